"""TensorRT lowering: explicit Q/DQ ONNX that passes TensorRT's fusion rules, runs in the onnxruntime proxy within the
fidelity budget, and ships with a build plan and build_engine.py. Engine tests need TensorRT and a GPU (-m gpu)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from edgepipe.build import build
from edgepipe.bundle import check_bundle
from edgepipe.config import QuantizeConfig, load_target, resolve_run_config
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError
from edgepipe.runtimes import QuantInputs, build_engine
from edgepipe.runtimes import tensorrt as trt_rt
from edgepipe.stages.validate import compare, embed_torch
from tests.conftest import tiny_encoder

NO_TENSORRT = trt_rt.tensorrt_here()


@pytest.fixture(scope="module")
def data(teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 64)
    return {
        "held": list(batches(tok, read_sentences("validation.txt", 64), 32)),
        "calib": list(batches(tok, read_sentences("calibration.txt", 64), 32)),
        "example": encode(tok, read_sentences("validation.txt", 2)),
    }


@pytest.fixture(scope="module")
def lowered(tmp_path_factory, data):
    model = tiny_encoder()
    ref = embed_torch(model, data["held"])
    quant = QuantInputs(data["calib"], data["held"], ref, QuantizeConfig())
    out = tmp_path_factory.mktemp("trt")
    result = trt_rt.lower_encoder(model, data["example"], _no_lint(load_target("jetson-orin-nano")), "w8a8", out, quant)
    return result, ref


def _no_lint(target):
    """The target without polygraphy's node-by-node lint (~10 s here), which has a test of its own."""
    return dataclasses.replace(
        target, runtime_options=dataclasses.replace(target.runtime_options, polygraphy_lint=False)
    )


@pytest.fixture
def graph(lowered):
    return onnx.load(str(lowered[0].files["model"]))


def test_lower_writes_qdq_onnx_build_plan_and_script(lowered):
    result, _ = lowered
    assert set(result.files) == {"model", "build_plan", "build_engine"}
    assert [p.name for p in result.files.values()] == ["model.onnx", "build_plan.json", "build_engine.py"]
    plan = json.loads(result.files["build_plan"].read_text())
    assert plan["flags"] == {"int8": True, "fp16": True, "tf32": True}
    assert plan["profiles"][0]["input_ids"] == {"min": [1, 1], "opt": [1, 128], "max": [8, 512]}
    assert plan["workspace_mb"] == 1024 and len(plan["int8_layers"]) == 12
    checks = result.report["tensorrt_checks"]
    assert checks["rules"] == "passed" and checks["qdq_pairs"] == 2 * 12  # one activation and one weight pair per GEMM
    assert checks["polygraphy_lint"].startswith("skipped")
    if NO_TENSORRT:
        assert result.report["engine"].startswith("not built here")


def test_graph_has_only_standard_ops_and_symmetric_int8_qdq_on_gemms(graph):
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}
    inits = {i.name: i for i in graph.graph.initializer}
    consumers = {}
    for node in graph.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node.op_type)
    for node in graph.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = inits[node.input[2]]
            assert zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()
        if node.op_type == "DequantizeLinear":
            assert consumers[node.output[0]] == ["MatMul"]
    assert trt_rt.check_graph(graph) == []


def test_proxy_runs_the_qdq_graph_within_budget_with_full_int8_coverage(lowered, data):
    result, ref = lowered
    ok, why = trt_rt.can_run_here(load_target("jetson"))
    assert ok and why == (trt_rt.PROXY if NO_TENSORRT else "TensorRT engine on this GPU")
    session = trt_rt.load(result.files["model"])
    out = np.concatenate([session.run(b)["sentence_embedding"] for b in data["held"]])
    fid = compare(out, ref)
    assert 1 - fid["mean_cosine"] <= 0.01 and fid["min_cosine"] > 0.99
    assert result.report["int8_coverage"]["total"] == 1.0
    assert result.report["calibration"]["samples"] == 64 and result.report["calibration"]["method"] == "minmax"
    assert not trt_rt.same_machine(load_target("jetson"))


# ------------------------------------------------------------------ the rule checker rejects broken placements
def _node(g, name):
    return next(n for n in g.graph.node if n.name == name)


def _producer(g, tensor):
    return next(n for n in g.graph.node if tensor in n.output)


def _init(g, name):
    return next(i for i in g.graph.initializer if i.name == name)


def _act_dq(g, gemm):
    return _producer(g, _node(g, gemm).input[0])


def _set_init(g, name, array):
    _init(g, name).CopyFrom(numpy_helper.from_array(array, name))


def break_domain(g):
    node = next(n for n in g.graph.node if n.op_type == "Erf")
    node.domain = "com.microsoft"
    return node.name


def break_unsupported(g):
    g.graph.node.append(helper.make_node("NonZero", ["attention_mask"], ["nz"], name="nonzero"))
    return "nonzero"


def break_opset(g):
    next(o for o in g.opset_import if o.domain in ("", "ai.onnx")).version = 9
    return "graph"


def break_uint8(g):
    q = _producer(g, _act_dq(g, "/layers.0/ffn_in/MatMul").input[0])
    _set_init(g, q.input[2], np.array(0, np.uint8))
    return q.name


def break_zero_point(g):
    q = _producer(g, _act_dq(g, "/layers.0/ffn_in/MatMul").input[0])
    _set_init(g, q.input[2], np.array(3, np.int8))
    return q.name


def break_per_channel(g):
    dq = _producer(g, _node(g, "/layers.1/ffn_out/MatMul").input[1])
    _set_init(g, dq.input[1], np.array(0.01, np.float32))
    return dq.name


def break_dq_consumer(g):
    _node(g, "/layers.0/ffn_out/MatMul").op_type = "Add"
    return _act_dq(g, "/layers.0/ffn_out/MatMul").name


def break_shared_pair(g):
    dq = _act_dq(g, "/layers.0/mixer/query/MatMul")
    _node(g, "/layers.0/mixer/key/MatMul").input[0] = dq.output[0]
    return dq.name


def break_pair_params(g):
    dq = _act_dq(g, "/layers.0/mixer/out/MatMul")
    dq.input[1] = _act_dq(g, "/layers.0/ffn_in/MatMul").input[1]
    return dq.name


def break_one_operand(g):
    node = _node(g, "/layers.1/ffn_in/MatMul")
    node.input[0] = _producer(g, _producer(g, node.input[0]).input[0]).input[0]
    return node.name


def break_bias(g):
    bias = numpy_helper.from_array(np.zeros(64, np.int32), "bias_q")
    scale = numpy_helper.from_array(np.array(1e-4, np.float32), "bias_scale")
    zp = numpy_helper.from_array(np.array(0, np.int32), "bias_zp")
    g.graph.initializer.extend([bias, scale, zp])
    dq = helper.make_node("DequantizeLinear", ["bias_q", "bias_scale", "bias_zp"], ["b"], name="bias_dq")
    g.graph.node.append(dq)
    return "bias_dq"


@pytest.mark.parametrize(
    "breaker, rule",
    [
        (break_domain, "standard-domain"),
        (break_unsupported, "unsupported-op"),
        (break_opset, "opset"),
        (break_uint8, "int8-only"),
        (break_zero_point, "zero-point"),
        (break_per_channel, "per-channel-weights"),
        (break_dq_consumer, "dq-feeds-gemm"),
        (break_shared_pair, "dedicated-pair"),
        (break_pair_params, "pair-params"),
        (break_one_operand, "both-operands"),
        (break_bias, "int8-only"),
    ],
    ids=lambda x: x if isinstance(x, str) else x.__name__,
)
def test_check_graph_rejects_each_placement_tensorrt_cannot_fuse(graph, breaker, rule):
    node = breaker(graph)
    found = [v for v in trt_rt.check_graph(graph) if v.rule == rule and v.node == node]
    assert found, f"{rule} not reported for {node}: {[str(v) for v in trt_rt.check_graph(graph)]}"
    line = str(found[0])
    assert line.startswith(f"{node} (") and f": {rule}: " in line and "\n" not in line


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("polygraphy"), reason='needs polygraphy: pip install ".[tensorrt]"')
def test_polygraphy_lint_passes_the_produced_graph_and_flags_a_broken_one(lowered, tmp_path):
    path = lowered[0].files["model"]
    assert trt_rt.polygraphy_lint(path).startswith("passed")
    broken = onnx.load(str(path))
    next(n for n in broken.graph.node if n.op_type == "Softmax").op_type = "NoSuchOp"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    assert "problem" in trt_rt.polygraphy_lint(tmp_path / "broken.onnx")


def test_build_plan_sets_flags_per_precision_and_rejects_bad_profiles():
    target = load_target("nvidia-gpu")
    assert trt_rt.build_plan(target, "fp16", 512, {})["flags"] == {"int8": False, "fp16": True, "tf32": True}
    assert trt_rt.build_plan(target, "fp32", 512, {})["flags"] == {"int8": False, "fp16": False, "tf32": False}
    plan = trt_rt.build_plan(target, "int8-fp16", 256, {})
    assert plan["profiles"][0]["attention_mask"] == {"min": [1, 1], "opt": [8, 128], "max": [64, 256]}
    bad = dataclasses.replace(target, runtime_options=dataclasses.replace(target.runtime_options, seq=[128, 1, 512]))
    with pytest.raises(BuildError, match=r"\[tensorrt\].seq = \[128, 1, 512\] must satisfy min <= opt <= max"):
        trt_rt.build_plan(bad, "fp16", 512, {})


def test_lower_rejects_int8_dynamic(tmp_path, data):
    with pytest.raises(BuildError, match="tensorrt cannot lower precision 'int8-dynamic'; it lowers fp32, fp16"):
        trt_rt.lower_encoder(tiny_encoder(), data["example"], load_target("jetson"), "int8-dynamic", tmp_path)


@pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here: the script builds instead of failing")
def test_build_engine_script_names_the_missing_tensorrt(lowered):
    bundle = lowered[0].files["model"].parent
    run = subprocess.run([sys.executable, str(bundle / "build_engine.py")], capture_output=True, text=True)
    assert run.returncode == build_engine.EXIT_MISSING
    assert "TensorRT's Python package is not importable" in run.stderr
    assert json.loads(run.stdout)["error"].startswith("TensorRT")


def test_build_engine_rejects_a_foreign_plan(tmp_path):
    (tmp_path / "build_plan.json").write_text(json.dumps({"schema": "other/1"}))
    assert build_engine.main([str(tmp_path), "--no-check"]) == build_engine.EXIT_USAGE
    with pytest.raises(build_engine.BuildFailure, match="this script reads edgepipe.trt_build_plan/1"):
        build_engine.load_plan(tmp_path)


# ---------------------------------------------------------------------------------------------- whole builds
FAST = ("validate.samples=48", "validate.max_len=64", "quantize.samples=64")


@pytest.mark.parametrize(
    "target, precision",
    [("jetson-orin-nano", "w8a8"), pytest.param("nvidia-gpu", "int8-fp16", marks=pytest.mark.slow)],
)
def test_build_for_tensorrt_target_writes_a_validated_bundle(tmp_path, tiny_checkpoint, target, precision):
    cfg = resolve_run_config(str(tiny_checkpoint), target, precision, tmp_path / "out", FAST)
    bundle = build(cfg)
    names = {p.name for p in bundle.path.iterdir()}
    assert {"model.onnx", "build_plan.json", "build_engine.py", "check.npz", "manifest.json"} <= names
    m = bundle.manifest
    assert m["runtime"] == "tensorrt" and m["precision"] == precision and m["graphs"]["model"] == "model.onnx"
    assert {"build_plan.json", "build_engine.py", "model.onnx"} <= set(m["files"])
    assert m["fidelity"]["lowered_vs_pytorch"]["mean_cosine"] >= 0.99
    validate = next(r for r in m["stages"] if r["stage"] == "validate")["metrics"]
    assert validate["runtime"] == "tensorrt"
    if NO_TENSORRT:
        assert validate["where"] == trt_rt.PROXY
    assert m["lowering"]["int8_coverage"]["total"] > 0.5 and m["lowering"]["calibration"]["samples"] == 64
    assert check_bundle(bundle.path).passed
    # build_engine.py's own check, fed by the proxy session, agrees with the build's tolerance
    plan = build_engine.load_plan(bundle.path)
    result = build_engine.check(bundle.path, plan, session=trt_rt.load(bundle.path / "model.onnx"))
    assert result["passed"] and result["tolerance"]["min_cosine"] == m["validation"]["min_cosine"]


# ------------------------------------------------------------------------------- the engine itself (-m gpu)
@pytest.mark.gpu
@pytest.mark.skipif(bool(NO_TENSORRT), reason=f"needs TensorRT and a GPU: {NO_TENSORRT}")
def test_engine_builds_and_matches_the_proxy(lowered, data):
    result, ref = lowered
    bundle = result.files["model"].parent
    plan = build_engine.load_plan(bundle)
    record = build_engine.build(bundle, plan)
    assert record["bytes"] > 0
    runner = build_engine.EngineRunner(bundle / plan["engine"])
    proxy = trt_rt.ProxySession(result.files["model"])
    engine_out = np.concatenate([runner.run(b)["sentence_embedding"] for b in data["held"]])
    proxy_out = np.concatenate([proxy.run(b)["sentence_embedding"] for b in data["held"]])
    assert compare(engine_out, proxy_out)["min_cosine"] > 0.99
    assert compare(engine_out, ref)["mean_cosine"] > 0.99
