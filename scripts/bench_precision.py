"""Precision plans side by side, per runtime: speed at 1x128 and 1x512, fidelity vs the teacher, INT8 coverage, size.

Usage:
    python scripts/bench_precision.py [--model minilm-student] [--runtimes onnxruntime,executorch,tensorrt]
                                      [--plans fp32,fp16,int8-dynamic,w8a8,int8-fp16]
                                      [--json benchmarks/bench_precision-<cpu>.json]

The model is the recipe's distilled student when the stage cache already holds it (build it once with
`edgepipe build`), else the teacher (all-MiniLM-L6-v2). Every plan is lowered with the runtime's own module
exactly as `edgepipe build` does (same calibration split, same held-back budget check), then:

- fidelity: held-back mean/min cosine vs the teacher on calibration_data/validation.txt (real text, never used
  for calibration), and the drop vs the unquantized model that the fidelity budget is about;
- speed: median ms at 1x128 and 1x512 over --rounds x --per-round timed runs (default 10 x 15 = 150: fewer than
  ~100 gave ratios off by up to 1.8x on a shared machine), sessions timed round by round in this one process so
  ratios vs fp32 see the same machine load (TensorRT rows run a CPU proxy: no device latency, so no ms);
- INT8 coverage: share of weight-GEMM FLOPs that run int8, read back from the lowered graph;
- size: the artifact's bytes; the resident memory a fresh process gains by loading it and running 1x512.

What int8 buys in speed on x86 depends on VNNI (``avx512_vnni`` / ``avx_vnni``), which the table's title reports:
without it ORT's int8 GEMMs run little faster than fp32, and what int8 buys is size and memory. The int8 choices
follow the target's declared CPU features (host-cpu: this machine's), as in ``edgepipe build``.

``--json FILE`` writes a ``benchrecord`` record: per (runtime, plan) every timed run per shape (``ms_by_shape``),
fidelity, INT8 coverage, bytes and resident memory.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchrecord import Record  # noqa: E402  (scripts/ is on sys.path when the script runs)

from edgepipe.build.encoder import cached_student  # noqa: E402  (the script runs from a checkout)
from edgepipe.config import RunConfig, load_recipe, load_target, resolve_teacher  # noqa: E402
from edgepipe.data import batches, encode, load_tokenizer, read_sentences  # noqa: E402
from edgepipe.models.hf import load_encoder  # noqa: E402
from edgepipe.runtimes import QuantInputs, cpu_has_vnni, get_runtime  # noqa: E402
from edgepipe.stages.quantize import int8_coverage  # noqa: E402
from edgepipe.stages.validate import compare, embed_session, embed_torch  # noqa: E402

TARGETS = {"onnxruntime": "host-cpu", "executorch": "android-arm64", "tensorrt": "jetson-orin-nano"}
SHAPES = ((1, 128), (1, 512))
# A fresh process: import the runtime module, then load the artifact and run 1x512 once; print the resident-set
# growth in MB (current RSS, not the peak: importing torch peaks higher than a small session ever does).
RSS_CHILD = """
import pathlib, sys
import numpy as np
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
sys.path.insert(0, sys.argv[3])
from edgepipe.runtimes import get_runtime
runtime = get_runtime(sys.argv[1])
before = rss()
s = runtime.load(pathlib.Path(sys.argv[2]))
s.run({"input_ids": np.full((1, 512), 2000, np.int64), "attention_mask": np.ones((1, 512), np.int64)})
print(rss() - before)
"""


def load_model(recipe_name: str):
    """(name, model, teacher, tokenizer path): the cached student of ``recipe_name`` if built, else the teacher."""
    recipe = load_recipe(recipe_name)
    cfg = RunConfig(recipe, load_target("host-cpu"), "fp32", Path(tempfile.gettempdir()))
    teacher_dir = resolve_teacher(recipe)
    teacher = load_encoder(teacher_dir)
    if recipe.student is not None:
        student = cached_student(cfg)
        if student is not None:
            return f"{recipe.name} (cached student)", student, teacher, teacher_dir / "tokenizer.json"
        print(f"no cached student for {recipe.name}: benchmarking the teacher", file=sys.stderr)
    return "all-MiniLM-L6-v2 (teacher)", teacher, teacher, teacher_dir / "tokenizer.json"


def timing_feeds(tok_path: Path, seq: int) -> dict[str, np.ndarray]:
    """Real token ids (validation text, concatenated) at exactly ``seq`` tokens."""
    tok = load_tokenizer(tok_path, 512)
    ids = np.concatenate([encode(tok, [s])["input_ids"][0, 1:-1] for s in read_sentences("validation.txt", 400)])
    return {"input_ids": np.resize(ids, (1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}


def time_sessions(sessions: dict[str, object], feeds: dict, rounds: int, per_round: int) -> dict[str, list[float]]:
    """Every timed run (ms) per session; each round runs every session ``per_round`` times, so load drifts hit all
    alike."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(feeds)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(per_round):
                t = time.perf_counter()
                s.run(feeds)
                times[name].append((time.perf_counter() - t) * 1e3)
    return times


def session_rss_mb(runtime: str, artifact: Path) -> float:
    """Resident memory (MB) a fresh process gains by loading ``artifact`` and running 1x512 once."""
    repo = str(Path(__file__).resolve().parents[1])
    out = subprocess.run(
        [sys.executable, "-c", RSS_CHILD, runtime, str(artifact), repo], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm-student", help="Recipe name (its cached student, else the teacher).")
    ap.add_argument("--runtimes", default="onnxruntime,executorch,tensorrt")
    ap.add_argument("--plans", default="fp32,fp16,int8-dynamic,w8a8,int8-fp16")
    ap.add_argument("--held-out", type=int, default=512, help="Held-back sentences (validation.txt) for fidelity.")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=15, help="timed runs per session per round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-precision"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    record = Record("bench_precision", **settings, timed_runs=args.rounds * args.per_round)

    name, model, teacher, tok_path = load_model(args.model)
    recipe = load_recipe(args.model)
    q, v = recipe.quantize, recipe.validate
    record.data["settings"]["fidelity_budget"] = q.fidelity_budget
    tok = load_tokenizer(tok_path, v.max_len)
    held = list(batches(tok, read_sentences(v.data, args.held_out), 32))
    calib = list(batches(load_tokenizer(tok_path, q.max_len), read_sentences(q.calibration, q.samples), 32))
    teacher_emb = embed_torch(teacher, held)
    model_emb = embed_torch(model, held)
    example = encode(tok, read_sentences(q.calibration, 2))
    quant = QuantInputs(calibration=calib, held_out=held, reference=model_emb, config=q)
    print(f"model: {name}; vs teacher in PyTorch: {compare(model_emb, teacher_emb)}", file=sys.stderr)

    rows = []
    feeds = {shape: timing_feeds(tok_path, shape[1]) for shape in SHAPES}
    for runtime_name in args.runtimes.split(","):
        try:
            runtime = get_runtime(runtime_name)
        except Exception as exc:  # a runtime module another helper has not written yet, or a missing extra
            print(f"skip {runtime_name}: {exc}", file=sys.stderr)
            continue
        target = load_target(TARGETS[runtime_name])
        sessions, runtime_rows = {}, []
        for plan in args.plans.split(","):
            if plan not in runtime.precisions():
                continue
            out = args.out / runtime_name / plan
            print(f"lower {runtime_name} {plan} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                lowered = runtime.lower_encoder(model, example, target, plan, out, quant)
            except Exception as exc:
                print(f"  failed: {exc}", file=sys.stderr)
                runtime_rows.append({"runtime": runtime_name, "plan": plan, "error": str(exc)})
                continue
            artifact = lowered.files["model"]
            try:
                session = runtime.load(artifact, target, threads=args.threads)
            except TypeError:  # a runtime whose load() takes no thread count
                session = runtime.load(artifact, target)
            emb = embed_session(session, held)
            report = lowered.report
            coverage = report.get("int8_coverage")
            if coverage is None and artifact.suffix == ".onnx":
                import onnx

                coverage = int8_coverage(onnx.load(str(artifact), load_external_data=False))
            row = {
                "runtime": runtime_name,
                "plan": plan,
                "lower_s": round(time.perf_counter() - start, 1),
                "vs_teacher": compare(emb, teacher_emb),
                "drop_vs_fp32_model": round(1 - compare(emb, model_emb)["mean_cosine"], 6),
                "int8_coverage": coverage.get("total") if isinstance(coverage, dict) else coverage,
                "bytes": artifact.stat().st_size,
                "calibration": report.get("calibration"),
                "plan_layers": report.get("plan"),
                "budget": report.get("budget"),
            }
            if runtime.same_machine(target):
                sessions[plan] = session
                row["rss_mb"] = round(session_rss_mb(runtime_name, artifact), 1)
            runtime_rows.append(row)
        for shape in SHAPES:
            runs = time_sessions(sessions, feeds[shape], args.rounds, args.per_round) if sessions else {}
            for row in runtime_rows:
                if row["plan"] in runs:
                    row.setdefault("ms_by_shape", {})[f"{shape[0]}x{shape[1]}"] = [
                        round(t, 4) for t in runs[row["plan"]]
                    ]
                    row[f"ms_{shape[0]}x{shape[1]}"] = round(statistics.median(runs[row["plan"]]), 3)
        base = next((r for r in runtime_rows if r["plan"] == "fp32"), None)
        for row in runtime_rows:
            for shape in SHAPES:
                key = f"ms_{shape[0]}x{shape[1]}"
                if base and row.get(key) and base.get(key):
                    row[f"x_fp32_{shape[1]}"] = round(row[key] / base[key], 2)
        rows += runtime_rows

    print_table(name, rows)
    if args.json:
        record.data["settings"]["model_benchmarked"] = name
        for row in rows:
            record.add(**row)
        record.write(args.json)
    return 0


def print_table(name: str, rows: list[dict]) -> None:
    head = (
        f"{'runtime':<12} {'plan':<12} {'ms 1x128':>9} {'ms 1x512':>9} {'x fp32':>11} {'mean cos':>9} "
        f"{'min cos':>8} {'drop':>8} {'int8 cov':>8} {'MB':>7} {'RSS MB':>7}"
    )
    vnni = "with" if cpu_has_vnni() else "without"
    print(f"\n{name}: held-back cosine vs the teacher; drop = 1 - mean cosine vs the unquantized model")
    print(f"{os.cpu_count()} CPUs {vnni} VNNI ({platform.processor() or platform.machine()})")
    print(head)
    print("-" * len(head))

    def f(x, fmt):
        return format(x, fmt) if isinstance(x, int | float) else "—"

    for r in rows:
        if "error" in r:
            print(f"{r['runtime']:<12} {r['plan']:<12} failed: {r['error'][:80]}")
            continue
        ratio = f"{f(r.get('x_fp32_128'), '.2f')}/{f(r.get('x_fp32_512'), '.2f')}"
        print(
            f"{r['runtime']:<12} {r['plan']:<12} {f(r.get('ms_1x128'), '9.1f')} {f(r.get('ms_1x512'), '9.1f')} "
            f"{ratio:>11} {r['vs_teacher']['mean_cosine']:9.4f} {r['vs_teacher']['min_cosine']:8.4f} "
            f"{r['drop_vs_fp32_model']:8.4f} {f(r['int8_coverage'], '8.2f')} {r['bytes'] / 1e6:7.1f} "
            f"{f(r.get('rss_mb'), '7.0f')}"
        )
    print("x fp32 = ms ratio vs the same runtime's fp32 at 1x128/1x512; tensorrt rows: CPU proxy, no device timing")


if __name__ == "__main__":
    sys.exit(main())
