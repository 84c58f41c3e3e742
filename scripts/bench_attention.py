"""Latency of full, windowed and linear attention in eager PyTorch, ONNX Runtime and ExecuTorch (XNNPACK).

Two scopes: the attention block alone (Q/K/V/out projections + mixing) and a whole post-norm transformer layer
(hidden 384, 12 heads, FFN 1536), at n = 512 ... 8192, batch 1, bidirectional, 2 threads. "full" is the fastest
full attention each runtime offers, measured per n:

- eager: ``F.scaled_dot_product_attention`` (flash kernel) or matmul + softmax;
- onnxruntime: ORT's contrib ``MultiHeadAttention`` (com.microsoft, graph built with onnx.helper from the same
  weights) or the plain matmul + softmax export;
- executorch: ExecuTorch's ``llama::custom_sdpa`` kernel, ``F.scaled_dot_product_attention``, matmul + softmax
  as 4-D matmul (edgepipe's form) or 3-D bmm, or 3-D bmm over query chunks of 1024 (bounded memory), each lowered
  with the XNNPACK partitioner (static shapes: one program per n).

Forms that materialise the (heads, n, n) score tensor are skipped where it would exceed ``--max-scores-gb``
(the machine is shared), and a full variant 4x slower than the best at some n >= 1024 is dropped for larger n; both are
printed. All variants of one (runtime, scope, n) are timed in --rounds rounds; in each, every variant runs a warm-up
and then --repeats timed calls in a row (median over all timed calls; default 10 x 10 = 100 per variant: fewer
than ~100 gave ratios off by up to 1.8x on a shared machine, and 6 put two cells above their FLOP ratio). Each
runtime (eager PyTorch included) is its own phase: no runtime's thread pool spins beside another's timed calls.

Prints ms, µs per token, the ratio full/form, the FLOP ratio beside it and each form's GFLOP/s. The FLOP ratio
counts matmul FLOPs only; it is not an upper bound on full/form: full attention also writes, normalises and reads
a (heads, n, n) score tensor that outgrows the caches (softmax is memory-bound), which windowed attention's
(heads, w, 2w) blocks do not, so full attention runs at fewer GFLOP/s and full/form can exceed the FLOP ratio by
what its GFLOP/s lose (the table shows both, and the score elements each form touches). ``--json FILE`` writes a
``benchrecord`` record: one row per (runtime, scope, form, variant, n) with every timed call (ms), GFLOP and score
elements.

    python scripts/bench_attention.py --json benchmarks/bench_attention-<cpu>.json   # everything (an hour or more)
    python scripts/bench_attention.py --ns 1024 4096 --runtimes onnxruntime --repeats 3
    python scripts/bench_attention.py --ns 4096 --runtimes onnxruntime --scopes attention --profile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from benchrecord import Record
from torch import Tensor, nn

from edgepipe.attention.full import full_attention
from edgepipe.attention.linear import linear_attention
from edgepipe.attention.windowed import windowed_attention

HIDDEN, HEADS, FFN = 384, 12, 1536
THREADS = 2
RUNTIMES = ("eager", "onnxruntime", "executorch")
SCOPES = ("attention", "layer")
FORMS = ("full", "windowed", "linear")


# ---------------------------------------------------------------- models


def _sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v)


def _custom_sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """ExecuTorch's SDPA kernel; layout (batch, seq, heads, head_dim)."""
    return torch.ops.llama.custom_sdpa(q, k, v, 0, None, 0.0, False, None)


def _full_bmm(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Full attention as explicit 3-D bmm + softmax + bmm: XNNPACK takes it as one delegated subgraph (edgepipe's
    full_attention keeps the 4-D matmul that ORT's optimizer fuses; XNNPACK leaves its ``expand`` outside)."""
    b, h, n, d = q.shape
    n_k = k.shape[-2]
    scores = torch.bmm(q.reshape(b * h, n, d) * (1.0 / math.sqrt(d)), k.reshape(b * h, n_k, d).transpose(1, 2))
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * h, n_k, d)).reshape(b, h, n, d)


def _query_chunked(q: Tensor, k: Tensor, v: Tensor, chunk: int = 1024) -> Tensor:
    """Full attention over query chunks (a static Python loop): (heads, chunk, n) scores at a time, not (heads, n, n).

    Same FLOPs as full attention; what a static-shape export can do where the whole score tensor does not fit.
    """
    n = q.shape[-2]
    return torch.cat([_full_bmm(q[:, :, i : i + chunk], k, v) for i in range(0, n, chunk)], dim=2)


class Block(nn.Module):
    """Q/K/V projections, a mixing function, out projection. x: (batch, seq, hidden) -> same."""

    def __init__(self, mix: Callable[..., Tensor], seq_major: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
        self.mix, self.seq_major = mix, seq_major

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        d = HIDDEN // HEADS
        q, k, v = (p(x).reshape(b, -1, HEADS, d) for p in (self.q, self.k, self.v))
        if self.seq_major:  # mixing takes (b, n, h, d): no transposes at all
            return self.o(self.mix(q, k, v).reshape(b, -1, HIDDEN))
        ctx = self.mix(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(ctx.transpose(1, 2).contiguous().reshape(b, -1, HIDDEN))


class Layer(nn.Module):
    """Post-norm BERT layer: x = LN(x + attn(x)); x = LN(x + W2 gelu(W1 x))."""

    def __init__(self, mix: Callable[..., Tensor], seq_major: bool = False) -> None:
        super().__init__()
        self.attn = Block(mix, seq_major)
        self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
        self.ffn1, self.ffn2 = nn.Linear(HIDDEN, FFN), nn.Linear(FFN, HIDDEN)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ffn2(F.gelu(self.ffn1(x))))


def build(scope: str, mix: Callable[..., Tensor], seq_major: bool = False) -> nn.Module:
    """The same seeded weights for every form, so outputs of one scope are comparable across forms."""
    torch.manual_seed(0)
    return (Block if scope == "attention" else Layer)(mix, seq_major).eval()


def mixers(runtime: str, window: int) -> dict[str, dict[str, tuple[Callable[..., Tensor], bool]]]:
    """form -> {variant: (mixing function, seq_major)}; "full" has several variants, the fastest counts."""
    full: dict[str, tuple[Callable[..., Tensor], bool]] = {"plain": (full_attention, False)}
    if runtime in ("eager", "executorch"):
        full["sdpa"] = (_sdpa, False)
    if runtime == "executorch":
        import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401  (registers llama::custom_sdpa)

        full["custom_sdpa"] = (_custom_sdpa, True)
        full["bmm"] = (_full_bmm, False)
        full["chunked"] = (_query_chunked, False)
    return {
        "full": full,
        "windowed": {"blocked": (partial(windowed_attention, window=window), False)},
        "linear": {"elu": (linear_attention, False)},
    }


def materialises_scores(runtime: str, variant: str) -> bool:
    """True where the variant holds the whole (heads, n, n) score tensor in memory."""
    return variant in ("plain", "bmm") or (runtime == "executorch" and variant == "sdpa")


# ---------------------------------------------------------------- FLOPs


def gflop(scope: str, form: str, n: int, window: int) -> float:
    """Multiply-adds x 2 of every matmul (projections, mixing, FFN); softmax, norms and masks not counted."""
    d = HIDDEN // HEADS
    flops = 4 * 2 * n * HIDDEN * HIDDEN
    if form == "full":
        flops += 2 * 2 * n * n * HIDDEN
    elif form == "windowed":
        n_pad = -(-n // window) * window
        flops += 2 * 2 * n_pad * 2 * window * HIDDEN  # each block of w queries against its 2w keys
    else:
        flops += 2 * 2 * n * HIDDEN * (d + 1)  # phi(K)ᵀ[V, 1] and phi(Q)·state
    if scope == "layer":
        flops += 2 * 2 * n * HIDDEN * FFN
    return flops / 1e9


def score_elements(form: str, n: int, window: int) -> int:
    """Attention scores the form writes, normalises and reads: (heads, n, n) for full, (heads, w, 2w) per block."""
    if form == "full":
        return HEADS * n * n
    if form == "windowed":
        return HEADS * -(-n // window) * window * 2 * window
    return 0


# ---------------------------------------------------------------- runtimes


def ort_session(path: Path, profile_prefix: str | None = None):  # noqa: ANN201 - onnxruntime is optional here
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    if profile_prefix:
        opts.enable_profiling, opts.profile_file_prefix = True, profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export_onnx(model: nn.Module, path: Path) -> Path:
    """Dynamo export with a dynamic sequence axis (any n; blocked forms pad inside)."""
    x = torch.randn(1, 512, HIDDEN)
    onnx_program = torch.onnx.export(
        model, (x,), dynamo=True, dynamic_shapes=({1: torch.export.Dim("seq", min=1, max=65536)},), verbose=False
    )
    onnx_program.save(str(path))
    return path


def mha_onnx(model: nn.Module, path: Path) -> Path:
    """The same block/layer with ORT's contrib MultiHeadAttention, built with onnx.helper from model's weights."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list = []

    def weight(name: str, t: Tensor) -> str:
        inits.append(numpy_helper.from_array(t.detach().numpy().astype(np.float32), name))
        return name

    nodes: list = []

    def linear(x: str, lin: nn.Linear, name: str) -> str:
        nodes.append(helper.make_node("MatMul", [x, weight(f"{name}.w", lin.weight.T.contiguous())], [f"{name}.mm"]))
        nodes.append(helper.make_node("Add", [f"{name}.mm", weight(f"{name}.b", lin.bias)], [name]))
        return name

    block = model if isinstance(model, Block) else model.attn
    q, k, v = (linear("x", getattr(block, c), c) for c in "qkv")
    nodes.append(helper.make_node("MultiHeadAttention", [q, k, v], ["ctx"], domain="com.microsoft", num_heads=HEADS))
    out = linear("ctx", block.o, "attn_out")
    if isinstance(model, Layer):

        def layer_norm(x: str, ln: nn.LayerNorm, name: str) -> str:
            ins = [x, weight(f"{name}.g", ln.weight), weight(f"{name}.b", ln.bias)]
            nodes.append(helper.make_node("LayerNormalization", ins, [name], axis=-1, epsilon=ln.eps))
            return name

        nodes.append(helper.make_node("Add", ["x", out], ["res1"]))
        h = layer_norm("res1", model.ln1, "ln1")
        nodes.append(helper.make_node("Gelu", [linear(h, model.ffn1, "ffn1")], ["gelu"]))
        nodes.append(helper.make_node("Add", [h, linear("gelu", model.ffn2, "ffn2")], ["res2"]))
        out = layer_norm("res2", model.ln2, "ln2")
    nodes.append(helper.make_node("Identity", [out], ["y"]))
    graph = helper.make_graph(
        nodes,
        "mha",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "seq", HIDDEN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", HIDDEN])],
        inits,
    )
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def lower_executorch(model: nn.Module, n: int) -> tuple[object, object, int]:
    """Static-shape export (the host pads to n) lowered with XNNPACK -> (program, method, delegated subgraphs).

    The caller keeps the program: a Method whose Program was garbage collected reads freed memory.
    """
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    exported = torch.export.export(model, (torch.randn(1, n, HIDDEN),))
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    delegates = get_delegation_info(edge.exported_program().graph_module).num_delegated_subgraphs
    program = Runtime.get().load_program(edge.to_executorch().buffer)
    return program, program.load_method("forward"), delegates


def ort_profile_summary(session, top: int = 12) -> list[str]:  # noqa: ANN001
    """Per-op-type and top-node times from ORT's profiler (one profiled session, several runs)."""
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    by_node: dict[tuple[str, str], float] = {}
    runs = sum(1 for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            key = (e["args"]["op_name"], e["name"].removesuffix("_kernel_time"))
            by_node[key] = by_node.get(key, 0.0) + e["dur"] / 1000 / max(runs, 1)
    by_op: dict[str, float] = {}
    for (op, _), ms in by_node.items():
        by_op[op] = by_op.get(op, 0.0) + ms
    total = sum(by_op.values())
    lines = [
        f"    kernels {total:.1f} ms/run; by op: "
        + ", ".join(f"{op} {ms:.1f}" for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:8])
    ]
    for (op, name), ms in sorted(by_node.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"      {ms:7.2f} ms  {op:16s} {name}")
    return lines


# ---------------------------------------------------------------- the benchmark


def bench(args: argparse.Namespace) -> list[dict]:
    """Every (runtime, scope, n): all forms and variants timed round-robin, so load on a shared machine hits
    them alike and the ratios stay fair."""
    torch.set_num_threads(THREADS)
    if "executorch" in args.runtimes:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(THREADS)
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_attention_"))
    for runtime in args.runtimes:
        for scope in args.scopes:
            variants = {}  # (form, variant) -> model (eager, executorch) or ONNX Runtime session
            for form in args.forms:
                for variant, (mix, seq_major) in mixers(runtime, args.window)[form].items():
                    variants[form, variant] = build(scope, mix, seq_major)
                if runtime == "onnxruntime" and form == "full":
                    variants[form, "mha"] = build(scope, full_attention)
            sessions = {}
            if runtime == "onnxruntime":
                for (form, variant), model in variants.items():
                    path = tmp / f"{scope}-{form}-{variant}.onnx"
                    (mha_onnx if variant == "mha" else export_onnx)(model, path)
                    prefix = str(tmp / f"prof-{scope}-{form}-{variant}") if args.profile else None
                    sessions[form, variant] = ort_session(path, prefix)
            for n in args.ns:
                new = bench_n(args, runtime, scope, n, variants, sessions)
                rows += new
                # A full variant 4x slower than the best full variant only grows the run: drop it for larger n
                # (not below n = 1024, where a noisy neighbour can fake such a gap).
                full = {r["variant"]: r["ms_median"] for r in new if r["form"] == "full"}
                for variant, ms in full.items():
                    if n >= 1024 and ms > 4 * min(full.values()):
                        print(f"  drop {runtime}/{scope}/full[{variant}] for n > {n}: 4x slower than the best full")
                        variants.pop(("full", variant))
            if args.profile:
                for (form, variant), session in sessions.items():
                    print(f"  profile {runtime}/{scope}/{form}[{variant}] (all n together):")
                    print("\n".join(ort_profile_summary(session)))
    return rows


def bench_n(args: argparse.Namespace, runtime: str, scope: str, n: int, variants: dict, sessions: dict) -> list[dict]:
    """Time every variant of one (runtime, scope) at sequence length n, round-robin."""
    x = torch.randn(1, n, HIDDEN, generator=torch.Generator().manual_seed(n))
    runs, notes, programs = {}, {}, []
    for (form, variant), model in variants.items():
        if materialises_scores(runtime, variant) and 4 * HEADS * n * n / 1e9 > args.max_scores_gb:
            print(f"  skip {runtime}/{scope}/{form}[{variant}] n={n}: (heads, n, n) scores > {args.max_scores_gb} GB")
            continue
        if runtime == "eager":
            runs[form, variant] = (model, x)
        elif runtime == "onnxruntime":
            session = sessions[form, variant]
            runs[form, variant] = (session.run, None, {session.get_inputs()[0].name: x.numpy()})
        else:
            program, method, delegates = lower_executorch(model, n)
            programs.append(program)
            runs[form, variant] = (method.execute, [x])
            notes[form, variant] = f" delegates={delegates}"
        with torch.inference_mode():  # check every artifact against eager PyTorch (the big ones only run, above)
            got = runs[form, variant][0](*runs[form, variant][1:])
            if n <= 2048 and runtime != "eager":
                got = torch.as_tensor(got[0])
                err = (got - model(x)).abs().max().item()
                notes[form, variant] = notes.get((form, variant), "") + f" max|diff|={err:.1e}"
    # Rounds of blocks: in each round every variant runs one untimed call, then --repeats timed calls in a row.
    # Alternating variant by variant call by call instead timed each call cold: the previous variant's thread pool
    # was still spinning on the cores and its tensors filled the caches, a fixed cost per call that made the fast
    # forms look slow (ORT windowed attention at n=4096: 123 ms that way, 70 ms warm; per-token cost "falling" with n).
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for key, (run, *run_args) in runs.items():
                run(*run_args)
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    run(*run_args)
                    times[key].append((time.perf_counter() - start) * 1000)
    rows = []
    for (form, variant), ts in times.items():
        ms = statistics.median(ts)
        print(
            f"  {runtime:11s} {scope:9s} {form:8s} {variant:11s} n={n:5d} {ms:9.1f} ms (min {min(ts):.1f})"
            f"{notes.get((form, variant), '')}",
            flush=True,
        )
        rows.append(
            {
                "runtime": runtime,
                "scope": scope,
                "form": form,
                "variant": variant,
                "n": n,
                "ms_median": ms,
                "ms": ts,
                "gflop": gflop(scope, form, n, args.window),
                "score_elements": score_elements(form, n, args.window),
                "check": notes.get((form, variant), "").strip(),
            }
        )
    del runs, programs
    return rows


def best_rows(rows: list[dict]) -> list[dict]:
    """One row per (runtime, scope, form, n): the fastest variant."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["runtime"], r["scope"], r["form"], r["n"])
        if key not in best or r["ms_median"] < best[key]["ms_median"]:
            best[key] = r
    return list(best.values())


def report(rows: list[dict], window: int) -> list[str]:
    """The table (best variant per form) and the goal checks of issue 4."""
    idx = {(r["runtime"], r["scope"], r["form"], r["n"]): r for r in rows}
    lines = [
        f"window {window}, hidden {HIDDEN}, heads {HEADS}, FFN {FFN}, batch 1, {THREADS} threads, bidirectional",
        f"{'runtime':11s} {'scope':9s} {'form':8s} {'(variant)':13s} {'n':>5s} {'ms':>9s} {'us/tok':>7s} "
        f"{'GFLOP/s':>8s} {'full/form':>9s} {'FLOPratio':>9s} {'%ratio':>6s}",
    ]
    goals = []
    for runtime in RUNTIMES:
        for scope in SCOPES:
            for form in FORMS:
                for n in sorted({r["n"] for r in rows}):
                    r = idx.get((runtime, scope, form, n))
                    if r is None:
                        continue
                    ms = r["ms_median"]
                    full = idx.get((runtime, scope, "full", n))
                    speed = full["ms_median"] / ms if full else None
                    ratio = gflop(scope, "full", n, window) / r["gflop"]
                    cells = (
                        f"{speed:9.2f} {ratio:9.2f} {100 * speed / ratio:5.0f}%"
                        if full
                        else f"{'-':>9s} " * 2 + "    -"
                    )
                    lines.append(
                        f"{runtime:11s} {scope:9s} {form:8s} {'(' + r['variant'] + ')':13s} {n:5d} "
                        f"{ms:9.1f} {1000 * ms / n:7.1f} {r['gflop'] / ms * 1e3:8.1f} {cells}"
                    )
                    if form == "windowed" and n in (4096, 8192) and runtime != "eager" and full:
                        goals.append(
                            f"{'MET ' if speed >= 0.7 * ratio else 'MISS'} windowed >= 70% of the FLOP ratio: "
                            f"{runtime}/{scope} n={n}: {speed:.2f}x of {ratio:.2f}x ({100 * speed / ratio:.0f}%)"
                        )
                    if form == "linear" and scope == "attention" and n == 4096 and full:
                        goals.append(
                            f"{'MET ' if speed >= 3 else 'MISS'} linear >= 3x full: {runtime}/attention n=4096: "
                            f"{speed:.2f}x"
                        )
                per_tok = {
                    n: 1000 * idx[(runtime, scope, form, n)]["ms_median"] / n
                    for n in (1024, 2048, 4096, 8192)
                    if (runtime, scope, form, n) in idx
                }
                if form != "full" and 1024 in per_tok and len(per_tok) > 1:
                    spread = [v / per_tok[1024] - 1 for v in per_tok.values()]
                    ok = all(abs(s) <= 0.25 for s in spread)
                    goals.append(
                        f"{'MET ' if ok else 'MISS'} {form} us/token flat ±25% 1024->8192: {runtime}/{scope}: "
                        + " ".join(f"{v:.1f}" for v in per_tok.values())
                    )
    return lines + [""] + goals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ns", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--scopes", nargs="+", choices=SCOPES, default=list(SCOPES))
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per variant per round, after a warm-up")
    parser.add_argument("--rounds", type=int, default=10, help="rounds over all variants (median of every timed run)")
    parser.add_argument(
        "--max-scores-gb",
        type=float,
        default=2.0,
        help="skip full-attention variants whose (heads, n, n) fp32 scores exceed this",
    )
    parser.add_argument("--profile", action="store_true", help="print ONNX Runtime per-op profiles")
    parser.add_argument("--json", type=Path, help="write the benchrecord record (every variant, every call) here")
    args = parser.parse_args(argv)
    settings = {k: v for k, v in vars(args).items() if k not in ("json", "profile")}
    record = Record("bench_attention", **settings, hidden=HIDDEN, heads=HEADS, ffn=FFN, threads=THREADS)
    rows = bench(args)
    print("\n".join(report(best_rows(rows), args.window)))
    if args.json:
        for row in rows:
            record.add(**row)
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
