"""ONNX Runtime lowering: the exported, fused graph runs in onnxruntime and matches eager PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgepipe.config import host_cpu_features, load_target
from edgepipe.data import encode, load_tokenizer
from edgepipe.errors import BuildError, ConfigError
from edgepipe.runtimes import onnxruntime as ort_rt
from edgepipe.stages.validate import compare, embed_torch
from tests.conftest import tiny_encoder


@pytest.fixture(scope="module")
def batch(teacher_dir, sentences):
    return encode(load_tokenizer(teacher_dir / "tokenizer.json", 64), sentences[:12])


def _lower_and_run(tmp_path, model, batch, precision):
    lowered = ort_rt.lower_encoder(model, batch, load_target("host-cpu"), precision, tmp_path)
    out = ort_rt.load(lowered.files["model"]).run(batch)["sentence_embedding"]
    return lowered, out, embed_torch(model, [batch])


def test_lower_encoder_fp32_matches_eager_and_fuses_attention(tmp_path, batch):
    lowered, out, ref = _lower_and_run(tmp_path, tiny_encoder(), batch, "fp32")
    np.testing.assert_allclose(out, ref, atol=1e-4)
    fused = lowered.report["fused_ops"]
    assert fused.get("Attention") == 2 and fused.get("SkipLayerNormalization") == 4


def test_lower_encoder_keeps_dynamic_batch_and_seq(tmp_path, batch):
    lowered, _, _ = _lower_and_run(tmp_path, tiny_encoder(), batch, "fp32")
    session = ort_rt.load(lowered.files["model"])
    small = {k: v[:3, :5] for k, v in batch.items()}
    out = session.run(small)["sentence_embedding"]
    assert out.shape == (3, 64)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("precision, min_cos", [("fp16", 0.999), ("int8-dynamic", 0.97)])
def test_lower_encoder_quantized_stays_close(tmp_path, batch, precision, min_cos):
    lowered, out, ref = _lower_and_run(tmp_path, tiny_encoder(), batch, precision)
    assert compare(out, ref)["min_cosine"] >= min_cos
    if precision == "int8-dynamic":
        assert any(op in lowered.report["ops"] for op in ("DynamicQuantizeMatMul", "MatMulInteger", "QAttention"))


def test_lower_encoder_rejects_unknown_precision(tmp_path, batch):
    with pytest.raises(BuildError, match="cannot lower precision 'int4'"):
        ort_rt.lower_encoder(tiny_encoder(), batch, load_target("host-cpu"), "int4", tmp_path)


def _declaring(name: str, features: list[str]):
    target = load_target(name)
    return dataclasses.replace(
        target, runtime_options=dataclasses.replace(target.runtime_options, cpu_features=features)
    )


def _int8_weight_range(path) -> int:
    """The largest |value| among the graph's int8 weight initializers."""
    model = onnx.load(str(path))
    ints = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert ints, "no int8 weights in the graph"
    return max(int(np.abs(w.astype(np.int32)).max()) for w in ints)


def test_int8_choices_follow_the_targets_declared_cpu_features_not_this_machine(tmp_path, batch):
    # x86-64-cpu declares no VNNI: 7-bit weights (reduce_range), whatever CPU builds it
    safe = ort_rt.lower_encoder(tiny_encoder(), batch, load_target("x86-64-cpu"), "int8-dynamic", tmp_path / "a")
    assert safe.report["reduce_range"] is True and safe.report["int8_kernels"]["cpu_features"] == []
    assert _int8_weight_range(safe.files["model"]) <= 64
    # a target that declares VNNI gets full-range int8 weights even on this machine, which may have none
    vnni = _declaring("x86-64-cpu", ["avx512_vnni"])
    fast = ort_rt.lower_encoder(tiny_encoder(), batch, vnni, "int8-dynamic", tmp_path / "b")
    assert fast.report["reduce_range"] is False and fast.report["int8_kernels"]["vnni"] is True
    assert _int8_weight_range(fast.files["model"]) > 100
    host_vnni = any(f in host_cpu_features() for f in ("avx512_vnni", "avx_vnni"))
    assert ("validated_here" in fast.report["int8_kernels"]) is (not host_vnni)  # the host says what it could check
    # static plans: u8 x s8 only where the target declares VNNI
    assert ort_rt.ort_qdq_flavor(load_target("x86-64-cpu")).weight_type == "uint8"
    assert ort_rt.ort_qdq_flavor(vnni).weight_type == "int8"


def test_host_cpu_declares_this_machines_features_and_bad_names_are_refused(tmp_path):
    assert load_target("host-cpu").cpu_features == host_cpu_features()
    assert load_target("x86-64-cpu").cpu_features == ()
    bad = tmp_path / "t.toml"
    bad.write_text(
        'description = "x"\nruntime = "onnxruntime"\nprecision = "fp32"\n[onnxruntime]\ncpu_features = ["vnni"]\n'
    )
    with pytest.raises(ConfigError, match=r"cpu_features \['vnni'\] are not known; accepted: host, avx2"):
        load_target(str(bad))
