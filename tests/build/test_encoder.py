"""End to end: a checkpoint becomes a validated bundle; re-runs hit the cache; failures leave no half bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgepipe.build import build
from edgepipe.bundle import check_bundle, open_bundle, text_fidelity
from edgepipe.cli import cli
from edgepipe.config import TARGETS_DIR, resolve_data_file, resolve_run_config
from edgepipe.errors import BuildError, BundleError, ModelError, UsageError

FAST = ("validate.samples=48", "validate.max_len=64")


def _build(ckpt, out, *overrides, precision="fp32", **kw):
    cfg = resolve_run_config(str(ckpt), "host-cpu", precision, out, FAST + overrides)
    return build(cfg, **kw)


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


def _tiny_student(tmp_path, tiny_checkpoint, precision="fp32", student=""):
    recipe = tmp_path / "tiny-student.toml"
    recipe.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n{student}'
        "[distill]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\n"
    )
    return build(resolve_run_config(str(recipe), "host-cpu", precision, tmp_path / "out", FAST))


def test_build_distills_a_student_and_records_each_stage_fidelity(tmp_path, tiny_checkpoint):
    bundle = _tiny_student(tmp_path, tiny_checkpoint)
    stages = [r["stage"] for r in bundle.manifest["stages"]]
    assert stages == ["reference", "distill", "lower", "validate", "latency"]
    fid = bundle.manifest["fidelity"]
    assert list(fid)[:4] == ["teacher", "initialised", "student", "lowered"]  # the chain, in order
    assert 0 < fid["initialised"]["mean_cosine"] <= 1 and 0 < fid["student"]["mean_cosine"] <= 1
    # the lowered fp32 artifact reproduces the PyTorch student, so its fidelity vs the teacher is the student's
    assert abs(fid["lowered"]["mean_cosine"] - fid["student"]["mean_cosine"]) < 1e-4
    assert check_bundle(bundle.path).passed


@pytest.mark.parametrize("precision", ["fp32", "int8-dynamic"])
def test_narrow_student_lowers_to_onnxruntime_with_its_projection(tmp_path, tiny_checkpoint, precision):
    bundle = _tiny_student(tmp_path, tiny_checkpoint, precision, student="hidden = 42\n")
    distill, lower = bundle.manifest["stages"][1:3]
    assert distill["config"]["student"]["hidden"] == 42
    assert lower["metrics"]["report"]["fused_ops"]["Attention"] == 2  # ORT fuses attention 64 wide on a 42-wide stream
    fid = bundle.manifest["fidelity"]
    budget = 1e-4 if precision == "fp32" else 0.05  # fp32 reproduces the PyTorch student; int8 stays near it
    assert abs(fid["lowered"]["mean_cosine"] - fid["student"]["mean_cosine"]) < budget
    assert check_bundle(bundle.path).passed


def test_failed_build_leaves_no_half_bundle(tmp_path, tiny_checkpoint, monkeypatch):
    """The failure comes while the bundle is being written: its folder exists and holds the model, the tokenizer
    and check.npz, and the manifest cannot be written (a full disk)."""
    import edgepipe.build.driver as driver

    staged = []

    def disk_full(folder, manifest):
        staged.append(sorted(p.name for p in folder.iterdir()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(driver, "write_manifest", disk_full)
    with pytest.raises(BuildError, match="No space left writing bundle host-cpu .*nothing half-written was kept"):
        _build(tiny_checkpoint, tmp_path / "out")
    assert staged == [["check.npz", "model.onnx", "tokenizer.json"]]  # the bundle's folder was there, half full
    model_dir = tmp_path / "out" / tiny_checkpoint.name
    assert not model_dir.exists()  # no bundle, no temporary folder, not even the model folder this build made


def test_a_build_over_its_fidelity_budget_falls_back_through_the_recipe(tmp_path, tiny_checkpoint):
    """int8-dynamic loses some cosine on the tiny encoder; with a budget of 0 the loop falls back to fp32."""
    bundle = _build(tiny_checkpoint, tmp_path / "out", "quantize.fidelity_budget=0", precision="int8-dynamic")
    m = bundle.manifest
    assert m["requested_precision"] == "int8-dynamic" and m["precision"] == "fp32"
    assert [r["stage"] for r in m["stages"]] == ["reference", "lower", "validate", "lower", "validate", "latency"]
    tried = m["stages"][2]
    drop = 1 - tried["metrics"]["vs_pytorch"]["mean_cosine"]
    assert drop > 0 and tried["decision"] == f"int8-dynamic dropped {drop:.4f} > budget 0.0: fall back to fp32"
    assert m["fidelity"]["lowered_vs_pytorch"]["mean_cosine"] > 0.9999  # what ships is the fp32 graph
    assert check_bundle(bundle.path).passed


def test_a_build_over_its_budget_with_no_fallback_plan_fails_in_one_line(tmp_path, tiny_checkpoint):
    target = tmp_path / "int8-only.toml"
    target.write_text(
        (TARGETS_DIR / "x86-64-cpu.toml").read_text().replace('precisions = ["fp32", "fp16", ', "precisions = [")
    )
    cfg = resolve_run_config(
        str(tiny_checkpoint), str(target), "int8-dynamic", tmp_path / "out", FAST + ("quantize.fidelity_budget=0",)
    )
    with pytest.raises(
        BuildError,
        match=r"Precision int8-dynamic loses 0\.\d{4} mean cosine .* no fallback plan on "
        r"target int8-only\.",
    ) as info:
        build(cfg)
    assert "quantize.fidelity_budget" in info.value.hint
    assert not (tmp_path / "out" / tiny_checkpoint.name).exists()


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
    with pytest.raises(BundleError, match=r"check.npz \((sha256 mismatch|size)"):
        check_bundle(bundle.path)


def test_text_fidelity_measures_a_bundle_against_its_teacher_on_any_text(tmp_path, tiny_checkpoint):
    bundle = _tiny_student(tmp_path, tiny_checkpoint, precision="int8-dynamic")
    # on the build's own held-back lines it reproduces the build's figures, the bundle run in onnxruntime here
    held = text_fidelity(bundle.path, resolve_data_file("validation.txt"), samples=48)
    recorded = bundle.manifest["fidelity"]["lowered"]
    assert held.result["n"] == 48 and held.teacher == tiny_checkpoint
    assert abs(held.result["mean_cosine"] - recorded["mean_cosine"]) < 1e-5
    assert abs(held.result["min_cosine"] - recorded["min_cosine"]) < 1e-5
    # other text gives its own figures; the lowest lines are that text's, lowest first
    lines = resolve_data_file("calibration.txt").read_text().splitlines()[:20]
    text = tmp_path / "mine.txt"
    text.write_text("\n\n".join(lines))  # blank lines are skipped
    mine = text_fidelity(bundle.path, text, worst=3)
    assert mine.result["n"] == 20 and mine.result["mean_cosine"] != held.result["mean_cosine"]
    assert [line for _, line in mine.worst] and all(line in lines for _, line in mine.worst)
    cos = [c for c, _ in mine.worst]
    assert cos == sorted(cos) and cos[0] == pytest.approx(mine.result["min_cosine"], abs=1e-5)


def test_text_fidelity_rejects_bad_text_and_a_different_teacher(tmp_path, tiny_checkpoint, teacher_dir):
    bundle = _build(tiny_checkpoint, tmp_path / "out")
    binary = tmp_path / "latin1.txt"
    binary.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(UsageError, match="Cannot read --text .*UnicodeDecodeError"):
        text_fidelity(bundle.path, binary)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(UsageError, match="no non-empty lines"):
        text_fidelity(bundle.path, blank)
    with pytest.raises(ModelError, match="is not the checkpoint bundle .* was built from"):
        text_fidelity(bundle.path, resolve_data_file("validation.txt"), samples=4, teacher=teacher_dir)


SELECTING = """
description = "this CPU: the fastest candidate that validates"
runtime = "onnxruntime"
precision = "int8-dynamic"
precisions = ["fp32", "int8-dynamic"]
candidates = ["onnxruntime:fp32", "onnxruntime:int8-dynamic", "tensorrt:fp16"]
[hardware]
arch = "x86_64"
[onnxruntime]
fuse = true
"""


def test_a_target_with_candidates_ships_the_fastest_that_validates(tmp_path, tiny_checkpoint):
    target = tmp_path / "selecting.toml"
    target.write_text(SELECTING)
    cfg = resolve_run_config(str(tiny_checkpoint), str(target), None, tmp_path / "out", FAST)
    assert cfg.select_runtime
    bundle = build(cfg)
    sel = bundle.manifest["selection"]
    rows = {r["candidate"]: r for r in sel["candidates"]}
    assert set(rows) == {"onnxruntime:fp32", "onnxruntime:int8-dynamic", "tensorrt:fp16"}
    assert rows["tensorrt:fp16"]["left_out"] == "not measurable on this machine"  # its latency says nothing here
    measured = {c: r["p50_ms"] for c, r in rows.items() if "left_out" not in r}
    assert set(measured) == {"onnxruntime:fp32", "onnxruntime:int8-dynamic"}
    assert sel["winner"] == min(measured, key=measured.get)  # the fastest of those inside the budget
    runtime, precision = sel["winner"].split(":")
    assert bundle.manifest["runtime"] == runtime and bundle.manifest["precision"] == precision
    assert bundle.manifest["target"]["runtime"] == runtime and bundle.manifest["target"]["candidates"] == []
    assert check_bundle(bundle.path).passed  # the bundle runs as the winner's runtime


def test_no_candidate_inside_the_budget_is_one_line(tmp_path, tiny_checkpoint):
    target = tmp_path / "selecting.toml"
    target.write_text(SELECTING.replace('"onnxruntime:fp32", ', ""))
    cfg = resolve_run_config(
        str(tiny_checkpoint), str(target), None, tmp_path / "out", FAST + ("quantize.fidelity_budget=0",)
    )
    with pytest.raises(BuildError, match=r"No candidate of target selecting validated .*int8-dynamic: drop"):
        build(cfg)
    assert not (tmp_path / "out" / tiny_checkpoint.name).exists()


def test_explicit_precision_builds_the_targets_own_runtime(tmp_path):
    target = tmp_path / "selecting.toml"
    target.write_text(SELECTING)
    assert not resolve_run_config("minilm-teacher", str(target), "fp32", tmp_path / "out").select_runtime


def test_int8_choices_follow_the_target_and_are_in_the_cache_key_and_manifest(tmp_path, tiny_checkpoint):
    vnni = tmp_path / "x86-64-vnni.toml"
    generic = (TARGETS_DIR / "x86-64-cpu.toml").read_text()
    vnni.write_text(generic.replace("cpu_features = []", 'cpu_features = ["avx512_vnni"]'))
    manifests = {}
    for target in ("x86-64-cpu", str(vnni)):
        cfg = resolve_run_config(str(tiny_checkpoint), target, "int8-dynamic", tmp_path / "out", FAST)
        manifests[cfg.target.name] = build(cfg).manifest
    safe, fast = manifests["x86-64-cpu"], manifests["x86-64-vnni"]
    lower = {name: next(r for r in m["stages"] if r["stage"] == "lower") for name, m in manifests.items()}
    assert lower["x86-64-cpu"]["cache_key"] != lower["x86-64-vnni"]["cache_key"]  # same model, other target CPU
    assert safe["lowering"]["int8_kernels"]["cpu_features"] == [] and safe["lowering"]["reduce_range"] is True
    assert fast["lowering"]["int8_kernels"]["cpu_features"] == ["avx512_vnni"]
    assert fast["lowering"]["reduce_range"] is False
    assert fast["target"]["runtime_options"]["cpu_features"] == ["avx512_vnni"]  # what the target declared


UNRUNNABLE = """
description = "an ORT GPU target: lowered here, run only where CUDA is"
runtime = "onnxruntime"
precision = "fp16"
precisions = ["fp32", "fp16"]
[hardware]
arch = "x86_64"
[onnxruntime]
providers = ["CUDAExecutionProvider"]
"""


def test_a_bundle_that_cannot_run_here_claims_no_fidelity(tmp_path, tiny_checkpoint):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine runs CUDA graphs: the bundle would be validated")
    target = tmp_path / "ort-gpu.toml"
    target.write_text(UNRUNNABLE)
    bundle = build(resolve_run_config(str(tiny_checkpoint), str(target), "fp16", tmp_path / "out", FAST))
    m = bundle.manifest
    assert m["validation"]["held_out"]["runtime"] == "not run here"
    assert m["validation"]["held_out"]["vs_teacher"] is None and m["fidelity"]["lowered_vs_pytorch"] is None
    # not the PyTorch model's fp32 cosine dressed up as the fp16 bundle's
    assert m["fidelity"]["lowered"] == {"not_validated": "not validated here: CUDAExecutionProvider not available here"}
    assert m["fidelity"]["meets_bar"] is None
    shown = CliRunner().invoke(cli, ["inspect", str(bundle.path)], terminal_width=200)
    rows = [" ".join(line.replace("│", " ").split()) for line in shown.output.splitlines()]
    assert shown.exit_code == 0 and "lowered not validated here: CUDAExecutionProvider not available here" in rows
