"""bench --profile: per-op times from each runtime's own profiler on real runs of tiny bundles, and the model's own
memory peak beside the process's."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from edgepipe.harness import profiles, report, runner

try:
    from harness_fixtures import make_onnx_bundle, make_pte_bundle
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle, make_pte_bundle

RUNNER = Path(runner.__file__)
# The ONNX graph's ops as ORT runs them: MatMul + Add + Tanh fused into one FusedGemm.
TINY_ONNX_OPS = {"Gather", "Cast", "Unsqueeze", "Mul", "ReduceSum", "Max", "Div", "FusedGemm", "ReduceL2"}


def run_runner(bundle: Path, out: Path, *args: str, runner_path: Path = RUNNER) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(runner_path), str(bundle), "--runs", "12", "--warmup", "2", "--json", str(out), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300)


def assert_profile(profile: dict, source: str, runs: int) -> None:
    assert profile["source"] == source and profile["runs"] == runs
    assert profile["total_ms"] > 0 and 0 < profile["ops_ms"] <= profile["total_ms"] + 1e-9
    assert profile["op_count"] >= len(profile["types"]) > 0
    assert sum(t["share"] for t in profile["types"]) == pytest.approx(1.0)
    assert sum(t["count"] for t in profile["types"]) == profile["op_count"]
    assert [t["ms"] for t in profile["types"]] == sorted((t["ms"] for t in profile["types"]), reverse=True)
    assert profile["top_ops"] and profile["top_ops"][0]["ms"] == max(op["ms"] for op in profile["top_ops"])


def assert_memory(memory: dict) -> None:
    assert memory["baseline_rss_mb"] == memory["rss_before_load_mb"] > 0
    assert 0 <= memory["model_peak_mb"] <= memory["peak_rss_mb"]
    assert memory["model_peak_source"] == "VmHWM since baseline"  # Linux resets VmHWM through clear_refs
    # the peak covers the load: at least what the resident set grew by while loading
    assert memory["model_peak_mb"] >= memory["rss_after_load_mb"] - memory["baseline_rss_mb"] - 1e-9


def test_onnxruntime_profile_names_the_graphs_ops(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "onnx")
    out = tmp_path / "r.json"
    done = run_runner(bundle, out, "--profile")
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    profile = record["profile"]
    assert_profile(profile, "onnxruntime profiling", runs=12)
    assert {t["type"] for t in profile["types"]} == TINY_ONNX_OPS
    assert {op["where"] for op in profile["top_ops"]} == {"CPUExecutionProvider"}
    assert profile["allocator"]["arena_held_mb"] > 0 and profile["allocator"]["in_use_peak_mb"] > 0
    assert_memory(record["memory"])
    assert record["memory"]["runtime_memory_source"] == "onnxruntime arena"
    assert record["memory"]["runtime_activations_mb"] == profile["allocator"]["in_use_peak_mb"]
    assert not list(Path("/tmp").glob(f"edgepipe-profile-*/profile_*{record['created_utc'][:4]}*"))  # raw file gone

    plain = tmp_path / "plain.json"
    assert run_runner(bundle, plain).returncode == 0
    unprofiled = json.loads(plain.read_text())
    assert unprofiled["profile"] is None and unprofiled["memory"]["runtime_activations_mb"] is None
    assert_memory(unprofiled["memory"])

    console = Console(record=True, width=220)
    console.print(report.profile_table(report.load_results([out, plain])))
    text = console.export_text()
    assert "onnxruntime profiling" in text and profile["types"][0]["type"] in text
    assert report.profile_table(report.load_results([plain])) is None


def test_profile_of_a_runner_copied_without_profiles_py_is_one_line(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "onnx")
    alone = tmp_path / "device" / "runner.py"
    alone.parent.mkdir()
    shutil.copy(RUNNER, alone)
    done = run_runner(bundle, tmp_path / "r.json", "--profile", runner_path=alone)
    assert done.returncode == runner.EXIT_BAD_FILES
    assert done.stderr.strip().splitlines()[-1].startswith("error: runner.py needs profiles.py beside it")
    shutil.copy(RUNNER.parent / "profiles.py", alone.parent)
    assert run_runner(bundle, tmp_path / "r.json", "--profile", runner_path=alone).returncode == 0


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch is not installed")
def test_executorch_profile_reads_the_etdump_with_the_inspector(tmp_path: Path) -> None:
    bundle = make_pte_bundle(tmp_path / "pte")
    out = tmp_path / "r.json"
    done = run_runner(bundle, out, "--profile")
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    profile = record["profile"]
    assert_profile(profile, "executorch etdump (Inspector)", runs=12)
    where = {op["type"]: op["where"] for op in profile["top_ops"] + profile["types"] if "where" in op}
    types = {t["type"] for t in profile["types"]}
    # the embedding lookup runs in the portable kernels; the Linear is XNNPACK's GEMM (the delegate's own name)
    assert "index" in types and where.get("index") == "portable"
    assert "Fully Connected (NC, F32) GEMM" in types
    assert profile["total_ms"] >= profile["ops_ms"]
    assert_memory(record["memory"])


def test_openvino_summary_from_real_performance_counters(tmp_path: Path) -> None:
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    bundle = make_onnx_bundle(tmp_path / "onnx")
    with np.load(bundle / "check.npz") as data:
        feeds = {k[len("input.") :]: data[k] for k in data.files if k.startswith("input.")}
    compiled = ov.Core().compile_model(str(bundle / "model.onnx"), "CPU", {"PERF_COUNT": "YES"})
    request = compiled.create_infer_request()
    runs = []
    for _ in range(5):
        request.infer(feeds)
        runs.append(request.get_profiling_info())
    profile = profiles.openvino_summary(runs)
    assert_profile(profile, "openvino performance counters", runs=5)
    executed = {i.node_name for run in runs for i in run if "NOT_RUN" not in str(i.status)}  # per run, it varies
    assert {op["name"] for op in profile["top_ops"]} <= executed and profile["op_count"] == len(executed)
    assert "FullyConnected" in {t["type"] for t in profile["types"]}  # OpenVINO's own name for MatMul + Add


def test_summarise_ranks_ops_and_shares_op_time() -> None:
    ops = [
        {"name": "a", "type": "MatMul", "where": "cpu", "ms": 3.0},
        {"name": "b", "type": "MatMul", "where": "cpu", "ms": 1.0},
        {"name": "c", "type": "Add", "where": "cpu", "ms": 1.0},
    ]
    summary = profiles.summarise(ops, total_ms=6.0, runs=4, source="test", top=2)
    assert summary["ops_ms"] == 5.0 and summary["unattributed_ms"] == pytest.approx(1.0)
    assert [op["name"] for op in summary["top_ops"]] == ["a", "b"] and summary["top_ops"][0]["share"] == 0.6
    assert summary["types"] == [
        {"type": "MatMul", "ms": 4.0, "count": 2, "share": 0.8},
        {"type": "Add", "ms": 1.0, "count": 1, "share": 0.2},
    ]
