"""``edgepipe.bundle`` on bundles that are not what a command needs."""

from __future__ import annotations

import pytest

from edgepipe.bundle import generate
from edgepipe.errors import UsageError
from edgepipe.manifest import write_manifest


def _bundle(tmp_path, kind: str, graphs: dict) -> object:
    path = tmp_path / "bundle"
    path.mkdir()
    (path / "model.onnx").write_bytes(b"graph")
    target = {"name": "host-cpu", "runtime": "onnxruntime"}
    manifest = {"model": "gpt2", "kind": kind, "runtime": "onnxruntime", "precision": "fp32", "target": target}
    write_manifest(path, {**manifest, "graphs": graphs})
    return path


def test_generate_refuses_an_optimum_text_generation_export_in_one_line(tmp_path):
    bundle = _bundle(tmp_path, "decoder", {"model": "model.onnx"})  # Optimum's kind: a decoder model, one graph
    with pytest.raises(UsageError, match=r"Optimum text-generation export .*prefill \+ decode graphs"):
        generate(bundle, "The kernel")


def test_generate_refuses_an_encoder_bundle(tmp_path):
    with pytest.raises(UsageError, match=r"holds the encoder gpt2; generate runs edgepipe's decoder bundles"):
        generate(_bundle(tmp_path, "encoder", {"model": "model.onnx"}), "The kernel")
