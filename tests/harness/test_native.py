"""bench --runner native: edgepipe's C++ ExecuTorch runner, built here from the executorch wheel's prebuilt runtime
(scripts/build_native_runner.sh), on a real .pte; its record has the Python runner's keys and its numbers agree."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.errors import UsageError
from edgepipe.harness import native, remote

try:
    from harness_fixtures import make_onnx_bundle, make_pte_bundle
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle, make_pte_bundle

ROOT = Path(__file__).parents[2]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None or not (shutil.which("cmake") and shutil.which("c++")),
    reason="needs executorch, cmake and a C++ compiler",
)


@pytest.fixture(scope="module")
def runner_binary() -> Path:
    built = ROOT / native.DEFAULT_BINARY
    if not built.is_file():
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "build_native_runner.sh"), sys.executable],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-2000:]
    return built


def keys(d: dict, prefix: str = "") -> set[str]:
    fixed = ("env.packages", "env.runtime", "check.outputs", "bundle.validation", "bundle.fidelity")
    return {prefix + k for k in d} | {
        x for k, v in d.items() if isinstance(v, dict) and prefix + k not in fixed for x in keys(v, prefix + k + ".")
    }


def test_native_runner_matches_the_python_runner(runner_binary: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEPIPE_NATIVE_RUNNER", str(runner_binary))
    bundle = make_pte_bundle(tmp_path / "pte")
    native_path = remote.bench(bundle, "local", runs=20, warmup=2, runner="native", results_dir=tmp_path / "r")
    python_path = remote.bench(bundle, "local", runs=20, warmup=2, results_dir=tmp_path / "r")
    got, want = json.loads(native_path.read_text()), json.loads(python_path.read_text())
    assert got["runner"] == "native" and want["runner"] == "python"
    assert keys(got) == keys(want)
    assert got["check"]["passed"] and want["check"]["passed"]
    for field in ("max_abs_error", "min_cosine", "mean_cosine"):  # the same outputs, judged by the same code
        assert got["check"][field] == pytest.approx(want["check"][field], abs=1e-6)
    assert got["check"]["max_abs_error"] < 1e-5
    lat = got["latency_ms"]
    assert len(got["samples_ms"]) == 20 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["max"]
    assert got["memory"]["runtime_memory_source"] == "executorch memory plan"
    assert got["memory"]["runtime_activations_mb"] > 0 and got["memory"]["model_peak_mb"] >= 0
    assert got["memory"]["peak_rss_mb"] < want["memory"]["peak_rss_mb"]  # no Python, numpy or libtorch in it
    assert got["env"]["runtime"]["native_runner"] == str(runner_binary)


def test_native_runner_refuses_what_it_cannot_do_in_one_line(runner_binary: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_NATIVE_RUNNER", str(runner_binary))
    onnx = make_onnx_bundle(tmp_path / "onnx")
    with pytest.raises(UsageError, match="runs ExecuTorch encoder bundles; .* is onnxruntime encoder"):
        remote.bench(onnx, "local", runs=2, runner="native", results_dir=tmp_path / "r")
    with pytest.raises(UsageError, match="--device local only so far"):
        remote.bench(onnx, "ssh://pi@127.0.0.1:1", runs=2, runner="native", results_dir=tmp_path / "r")
    monkeypatch.setenv("EDGEPIPE_NATIVE_RUNNER", os.fspath(tmp_path / "missing"))
    with pytest.raises(UsageError, match="native runner is not built"):
        native.binary()
    assert not (tmp_path / "r").exists()
