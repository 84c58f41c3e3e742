# ruff: noqa: UP006, UP035  (runs on the device's Python, 3.8+, beside runner.py)
"""Per-op profiles from each runtime's own profiler, summarised the same way for every runtime.

Shipped to the device beside runner.py (standard library only; ExecuTorch's reader imports its Inspector).
`bench --profile` turns each runtime's raw profile into one summary (the result JSON's `profile`, see SCHEMA.md):

- onnxruntime: the profiling JSON of a session with `SessionOptions.enable_profiling` (per-node `*_kernel_time`
  events inside `model_run` events);
- ExecuTorch: the ETDump of a program loaded with `enable_etdump=True`, read with `executorch.devtools.Inspector`
  (portable ops `native_call_*`, delegated ops by the backend's own names, `Method::execute` per run);
- OpenVINO: `InferRequest.get_profiling_info()` after each run of a model compiled with `PERF_COUNT`;
- TensorRT: `trtexec --dumpProfile --exportProfile` (and `--exportLayerInfo` for layer types).
"""

from __future__ import annotations

import bisect
import json
import re
import statistics

TOP_OPS = 10
PROFILE_RUNS_MAX = 50  # profiled runs at most: profile files grow with every run


def summarise(ops: list, total_ms: float | None, runs: int, source: str, top: int = TOP_OPS, extra=None) -> dict:
    """One profile summary from per-op times.

    Times are medians over the profiled runs (a run preempted on a busy machine moves a mean, not a median).

    Args:
        ops: [{"name", "type", "where", "ms"}], `ms` the op's median time per run (one entry per op instance).
        total_ms: Median time of one profiled run as the profiler measured it (None: the ops' sum).
        runs: Profiled runs the times cover.
        source: Which profiler, e.g. "onnxruntime profiling".
        extra: Runtime-specific keys merged into the summary (e.g. allocator peaks).

    Returns:
        {source, runs, total_ms, ops_ms, unattributed_ms, op_count, top_ops: [{name, type, where, ms, share}],
        types: [{type, ms, share, count}]}; ms per run. Shares are fractions of ops_ms, the time inside ops: the
        rest of a run (unattributed_ms: the runtime's own work between ops, and the profiler's) is kept apart, as
        it is a large part of small models' runs and says nothing about which layer costs what.
    """
    per_run = list(ops)
    ops_ms = sum(op["ms"] for op in per_run)
    total = total_ms if total_ms else ops_ms

    def share(ms: float) -> float | None:
        return ms / ops_ms if ops_ms else None

    by_type = {}
    for op in per_run:
        entry = by_type.setdefault(op["type"], {"type": op["type"], "ms": 0.0, "count": 0})
        entry["ms"] += op["ms"]
        entry["count"] += 1
    ranked = sorted(per_run, key=lambda op: -op["ms"])
    summary = {
        "source": source,
        "runs": max(int(runs), 1),
        "total_ms": total,
        "ops_ms": ops_ms,
        "unattributed_ms": max(total - ops_ms, 0.0) if total_ms else 0.0,
        "op_count": len(per_run),
        "top_ops": [
            {"name": op["name"], "type": op["type"], "where": op.get("where"), "ms": op["ms"], "share": share(op["ms"])}
            for op in ranked[:top]
        ],
        "types": [dict(t, share=share(t["ms"])) for t in sorted(by_type.values(), key=lambda t: (-t["ms"], t["type"]))],
    }
    summary.update(extra or {})
    return summary


# ----------------------------------------------------------------------------------------------- onnxruntime


def onnxruntime_summary(path: str, skip_runs: int = 0) -> dict:
    """ORT's profiling JSON -> summary; the first `skip_runs` model_run events are warm-up and left out.

    Node events (`cat` "Node", name `<node>_kernel_time`, `dur` in µs) are assigned to the `model_run` event whose
    window holds their start. ORT's own allocator numbers ride along: `mem_arena_held` and `mem_in_use_peak` of the
    node events, their maxima as `allocator.arena_held_mb` / `allocator.in_use_peak_mb`.
    """
    with open(path, encoding="utf-8") as f:
        events = json.load(f)
    runs = sorted(
        (e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run"
    )
    kept = runs[skip_runs:] or runs
    starts = [r[0] for r in kept]
    ops, arena, in_use = {}, 0, 0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args") or {}
        arena = max(arena, _int(args.get("mem_arena_held")))
        in_use = max(in_use, _int(args.get("mem_in_use_peak")))
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i < 0 or e["ts"] > kept[i][1]:
            continue  # a warm-up run's node
        name = e["name"][: -len("_kernel_time")]
        op = ops.setdefault(
            name, {"name": name, "type": args.get("op_name") or name, "where": args.get("provider"), "runs": {}}
        )
        op["runs"][i] = op["runs"].get(i, 0.0) + e["dur"] / 1e3
    ops = [_median_op(op, len(kept)) for op in ops.values()]
    total = statistics.median([(b - a) / 1e3 for a, b in kept]) if kept else None
    allocator = {
        "arena_held_mb": arena / 2**20 if arena else None,
        "in_use_peak_mb": in_use / 2**20 if in_use else None,
    }
    return summarise(ops, total, len(kept), "onnxruntime profiling", extra={"allocator": allocator})


def _median_op(op: dict, runs: int) -> dict:
    """{..., "runs": {run: ms}} -> {..., "ms": median over `runs` runs}; a run the op was absent from counts 0."""
    times = list(op.pop("runs").values())
    return dict(op, ms=statistics.median(times + [0.0] * (runs - len(times))) if runs else 0.0)


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        return 0


# ----------------------------------------------------------------------------------------------- ExecuTorch

ET_WRAPPERS = {"OPERATOR_CALL", "DELEGATE_CALL", "Method::execute", "Method::init", "Program::load_method"}


def executorch_summary(etdump_path: str, skip_runs: int = 0) -> dict:
    """An ETDump -> summary, read with ExecuTorch's Inspector; the first `skip_runs` executions are left out.

    Each event's `perf_data.raw` holds one time (ms) per execution. `Method::execute` is the run's total; the
    OPERATOR_CALL / DELEGATE_CALL wrappers are not ops. Portable ops are `native_call_<op>.<overload>` (type: the op);
    a delegate's ops carry the backend's names (XNNPACK: "Fully Connected (NC, F32) GEMM #1"; type: without "#n").
    """
    from executorch.devtools import Inspector  # imports torch and executorch.exir: only with --profile

    inspector = Inspector(etdump_path=etdump_path)
    ops, totals, runs = [], [], 0
    for block in inspector.event_blocks:
        for event in block.events:
            raw = list(event.perf_data.raw) if event.perf_data is not None else []
            kept = raw[skip_runs:] if len(raw) > skip_runs else raw
            if event.name == "Method::execute":
                totals.extend(kept)
                runs = max(runs, len(kept))
            elif event.name not in ET_WRAPPERS and kept:
                delegated = bool(getattr(event, "is_delegated_op", False))
                ops.append(
                    {
                        "name": event.name,
                        "type": _et_type(event.name, delegated),
                        "where": (getattr(event, "delegate_backend_name", None) or "delegate")
                        if delegated
                        else "portable",
                        "ms": float(statistics.median(kept)),
                    }
                )
    total = statistics.median(totals) if totals else None
    return summarise(ops, total, runs or 1, "executorch etdump (Inspector)")


def _et_type(name: str, delegated: bool) -> str:
    if delegated:
        return re.sub(r"\s*#\d+$", "", name)
    if name.startswith("native_call_"):
        return name[len("native_call_") :].split(".")[0]
    return name


# ----------------------------------------------------------------------------------------------- OpenVINO


def openvino_summary(runs_infos: list) -> dict:
    """Per-run `InferRequest.get_profiling_info()` lists -> summary (OpenVINO's performance counters).

    Each item has node_name, node_type, exec_type (the kernel, e.g. brgemm_avx2_f32) and real_time (a timedelta);
    nodes with status NOT_RUN (fused into another, or constants) are left out. There is no per-run total: the
    share is of the executed nodes' sum.
    """
    ops = {}
    for i, infos in enumerate(runs_infos):
        for info in infos:
            if "NOT_RUN" in str(getattr(info, "status", "")):
                continue
            op = ops.setdefault(
                info.node_name,
                {"name": info.node_name, "type": info.node_type, "where": info.exec_type, "runs": {}},
            )
            op["runs"][i] = op["runs"].get(i, 0.0) + info.real_time.total_seconds() * 1e3
    ops = [_median_op(op, len(runs_infos)) for op in ops.values()]
    return summarise(ops, None, len(runs_infos), "openvino performance counters")


# ----------------------------------------------------------------------------------------------- TensorRT


def trtexec_summary(profile_path: str, layer_info_path: str | None = None) -> dict:
    """`trtexec --exportProfile` JSON (and `--exportLayerInfo`, for layer types) -> summary.

    The profile is `[{"count": runs}, {"name", "timeMs", "averageMs", ("medianMs",) "percentage"}, ...]`, timeMs
    summed over the runs; medianMs where this trtexec writes it, else averageMs. Layer types come from the layer
    info's `LayerType` (built with --profilingVerbosity=detailed); without it, from the layer name (Reformatting
    CopyNode, PWN(...), ForeignNode).
    Not run in edgepipe's CI (no TensorRT there).
    """
    with open(profile_path, encoding="utf-8") as f:
        entries = json.load(f)
    runs = next((int(e["count"]) for e in entries if "count" in e), 1)
    types = {}
    if layer_info_path:
        with open(layer_info_path, encoding="utf-8") as f:
            info = json.load(f)
        for layer in info.get("Layers", []) if isinstance(info, dict) else []:
            if isinstance(layer, dict) and "Name" in layer:
                types[layer["Name"]] = layer.get("LayerType") or "unknown"
    ops = [
        {
            "name": e["name"],
            "type": types.get(e["name"]) or _trt_type(e["name"]),
            "where": "gpu",
            "ms": e.get("medianMs", e.get("averageMs", e["timeMs"] / max(runs, 1))),
        }
        for e in entries
        if "name" in e and "timeMs" in e
    ]
    return summarise(ops, None, runs, "trtexec --dumpProfile")


def _trt_type(name: str) -> str:
    if name.startswith("Reformatting CopyNode"):
        return "Reformat"
    if "ForeignNode" in name:
        return "Myelin"
    if name.startswith("PWN("):
        return "PointWise"
    last = name.split(" + ")[0].rstrip("/").split("/")[-1]
    return re.sub(r"[_.]?\d+$", "", last) or name
