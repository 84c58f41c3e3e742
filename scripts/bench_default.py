"""Benchmark the default bundle against the teacher in one run: PyTorch eager, ORT fp32, ORT int8-dynamic (the anchor).

Where the ``optimum`` extra is installed (its own environment: optimum-onnx pins transformers < 4.58), two more rows
show what a user gets from optimum-cli for the teacher: ``optimum-cli export onnx --task feature-extraction`` (fp32)
and ``optimum-cli onnxruntime quantize --avx512`` on it (dynamic int8); Optimum exports this sentence-transformers
checkpoint with its pooling and normalisation in the graph, as edgepipe does (else the rows pool in numpy).
Every row also gets its fidelity: mean / min cosine of its sentence embeddings vs the PyTorch teacher on 64 held-back
sentences, so speed is compared at known fidelity.

Usage:
    python scripts/bench_default.py [--bundle artifacts/minilm-student/host-cpu] [--repeats 30] [--json FILE]

Inputs are real text (calibration_data/validation.txt) tiled to each shape. Every row is timed in this one process,
with the candidates interleaved round by round so that machine noise hits all of them alike; ratios are the
anchor's median over the row's median (> 1 means faster than the anchor).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgepipe.config import load_recipe, load_target, resolve_teacher
from edgepipe.data import encode, load_tokenizer, read_sentences
from edgepipe.models.hf import load_encoder
from edgepipe.runtimes import onnxruntime as ort_rt

SHAPES = ((1, 128), (1, 512), (8, 128))
ANCHOR = "ort int8-dynamic (teacher)"
FIDELITY_SENTENCES = 64


def real_inputs(tok_path: Path, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Token ids of real held-back sentences, concatenated and cut to (batch, seq); mask all ones."""
    tok = load_tokenizer(tok_path, 512)
    ids = np.concatenate([encode(tok, [s])["input_ids"][0, 1:-1] for s in read_sentences("validation.txt", 400)])
    need = batch * seq
    ids = np.resize(ids, need).reshape(batch, seq).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64)}


def timed(fn, feeds, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(feeds)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(feeds)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings from token states (b, s, d): masked mean, L2-normalised (what the teacher's pooling does)."""
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def optimum_candidates(teacher_dir: Path, work: Path, target, threads: int) -> dict:
    """Optimum's own ORT path for the teacher, as optimum-cli gives it: {name: feeds -> sentence embeddings}."""
    try:
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError:
        print('optimum-onnx is not installed: pip install "edgepipe[optimum]" to add its rows', file=sys.stderr)
        return {}
    export = work / "optimum-fp32"
    main_export(str(teacher_dir), export, task="feature-extraction", device="cpu")  # optimum-cli export onnx
    # optimum-cli onnxruntime quantize --avx512: dynamic int8, its default per-tensor weights (this CPU has no VNNI).
    config = AutoQuantizationConfig.avx512(is_static=False, per_channel=False)
    ORTQuantizer.from_pretrained(export).quantize(save_dir=work / "optimum-int8", quantization_config=config)
    rows = {}
    for name, path in (
        ("optimum-cli export fp32 (teacher)", export / "model.onnx"),
        ("optimum-cli quantize --avx512 (teacher)", work / "optimum-int8" / "model_quantized.onnx"),
    ):
        session = ort_rt.load(path, target, threads=threads)
        if "sentence_embedding" in session.output_names:  # a sentence-transformers checkpoint: pooled in the graph
            rows[name] = lambda f, s=session: s.run(f)["sentence_embedding"]
        else:
            rows[name] = lambda f, s=session: mean_pool(s.run(f)["last_hidden_state"], f["attention_mask"])
    return rows


def fidelity(fn, tok_path: Path, reference: np.ndarray) -> dict[str, float]:
    """Mean / min cosine of ``fn``'s sentence embeddings vs the teacher's on held-back sentences."""
    tok = load_tokenizer(tok_path, 128)
    feeds = encode(tok, read_sentences("validation.txt", FIDELITY_SENTENCES))
    out = np.asarray(fn(feeds), dtype=np.float64)
    cos = (out * reference).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(reference, axis=1))
    return {"mean_cosine": round(float(cos.mean()), 5), "min_cosine": round(float(cos.min()), 5)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=Path("artifacts/minilm-student/host-cpu"))
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", type=Path, help="Write the rows as JSON.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    teacher_dir = resolve_teacher(load_recipe("minilm-teacher"))
    teacher = load_encoder(teacher_dir)
    tok_path = teacher_dir / "tokenizer.json"
    work = Path(tempfile.mkdtemp(prefix="bench-default-"))
    example = real_inputs(tok_path, 1, 16)
    target = load_target("host-cpu")
    candidates = {
        "pytorch eager fp32 (teacher)": lambda f: teacher(
            torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])
        )
    }
    for precision in ("fp32", "int8-dynamic"):
        lowered = ort_rt.lower_encoder(teacher, example, target, precision, work / precision)
        session = ort_rt.load(lowered.files["model"], target, threads=args.threads)
        candidates[f"ort {precision} (teacher)"] = lambda f, s=session: s.run(f)["sentence_embedding"]
    candidates.update(optimum_candidates(teacher_dir, work, target, args.threads))
    if (args.bundle / "manifest.json").is_file():
        manifest = json.loads((args.bundle / "manifest.json").read_text())
        session = ort_rt.load(args.bundle / manifest["graphs"]["model"], target, threads=args.threads)
        candidates[f"bundle {manifest['model']} ({manifest['precision']})"] = lambda f, s=session: s.run(f)[
            "sentence_embedding"
        ]
    else:
        print(f"no bundle at {args.bundle}: build it with `edgepipe build` to add its row", file=sys.stderr)

    rows = []
    with torch.no_grad():
        ref_feeds = encode(load_tokenizer(tok_path, 128), read_sentences("validation.txt", FIDELITY_SENTENCES))
        reference = np.asarray(candidates["pytorch eager fp32 (teacher)"](ref_feeds), dtype=np.float64)
        fidelities = {name: fidelity(fn, tok_path, reference) for name, fn in candidates.items()}
        for batch, seq in SHAPES:
            feeds = real_inputs(tok_path, batch, seq)
            times: dict[str, list[float]] = {name: [] for name in candidates}
            rounds = 3  # interleave: each round times every candidate, so drift hits all alike
            for _ in range(rounds):
                for name, fn in candidates.items():
                    times[name] += timed(fn, feeds, args.warmup, max(1, args.repeats // rounds))
            anchor = float(np.median(times[ANCHOR]))
            for name, t in times.items():
                ms = float(np.median(t))
                rows.append(
                    {
                        "name": name,
                        "batch": batch,
                        "seq": seq,
                        "ms": round(ms, 3),
                        "p90_ms": round(float(np.percentile(t, 90)), 3),
                        "vs_anchor": round(anchor / ms, 3),
                        **fidelities[name],
                    }
                )

    print(f"{'candidate':44s} {'shape':>7s} {'p50 ms':>9s} {'p90 ms':>9s} {'x anchor':>9s} {'cos mean/min':>15s}")
    for r in rows:
        print(
            f"{r['name']:44s} {r['batch']}x{r['seq']:<5d} {r['ms']:9.2f} {r['p90_ms']:9.2f} {r['vs_anchor']:9.2f} "
            f"{r['mean_cosine']:.4f}/{r['min_cosine']:.4f}"
        )
    print(f"(x anchor = median of '{ANCHOR}' / median of the row; > 1 is faster; {args.threads} threads)")
    print(f"(cos = sentence-embedding cosine vs the PyTorch teacher on {FIDELITY_SENTENCES} held-back sentences)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
