"""The record a benchmark script writes with ``--json``: what ran, where, on what, and every raw timing.

Every figure the README or a note quotes comes from one of these records, kept in ``benchmarks/``. A record holds
the commit (and whether the tree was dirty), the machine (CPU model and the flags that pick kernels, cores this
process may use, memory), the versions of the packages that did the work, the exact command, and per row the raw
timings from which the printed medians and ratios follow. ``scripts/tables.py`` turns records into README tables.

Use from a script in ``scripts/`` (run as ``python scripts/bench_x.py``, so this directory is on ``sys.path``)::

    from benchrecord import Record

    record = Record("bench_x", repeats=args.repeats)
    record.add(name="ORT fp32", shape="1x128", ms=timings, cosine_mean=0.999)
    record.write(args.json)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

SCHEMA = 1
ROOT = Path(__file__).resolve().parent.parent

# The CPU flags that decide which kernels a runtime picks (VNNI and bf16 dot products, AMX tiles).
KERNEL_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "amx_tile",
    "asimd",
    "asimddp",
    "i8mm",
    "bf16",
)
PACKAGES = (
    "edgepipe",
    "torch",
    "onnxruntime",
    "onnx",
    "executorch",
    "openvino",
    "nncf",
    "numpy",
    "transformers",
    "optimum-onnx",
    "tensorrt",
)


def cpu() -> dict:
    """CPU model, kernel-relevant flags, logical cores and the cores this process may run on."""
    model, flags, ident = platform.processor() or platform.machine(), set(), {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key in ("cpu family", "model", "stepping", "CPU part", "CPU implementer") and key not in ident:
                ident[key] = value.strip()  # "AMD EPYC" alone does not say Zen 3 from Zen 4
    except OSError:
        pass
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:
        available = os.cpu_count()
    return {
        "model": model,
        "id": ident,
        "arch": platform.machine(),
        "flags": [f for f in KERNEL_FLAGS if f in flags],
        "cores_logical": os.cpu_count(),
        "cores_available": available,
    }


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def git() -> dict:
    def run(*args: str) -> str:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=False)
        return out.stdout.strip()

    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return {"commit": run("rev-parse", "HEAD") or None, "dirty": dirty}


def versions(packages: tuple[str, ...] = PACKAGES) -> dict:
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def summary(ms: list[float]) -> dict:
    """Median and spread of raw timings (ms)."""
    ordered = sorted(ms)
    n = len(ordered)
    return {
        "median": statistics.median(ordered),
        "p10": ordered[int(0.1 * (n - 1))],
        "p90": ordered[int(0.9 * (n - 1))],
        "min": ordered[0],
        "n": n,
    }


class Record:
    """One benchmark run: context captured at construction, rows added as they are measured."""

    def __init__(self, script: str, **settings) -> None:
        self.data = {
            "schema": SCHEMA,
            "script": script,
            "command": [Path(sys.executable).name, *sys.argv],
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git(),
            "machine": {
                "cpu": cpu(),
                "memory_gib": memory_gib(),
                "system": platform.platform(),
                "python": platform.python_version(),
            },
            "versions": versions(),
            "settings": settings,
            "rows": [],
        }

    def add(self, ms: list[float] | None = None, **fields) -> dict:
        """Add a row; ``ms`` (raw timings) gets its summary beside it."""
        row = dict(fields)
        if ms is not None:
            row["ms"] = [round(t, 4) for t in ms]
            row["ms_summary"] = summary(list(ms))
        self.data["rows"].append(row)
        return row

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(path)
        print(f"wrote {path}")
        return path


def load(path: Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: record schema {data.get('schema')!r}, this script reads {SCHEMA}")
    return data
