"""The CLI end to end in a subprocess: real exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGEPIPE = [sys.executable, "-m", "edgepipe.cli"]
FAST = ["--set", "validate.samples=48", "--set", "validate.max_len=64"]
CALIBRATION = Path(__file__).resolve().parent.parent / "edgepipe" / "calibration_data" / "calibration.txt"


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEPIPE, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    err = " ".join(proc.stderr.split())
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err


def test_every_command_has_help_with_an_example():
    for command in ("build", "targets", "models", "inspect", "check", "deploy", "bench", "compare"):
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
