"""The Python API: ``edgepipe.build(...) -> Bundle`` and ``edgepipe.load(bundle).encode(texts)`` in the bundle's real
runtime, compared with the PyTorch model it was built from on real held-back text."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edgepipe
from edgepipe.config import overrides_from
from edgepipe.data import batches, load_tokenizer
from edgepipe.errors import BuildError, BundleError, UsageError
from edgepipe.models.hf import load_encoder
from edgepipe.stages.validate import cosines, embed_torch

FAST = {"validate": {"samples": 48, "max_len": 64}}


def _reference(checkpoint, sentences: list[str], max_len: int) -> np.ndarray:
    """The checkpoint's sentence embeddings in eager PyTorch, tokenized as the bundle tokenizes."""
    tok = load_tokenizer(checkpoint / "tokenizer.json", max_len)
    return embed_torch(load_encoder(checkpoint), batches(tok, sentences, 16))


def test_import_edgepipe_loads_no_torch_and_no_runtime():
    code = (
        "import sys, edgepipe; b, l = edgepipe.build, edgepipe.load; "
        "print(callable(b), callable(l), sorted(m for m in ('torch', 'onnxruntime', 'executorch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "True", "[]"]


def test_keywords_become_set_overrides():
    sets = {"distill__steps": 200, "validate": {"samples": 64, "data": "validation.txt"}, "student.layers": [0, 2]}
    assert overrides_from(sets) == (
        "distill.steps=200",
        "validate.samples=64",
        'validate.data="validation.txt"',
        "student.layers=[0, 2]",
    )


def test_build_returns_the_bundle_and_load_encodes_like_pytorch(tmp_path, tiny_checkpoint, sentences):
    bundle = edgepipe.build(model=tiny_checkpoint, target="host-cpu", precision="fp32", out=tmp_path, **FAST)
    assert bundle.path == tmp_path / tiny_checkpoint.name / "host-cpu"
    assert bundle.manifest == json.loads((bundle.path / "manifest.json").read_text())
    assert bundle.fidelity["lowered"]["mean_cosine"] > 0.9999 and bundle.fidelity["meets_bar"] is True

    model = edgepipe.load(bundle.path)
    texts = sentences[:20]
    out = model.encode(texts, batch_size=8)
    ref = _reference(tiny_checkpoint, texts, 64)
    assert out.shape == ref.shape == (20, 64) and out.dtype == np.float32
    assert cosines(out, ref).min() > 0.9999 and np.abs(out - ref).max() < 1e-4
    one = model.encode(texts[3])
    assert one.shape == (64,) and np.allclose(one, out[3], atol=1e-5)
    assert model.encode([]).shape == (0, 64)
    with pytest.raises(UsageError, match="encode takes strings; got int"):
        model.encode(["a sentence", 3])
    with pytest.raises(UsageError, match="generate runs edgepipe's decoder bundles"):
        model.generate("The kernel")


def test_openvino_bundle_encodes_in_openvino(tmp_path, tiny_checkpoint, sentences):
    pytest.importorskip("openvino")
    bundle = edgepipe.build(model=tiny_checkpoint, target="intel-cpu", precision="fp32", out=tmp_path, **FAST)
    assert bundle.manifest["runtime"] == "openvino"
    out, ref = edgepipe.load(bundle.path).encode(sentences[:12]), _reference(tiny_checkpoint, sentences[:12], 64)
    assert cosines(out, ref).min() > 0.9999 and np.abs(out - ref).max() < 1e-4


@pytest.mark.slow  # ~70 s of CPU (the exporter's import and an XNNPACK lowering); .ci/run runs it
def test_executorch_bundle_encodes_in_the_executorch_runtime(tmp_path, tiny_checkpoint, sentences):
    """The default run covers ExecuTorch sessions (tests/runtimes/test_executorch.py) and encode (onnxruntime above)."""
    pytest.importorskip("executorch.exir")
    bundle = edgepipe.build(model=tiny_checkpoint, target="android-arm64", precision="fp32", out=tmp_path, **FAST)
    model = edgepipe.load(bundle.path)
    assert bundle.manifest["graphs"]["model"].endswith(".pte")
    out, ref = model.encode(sentences[:12]), _reference(tiny_checkpoint, sentences[:12], 64)
    assert cosines(out, ref).min() > 0.9999 and np.abs(out - ref).max() < 1e-4


def test_strict_build_below_the_bar_raises_and_writes_no_bundle(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "tiny-student.toml"  # 4 steps of distillation: far below the recipe's bar of 0.99
    recipe.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n'
        "[distill]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\n"
    )
    loose = edgepipe.build(model=recipe, precision="fp32", out=tmp_path / "loose", **FAST)
    assert loose.fidelity["meets_bar"] is False  # the default: shipped, with a warning
    with pytest.raises(BuildError, match=r"below the recipe's bar 0.99 \(validate.min_cosine, strict\)"):
        edgepipe.build(model=recipe, precision="fp32", out=tmp_path / "strict", strict=True, **FAST)
    assert not (tmp_path / "strict" / "tiny-student").exists()
    with pytest.raises(BuildError, match="strict"):  # the recipe key does the same
        edgepipe.build(model=recipe, precision="fp32", out=tmp_path / "strict", validate__strict=True, **FAST)


def test_load_refuses_a_tampered_bundle(tmp_path, tiny_checkpoint):
    bundle = edgepipe.build(model=tiny_checkpoint, precision="fp32", out=tmp_path, **FAST)
    (bundle.path / "tokenizer.json").write_text("{}")
    with pytest.raises(BundleError, match="does not match its manifest: tokenizer.json"):
        edgepipe.load(bundle.path)
