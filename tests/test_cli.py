"""The CLI end to end in a subprocess: real exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EDGEPIPE = [sys.executable, "-m", "edgepipe.cli"]
FAST = ["--set", "validate.samples=48", "--set", "validate.max_len=64"]
CALIBRATION = Path(__file__).resolve().parent.parent / "edgepipe" / "calibration_data" / "calibration.txt"


def run(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEPIPE, *args], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err


def test_every_command_has_help_with_an_example():
    for command in ("build", "distill", "targets", "models", "inspect", "check", "deploy", "bench", "compare"):
        proc = run(command, "--help")
        assert proc.returncode == 0 and "Example" in proc.stdout, command


def test_targets_and_models_list_shipped_files():
    targets = run("targets")
    assert targets.returncode == 0 and "host-cpu" in targets.stdout and "onnxruntime" in targets.stdout
    models = run("models")
    assert models.returncode == 0 and "minilm-student (default)" in models.stdout


@pytest.mark.parametrize(
    "args, code, needles",
    [
        (["build", "--target", "orin-nano"], 2, ["Unknown target 'orin-nano'", "host-cpu"]),
        (["build", "--model", "bert-huge"], 2, ["Unknown model 'bert-huge'", "minilm-student"]),
        (["build", "--precision", "int4"], 2, ["Unknown precision 'int4'", "int8-dynamic"]),
        (["build", "--set", "distill.steps"], 2, ["not key=value"]),
        (["inspect", "/nonexistent/bundle"], 1, ["is not a directory"]),
    ],
)
def test_bad_input_gets_one_line_and_exit_code(args, code, needles):
    assert_one_line_error(run(*args), code, *needles)


def test_malformed_recipe_reports_file_and_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("teacher = \n")
    assert_one_line_error(run("build", "--model", str(bad)), 2, "bad.toml: malformed TOML")


def test_missing_checkpoint_files_fail_with_exit_1(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text('{"model_type": "bert"}')
    assert_one_line_error(run("build", "--model", str(tmp_path / "ckpt"), "--out", str(tmp_path / "out")), 1)
    assert not (tmp_path / "out" / "ckpt").exists()


def test_debug_shows_the_traceback():
    proc = run("--debug", "build", "--target", "orin-nano")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_build_inspect_check_round_trip(tmp_path, tiny_checkpoint):
    out = tmp_path / "out"
    built = run("build", "--model", str(tiny_checkpoint), "--precision", "fp32", "--out", str(out), *FAST)
    assert built.returncode == 0, built.stderr
    assert "fidelity vs teacher" in built.stdout and "reference" in built.stdout
    bundle = out / tiny_checkpoint.name / "host-cpu"
    inspected = run("inspect", str(bundle))
    assert inspected.returncode == 0 and "sha256 verified" in inspected.stdout
    checked = run("check", str(bundle))
    assert checked.returncode == 0 and "check passed" in checked.stdout
    again = run("build", "--model", str(tiny_checkpoint), "--precision", "fp32", "--out", str(out), *FAST)
    assert again.returncode == 0 and again.stdout.count(" hit ") == 4

    on_text = run("check", str(bundle), "--text", str(CALIBRATION), "--samples", "16")
    assert on_text.returncode == 0, on_text.stderr
    assert "where it strays most" in on_text.stdout and "held-back (the build's)" in on_text.stdout
    assert_one_line_error(
        run("check", str(bundle), "--text", str(tmp_path / "missing.txt")), 2, "Cannot read --text", "UTF-8"
    )

    (bundle / "model.onnx").write_bytes(b"corrupt")
    assert_one_line_error(run("check", str(bundle)), 1, "does not match its manifest", "model.onnx")


# -- --json, -q, -v, exit codes for CI ------------------------------------------------------------------------------
def document(proc: subprocess.CompletedProcess, command: str, ok: bool = True) -> dict:
    """stdout is exactly one --json document (schema 1) of ``command``."""
    doc = json.loads(proc.stdout)
    assert (doc["schema"], doc["command"], doc["ok"]) == (1, command, ok), proc.stderr
    return doc


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_checkpoint):
    """One tiny fp32 bundle built by `edgepipe build --json`: (its document, a stage cache to share, a work dir)."""
    root = tmp_path_factory.mktemp("cli-json")
    env = {**os.environ, "EDGEPIPE_CACHE": str(root / "cache")}
    args = ["build", "--json", "--model", str(tiny_checkpoint), "--precision", "fp32", "--out", str(root / "out")]
    proc = run(*args, *FAST, env=env)
    assert proc.returncode == 0, proc.stderr
    return document(proc, "build"), env, root


def test_build_json_reports_bundle_fidelity_and_stages(built, tiny_checkpoint):
    doc, _, root = built
    assert doc["bundle"] == str((root / "out" / tiny_checkpoint.name / "host-cpu").resolve())
    manifest = json.loads(open(doc["manifest_path"]).read())
    assert doc["fidelity"] == manifest["fidelity"] and doc["fidelity"]["lowered"]["mean_cosine"] > 0.9999
    assert (doc["target"], doc["runtime"], doc["precision"]) == ("host-cpu", "onnxruntime", "fp32")
    assert [s["stage"] for s in doc["stages"]] == ["reference", "lower", "validate", "latency"]
    assert doc["bytes"] == sum(f["bytes"] for f in manifest["files"].values())
    documented = (Path(__file__).resolve().parent.parent / "docs" / "cli-json.md").read_text()
    assert [k for k in doc if f"`{k}`" not in documented] == []  # every key of the document is in docs/cli-json.md


def test_inspect_check_bench_compare_json_read_the_bundle(built, tmp_path):
    doc, env, _ = built
    inspected = document(run("inspect", doc["bundle"], "--json"), "inspect")
    assert inspected["files_verified"] == 3 and inspected["manifest"]["fidelity"] == doc["fidelity"]
    checked = document(run("check", doc["bundle"], "--json"), "check")
    assert checked["passed"] and checked["result"]["outputs"]["sentence_embedding"]["max_abs_error"] < 1e-4
    args = ["--device", "local", "--runs", "3", "--warmup", "1", "--results", str(tmp_path), "--json"]
    bench = document(run("bench", doc["bundle"], *args, env=env), "bench")
    assert bench["result"]["check"]["passed"] and json.loads(open(bench["results"]).read()) == bench["result"]
    compared = document(run("compare", bench["results"], "--json", "--csv", str(tmp_path / "c.csv")), "compare")
    assert compared["rows"][0]["model"] == doc["model"] and compared["written"]["csv"] == str(tmp_path / "c.csv")


def test_a_device_check_that_fails_exits_1_with_the_result_in_the_document(built, tmp_path):
    """Expected outputs that are not what the graph computes (a consistent bundle, every sha256 matching)."""
    from edgepipe.manifest import file_records

    doc, env, _ = built
    bundle = tmp_path / "bundle"
    shutil.copytree(doc["bundle"], bundle)
    with np.load(bundle / "check.npz") as check:
        arrays = dict(check)
    arrays["output.sentence_embedding"] = arrays["output.sentence_embedding"] + 0.05
    np.savez(bundle / "check.npz", **arrays)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "files": file_records(bundle)}))

    args = ["--device", "local", "--runs", "2", "--warmup", "1", "--results", str(tmp_path / "results"), "--json"]
    bench = run("bench", str(bundle), *args, env=env)
    assert bench.returncode == 1 and "differ beyond its tolerances" in bench.stderr
    failed = document(bench, "bench", ok=False)
    assert failed["error"]["type"] == "BuildError" and failed["result"]["check"]["passed"] is False
    assert json.loads(open(failed["results"]).read())["check"]["passed"] is False  # the result is still written
    checked = run("check", str(bundle), "--json")
    assert checked.returncode == 1 and document(checked, "check", ok=False)["result"]["passed"] is False


def test_strict_build_below_the_bar_exits_1_and_writes_no_bundle(built, tiny_checkpoint, tmp_path):
    _, env, _ = built
    recipe = tmp_path / "tiny-student.toml"  # 4 distillation steps: far below the recipe's default bar (0.99)
    recipe.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n'
        "[distill]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\n"
    )
    args = ["build", "--model", str(recipe), "--precision", "fp32", "--out", str(tmp_path / "out"), *FAST]
    strict = run("-q", *args, "--strict", "--json", env=env)  # -q: stderr holds the error and nothing else
    assert_one_line_error(strict, 1, "below the recipe's bar 0.99", "strict")
    assert document(strict, "build", ok=False)["error"]["exit_code"] == 1
    assert not (tmp_path / "out" / "tiny-student").exists()
    loose = run("-q", *args, env=env)  # the default ships it; -q prints the bundle and nothing else
    assert loose.returncode == 0 and loose.stdout.strip() == str(tmp_path / "out" / "tiny-student" / "host-cpu")
    assert "✓" not in loose.stderr and "below the recipe's bar" not in loose.stderr  # no progress, no notes


def test_targets_and_models_json_and_quiet():
    targets = document(run("targets", "--json"), "targets")["targets"]
    host = next(t for t in targets if t["name"] == "host-cpu")
    assert host["runtime"] == "onnxruntime" and host["validated_here"] is True
    assert run("-q", "targets").stdout.split() == [t["name"] for t in targets]
    models = document(run("models", "--json"), "models")["models"]
    assert [m["name"] for m in models if m["default"]] == ["minilm-student"]
    assert next(m for m in models if m["name"] == "minilm-student")["student"]["layers"] == [1, 3, 5]


def test_a_usage_error_under_json_is_a_document_too():
    proc = run("build", "--json", "--target", "orin-nano")
    assert_one_line_error(proc, 2, "Unknown target 'orin-nano'")
    error = document(proc, "build", ok=False)["error"]
    assert error["type"] == "UsageError" and error["exit_code"] == 2 and "host-cpu" in error["message"]


def test_verbose_build_shows_cache_keys_and_directories(built, tiny_checkpoint):
    doc, env, root = built
    args = ["build", "--model", str(tiny_checkpoint), "--precision", "fp32", "--out", str(root / "out"), *FAST]
    proc = run("-v", *args, env=env)
    assert proc.returncode == 0, proc.stderr
    for stage in doc["stages"]:
        assert stage["cache_key"][:12] in proc.stdout and f"{stage['stage']}/{stage['cache_key']}" in proc.stderr
    assert_one_line_error(run("-q", "-v", "targets"), 2, "-q and -v")
