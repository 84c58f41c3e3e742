"""Pareto table for the MiniLM student family: depth / width / attention x precision -> speed and fidelity.

Usage:
    python scripts/bench_student.py [--steps 400] [--points l3,l2] [--precisions fp32,int8-dynamic] [--json F]
                                    [--set distill.sentences=76800 ...]

Each point is built with the real pipeline (distill -> lower -> validate, all cached, so re-runs are cheap) for the
host-cpu target, then timed in onnxruntime at 1x128 and 1x512 on real held-back text, interleaved round by round
with the anchor (ORT int8-dynamic on the teacher) in this one process. Fidelity is the bundle's held-back mean/min
cosine vs the teacher, from its manifest. A point is on the frontier when no other point is both faster at 1x128
and at least as faithful. ``--repeats`` timed runs per session and shape (default 150, in 3 interleaved rounds:
fewer than ~100 gave ratios off by up to 1.8x on a shared machine).

``--json FILE`` writes a ``benchrecord`` record: per point and shape every timed run, the ratio to the anchor and
the bundle's held-back fidelity.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchrecord import Record

from edgepipe.build import build
from edgepipe.config import load_target, resolve_run_config, resolve_teacher
from edgepipe.data import encode, load_tokenizer, read_sentences
from edgepipe.models.hf import load_encoder
from edgepipe.runtimes import onnxruntime as ort_rt

# name -> (recipe, overrides); all cut from all-MiniLM-L6-v2. Depth/width points vary the default recipe; the swap
# points are the shipped swap recipes (the teacher's six layers with another mixer, re-distilled).
POINTS = {
    "l3": ("minilm-student", ["student.layers=[1, 3, 5]"]),
    "l3-ffn768": ("minilm-student", ["student.layers=[1, 3, 5]", "student.ffn=768"]),
    "l3-h256": ("minilm-student", ["student.layers=[1, 3, 5]", "student.hidden=256"]),
    "l3-h192": ("minilm-student", ["student.layers=[1, 3, 5]", "student.hidden=192"]),
    "l2": ("minilm-student", ["student.layers=[2, 5]"]),
    "l2-ffn768": ("minilm-student", ["student.layers=[2, 5]", "student.ffn=768"]),
    "l6-windowed32": ("minilm-windowed", []),
    "l6-linear": ("minilm-linear", []),
    "mamba2": ("minilm-mamba", []),
}
SHAPES = ((1, 128), (1, 512))


def real_inputs(tok_path: Path, seq: int) -> dict[str, np.ndarray]:
    tok = load_tokenizer(tok_path, 512)
    ids = np.concatenate([encode(tok, [s])["input_ids"][0, 1:-1] for s in read_sentences("validation.txt", 400)])
    return {"input_ids": np.resize(ids, (1, seq)).astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}


def timed_ms(run, feeds, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        run(feeds)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(feeds)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=",".join(POINTS), help=f"Comma-separated subset of {', '.join(POINTS)}.")
    ap.add_argument("--precisions", default="fp32,int8-dynamic")
    ap.add_argument("--steps", type=int, default=None, help="Override distill.steps for every point.")
    ap.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="Recipe override, every point."
    )
    ap.add_argument("--repeats", type=int, default=150, help="Timed runs per session and shape (3 rounds).")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-student"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    target = load_target("host-cpu")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    record = Record("bench_student", **settings)

    sessions: dict[str, object] = {}
    meta: dict[str, dict] = {}
    for point in args.points.split(","):
        recipe, overrides = POINTS[point]
        overrides = overrides + ([f"distill.steps={args.steps}"] if args.steps else []) + args.sets
        for precision in args.precisions.split(","):
            cfg = resolve_run_config(recipe, "host-cpu", precision, args.out / point, tuple(overrides))
            print(f"building {point} ({precision}) ...", file=sys.stderr, flush=True)
            bundle = build(cfg)
            name = f"{point} {precision}"
            sessions[name] = ort_rt.load(bundle.path / "model.onnx", target, threads=args.threads)
            fid = bundle.manifest["fidelity"]["lowered"]
            meta[name] = {"point": point, "recipe": recipe, "precision": precision, "overrides": overrides, **fid}

    teacher_dir = resolve_teacher(cfg.recipe)
    work = Path(tempfile.mkdtemp(prefix="bench-student-"))
    example = real_inputs(teacher_dir / "tokenizer.json", 16)
    lowered = ort_rt.lower_encoder(load_encoder(teacher_dir), example, target, "int8-dynamic", work)
    anchor = "anchor: teacher int8-dynamic"
    sessions = {anchor: ort_rt.load(lowered.files["model"], target, threads=args.threads), **sessions}

    rows = []
    for _, seq in SHAPES:
        feeds = real_inputs(teacher_dir / "tokenizer.json", seq)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for _ in range(3):  # interleaved rounds
            for name, session in sessions.items():
                times[name] += timed_ms(session.run, feeds, 3, max(1, args.repeats // 3))
        base = float(np.median(times[anchor]))
        for name, t in times.items():
            ms = float(np.median(t))
            rows.append(
                {
                    "name": name,
                    "seq": seq,
                    "ms_median": round(ms, 3),
                    "vs_anchor": round(base / ms, 3),
                    "ms": t,
                    **meta.get(name, {}),
                }
            )

    by_name = {r["name"]: r for r in rows if r["seq"] == 128}
    for r in rows:
        r["frontier"] = r["name"] != anchor and not any(
            o["name"] not in (anchor, r["name"])
            and o["ms_median"] < by_name[r["name"]]["ms_median"]
            and o.get("mean_cosine", 0) >= by_name[r["name"]].get("mean_cosine", 0)
            for o in by_name.values()
        )
    print(f"{'point':28s} {'seq':>4s} {'ms':>8s} {'x anchor':>9s} {'mean cos':>9s} {'min cos':>8s} frontier")
    for r in rows:
        cos = f"{r['mean_cosine']:9.4f} {r['min_cosine']:8.4f}" if "mean_cosine" in r else f"{'-':>9s} {'-':>8s}"
        print(
            f"{r['name']:28s} {r['seq']:4d} {r['ms_median']:8.2f} {r['vs_anchor']:9.2f} {cos} "
            f"{'*' if r['frontier'] else ''}"
        )
    print(f"(x anchor = ORT int8-dynamic teacher median / row median, measured in this run; {args.threads} threads)")
    if args.json:
        for r in rows:
            record.add(**r)
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
