"""Cost of one decode step vs context, each context with a real filled cache or state, in ONNX Runtime and
ExecuTorch (XNNPACK): full attention, windowed attention, Mamba-2 and full attention over the tiered INT8 KV cache
(a8w16), all points of a runtime interleaved in one run.

Each form is a one-layer decoder of tinylm's layer shape (hidden 384, 6 query / 2 KV heads, FFN 1024; Mamba-2:
state 128, head_dim 64, expand 2) with seeded weights, a 512-token byte-level BPE trained on
calibration_data/train.txt (so the LM head is a small part of a step), lowered with edgepipe's own
``lower_decoder`` into the prefill + decode graphs a bundle holds, and run through ``harness.runner.DecoderGraphs``
(what ``edgepipe generate`` and the device runner use).

At context C the full and tiered caches have C slots, the windowed cache its rolling 2W and Mamba-2 its fixed
state. A real prompt (calibration_data/validation.txt, encoded with that tokenizer) of C - S tokens is prefilled
through the graphs, and the S decode steps that follow (greedy, the graphs' own tokens) bring the history to C: every
timed step reads a cache or state built from real text, at its position, not a random tensor at a fixed position.
S = --warmup + --rounds x (1 + --block). In each round every (form, context) point of the runtime runs one untimed
step and then --block timed steps in a row, so machine load hits every point alike and each block runs warm:
--rounds x --block timed steps per point (default 10 x 10 = 100).

    python scripts/bench_decode.py --json benchmarks/bench_decode-<cpu>.json
    python scripts/bench_decode.py --contexts 256,1024 --runtimes onnxruntime --rounds 2 --block 3   # a smoke run

``--json FILE`` writes a ``benchrecord`` record: one row per (runtime, form, context) with every timed step (ms),
the state bytes and the positions timed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from benchrecord import Record

from edgepipe.build.decoder import decoder_facts, open_graphs
from edgepipe.config import KVCacheConfig, load_target
from edgepipe.data import encode_text, read_sentences
from edgepipe.models.decoder import DecoderConfig, DecoderLM
from edgepipe.models.kv_cache import tiered_decoder
from edgepipe.models.mamba import MambaConfig, MambaLM
from edgepipe.runtimes import get_runtime
from edgepipe.runtimes.decoder_graphs import graph_io
from edgepipe.stages.pretrain import init_weights, train_tokenizer

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)
FORMS = ("full", "windowed", "mamba2", "tiered-int8")
TARGETS = {"onnxruntime": "host-cpu", "executorch": "android-arm64"}
VOCAB = 512


def model_for(form: str, context: int, args: argparse.Namespace):
    """(module to lower, plain model, precision) for ``form`` with a cache for ``context`` tokens; seeded."""
    torch.manual_seed(0)
    if form == "mamba2":
        cfg = MambaConfig(vocab_size=VOCAB, hidden=args.hidden, layers=1, state_size=args.state, head_dim=64)
        return MambaLM(cfg).eval(), None, "fp32"
    attention = f"windowed:{args.window}" if form == "windowed" else "full"
    cfg = DecoderConfig(
        vocab_size=VOCAB, hidden=args.hidden, layers=1, heads=args.heads, kv_heads=args.kv_heads, ffn=args.ffn,
        attention=attention, max_context=context,
    )  # fmt: skip
    model = DecoderLM(cfg).eval()
    init_weights(model, seed=0)  # pretraining's init: activations in a realistic range for the INT8 cache
    if form == "tiered-int8":
        return tiered_decoder(model, args.tok, KVCacheConfig())[0], model, "a8w16"
    return model, model, "fp32"


def lower(runtime: str, form: str, context: int, out: Path, args: argparse.Namespace):
    """Lowered graphs of ``form`` (a cache of ``context`` slots where it has one) -> (DecoderGraphs, state bytes)."""
    module, model, precision = model_for(form, context, args)
    target = load_target(TARGETS[runtime])
    low = get_runtime(runtime).lower_decoder(module, target, precision, out)
    chunk = low.report["prefill_tokens"]
    meta = {
        "files": {k: p.name for k, p in low.files.items()},
        "io": graph_io(module, chunk),
        "decoder": decoder_facts(model or module, module, chunk, precision),
    }
    return open_graphs(out, target, meta, args.threads), meta["decoder"]["state_bytes"]


def check_prefill(form: str, context: int, prompt: np.ndarray, points: dict, args) -> float:
    """Largest |logit| difference between the graphs after prefill and eager PyTorch on the same prompt."""
    model = model_for(form, context, args)[0]
    with torch.no_grad():
        want = model(torch.from_numpy(prompt))[0, -1].numpy()
    got = np.asarray(points[form, prompt.shape[1] + args.warmup + args.rounds * (1 + args.block)]["logits"][0])
    err = float(np.abs(got - want).max())
    if err > 1e-3:
        raise SystemExit(f"{form}: prefill logits differ from eager PyTorch by {err:.2e} (> 1e-3)")
    return err


def prefill(graphs, prompt: np.ndarray) -> dict:
    logits, state = graphs.feed(prompt, 0, graphs.init_state())
    return {"graphs": graphs, "logits": logits, "state": state, "position": prompt.shape[1], "ms": []}


def step(point: dict) -> float:
    """One greedy decode step of ``point``; returns its wall time in ms."""
    token = np.array([[int(np.argmax(point["logits"][0]))]], dtype=np.int64)
    start = time.perf_counter()
    point["logits"], point["state"] = point["graphs"].feed(token, point["position"], point["state"])
    ms = (time.perf_counter() - start) * 1e3
    point["position"] += 1
    return ms


def measure(runtime: str, contexts: list[int], stream: np.ndarray, work: Path, args) -> list[dict]:
    """Every (form, context) point of ``runtime``: lowered, prefilled with real text, timed interleaved."""
    steps = args.warmup + args.rounds * (1 + args.block)
    points, facts, shared = {}, {}, {}
    for form in args.forms:
        for context in contexts:
            if form == "tiered-int8" and context <= KVCacheConfig().active:
                print(f"skip tiered-int8 at {context}: its cache keeps the newest {KVCacheConfig().active} in fp16")
                continue
            grows = form in ("full", "tiered-int8")  # windowed and Mamba-2 graphs are the same at every context
            key = (form, context if grows else max(contexts))
            if key not in shared:
                t0 = time.perf_counter()
                shared[key] = lower(runtime, form, key[1], work / f"{runtime}-{form}-{key[1]}", args)
                print(f"lowered {runtime} {form} (cache for {key[1]}) in {time.perf_counter() - t0:.0f} s", flush=True)
            graphs, state_bytes = shared[key]
            prompt = np.ascontiguousarray(stream[: context - steps][None], dtype=np.int64)
            points[form, context] = prefill(graphs, prompt)
            facts[form, context] = {"state_bytes": state_bytes, "prefilled": int(prompt.shape[1])}
            if context == contexts[0] and form != "tiered-int8":  # the graphs compute what the model does
                facts[form, context]["prefill_max_abs_vs_eager"] = check_prefill(form, key[1], prompt, points, args)
    for point in points.values():
        for _ in range(args.warmup):
            step(point)
    for _ in range(args.rounds):
        for point in points.values():
            step(point)  # re-warms what the other points evicted
            point["ms"] += [step(point) for _ in range(args.block)]
    rows = []
    for (form, context), point in points.items():
        rows.append(
            {
                "runtime": runtime,
                "form": form,
                "context": context,
                "ms": point["ms"],
                "positions": [context - steps, point["position"]],
                **facts[form, context],
            }
        )
    return rows


def report(rows: list[dict]) -> list[str]:
    """Median ms per step per form and context, flatness of the fixed-state forms, full vs the others at the end."""
    lines = []
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        by = {(r["form"], r["context"]): statistics.median(r["ms"]) for r in rows if r["runtime"] == runtime}
        contexts = sorted({c for _, c in by})
        lines.append(f"{runtime}: median ms per decode step at contexts {contexts}")
        for form in FORMS:
            ms = [by[form, c] for c in contexts if (form, c) in by]
            if not ms:
                continue
            mid = statistics.median(ms)
            spread = 100 * max(max(ms) / mid - 1, 1 - min(ms) / mid)
            flat = "" if form in ("full", "tiered-int8") else f"   within {spread:.0f}% of its median"
            lines.append(f"  {form:12s} " + " ".join(f"{m:8.3f}" for m in ms) + flat)
        last = contexts[-1]
        ratios = [f"full / {f} {by['full', last] / by[f, last]:.1f}x" for f in FORMS[1:] if (f, last) in by]
        if ("full", last) in by and ratios:
            lines.append(f"  at {last}: " + ", ".join(ratios))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runtimes", default="onnxruntime,executorch")
    parser.add_argument("--forms", default=",".join(FORMS))
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6, help="attention query heads (head_dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="attention kv heads (grouped-query)")
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--state", type=int, default=128, help="Mamba-2 state size (head_dim 64, expand 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds over every point")
    parser.add_argument("--block", type=int, default=10, help="timed steps per point per round (after one untimed)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per point before the first round")
    parser.add_argument("--json", type=Path, help="write the benchrecord record here")
    args = parser.parse_args(argv)
    args.forms = args.forms.split(",")
    contexts = sorted(int(c) for c in args.contexts.split(","))
    steps = args.warmup + args.rounds * (1 + args.block)
    if contexts[0] <= steps:
        parser.error(f"every context must exceed the {steps} decode steps that fill it (--warmup + rounds x (1+block))")
    settings = {k: v for k, v in vars(args).items() if k != "json"}
    record = Record(
        "bench_decode", **{**settings, "contexts": contexts, "timed_steps_per_point": args.rounds * args.block}
    )
    warnings.simplefilter("ignore")
    # PyTorch's own intra-op threads (export, calibration) spin after their work and steal the cores the timed
    # runtime needs: ExecuTorch steps measured 20x slower with them on a busy 2-core machine.
    torch.set_num_threads(max(1, args.threads))
    args.tok = train_tokenizer(read_sentences("train.txt", 20000), VOCAB)
    stream = encode_text(args.tok, read_sentences("validation.txt"))
    if len(stream) < contexts[-1]:
        stream = np.resize(stream, contexts[-1])  # the held-back text again from its start
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        for runtime in args.runtimes.split(","):
            rows += measure(runtime, contexts, stream, Path(tmp), args)
    print("\n".join(report(rows)))
    if args.json:
        for row in rows:
            record.add(**row)
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
