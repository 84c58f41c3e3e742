"""Decoder speed, memory and fidelity: teacher and students x precision x context, in onnxruntime and ExecuTorch.

For each model, precision, runtime and context C the prefill + decode graphs are lowered with a cache of C tokens
(what a bundle built for that context holds; windowed and Mamba-2 states do not grow with C), a prompt of C tokens
is prefilled, and ``--steps`` greedy decode steps are timed one by one, interleaved across the configurations of
a context so machine noise spreads over all of them. Perplexity and top-1 next-token agreement with the fp32
teacher are measured once per (model, precision, runtime), teacher-forced through the graphs on held-back windows
(the decoder build's own validation, ``edgepipe.build.decoder.score_graphs``).

    python scripts/bench_decoder.py --teacher ~/.cache/edgepipe/tinylm-teacher \\
        --student windowed=/tmp/tinylm-windowed --student mamba=/tmp/tinylm-mamba \\
        --json benchmarks/bench_decoder-<cpu>.json

``--json FILE`` writes a ``benchrecord`` record, one row per (model, precision, runtime, context): every timed
decode step (``ms``), tokens/s of the median, cache and decode-memory bytes, held-back perplexity and top-1
agreement with the fp32 teacher; a8w16 rows use the tiered INT8 KV cache. ``--steps`` timed steps per
configuration (default 100).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from benchrecord import Record

from edgepipe.build.decoder import PREFILL_SKIP, decoder_facts, open_graphs
from edgepipe.config import KVCacheConfig, load_target
from edgepipe.data import load_tokenizer
from edgepipe.models.hf_decoders import load_decoder
from edgepipe.models.kv_cache import tiered_decoder
from edgepipe.precisions import DECODER_PLANS
from edgepipe.runtimes import get_runtime
from edgepipe.runtimes.decoder_graphs import graph_io
from edgepipe.stages.validate import EVAL_TOKENS, eval_windows, score_graphs, summarize

TARGETS = {"onnxruntime": "host-cpu", "executorch": "android-arm64"}


def lowered(
    ckpt: Path, precision: str, runtime: str, context: int, tok, out: Path, threads: int | None
) -> tuple[object, dict]:
    """(graphs, facts) for one configuration, lowered into ``out``."""
    model = load_decoder(ckpt, max_context=context)
    module = tiered_decoder(model, tok, KVCacheConfig())[0] if precision == "a8w16" else model
    target = load_target(TARGETS[runtime])
    low = get_runtime(target.runtime).lower_decoder(module, target, precision, out)
    meta = {
        "files": {k: p.name for k, p in low.files.items()},
        "io": graph_io(module, low.report["prefill_tokens"]),
        "decoder": decoder_facts(model, module, low.report["prefill_tokens"], precision),
    }
    return open_graphs(out, target, meta, threads), meta["decoder"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("~/.cache/edgepipe/tinylm-teacher").expanduser())
    ap.add_argument("--student", action="append", default=[], help="name=checkpoint dir (repeatable)")
    ap.add_argument("--precisions", default="fp32,fp16,a8w16")
    ap.add_argument("--contexts", default="256,1024,4096")
    ap.add_argument("--runtimes", default="onnxruntime,executorch")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps per configuration")
    ap.add_argument("--windows", type=int, default=4, help="held-back windows for perplexity / agreement")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="runtime threads per session (default 1: the configurations are interleaved, and idle multi-thread "
        "pools spin and take the cores from the next one; a decode step's GEMMs are small)",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    record = Record("bench_decoder", **settings)

    models = {"teacher": args.teacher, **dict(s.split("=", 1) for s in args.student)}
    models = {k: Path(v).expanduser() for k, v in models.items()}
    tok = load_tokenizer(args.teacher / "tokenizer.json")
    wins = eval_windows(tok, "validation.txt", EVAL_TOKENS + 1, args.windows)
    contexts = [int(c) for c in args.contexts.split(",")]
    teacher_top1 = None
    fidelity: dict[tuple, dict] = {}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-decoder-") as tmp:
        for context in contexts:
            configs = {}
            for name, ckpt in models.items():
                kind = json.loads((ckpt / "config.json").read_text()).get("model_type")
                for runtime in args.runtimes.split(","):
                    for precision in args.precisions.split(","):
                        if precision not in DECODER_PLANS[runtime]:
                            continue
                        if precision == "a8w16" and (kind != "llama" or name != "teacher"):
                            continue  # the tiered cache is for full attention
                        if precision == "fp16" and runtime != "onnxruntime":
                            continue
                        key = (name, precision, runtime)
                        out = Path(tmp) / f"{name}-{precision}-{runtime}-{context}"
                        t0 = time.perf_counter()
                        graphs, facts = lowered(ckpt, precision, runtime, context, tok, out, args.threads)
                        print(f"lowered {key} at {context} in {time.perf_counter() - t0:.0f} s", flush=True)
                        if key not in fidelity:
                            scores = score_graphs(graphs, wins, PREFILL_SKIP)
                            if teacher_top1 is None:  # the first configuration is the fp32 teacher
                                teacher_top1 = scores["top1"]
                            fidelity[key] = summarize(scores, teacher_top1)
                        prompt = np.resize(wins.reshape(-1), (1, context)).astype(np.int64)
                        logits, state = graphs.feed(prompt, 0, graphs.init_state())
                        configs[key] = {
                            "graphs": graphs,
                            "facts": facts,
                            "logits": logits,
                            "state": state,
                            "position": context,
                            "times": [],
                        }
            for _ in range(args.steps):  # interleaved: one step of each configuration per round
                for c in configs.values():
                    token = np.array([[int(np.argmax(c["logits"][0]))]], dtype=np.int64)
                    t0 = time.perf_counter()
                    c["logits"], c["state"] = c["graphs"].feed(token, c["position"], c["state"])
                    c["times"].append(time.perf_counter() - t0)
                    c["position"] += 1
            for (name, precision, runtime), c in configs.items():
                ms = 1e3 * float(np.median(c["times"]))
                f = fidelity[(name, precision, runtime)]
                rows.append(
                    {
                        "model": name,
                        "precision": precision,
                        "runtime": runtime,
                        "context": context,
                        "tokens_per_s": round(1e3 / ms, 1),
                        "ms_per_token": round(ms, 3),
                        "cache_bytes": c["facts"]["state_bytes"],
                        "memory_bytes": c["facts"]["decode_memory_bytes"]["total"],
                        "ppl": f["perplexity"],
                        "agreement": f["top1_vs_teacher"],
                        "ms": [1e3 * t for t in c["times"]],
                    }
                )
    anchor = {
        (r["runtime"], r["context"]): r["tokens_per_s"]
        for r in rows
        if r["model"] == "teacher" and r["precision"] == "fp32"
    }
    print(
        f"\n{'model':10} {'prec':6} {'runtime':12} {'ctx':>5} {'tok/s':>8} {'x teacher':>9} {'cache MiB':>9} "
        f"{'mem MiB':>8} {'ppl':>8} {'top-1':>6}"
    )
    for r in rows:
        ratio = (
            r["tokens_per_s"] / anchor[(r["runtime"], r["context"])] if (r["runtime"], r["context"]) in anchor else 0
        )
        print(
            f"{r['model']:10} {r['precision']:6} {r['runtime']:12} {r['context']:>5} {r['tokens_per_s']:>8.1f} "
            f"{ratio:>9.2f} {r['cache_bytes'] / 2**20:>9.2f} {r['memory_bytes'] / 2**20:>8.1f} {r['ppl']:>8.1f} "
            f"{r['agreement']:>6.3f}"
        )
    if args.json:
        for r in rows:
            record.add(**r)
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
