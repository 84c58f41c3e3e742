"""runner.py on real bundles: a tiny ONNX (and ExecuTorch) encoder, run as a subprocess like on a device."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edgepipe.harness import runner
from edgepipe.manifest import write_manifest

try:
    from harness_fixtures import check_inputs, make_onnx_bundle, make_pte_bundle
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import check_inputs, make_onnx_bundle, make_pte_bundle

RUNNER = Path(runner.__file__)

# Runs runner.py as a script while any import of edgepipe or torch fails: the device has neither.
BLOCKED_RUN = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("edgepipe", "torch"):
            raise ImportError("blocked on the device: " + name)
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_runner(
    *args: str | Path, python: str = sys.executable, runner_path: Path = RUNNER, isolated: bool = False
) -> subprocess.CompletedProcess:
    argv = [python, "-I", "-c", BLOCKED_RUN, str(runner_path)] if isolated else [python, str(runner_path)]
    return subprocess.run([*argv, *map(str, args)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_bundle(tmp_path_factory.mktemp("bundle") / "tiny-encoder" / "host-cpu")


def assert_sane(record: dict, runs: int) -> None:
    lat = record["latency_ms"]
    assert record["schema"] == "edgepipe.bench/1"
    assert record["check"]["passed"], record["check"]["problems"]
    assert record["check"]["max_abs_error"] < 1e-5
    assert record["check"]["min_cosine"] > 0.99999
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert lat["load"] > 0 and lat["first_run"] > 0 and lat["warmup_total"] >= 0
    assert len(record["samples_ms"]) == runs
    assert np.isclose(np.median(record["samples_ms"]), lat["p50"], rtol=1e-3)
    assert record["throughput"]["items_per_s"] > 0
    assert record["memory"]["peak_rss_mb"] >= record["memory"]["rss_after_load_mb"] > 0
    assert record["verify"] == {"files_checked": 3, "ok": True}
    assert set(record["power"]) == {"source", "mean_w", "max_w", "energy_per_item_j", "interval_ms", "rails"}
    assert record["env"]["python"]["version"] == ".".join(map(str, sys.version_info[:3]))
    assert record["env"]["packages"]["numpy"] == np.__version__


def test_runner_bench_writes_sane_json_for_onnx_bundle(onnx_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = run_runner(onnx_bundle, "--runs", 40, "--warmup", 3, "--threads", 1, "--json", out)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert_sane(record, runs=40)
    assert record["bundle"]["model"] == "tiny-encoder" and record["bundle"]["target"] == "host-cpu"
    assert record["bundle"]["files_bytes"] == sum(
        (onnx_bundle / f).stat().st_size for f in ("model.onnx", "check.npz", "tokenizer.json")
    )
    assert record["env"]["runtime"]["providers"] == ["CPUExecutionProvider"]
    assert record["env"]["runtime"]["threads"] == 1 and record["env"]["runtime"]["needs_torch"] is False
    assert record["inputs"]["input_ids"]["shape"] == [2, 8]
    assert "p50" in done.stderr and "check passed" in done.stderr
    assert not list(tmp_path.glob("*.tmp"))


def test_runner_times_batch_by_seq_inputs_built_from_check_inputs(onnx_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = run_runner(onnx_bundle, "--runs", 10, "--warmup", 1, "--batch", 3, "--seq", 20, "--json", out)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["inputs"]["input_ids"] == {"shape": [3, 20], "dtype": "int64"}
    assert record["config"]["batch"] == 3 and record["config"]["seq"] == 20
    assert record["throughput"]["tokens_per_s"] == pytest.approx(record["throughput"]["items_per_s"] * 20)


def test_bench_inputs_tile_real_tokens_and_drop_padding() -> None:
    check = check_inputs(batch=2, seq=8)
    feeds = runner.bench_inputs(check, batch=3, seq=12)
    ids, real1 = feeds["input_ids"], check["input_ids"][1][:7]  # row 1 has one padded position
    assert ids.shape == (3, 12) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids[0], np.resize(check["input_ids"][0], 12))
    np.testing.assert_array_equal(ids[1], np.resize(real1, 12))
    np.testing.assert_array_equal(ids[2], ids[0])
    assert (ids != 0).all()  # no padding token survives
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((3, 12), np.int64))
    cropped = runner.bench_inputs(check, batch=None, seq=4)
    np.testing.assert_array_equal(cropped["input_ids"], check["input_ids"][:, :4])


def test_compare_outputs_cosine_and_tolerances() -> None:
    want = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    got = np.array([[1.0, 0.0], [0.6, 0.8]], np.float32)
    res = runner.compare_outputs({"y": got}, {"y": want}, {"atol": 0.5, "min_cosine": 0.9})
    assert res["min_cosine"] == pytest.approx(0.8) and res["mean_cosine"] == pytest.approx(0.9)
    assert res["max_abs_error"] == pytest.approx(0.6)
    assert not res["passed"] and len(res["problems"]) == 2
    assert runner.compare_outputs({"y": want}, {"y": want}, {"atol": 0.0, "min_cosine": 1.0})["passed"]
    bad = runner.compare_outputs({"y": want[:1]}, {"y": want}, {})
    assert not bad["passed"] and "shape" in bad["problems"][0]
    nan = runner.compare_outputs({"y": want * np.nan}, {"y": want}, {})
    assert not nan["passed"] and "NaN" in nan["problems"][0]


def test_runner_works_copied_alone_without_edgepipe_or_torch(onnx_bundle: Path, tmp_path: Path) -> None:
    alone = tmp_path / "device" / "runner.py"
    alone.parent.mkdir()
    shutil.copy(RUNNER, alone)
    out = tmp_path / "r.json"
    done = run_runner(onnx_bundle, "--runs", 15, "--warmup", 2, "--json", out, runner_path=alone, isolated=True)
    assert done.returncode == 0, done.stderr
    assert_sane(json.loads(out.read_text()), runs=15)
    verify = run_runner(onnx_bundle, "--verify", runner_path=alone, isolated=True)
    assert verify.returncode == 0, verify.stderr
    report = json.loads(verify.stdout)
    assert report["ok"] and report["runtime"]["version"] and report["runner_sha256"] == runner.sha256_file(str(alone))


def test_runner_rejects_a_corrupted_file(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (bundle / "model.onnx").write_bytes(bytes(data))
    verify = run_runner(bundle, "--verify")
    assert verify.returncode == runner.EXIT_BAD_FILES
    assert json.loads(verify.stdout)["files"]["problems"] == [{"path": "model.onnx", "problem": "sha256 mismatch"}]
    out = tmp_path / "r.json"
    done = run_runner(bundle, "--runs", 3, "--json", out)
    assert done.returncode == runner.EXIT_BAD_FILES
    assert (
        done.stderr.strip().splitlines()[-1].startswith("error: bundle")
        and "model.onnx (sha256 mismatch)" in done.stderr
    )
    assert not out.exists()
    (bundle / "tokenizer.json").unlink()
    assert "missing" in run_runner(bundle, "--verify").stdout


def test_runner_writes_json_and_exits_3_when_check_fails(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b", validation={"atol": 1e-12, "min_cosine": 0.9})
    out = tmp_path / "r.json"
    done = run_runner(bundle, "--runs", 5, "--warmup", 1, "--json", out)
    assert done.returncode == runner.EXIT_CHECK_FAILED, done.stderr
    check = json.loads(out.read_text())["check"]
    assert not check["passed"] and check["problems"][0].startswith("max-abs error")
    assert 0 < check["max_abs_error"] < 1e-5 and check["min_cosine"] > 0.9999


def test_runner_reports_missing_numpy_and_runtime(onnx_bundle: Path) -> None:
    python = "/usr/bin/python3"
    probe = subprocess.run([python, "-c", "import numpy"], capture_output=True) if Path(python).exists() else None
    if probe is None or probe.returncode == 0:
        pytest.skip(f"needs a Python without numpy at {python} (the system python3 of Debian)")
    done = run_runner(onnx_bundle, "--verify", python=python)
    assert done.returncode == runner.EXIT_MISSING_RUNTIME
    report = json.loads(done.stdout)
    assert report["runtime"]["missing"] == ["numpy", "onnxruntime"] and report["numpy"] is None
    assert report["files"]["problems"] == []  # integrity is checked with the standard library alone


def test_runner_rejects_a_decoder_manifest_without_its_graph_contract(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    shutil.copy(bundle / "model.onnx", bundle / "decode.onnx")
    manifest.update(kind="decoder", graphs={"prefill": "model.onnx", "decode": "decode.onnx"})
    manifest.pop("files"), manifest.pop("schema")
    write_manifest(bundle, manifest)
    assert run_runner(bundle, "--verify").returncode == 0
    done = run_runner(bundle, "--runs", 2, "--json", tmp_path / "r.json")
    assert done.returncode == runner.EXIT_BAD_FILES and "io.prefill, io.decode and decoder" in done.stderr


def test_runner_usage_errors_exit_2(onnx_bundle: Path, tmp_path: Path) -> None:
    assert run_runner(onnx_bundle, "--runs", 0).returncode == 2
    done = run_runner(tmp_path, "--verify")
    assert done.returncode == runner.EXIT_BAD_FILES and "no manifest.json" in done.stderr


@pytest.mark.skipif(importlib.util.find_spec("executorch") is None, reason="executorch is not installed")
def test_runner_bench_executorch_bundle_has_the_same_keys(onnx_bundle: Path, tmp_path: Path) -> None:
    bundle = make_pte_bundle(tmp_path / "pte")
    out_pte, out_ort = tmp_path / "pte.json", tmp_path / "ort.json"
    done = run_runner(bundle, "--runs", 20, "--warmup", 2, "--threads", 1, "--json", out_pte)
    assert done.returncode == 0, done.stderr
    pte = json.loads(out_pte.read_text())
    assert_sane(pte, runs=20)
    assert pte["env"]["runtime"]["needs_torch"] is True and "XnnpackBackend" in pte["env"]["runtime"]["backends"]
    static = run_runner(bundle, "--runs", 2, "--batch", 4, "--seq", 16, "--json", tmp_path / "x.json")
    assert static.returncode == 1 and "the graph takes [[2, 8], [2, 8]]" in static.stderr

    assert run_runner(onnx_bundle, "--runs", 5, "--json", out_ort).returncode == 0
    ort = json.loads(out_ort.read_text())

    def keys(d: dict, prefix: str = "") -> set[str]:
        fixed = ("env.packages", "env.runtime", "check.outputs", "bundle.validation", "bundle.fidelity")
        return {prefix + k for k in d} | {
            x
            for k, v in d.items()
            if isinstance(v, dict) and prefix + k not in fixed
            for x in keys(v, prefix + k + ".")
        }

    assert keys(pte) == keys(ort)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def test_sampler_reads_jetson_rails_and_thermal_zones_from_sysfs(tmp_path: Path) -> None:
    hwmon = tmp_path / "sys/bus/i2c/drivers/ina3221/1-0040/hwmon/hwmon3"  # JetPack 5/6 layout: mV x mA
    for idx, label, mv, ma in [(1, "VDD_IN", 5000, 1200), (2, "VDD_CPU_GPU_CV", 5000, 400), (7, "sum of shunt", 1, 1)]:
        _write(hwmon / f"in{idx}_label", label)
        _write(hwmon / f"in{idx}_input", str(mv))
        _write(hwmon / f"curr{idx}_input", str(ma))
    zones = tmp_path / "sys/class/thermal"
    _write(zones / "thermal_zone0/type", "cpu-thermal")
    _write(zones / "thermal_zone0/temp", "45000")
    _write(zones / "thermal_zone1/type", "gpu-thermal")
    _write(zones / "thermal_zone1/temp", "41500")
    sampler = runner.Sampler(0.02, gpu=False, root=str(tmp_path))
    sampler.start()
    time.sleep(0.1)
    _write(zones / "thermal_zone0/temp", "52000")
    time.sleep(0.1)
    power, thermal = sampler.stop(items=10)
    assert set(power["rails"]) == {"VDD_IN", "VDD_CPU_GPU_CV"}
    assert power["rails"]["VDD_IN"]["mean_w"] == pytest.approx(6.0) and power["rails"]["VDD_IN"]["total"]
    assert power["rails"]["VDD_CPU_GPU_CV"]["mean_w"] == pytest.approx(2.0)
    assert not power["rails"]["VDD_CPU_GPU_CV"]["total"]  # a sub-rail of VDD_IN: not added to the board total
    assert power["mean_w"] == pytest.approx(6.0) and power["max_w"] == pytest.approx(6.0)
    assert power["rails"]["VDD_IN"]["samples"] >= 3
    assert 6.0 * 0.2 / 10 <= power["energy_per_item_j"] < 6.0 * 1.0 / 10
    assert thermal["zones"]["cpu-thermal"] == {"start_c": 45.0, "max_c": 52.0, "end_c": 52.0}
    assert thermal["zones"]["gpu-thermal"]["max_c"] == 41.5 and thermal["max_c"] == 52.0


def test_sampler_turns_rapl_energy_counters_into_watts(tmp_path: Path) -> None:
    rapl = tmp_path / "sys/class/powercap"
    _write(rapl / "intel-rapl:0/name", "package-0")
    _write(rapl / "intel-rapl:0/energy_uj", "1000000")
    _write(rapl / "intel-rapl:0:0/name", "core")  # a sub-domain, inside package-0
    _write(rapl / "intel-rapl:0:0/energy_uj", "5")
    start = time.perf_counter()
    sampler = runner.Sampler(0.05, gpu=False, root=str(tmp_path))
    sampler.start()
    time.sleep(0.1)
    _write(rapl / "intel-rapl:0/energy_uj", "3000000")  # 2 J later
    time.sleep(0.1)
    power, _ = sampler.stop(items=4)
    elapsed = time.perf_counter() - start
    assert set(power["rails"]) == {"rapl/package-0"}
    assert 2.0 / elapsed <= power["mean_w"] <= 2.0 / 0.1
    assert power["max_w"] is None  # counters give energy over the window, not peaks


def test_sampler_without_sensors_reports_nulls_and_starts_no_thread(tmp_path: Path) -> None:
    sampler = runner.Sampler(0.01, gpu=False, root=str(tmp_path))
    sampler.start()
    assert sampler._thread is None
    power, thermal = sampler.stop(items=1)
    assert power["mean_w"] is None and power["rails"] is None and power["source"] is None
    assert thermal == {"max_c": None, "zones": None}


def _old_python() -> str | None:
    """A Python older than 3.11 (JetPack 5 ships 3.8): $EDGEPIPE_OLD_PYTHON, python3.8 on PATH, or pyenv's."""
    candidates = [
        os.environ.get("EDGEPIPE_OLD_PYTHON"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python"))),
    ]
    candidates += [shutil.which("python3.8"), shutil.which("python3.9")]
    return next((c for c in candidates if c and os.path.exists(c) and "/shims/" not in c), None)  # shims may refuse


def test_runner_runs_on_python_3_8(onnx_bundle: Path, tmp_path: Path) -> None:
    python = _old_python()
    if python is None:
        pytest.skip("no Python 3.8/3.9 here (set EDGEPIPE_OLD_PYTHON, or install python3.8)")
    verify = run_runner(onnx_bundle, "--verify", python=python)
    report = json.loads(verify.stdout)  # the whole file parses and verifies on the old interpreter
    assert report["files"]["problems"] == [] and tuple(map(int, report["python"]["version"].split(".")[:2])) < (3, 11)
    if not report["runtime"]["importable"]:
        assert verify.returncode == runner.EXIT_MISSING_RUNTIME
        pytest.skip(f"{python} has no {', '.join(report['runtime']['missing'])}: only --verify was run on it")
    out = tmp_path / "r.json"
    done = run_runner(onnx_bundle, "--runs", 10, "--warmup", 1, "--batch", 2, "--seq", 12, "--json", out, python=python)
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["check"]["passed"] and record["env"]["python"]["version"] == report["python"]["version"]
    assert 0 < record["latency_ms"]["p50"] <= record["latency_ms"]["p90"]


def test_the_int8_encoder_tolerance_catches_one_wrong_channel_that_min_cosine_lets_through(teacher_dir, sentences):
    """The teacher's unit-length embeddings of 8 real sentences: one channel off by 0.15 keeps every cosine above
    0.97 but is no int8 rounding (measured <= 0.044 per element); errors of the measured size pass."""
    from edgepipe.data import encode, load_tokenizer
    from edgepipe.models.hf import load_encoder
    from edgepipe.precisions import tolerance
    from edgepipe.stages.validate import embed_torch

    int8 = tolerance("int8-dynamic", "encoder")
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 64)
    want = embed_torch(load_encoder(teacher_dir), [encode(tok, sentences[:8])]).astype(np.float64)
    # int8-sized error: RMS 0.007 per channel is the teacher's int8-dynamic mean cosine 0.991 (sqrt(2 x 0.009 / 384))
    rounded = want + np.random.default_rng(0).uniform(-0.012, 0.012, want.shape)
    assert runner.compare_outputs({"y": rounded}, {"y": want}, int8)["passed"]
    broken = want.copy()
    broken[:, 7] += 0.15  # one channel wrong in every row
    res = runner.compare_outputs({"y": broken}, {"y": want}, int8)
    assert res["min_cosine"] > int8["min_cosine"] and not res["passed"]
    assert res["problems"] == [f"max-abs error {res['max_abs_error']:.3g} > atol {int8['atol']:.3g}"]
