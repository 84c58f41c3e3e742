"""Tiered INT8 KV cache vs an fp16 cache on real held-back text: cache bytes and top-1 next-token agreement.

For each context N the held-back text (calibration_data/validation.txt, sentences joined with ``<|eos|>`` in file
order, so a long context spans many unrelated documents) is decoded teacher-forced: a 64-token prefill, then one
token per step up to N. Every cache configuration sees the same tokens; the fp16 cache (no archive) is the
reference for top-1 agreement. Perplexity by position bucket shows how far the model is from its trained context.
Also prints the reconstruction error of K and V under the candidate scale granularities (why K is per channel).

    OMP_NUM_THREADS=1 python scripts/measure_kv_cache.py --model ~/.cache/edgepipe/tinylm-teacher --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from edgepipe.data import encode_text, read_sentences
from edgepipe.models.hf_decoders import load_decoder
from edgepipe.models.kv_cache import QMAX, TieredDecoder, cache_bytes, calibrate_on_text, decode_memory, quantize

PREFILL = 64


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm()).item()


def scale_granularity(model, ids: torch.Tensor) -> dict[str, float]:
    """Relative error of INT8 round trips of real K and V under different scale granularities (oracle absmax)."""
    with torch.no_grad():
        _, keys, values = model._layers(ids, None)
    k, v = torch.stack(keys), torch.stack(values)  # (layers, b, kvh, n, d)

    def rt(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        s = torch.clamp(absmax, min=1e-6) / QMAX
        return quantize(x, s).float() * s

    out = {}
    for name, x in (("k", k), ("v", v)):
        out[f"{name}_per_head"] = _rel(x, rt(x, x.abs().amax(dim=(1, 3, 4), keepdim=True)))
        out[f"{name}_per_channel"] = _rel(x, rt(x, x.abs().amax(dim=(1, 3), keepdim=True)))
        out[f"{name}_per_token"] = _rel(x, rt(x, x.abs().amax(dim=4, keepdim=True)))
    # How uneven K's channels are: largest channel absmax over the median, per (layer, head), averaged.
    ch = k.abs().amax(dim=(1, 3))
    out["k_channel_max_over_median"] = (ch.amax(-1) / ch.median(-1).values).mean().item()
    return out


@torch.no_grad()
def decode_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Prefill PREFILL tokens, then teacher-force one token per step: logits for positions PREFILL-1 .. n-2."""
    logits, *state = model.prefill(ids[:, :PREFILL])
    out = [logits[:, -1]]
    for t in range(PREFILL, ids.shape[1] - 1):
        logits, *state = model.step(ids[:, t : t + 1], torch.tensor([t]), *state)
        out.append(logits[:, -1])
    return torch.stack(out, dim=1)[0]  # (n - PREFILL, vocab)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("~/.cache/edgepipe/tinylm-teacher"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--active", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--calibration-windows", type=int, default=32, help="256-token windows of calibration.txt")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model_dir = args.model.expanduser()
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    stream = torch.from_numpy(encode_text(tok, read_sentences("validation.txt")))
    base = load_decoder(model_dir)
    scales = calibrate_on_text(base, tok, read_sentences("calibration.txt"), 256, args.calibration_windows)
    report = {"validation_tokens": len(stream), "granularity": scale_granularity(base, stream[:1024].reshape(1, -1))}
    print(json.dumps(report["granularity"], indent=1))
    rows = []
    for n in args.contexts:
        if n + 1 > len(stream):
            print(f"context {n}: validation.txt has only {len(stream)} tokens; skipped")
            continue
        model = load_decoder(model_dir, max_context=n)
        ids = stream[: n + 1].reshape(1, -1)
        targets = ids[0, PREFILL:]
        # fp16: the whole cache in fp16, no archive (the reference); fp32: DecoderLM's own float32 cache.
        configs = {"fp16": TieredDecoder(model, scales, active=n), "fp32": model}
        for r in args.active:
            configs[f"tiered-R{r}-token"] = TieredDecoder(model, scales, active=r, v_scales="token")
        configs[f"tiered-R{max(args.active)}-head"] = TieredDecoder(
            model, scales, active=max(args.active), v_scales="head"
        )
        ref, dtypes = None, {"fp16": torch.float16, "fp32": torch.float32}
        for name, cfg in configs.items():
            t0 = time.perf_counter()
            logits = decode_logits(cfg, ids)
            seconds = time.perf_counter() - t0
            plain_or_tiered = model if name in dtypes else cfg  # the fp16/fp32 references are plain float caches
            nll = F.cross_entropy(logits, targets, reduction="none")
            top1 = logits.argmax(-1)
            row = {
                "context": n,
                "cache": name,
                "bytes": cache_bytes(plain_or_tiered, n, dtype=dtypes.get(name, torch.float16))["total"],
                "decode_memory": decode_memory(plain_or_tiered, n, cache_dtype=dtypes.get(name, torch.float16)),
                "ms_per_step": round(1000 * seconds / len(targets), 2),
                "ppl": math.exp(nll.mean().item()),
                "ppl_last_256": math.exp(nll[-256:].mean().item()),
            }
            if ref is None:
                ref = top1
                row["bytes_vs_fp16"] = 1.0
                fp16_bytes = row["bytes"]
                row["ppl_by_position"] = {}
                for lo, hi in ((PREFILL, 256), (256, 1024), (1024, 4096)):
                    part = nll[lo - PREFILL : hi - PREFILL]  # nll[j] scores the token at position PREFILL + j
                    if len(part) >= 32:  # a bucket of a few tokens says nothing
                        row["ppl_by_position"][f"{lo}-{hi}"] = math.exp(part.mean().item())
            else:
                row["bytes_vs_fp16"] = row["bytes"] / fp16_bytes
                row["top1_agreement"] = (top1 == ref).float().mean().item()
                tail = min(512, len(ref))
                row["top1_agreement_last_512"] = (top1[-tail:] == ref[-tail:]).float().mean().item()
            rows.append(row)
            print(
                f"ctx {n:5d} {name:18s} {row['bytes'] / 2**20:7.3f} MiB ({row['bytes_vs_fp16']:.3f} of fp16)  "
                f"top1 {row.get('top1_agreement', 1.0):.4f} (last 512: {row.get('top1_agreement_last_512', 1.0):.4f})  "
                f"ppl {row['ppl']:.1f}  {row['ms_per_step']:.1f} ms/step",
                flush=True,
            )
    report["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
