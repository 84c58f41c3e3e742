"""Distillation throughput: the same recipe as 1 and as N data-parallel processes (``edgepipe distill``).

Usage:
    python scripts/bench_distill.py [--model minilm-student] [--procs 1,2] [--repeats 1]
                                    [--threads T] [--set distill.steps=40 ...] [--json F]

Each run is ``edgepipe distill`` in a fresh stage cache (so each computes its teacher targets, sharded over its
processes), launched as one process or under ``torchrun --standalone --nproc_per_node=N``; on a CPU the cores are
split evenly (one process gets all of them as threads, N processes 1/N each) unless ``--threads`` says otherwise.
Runs alternate between process counts round by round. Per run the record keeps the command's wall time, the distill
stage's own seconds, seconds per step, sentences per second and the held-back mean cosine, and how far its weights
are from the first 1-process run's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from benchrecord import ROOT, Record

from edgepipe.stages.distill import load_student


def run_once(model: str, procs: int, overrides: list[str], threads: int, cache: Path) -> dict:
    distill = ["-m", "edgepipe.cli", "-q", "distill", "--model", model, *(f"--set={o}" for o in overrides)]
    if procs == 1:
        cmd = [sys.executable, *distill]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", *distill]
    env = {**os.environ, "EDGEPIPE_CACHE": str(cache), "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    (meta_path,) = (cache / "distill").glob("*/meta.json")
    meta = json.loads(meta_path.read_text())
    return {
        "procs": procs,
        "threads_per_proc": threads,
        "wall_s": round(wall, 2),
        "stage_s": meta["seconds"],
        "seconds_per_step": meta["seconds_per_step"],
        "sentences_per_s": meta["sentences_per_s"],
        "held_out_mean_cosine": (meta.get("held_out") or {}).get("mean_cosine"),
        "world_size": meta["world_size"],
        "device": meta["device"],
        "loadavg_1min_before": round(load, 2),
        "entry": meta_path.parent,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-student")
    ap.add_argument("--procs", default="1,2", help="Process counts to compare, e.g. 1,2.")
    ap.add_argument("--repeats", type=int, default=1, help="Rounds (each runs every process count once).")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="Recipe override (repeatable).")
    ap.add_argument("--threads", type=int, help="Threads per process (default: this machine's cores / processes).")
    ap.add_argument("--json", type=Path, help="Write a benchrecord Record here.")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",")]
    cores = len(os.sched_getaffinity(0))
    settings = dict(model=args.model, procs=procs, repeats=args.repeats, overrides=args.overrides, threads=args.threads)
    record = Record("bench_distill", **settings)
    reference = None
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
        for r in range(args.repeats):
            for n in procs:
                threads = args.threads or max(1, cores // n)
                row = run_once(args.model, n, args.overrides, threads, Path(tmp) / f"{r}-{n}")
                weights = load_student(row.pop("entry")).state_dict()
                if reference is None and n == 1:
                    reference = weights
                if reference is not None:
                    row["max_abs_weight_diff_vs_1proc"] = max(
                        float((weights[k] - reference[k]).abs().max()) for k in weights
                    )
                record.add(name=f"{n} process(es)", round=r, **row)
                print(json.dumps(row))
    rows = record.data["rows"]
    for n in procs:
        steps = sorted(x["seconds_per_step"] for x in rows if x["procs"] == n)
        print(f"{n} process(es): median {steps[len(steps) // 2]:.3f} s/step")
    if args.json:
        record.data["settings"]["cuda"] = torch.cuda.is_available()
        record.write(args.json)


if __name__ == "__main__":
    main()
