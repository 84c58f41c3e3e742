"""ONNX Runtime lowering: the exported, fused graph runs in onnxruntime and matches eager PyTorch."""

from __future__ import annotations

import numpy as np
import pytest

from edgepipe.config import load_target
from edgepipe.data import encode, load_tokenizer
from edgepipe.errors import BuildError
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
