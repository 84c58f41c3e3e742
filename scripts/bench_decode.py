"""Cost of one decode step of the token mixer vs context length, in ONNX Runtime and ExecuTorch (XNNPACK).

Three token mixers of the same hidden size, each exported as edgepipe's decode step (explicit state in and out):

- ``full``: grouped-query attention (projections, RoPE, attention over a KV cache holding ``context`` tokens);
- ``windowed``: the same layer with ``windowed:W`` attention, whose rolling cache holds 2W tokens at any context;
- ``mamba2``: the Mamba-2 mixer's recurrent step (in_proj, conv step, SSM step, gated norm, out_proj).

Each graph runs at contexts 256 ... 8192 (full: a cache of that size, full of tokens; windowed: the step at that
position; mamba2: its fixed state), batch 1, with a fixed thread count. Prints a table and the issue-4 goals
(windowed and mamba2 flat within ±15%, full growing, mamba2 >= 5x cheaper than full at the largest context);
``--json FILE`` writes rows ``{"runtime", "form", "context", "ms", "state_bytes"}`` (``ms``: the median; each row
also has ``ms_p10``, the 10th percentile, which a busy machine disturbs less).

    python scripts/bench_decode.py --json results/bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edgepipe.models.decoder import DecoderConfig, DecoderLM
from edgepipe.models.mamba import Mamba2Mixer, MambaConfig

CONTEXTS = (256, 512, 1024, 2048, 4096, 8192)


class AttentionStep(nn.Module):
    """One attention layer's decode step: (x, position, k_cache, v_cache) -> (out, k_cache, v_cache)."""

    def __init__(self, model: DecoderLM) -> None:
        super().__init__()
        self.model, self.attn = model, model.layers[0].attn

    def forward(self, x: Tensor, position: Tensor, k_cache: Tensor, v_cache: Tensor) -> tuple[Tensor, ...]:
        cos, sin, bias = self.model.step_context(position, 1)
        return self.attn.step(x, cos, sin, bias, k_cache, v_cache)


class MambaStep(nn.Module):
    """The Mamba-2 mixer's recurrent step: (x, position, conv_state, ssm_state) -> (out, conv_state, ssm_state)."""

    def __init__(self, mixer: Mamba2Mixer) -> None:
        super().__init__()
        self.mixer = mixer

    def forward(self, x: Tensor, position: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, ...]:
        return self.mixer.step(x, conv_state, ssm_state)


def build(form: str, context: int, args: argparse.Namespace) -> tuple[nn.Module, tuple[Tensor, ...]]:
    """The step module and example inputs (state filled with random values) for ``form`` at ``context``."""
    torch.manual_seed(0)
    x, position = torch.randn(1, 1, args.hidden), torch.tensor([context - 1])
    if form == "mamba2":
        cfg = MambaConfig(vocab_size=1, hidden=args.hidden, layers=1, state_size=args.state, head_dim=64)
        mixer = Mamba2Mixer(cfg).eval()
        conv, ssm = torch.randn(1, cfg.conv_dim, cfg.conv_kernel - 1), 0.1 * torch.randn(1, cfg.heads, 64, args.state)
        return MambaStep(mixer), (x, position, conv, ssm)
    attention = "full" if form == "full" else f"windowed:{args.window}"
    cfg = DecoderConfig(
        vocab_size=1, hidden=args.hidden, layers=1, heads=args.heads, kv_heads=args.kv_heads, attention=attention,
        max_context=context,
    )  # fmt: skip
    model = DecoderLM(cfg).eval()
    cache = (1, cfg.kv_heads, cfg.cache_len, cfg.head_dim)
    return AttentionStep(model), (x, position, torch.randn(cache), torch.randn(cache))


def state_bytes(inputs: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in inputs[2:])


def compile_onnxruntime(module: nn.Module, inputs: tuple[Tensor, ...], path: Path, args) -> Callable:
    """Export the step to ONNX and return ``run(inputs) -> outputs`` on an ONNX Runtime session."""
    import onnxruntime as ort

    from edgepipe.runtimes.onnxruntime import export_onnx

    path = path.with_suffix(".onnx")
    names = ["x", "position", "state_a", "state_b"]
    export_onnx(module, inputs, path, names, ["out", "state_a_out", "state_b_out"], {})
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    taken = {i.name for i in session.get_inputs()}  # the exporter drops unused inputs (mamba2's position)

    def run(values: tuple[Tensor, ...]) -> list:
        return session.run(None, {n: t.numpy() for n, t in zip(names, values) if n in taken})

    return run


def compile_executorch(module: nn.Module, inputs: tuple[Tensor, ...], path: Path, args) -> Callable:
    """Lower the step with XNNPACK and return ``run(inputs) -> outputs`` on ExecuTorch's runtime."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    from executorch.runtime import Runtime

    if args.threads > 0:
        _unsafe_reset_threadpool(args.threads)
    path = path.with_suffix(".pte")  # one file per program: a loaded program keeps reading its file
    edge = to_edge_transform_and_lower(torch.export.export(module, inputs), partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    method = Runtime.get().load_program(str(path)).load_method("forward")
    return lambda values: method.execute(list(values))


COMPILERS = {"onnxruntime": compile_onnxruntime, "executorch": compile_executorch}


def measure(runtime: str, form: str, contexts: list[int], work: Path, args) -> dict[int, tuple[float, float, int]]:
    """Median and 10th-percentile ms per step, and state bytes, at each context.

    Windowed and mamba2 compile one graph for all contexts (their state does not grow); full compiles one per
    context. Contexts are timed in interleaved rounds of back-to-back calls, so a change in machine load hits all
    of them alike while each block runs warm.
    """
    runs, compiled = {}, None
    for context in contexts:
        module, inputs = build(form, context, args)
        if form == "full" or compiled is None:
            compiled = COMPILERS[runtime](module.eval(), inputs, work / f"{form}-{context}", args)
        with torch.no_grad():
            want = module(*inputs)[0]
        got = np.asarray(compiled(inputs)[0])
        assert np.abs(got - want.numpy()).max() < 1e-4, f"{runtime} {form} @ {context} disagrees with eager"
        runs[context] = (compiled, inputs)
        for _ in range(args.warmup):
            compiled(inputs)
    times: dict[int, list[float]] = {c: [] for c in contexts}
    block = max(2, args.repeats // args.rounds)
    for _ in range(args.rounds):
        for context, (run, inputs) in runs.items():
            run(inputs)  # the first call of a block re-warms the caches the other contexts' states evicted
            for _ in range(block):
                start = time.perf_counter()
                run(inputs)
                times[context].append((time.perf_counter() - start) * 1e3)
    return {c: (statistics.median(times[c]), percentile(times[c], 10), state_bytes(runs[c][1])) for c in contexts}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtimes", default="onnxruntime,executorch")
    parser.add_argument("--forms", default="full,windowed,mamba2")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=6, help="attention query heads (head_dim = hidden / heads)")
    parser.add_argument("--kv-heads", type=int, default=2, help="attention kv heads (grouped-query)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--state", type=int, default=128, help="Mamba-2 state size (head_dim 64, expand 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=100, help="timed calls per context")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the calls are split into")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # PyTorch's own intra-op threads (export, eager checks) spin after their work and steal the cores the timed
    # runtime needs: ExecuTorch steps measured 20x slower with them on a busy 2-core machine.
    torch.set_num_threads(max(1, args.threads))
    contexts = [int(c) for c in args.contexts.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for runtime in args.runtimes.split(","):
            for form in args.forms.split(","):
                for context, (ms, p10, nbytes) in measure(runtime, form, contexts, Path(tmp), args).items():
                    row = {"runtime": runtime, "form": form, "context": context, "ms": round(ms, 4)}
                    rows.append({**row, "state_bytes": nbytes, "ms_p10": round(p10, 4)})
                    print(
                        f"{runtime:12s} {form:9s} {context:6d} {ms:9.3f} ms (p10 {p10:7.3f}) {nbytes / 2**20:6.2f} MiB",
                        flush=True,
                    )
    print()
    report(rows)
    report(rows, "ms_p10")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
        print(f"Wrote {args.json}")


def report(rows: list[dict], stat: str = "ms") -> None:
    """The issue-4 decode goals, per runtime, on the median (``ms``) or the 10th percentile (``ms_p10``)."""
    for runtime in dict.fromkeys(r["runtime"] for r in rows):
        by = {(r["form"], r["context"]): r[stat] for r in rows if r["runtime"] == runtime}
        contexts = sorted({c for _, c in by})
        label = "median" if stat == "ms" else "10th-percentile"
        print(f"{runtime}: {label} ms per step at contexts {contexts}")
        for form in ("full", "windowed", "mamba2"):
            ms = [by[(form, c)] for c in contexts if (form, c) in by]
            if not ms:
                continue
            spread = max(ms) / statistics.median(ms) - 1, 1 - min(ms) / statistics.median(ms)
            flat = f"flat within ±{100 * max(spread):.0f}% of its median" if form != "full" else ""
            print(f"  {form:9s} " + " ".join(f"{m:8.3f}" for m in ms) + f"   {flat}")
        last = contexts[-1]
        if ("full", last) in by and ("mamba2", last) in by:
            print(f"  full / mamba2 at {last}: {by[('full', last)] / by[('mamba2', last)]:.1f}x", end="")
            if ("windowed", last) in by:
                print(f";  full / windowed: {by[('full', last)] / by[('windowed', last)]:.1f}x", end="")
            print()


if __name__ == "__main__":
    main()
