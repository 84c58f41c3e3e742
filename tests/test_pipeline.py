"""End to end: a checkpoint becomes a validated bundle; re-runs hit the cache; failures leave no half bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgepipe import pipeline
from edgepipe.bundle import check_bundle, open_bundle
from edgepipe.config import resolve_run_config
from edgepipe.errors import BundleError, UsageError

FAST = ("validate.samples=48", "validate.max_len=64")


def _build(ckpt, out, *overrides, precision="fp32", **kw):
    cfg = resolve_run_config(str(ckpt), "host-cpu", precision, out, FAST + overrides)
    return pipeline.build(cfg, **kw)


def test_build_writes_a_complete_verified_bundle(tmp_path, tiny_checkpoint):
    bundle = _build(tiny_checkpoint, tmp_path / "out")
    assert bundle.path == tmp_path / "out" / tiny_checkpoint.name / "host-cpu"
    assert {p.name for p in bundle.path.iterdir()} == {"model.onnx", "manifest.json", "tokenizer.json", "check.npz"}
    manifest = open_bundle(bundle.path)  # verifies every sha256
    assert set(manifest["files"]) == {"model.onnx", "tokenizer.json", "check.npz"}
    assert [r["stage"] for r in manifest["stages"]] == ["reference", "lower", "validate", "latency"]
    assert manifest["fidelity"]["lowered"]["mean_cosine"] > 0.9999
    report = check_bundle(bundle.path)
    assert report.passed and report.result["outputs"]["sentence_embedding"]["max_abs_error"] < 1e-4


def test_second_build_hits_the_cache_for_every_stage(tmp_path, tiny_checkpoint):
    _build(tiny_checkpoint, tmp_path / "out")
    again = _build(tiny_checkpoint, tmp_path / "out")
    assert all(r["cache_hit"] for r in again.manifest["stages"])
    forced = _build(tiny_checkpoint, tmp_path / "out", force=True)
    assert not any(r["cache_hit"] for r in forced.manifest["stages"])


def test_build_distills_a_student_and_records_each_stage_fidelity(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "tiny-student.toml"
    recipe.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n'
        "[distill]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\n"
    )
    cfg = resolve_run_config(str(recipe), "host-cpu", "fp32", tmp_path / "out", FAST)
    bundle = pipeline.build(cfg)
    stages = [r["stage"] for r in bundle.manifest["stages"]]
    assert stages == ["reference", "distill", "lower", "validate", "latency"]
    fid = bundle.manifest["fidelity"]
    assert list(fid)[:4] == ["teacher", "initialised", "student", "lowered"]  # the chain, in order
    assert 0 < fid["initialised"]["mean_cosine"] <= 1 and 0 < fid["student"]["mean_cosine"] <= 1
    # the lowered fp32 artifact reproduces the PyTorch student, so its fidelity vs the teacher is the student's
    assert abs(fid["lowered"]["mean_cosine"] - fid["student"]["mean_cosine"]) < 1e-4
    assert check_bundle(bundle.path).passed


def test_failed_build_leaves_no_half_bundle(tmp_path, tiny_checkpoint, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("lowering crashed")

    monkeypatch.setattr("edgepipe.runtimes.onnxruntime.lower_encoder", boom)
    with pytest.raises(RuntimeError):
        _build(tiny_checkpoint, tmp_path / "out")
    model_dir = tmp_path / "out" / tiny_checkpoint.name
    assert not (model_dir / "host-cpu").exists()
    assert not any(model_dir.glob(".*tmp*")) if model_dir.exists() else True


def test_rebuild_replaces_the_bundle_atomically(tmp_path, tiny_checkpoint):
    first = _build(tiny_checkpoint, tmp_path / "out")
    second = _build(tiny_checkpoint, tmp_path / "out", precision="int8-dynamic")
    assert second.path == first.path
    assert json.loads((second.path / "manifest.json").read_text())["precision"] == "int8-dynamic"
    assert [p.name for p in second.path.parent.iterdir()] == ["host-cpu"]


def test_build_refuses_an_unwritable_out(tmp_path, tiny_checkpoint):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UsageError, match="Cannot write to --out"):
        _build(tiny_checkpoint, blocker / "out")


def test_check_bundle_detects_a_corrupted_file(tmp_path, tiny_checkpoint):
    bundle = _build(tiny_checkpoint, tmp_path / "out")
    data = np.load(bundle.path / "check.npz")
    np.savez(bundle.path / "check.npz", **{k: data[k] + 1 for k in data.files})
    with pytest.raises(BundleError, match="check.npz: (sha256 mismatch|size)"):
        check_bundle(bundle.path)
