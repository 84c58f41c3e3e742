"""Per-layer precision plans: weight GEMMs found in the graph, calibration on real text, the budget loop, and the
INT8 coverage read back from the lowered graph, all run in onnxruntime on a tiny seeded encoder."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from edgepipe.config import QuantizeConfig, load_target
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError, UsageError
from edgepipe.runtimes import QuantInputs
from edgepipe.runtimes import onnxruntime as ort_rt
from edgepipe.stages import calibrate as cal
from edgepipe.stages import quantize as q
from edgepipe.stages.validate import compare, embed_torch
from tests.conftest import tiny_encoder

LINEARS = ("mixer.query", "mixer.key", "mixer.value", "mixer.out", "ffn_in", "ffn_out")


def outlier_encoder():
    """The tiny encoder with one LayerNorm gain of 60 in layer 1: layers.1.ffn_in's input gets an outlier channel,
    so int8 activations hurt that layer far more than any other (its held-back drop is ~10x the next one)."""
    model = tiny_encoder()
    with torch.no_grad():
        model.layers[1].mixer_norm.weight[0] = 60.0
    return model


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return load_tokenizer(teacher_dir / "tokenizer.json", 64)


@pytest.fixture(scope="module")
def data(tok):
    held = list(batches(tok, read_sentences("validation.txt", 64), 32))
    calib = list(batches(tok, read_sentences("calibration.txt", 64), 32))
    return {"held": held, "calib": calib, "example": encode(tok, read_sentences("validation.txt", 2))}


def _lower(tmp_path, model, data, precision, **cfg):
    quant = QuantInputs(data["calib"], data["held"], embed_torch(model, data["held"]), QuantizeConfig(**cfg))
    lowered = ort_rt.lower_encoder(model, data["example"], load_target("host-cpu"), precision, tmp_path, quant)
    session = ort_rt.load(lowered.files["model"])
    out = np.concatenate([session.run(b)["sentence_embedding"] for b in data["held"]])
    return lowered, compare(out, quant.reference)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    inputs = tuple(torch.from_numpy(data["example"][k]) for k in ("input_ids", "attention_mask"))
    ort_rt.export_onnx(tiny_encoder(), inputs, path, ["input_ids", "attention_mask"], ["sentence_embedding"], {})
    return onnx.load(str(path))


def test_weight_gemms_finds_every_linear_and_no_attention_matmul(exported):
    gemms = q.weight_gemms(exported)
    assert [g.layer for g in gemms] == [f"layers.{i}.{name}" for i in range(2) for name in LINEARS]
    assert {(g.layer.split(".", 2)[2], g.k, g.n) for g in gemms if g.layer.startswith("layers.0")} == {
        ("mixer.query", 64, 64),
        ("mixer.key", 64, 64),
        ("mixer.value", 64, 64),
        ("mixer.out", 64, 64),
        ("ffn_in", 64, 128),
        ("ffn_out", 128, 64),
    }
    # QKᵀ, softmax·V and the pooling matmul multiply two activations: never planned
    matmuls = [n.name for n in exported.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 12 + 2 * 2 + 1


def test_layer_name_maps_exported_node_names():
    assert q.layer_name("/layers.3/mixer/query/MatMul") == "layers.3.mixer.query"
    assert q.layer_name("/layers.0/ffn_in/MatMul_quant") == "layers.0.ffn_in"
    assert q.layer_name("Attention_0") == "Attention_0"


def test_fit_budget_moves_most_sensitive_first_until_the_budget_holds():
    # an additive world: the drop of a plan is the sum of its int8 layers' own drops
    sens = {"a": 0.004, "b": 0.0001, "c": 0.02, "d": 0.001}
    fit = q.fit_budget(list(sens), sens, lambda int8: sum(sens[x] for x in int8), budget=0.005)
    assert fit.moved == ["c", "a"] and fit.int8 == {"b", "d"} and fit.drop == pytest.approx(0.0011)
    assert [s.get("moved") for s in fit.steps] == [None, "c", "a"]
    none = q.fit_budget(list(sens), sens, lambda int8: 1.0 if int8 else 0.0, budget=0.01)
    assert none.int8 == frozenset() and none.drop == 0.0 and none.moved == ["c", "a", "d", "b"]


def test_calibration_methods_map_to_ort_and_reject_unknown_names():
    from onnxruntime.quantization import CalibrationMethod

    assert cal.ort_method("percentile") == CalibrationMethod.Percentile
    assert cal.ort_method("entropy") == CalibrationMethod.Entropy
    assert cal.ort_calibration_options("percentile") == {"CalibPercentile": 99.999}
    with pytest.raises(UsageError, match="Unknown calibration method 'kl'. Accepted: minmax, percentile, entropy"):
        cal.ort_method("kl")


def test_calibration_reader_feeds_graph_inputs_and_rewinds(data):
    reader = cal.OrtCalibrationReader(data["calib"], ["input_ids", "attention_mask"])
    first = [reader.get_next() for _ in range(3)]
    assert first[2] is None and first[0]["input_ids"].shape == data["calib"][0]["input_ids"].shape
    reader.rewind()
    assert reader.get_next()["attention_mask"].dtype == np.int64 and len(reader) == 2
    spec = cal.describe(data["calib"], "entropy")
    assert spec.samples == 64 and spec.batches == 2
    assert spec.tokens == sum(int(b["attention_mask"].sum()) for b in data["calib"])


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory, data):
    return _lower(tmp_path_factory.mktemp("w8a8"), tiny_encoder(), data, "w8a8")


def test_w8a8_runs_every_weight_gemm_int8_within_budget(w8a8):
    lowered, fid = w8a8
    report = lowered.report
    assert 1 - fid["mean_cosine"] <= 0.01 and fid["min_cosine"] > 0.99
    assert report["int8_coverage"]["total"] == 1.0 and set(report["int8_coverage"]["layers"].values()) == {"int8"}
    assert all(lp["precision"] == "int8" for lp in report["plan"]) and len(report["plan"]) == 12
    assert report["calibration"]["method"] == "minmax" and report["calibration"]["samples"] == 64
    assert report["quantization"]["activations"] == "uint8"
    graph = onnx.load(str(lowered.files["model"]))
    # attention scores and values stay float: their MatMuls have no DequantizeLinear input
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    scores = [n for n in graph.graph.node if n.name in ("/layers.0/mixer/MatMul", "/layers.0/mixer/MatMul_1")]
    assert len(scores) == 2 and all(producers.get(i) != "DequantizeLinear" for n in scores for i in n.input)


def test_int8_fp16_moves_the_outlier_layer_first_to_hold_a_tight_budget(tmp_path, data):
    # all-int8 drops ~1.5e-4 on this model; without layers.1.ffn_in's int8 ~2e-5
    budget = 5e-5
    lowered, fid = _lower(tmp_path, outlier_encoder(), data, "int8-fp16", fidelity_budget=budget)
    steps = lowered.report["budget"]["steps"]
    assert steps[0]["drop"] > budget, "all-int8 no longer breaks the budget: the test lost its point"
    plan = {lp["layer"]: lp for lp in lowered.report["plan"]}
    assert max(plan.values(), key=lambda lp: lp["sensitivity"])["layer"] == "layers.1.ffn_in"
    assert steps[1]["moved"] == "/layers.1/ffn_in/MatMul"
    assert plan["layers.1.ffn_in"]["precision"] == "fp16" and plan["layers.1.ffn_in"]["runs_as"] == "fp32"
    assert plan["layers.1.ffn_in"]["why"].startswith("fp16: #1 most sensitive, drop ")
    assert "runs fp32" in plan["layers.1.ffn_in"]["why"]
    assert plan["layers.0.ffn_in"]["why"].startswith("int8: drop ")
    assert 1 - fid["mean_cosine"] <= budget and lowered.report["budget"]["drop"] <= budget
    # coverage read back from the graph matches the plan, weighted by FLOPs
    cov = lowered.report["int8_coverage"]
    flops = {name: lp["flops_per_token"] for name, lp in plan.items()}
    expected = sum(f for name, f in flops.items() if plan[name]["precision"] == "int8") / sum(flops.values())
    assert cov["total"] == pytest.approx(expected, abs=1e-4) and cov["layers"]["layers.1.ffn_in"] == "float"
    assert sum(lp["precision"] == "int8" for lp in plan.values()) == len(plan) - (len(steps) - 1)


def test_int8_coverage_reads_float_dynamic_and_broken_graphs(tmp_path, data, exported, w8a8):
    assert q.int8_coverage(exported)["total"] == 0.0
    dyn, _ = _lower(tmp_path, tiny_encoder(), data, "int8-dynamic")
    # the fused graph's QAttention (packed QKV) and DynamicQuantizeMatMul / MatMulInteger all count as int8
    assert q.int8_coverage(onnx.load(str(dyn.files["model"])))["total"] == 1.0
    graph = onnx.load(str(w8a8[0].files["model"]))
    # cut the activation Q/DQ of layers.0.ffn_in: the weight keeps its DQ, but the GEMM no longer runs int8
    node = next(n for n in graph.graph.node if n.name == "/layers.0/ffn_in/MatMul")
    dq = next(n for n in graph.graph.node if n.output[0] == node.input[0])
    q_node = next(n for n in graph.graph.node if n.output[0] == dq.input[0])
    node.input[0] = q_node.input[0]
    cov = q.int8_coverage(graph)
    assert cov["layers"]["layers.0.ffn_in"] == "float"
    assert cov["total"] == pytest.approx(1 - (2 * 64 * 128) / (2 * (4 * 2 * 64 * 64 + 2 * 2 * 64 * 128)), abs=1e-4)


def test_compose_of_no_layers_is_the_float_graph(exported, w8a8):
    qdq = onnx.load(str(w8a8[0].files["model"]))
    nothing = q.compose(exported, qdq, [])
    assert [n.op_type for n in nothing.graph.node] == [n.op_type for n in exported.graph.node]
    with pytest.raises(KeyError, match="not in both graphs"):
        q.compose(exported, qdq, ["/layers.9/ffn_in/MatMul"])


@pytest.mark.parametrize("method", ["percentile", pytest.param("entropy", marks=pytest.mark.slow)])
def test_histogram_calibration_methods_keep_fidelity(tmp_path, data, method):
    lowered, fid = _lower(tmp_path, tiny_encoder(), data, "w8a8", method=method)
    assert lowered.report["calibration"]["method"] == method
    assert 1 - fid["mean_cosine"] <= 0.01


def test_static_plan_without_calibration_data_is_a_build_error(tmp_path, data):
    with pytest.raises(BuildError, match="needs calibration and held-back data"):
        ort_rt.lower_encoder(tiny_encoder(), data["example"], load_target("host-cpu"), "int8-fp16", tmp_path)
