"""`bench --runner native`: time an ExecuTorch bundle with edgepipe's C++ runner (no Python in the timed process).

The runner (native/executorch/et_runner.cpp, built by scripts/build_native_runner.sh against the executorch wheel's
prebuilt runtime) loads model.pte, runs check.npz's inputs once and writes the outputs, then warms up and times
`Module::forward`. This module feeds it check.npz's inputs as raw arrays, judges its outputs with runner.py's own
compare_outputs and writes the same edgepipe.bench/1 record the Python runner writes (`runner`: "native").

Only `--device local` so far: the binary, its lib/ and the raw inputs would travel to a device the same way.
"""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from edgepipe.errors import DeviceError, UsageError
from edgepipe.harness import runner

DEFAULT_BINARY = Path("build/native/executorch/edgepipe_et_runner")
DTYPES = {np.dtype(np.int64): "int64", np.dtype(np.int32): "int32", np.dtype(np.float32): "float32"}


def binary() -> Path:
    """The built runner: $EDGEPIPE_NATIVE_RUNNER, else build/native/executorch/edgepipe_et_runner.

    Raises:
        UsageError: It is not built.
    """
    path = Path(os.environ.get("EDGEPIPE_NATIVE_RUNNER") or DEFAULT_BINARY)
    if not path.is_file():
        raise UsageError(
            f"The native runner is not built ({path} does not exist).",
            hint="Build it with scripts/build_native_runner.sh, or point EDGEPIPE_NATIVE_RUNNER at it.",
        )
    return path


def bench_local(
    bundle_dir: Path, *, runs: int = 50, warmup: int = 10, tolerance: dict | None = None, **options
) -> dict:
    """Run the native runner on this machine and return the edgepipe.bench/1 record.

    `tolerance` is the check's (edgepipe's table, from remote.check_tolerance); None: the manifest's validation.

    Raises:
        UsageError: Not an ExecuTorch encoder bundle, or an option the native runner does not take.
        DeviceError: The runner failed (its error line is quoted).
    """
    refused = sorted(k for k, v in options.items() if v not in (None, False))
    if refused:
        raise UsageError(
            f"--runner native does not take {', '.join('--' + k.replace('_', '-') for k in refused)} yet.",
            hint="It times check.npz's own inputs with the runtime's default threads; drop those options.",
        )
    started = datetime.datetime.now(datetime.UTC)
    bundle = str(bundle_dir)
    manifest = runner.load_manifest(bundle)
    if manifest.get("runtime") != "executorch" or runner.bench_kind(manifest) != "encoder":
        raise UsageError(
            f"--runner native runs ExecuTorch encoder bundles; {bundle} is {manifest.get('runtime')} "
            f"{runner.bench_kind(manifest)}.",
            hint="Use the Python runner (the default) for it.",
        )
    files = runner.verify_files(bundle, manifest)
    if files["problems"]:
        listed = "; ".join(f"{p['path']} ({p['problem']})" for p in files["problems"])
        raise DeviceError(f"Bundle {bundle} is corrupt: {listed}.", hint="Rebuild it with `edgepipe build`.")
    check_in, check_out = runner.load_check(bundle)
    names = [i["name"] for i in (manifest.get("io") or {}).get("inputs", [])] or list(check_in)
    graph = runner.graph_path(bundle, manifest)
    with tempfile.TemporaryDirectory(prefix="edgepipe-native-") as tmp:
        argv = [str(binary()), graph, "--outputs", tmp, "--runs", str(runs), "--warmup", str(warmup)]
        for i, name in enumerate(names):
            array = np.ascontiguousarray(check_in[name])
            if array.dtype not in DTYPES:
                raise UsageError(f"check.npz input {name!r} is {array.dtype}; the native runner takes {list(DTYPES)}.")
            raw = os.path.join(tmp, f"input{i}.bin")
            array.tofile(raw)
            argv += ["--input", f"{raw}:{DTYPES[array.dtype]}:{'x'.join(map(str, array.shape))}"]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600.0 + runs)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
            raise DeviceError(f"The native runner failed (exit {done.returncode}): {last}")
        native = json.loads(done.stdout.strip().splitlines()[-1])
        outputs = [
            np.fromfile(os.path.join(tmp, o["file"]), dtype=o["dtype"]).reshape(o["shape"]) for o in native["outputs"]
        ]
    out_names = [o["name"] for o in (manifest.get("io") or {}).get("outputs", [])] or list(check_out)
    check = runner.compare_outputs(
        dict(zip(out_names, outputs)), check_out, tolerance or manifest.get("validation") or {}
    )
    check["tolerance_source"] = "edgepipe" if tolerance else "manifest"
    return record(bundle, manifest, files, native, check, check_in, names, runs, warmup, started)


def record(bundle, manifest, files, native, check, check_in, names, runs, warmup, started) -> dict:
    """The edgepipe.bench/1 record from the native runner's JSON: the Python runner's keys, in its order."""
    times = native["samples_ms"]
    t = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99]).tolist()
    stats = {"p50": p50, "p90": p90, "p99": p99, "mean": float(t.mean()), "std": float(t.std())}
    stats.update(min=float(t.min()), max=float(t.max()))
    shape = list(check_in[names[0]].shape)
    total_s = sum(times) / 1e3
    kb = 1024.0
    baseline, loaded, hwm = native["rss_baseline_kb"] / kb, native["rss_after_load_kb"] / kb, native["hwm_kb"] / kb
    graph = runner.graph_path(bundle, manifest)
    target = manifest.get("target") or {}
    info = {"providers": None, "providers_requested": None, "threads": None, "needs_torch": False, "backends": None}
    env = runner.environment(dict(info, native_runner=str(binary())), "executorch")
    return {
        "schema": runner.SCHEMA,
        "runner_version": runner.RUNNER_VERSION,
        "runner": "native",
        "created_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": {"url": "local", "name": env["device_model"] or env["cpu"]["model"] or env["hostname"]},
        "bundle": {
            "path": os.path.abspath(bundle),
            "model": manifest.get("model"),
            "kind": "encoder",
            "target": target.get("name") if isinstance(target, dict) else target,
            "runtime": "executorch",
            "precision": manifest.get("precision"),
            "edgepipe_version": manifest.get("edgepipe_version"),
            "manifest_sha256": runner.sha256_file(os.path.join(bundle, "manifest.json")),
            "files_bytes": files["bytes"],
            "graph_file": os.path.relpath(graph, bundle),
            "graph_bytes": os.path.getsize(graph),
            "validation": manifest.get("validation"),
            "fidelity": manifest.get("fidelity"),
        },
        "config": {
            "runs": runs,
            "warmup": warmup,
            "batch": None,
            "seq": None,
            "context": None,
            "threads": None,
            "sample_ms": None,
        },
        "verify": {"files_checked": files["checked"], "ok": True},
        "engine": None,
        "inputs": {n: {"shape": list(check_in[n].shape), "dtype": str(check_in[n].dtype)} for n in names},
        "check": check,
        "latency_ms": dict(
            stats, load=native["load_ms"], first_run=native["first_run_ms"], warmup_total=native["warmup_total_ms"]
        ),
        "throughput": {
            "items_per_s": shape[0] * runs / total_s if total_s else None,
            "tokens_per_s": shape[0] * shape[1] * runs / total_s if len(shape) > 1 and total_s else None,
        },
        "memory": {
            "rss_before_load_mb": baseline,
            "rss_after_load_mb": loaded,
            "peak_rss_mb": hwm,
            "baseline_rss_mb": baseline,
            "model_peak_mb": hwm - baseline if native["hwm_reset"] else max(loaded - baseline, 0.0),
            "model_peak_source": "VmHWM since baseline" if native["hwm_reset"] else "VmRSS samples",
            "runtime_activations_mb": sum(native["planned_buffers_bytes"]) / 2**20,
            "runtime_memory_source": "executorch memory plan",
        },
        "power": {
            "source": None,
            "mean_w": None,
            "max_w": None,
            "energy_per_item_j": None,
            "interval_ms": None,
            "rails": None,
        },
        "thermal": {"max_c": None, "zones": None},
        "samples_ms": [round(x, 6) for x in times],
        "decoder": None,
        "profile": None,
        "env": env,
    }
