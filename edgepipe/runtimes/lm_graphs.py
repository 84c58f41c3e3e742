"""Decoder bundles' two graphs, lowered per runtime: a chunked prefill step and a one-token decode step.

Both graphs are ``model.step`` at a fixed token count with the whole decode state as explicit inputs and outputs::

    prefill: (input_ids (1, P), position (1,), *state) -> (logits (1, P, vocab), *state_out)
    decode:  (input_ids (1, 1), position (1,), *state) -> (logits (1, 1, vocab), *state_out)

Static shapes everywhere: XNNPACK, TensorRT and NPUs want them, the state has a fixed size anyway (full attention:
``cache_len`` slots; windowed: a rolling 2W; Mamba-2: conv + SSM state), and the host runs a prompt through prefill
in whole chunks of P tokens and the remainder through decode (``harness.runner.DecoderGraphs``), which is exact:
no padding token ever enters the cache.

Precision plans for decoders:

- ``fp32``; ``fp16`` (onnxruntime: weights and compute fp16, fp32 inputs/outputs);
- ``int8-dynamic`` (onnxruntime: INT8 weights, activations quantized per call);
- ``a8w16``: the tiered INT8 KV cache (``models.kv_cache.TieredDecoder``, calibrated per-channel K scales, per-token
  V scales): the state itself is INT8 for everything but the newest ``active`` tokens. Weights and compute stay
  in fp32 on CPU runtimes (ONNX Runtime's and XNNPACK's fp16 GEMMs on x86 are emulated and slower); the manifest
  says so.
- ``int8-fp16`` (TensorRT): explicit Q/DQ on the inputs of every weight GEMM but the LM head, activation scales
  calibrated on real text fed through both graphs (``calibration_feeds``), symmetric int8 with per-channel weights;
  TensorRT fuses each pair into an int8 GEMM and runs the rest (attention, norms, the LM head) in FP16. The LM head
  stays out of int8 because its logits pick the next token. Given a ``fit`` measure and a budget, the weight GEMMs
  that cost the most agreement move to FP16, most sensitive first, until the budget holds (the encoders'
  per-layer plan, ``stages.quantize``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edgepipe.config import Target
from edgepipe.errors import BuildError, UsageError
from edgepipe.models.decoder import DecodeGraph
from edgepipe.precisions import DECODER_PLANS, STATIC
from edgepipe.runtimes import Lowered

GRAPHS = ("prefill", "decode")
PREFILL_TOKENS = 32
EXTENSIONS = {"onnxruntime": ".onnx", "executorch": ".pte", "tensorrt": ".onnx"}


def precisions(runtime: str) -> tuple[str, ...]:
    return DECODER_PLANS.get(runtime, ())


def prefill_tokens(model: nn.Module) -> int:
    """Tokens per prefill call: ``PREFILL_TOKENS``, at most the tiered cache's active region and the window;
    Mamba-2 prefills one scan chunk per call (its chunked form takes whole chunks)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "spec"):  # MambaLM
        return int(inner.cfg.chunk_size)
    limits = [PREFILL_TOKENS, getattr(model, "active", PREFILL_TOKENS)]
    spec = getattr(inner, "spec", None)
    if spec is not None and spec.kind == "windowed":
        limits.append(spec.window)
    return int(min(limits))


def state_io(model: nn.Module) -> list[dict]:
    """The state tensors as manifest entries ``{"name", "dtype", "shape", "fill"}`` (fill: the empty state's value)."""
    entries = []
    for name, t in zip(model.state_names, model.init_state(1), strict=True):
        fill = float(t.flatten()[0]) if t.numel() else 0.0
        entries.append(
            {"name": name, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape), "fill": fill}
        )
    return entries


def graph_io(model: nn.Module, tokens: int) -> dict[str, dict[str, list[dict]]]:
    """``{"prefill": {"inputs", "outputs"}, "decode": {...}}`` for the chunked step graphs (see module docstring)."""
    state = state_io(model)
    vocab = model.lm_head.out_features

    def step(t: int) -> dict[str, list[dict]]:
        return {
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": [1, t]},
                {"name": "position", "dtype": "int64", "shape": [1]},
                *state,
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": [1, t, vocab]},
                *[{**s, "name": s["name"] + "_out"} for s in state],
            ],
        }

    return {"prefill": step(tokens), "decode": step(1)}


def example_inputs(model: nn.Module, tokens: int) -> tuple[Tensor, ...]:
    """Trace inputs: ``tokens`` ids at position 0 against the empty state."""
    ids = torch.arange(tokens, dtype=torch.long).reshape(1, tokens) % model.lm_head.out_features
    return (ids, torch.zeros(1, dtype=torch.long), *model.init_state(1))


def lower_decoder(
    model: nn.Module,
    target: Target,
    precision: str,
    out_dir: Path,
    calibration: dict[str, list[dict[str, np.ndarray]]] | None = None,
    method: str = "minmax",
    fit: Callable[[dict[str, Path], bool], float] | None = None,
    budget: float = 0.0,
) -> Lowered:
    """Write ``prefill`` and ``decode`` graphs of ``model`` for ``target``'s runtime at ``precision``.

    Args:
        model: A DecoderLM, MambaLM or TieredDecoder (a8w16) in eval mode.
        target: Its ``runtime`` picks the lowering (onnxruntime, executorch + XNNPACK, or TensorRT's ONNX).
        precision: One of ``precisions(target.runtime)``; ``a8w16`` expects a TieredDecoder.
        out_dir: Where to write ``prefill.<ext>`` and ``decode.<ext>``.
        calibration: Static INT8 plans (TensorRT ``int8-fp16``): real feeds per graph, from ``calibration_feeds``.
        method: Calibration method for the activation scales (``stages.calibrate``).
        fit: Static INT8 plans: ``fit(graphs, quick)``, the fidelity drop of candidate graphs (``{"prefill": path,
            "decode": path}``) on held-back text (``quick``: a cheaper estimate, to rank the GEMMs); with it, the
            most sensitive weight GEMMs move from int8 to FP16 until the drop is within ``budget``.
        budget: The largest drop ``fit`` may report for the plan that ships.

    Raises:
        UsageError: A runtime or precision decoder bundles do not support.
        BuildError: Export or lowering failed (the first line of the exporter's error).
    """
    runtime = target.runtime
    if runtime not in DECODER_PLANS:
        raise UsageError(
            f"Target {target.name} runs {runtime}; decoder bundles lower to onnxruntime and executorch targets.",
            hint="Pick a target such as host-cpu, arm64-cpu, android-arm64 or raspberry-pi-5.",
        )
    if precision not in DECODER_PLANS[runtime]:
        raise UsageError(
            f"Decoder precision '{precision}' is not available on {runtime}; "
            f"it lowers {', '.join(DECODER_PLANS[runtime])}.",
            hint=f"Use --precision {DECODER_PLANS[runtime][0]}.",
        )
    if precision in STATIC and not calibration:
        raise BuildError(f"Decoder precision {precision} needs calibration feeds for both graphs.")
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = prefill_tokens(model)
    files, report = {}, {"prefill_tokens": tokens, "precision": precision}
    for graph, t in (("prefill", tokens), ("decode", 1)):
        path = out_dir / f"{graph}{EXTENSIONS[runtime]}"
        inputs = example_inputs(model, t)
        if runtime == "executorch":
            report[graph] = _lower_executorch(model, inputs, target, path)
        else:  # TensorRT takes the fp32 ONNX; fp16 is its builder flag
            report[graph] = _lower_onnx(model, inputs, "fp32" if runtime == "tensorrt" else precision, path)
        files[graph] = path
    if precision in STATIC:
        planned = _qdq_graphs(files, calibration, method, fit, budget)
        for graph in GRAPHS:
            report[graph].update(planned[graph])
        report["int8_plan"] = planned["int8_plan"]
    if runtime in ("onnxruntime", "tensorrt"):
        files["weights"] = share_weights([files["prefill"], files["decode"]], out_dir / "weights.bin")
        report["shared_weights"] = {"file": "weights.bin", "bytes": files["weights"].stat().st_size}
    if runtime == "tensorrt":
        files.update(_tensorrt_plan(target, precision, files, out_dir, report))
    report["weights"] = {"fp16": "fp16", "int8-dynamic": "int8", "int8-fp16": "int8 (Q/DQ) + fp16 LM head"}.get(
        precision, "fp32"
    )
    if precision == "a8w16":
        boundaries = "; residual stream INT8 at every layer boundary (calibrated per-channel scales)"
        report["note"] = (
            "KV cache archive INT8 (calibrated per-channel K, per-token V scales), newest tokens fp16"
            + (boundaries if getattr(model, "boundaries", False) else "")
            + "; weights and compute fp32 on this CPU runtime"
        )
    return Lowered(files=files, report=report)


def _lower_onnx(model: nn.Module, inputs: tuple[Tensor, ...], precision: str, path: Path) -> dict:
    import onnx

    from edgepipe.runtimes.onnxruntime import apply_precision, export_onnx

    names = ["input_ids", "position", *model.state_names]
    outputs = ["logits", *(n + "_out" for n in model.state_names)]
    fp32 = path.with_suffix(".fp32.onnx")
    export_onnx(DecodeGraph(model), inputs, fp32, names, outputs, {})
    plan = {"a8w16": "fp32"}.get(precision, precision)
    try:
        done = apply_precision(fp32, path, plan)
    finally:
        fp32.unlink(missing_ok=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    return {**done, "ops": dict(Counter(n.op_type for n in graph.node)), "inputs": [i.name for i in graph.input]}


def _tensorrt_plan(target: Target, precision: str, files: dict[str, Path], out_dir: Path, report: dict) -> dict:
    """Check both graphs against TensorRT's rules; write build_plan.json (two static-shape engines) and
    build_engine.py, which builds them on the device."""
    import json
    import shutil

    import onnx

    from edgepipe.runtimes import tensorrt as trt_rt

    for graph in GRAPHS:
        model = onnx.load(str(files[graph]))  # with weights.bin: the rules read Q/DQ scales and weight shapes
        problems = trt_rt.check_graph(model)
        if problems:
            raise BuildError(
                f"TensorRT cannot parse {len(problems)} node(s) of {files[graph].name} for target {target.name}: "
                f"{problems[0]}",
                hint="Use an onnxruntime target for this decoder, or report the node.",
            )
        report[graph]["tensorrt_checks"] = {"rules": "passed", "opset": trt_rt.default_opset(model)}
    opts = target.runtime_options
    plan = {
        "schema": "edgepipe.trt_build_plan/1",
        "precision": precision,
        "engines": [{"graph": g, "onnx": files[g].name, "engine": f"{g}.plan"} for g in GRAPHS],
        # Q/DQ graphs are explicitly quantized: INT8 lets TensorRT use their scales, FP16 runs everything else.
        "flags": {
            "int8": precision in STATIC,
            "fp16": precision in ("fp16", *STATIC),
            "tf32": precision != "fp32",
        },
        "workspace_mb": int(opts.get("workspace_mb", 1024)),
        "builder_optimization_level": int(opts.get("builder_optimization_level", 3)),
        "profiles": [],  # static shapes: no optimisation profile
        "min_tensorrt": "8.6",
        "check": {"note": "decoders are checked by runner.py (edgepipe bench): greedy tokens vs check.npz"},
        "target": {"name": target.name, **{k: v for k, v in target.hardware.items() if k in ("accelerator", "arch")}},
    }
    plan_path = out_dir / "build_plan.json"
    plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    script = out_dir / "build_engine.py"
    shutil.copy2(Path(__file__).with_name("build_engine.py"), script)
    report["engine"] = "built on the device: python3 build_engine.py in the bundle (prefill.plan, decode.plan)"
    return {"build_plan": plan_path, "build_engine": script}


def calibration_feeds(
    model: nn.Module, windows: list[np.ndarray], chunk: int, decode_steps: int = 8
) -> dict[str, list[dict[str, np.ndarray]]]:
    """What each graph is fed on real text: every window prefilled chunk by chunk, then ``decode_steps`` tokens
    decoded one by one, each call's inputs (ids, position and the state so far) recorded for its graph.

    Args:
        model: The module the graphs are traced from (``step`` and ``init_state``).
        windows: Token ids of calibration text, each at least ``chunk + decode_steps`` long.
        chunk: The prefill graph's token count (``prefill_tokens(model)``).
        decode_steps: Decode calls recorded per window.
    """
    names = ["input_ids", "position", *model.state_names]
    feeds: dict[str, list[dict[str, np.ndarray]]] = {"prefill": [], "decode": []}

    def call(graph: str, ids: np.ndarray, position: int, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        inputs = (torch.from_numpy(ids[None]), torch.tensor([position]), *state)
        feeds[graph].append({n: t.numpy().copy() for n, t in zip(names, inputs, strict=True)})
        return tuple(model.step(*inputs)[1:])

    with torch.no_grad():
        for w in windows:
            w = np.asarray(w, np.int64)
            state, pos = tuple(model.init_state(1)), 0
            while pos + chunk + decode_steps <= len(w):
                state, pos = call("prefill", w[pos : pos + chunk], pos, state), pos + chunk
            for _ in range(min(decode_steps, len(w) - pos)):
                state, pos = call("decode", w[pos : pos + 1], pos, state), pos + 1
    return feeds


def _qdq_graphs(
    files: dict[str, Path],
    calibration: dict[str, list[dict[str, np.ndarray]]],
    method: str,
    fit: Callable[[dict[str, Path], bool], float] | None,
    budget: float,
) -> dict:
    """Rewrite the fp32 graphs in ``files`` with TensorRT's explicit Q/DQ on the weight GEMMs of the plan: every one
    but the LM head, less those ``fit`` finds break ``budget`` (moved to FP16, most sensitive first).

    Each graph is calibrated and quantized once; every candidate plan is composed from that (``quantize.compose``).
    """
    import tempfile

    import onnx

    from edgepipe.config import QuantizeConfig
    from edgepipe.runtimes import QuantInputs
    from edgepipe.runtimes import onnxruntime as ort_rt
    from edgepipe.runtimes import tensorrt as trt_rt
    from edgepipe.stages import calibrate as cal
    from edgepipe.stages import quantize as q

    floats, qdqs, gemms = {}, {}, {}
    for graph, path in files.items():
        floats[graph] = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
        gemms[graph] = q.weight_gemms(floats[graph])
        nodes = [g.node for g in gemms[graph] if "lm_head" not in g.layer]
        if not nodes:
            raise BuildError(f"{path.name} has no weight GEMM to quantize.", hint="Use --precision fp16.")
        config = QuantizeConfig(method=method)
        quant = QuantInputs(calibration=calibration[graph], held_out=[], reference=np.zeros(0), config=config)
        with tempfile.TemporaryDirectory(prefix=".quantize-", dir=path.parent) as tmp:
            qdqs[graph] = ort_rt._quantize_all(floats[graph], nodes, quant, trt_rt.trt_qdq_flavor(), Path(tmp))
        del qdqs[graph].graph.value_info[:]
    units = [g.layer for g in gemms["decode"] if "lm_head" not in g.layer]  # the same modules in both graphs
    if sorted(units) != sorted(g.layer for g in gemms["prefill"] if "lm_head" not in g.layer):
        raise BuildError("The prefill and decode graphs have different weight GEMMs.", hint="Use --precision fp16.")

    def write(int8: frozenset[str], where: dict[str, Path]) -> dict[str, Path]:
        for graph, path in where.items():
            nodes = [g.node for g in gemms[graph] if g.layer in int8]
            onnx.save(q.compose(floats[graph], qdqs[graph], nodes), str(path))
        return where

    int8, plan = frozenset(units), {"budget": budget}
    if fit is not None:
        with tempfile.TemporaryDirectory(prefix=".plan-", dir=files["decode"].parent) as tmp:
            where = {graph: Path(tmp) / path.name for graph, path in files.items()}

            def measure(candidate: frozenset[str], quick: bool = False) -> float:
                return fit(write(candidate, where), quick)

            drop = measure(int8)
            plan["all_int8_drop"] = round(drop, 6)
            if drop > budget:
                sensitivity = q.rank_sensitivity(units, lambda one: measure(one, quick=True))
                fitted = q.fit_budget(units, sensitivity, measure, budget)
                if fitted.int8:  # none left in int8 is the fp16 plan: the caller's fallback names it so
                    int8 = fitted.int8
                plan.update(
                    sensitivity={k: round(v, 6) for k, v in sensitivity.items()}, moved=fitted.moved, steps=fitted.steps
                )
    plan["fp16_layers"] = [u for u in units if u not in int8]
    write(int8, files)
    out = {"int8_plan": plan}
    for graph, path in files.items():
        lowered = onnx.load(str(path))
        coverage = q.int8_coverage(lowered)
        out[graph] = {
            "int8_gemms": sum(v == "int8" for v in coverage["layers"].values()),
            "weight_gemms": len(gemms[graph]),
            "int8_coverage": coverage,
            "calibration": {"method": cal.check_method(method), "calls": len(calibration[graph])},
            "kept_fp16": [g.layer for g in gemms[graph] if coverage["layers"].get(g.layer) != "int8"],
            "ops": dict(Counter(n.op_type for n in lowered.graph.node)),
        }
    return out


def share_weights(graphs: list[Path], blob: Path, threshold: int = 1024, align: int = 4096) -> Path:
    """Move the initializers of ``graphs`` into one external-data file, each distinct tensor stored once.

    The prefill and decode graphs hold the same weights; inline, a bundle would carry them twice. Offsets are
    page-aligned so ONNX Runtime can memory-map the file.
    """
    import hashlib

    import onnx
    from onnx import numpy_helper

    index: dict[bytes, tuple[int, int]] = {}
    with blob.open("wb") as f:
        for path in graphs:
            model = onnx.load(str(path))
            for t in model.graph.initializer:
                arr = numpy_helper.to_array(t)
                if arr.nbytes < threshold:
                    continue
                raw = arr.tobytes()
                key = hashlib.sha256(raw).digest() + str(arr.dtype).encode()
                if key not in index:
                    f.write(b"\0" * (-f.tell() % align))
                    index[key] = (f.tell(), len(raw))
                    f.write(raw)
                offset, length = index[key]
                t.CopyFrom(numpy_helper.from_array(arr, t.name))
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for k, v in (("location", blob.name), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=k, value=v)
            onnx.save(model, str(path))
    return blob


def _lower_executorch(model: nn.Module, inputs: tuple[Tensor, ...], target: Target, path: Path) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from edgepipe.runtimes.executorch import _export, _op_name, _to_backend

    edge = _to_backend(_export(DecodeGraph(model), inputs, target), [XnnpackPartitioner()], {}, target)
    calls = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    delegated = sum("executorch_call_delegate" in str(n.target) for n in calls)
    outside = Counter(
        _op_name(n.target)
        for n in calls
        if not any(k in str(n.target) for k in ("executorch_call_delegate", "getitem"))
    )
    try:
        path.write_bytes(edge.to_executorch().buffer)
    except Exception as exc:  # serialisation errors name the op that has no out-variant kernel
        raise BuildError(f"ExecuTorch could not serialise {path.name}: {exc}".splitlines()[0]) from exc
    return {"backend": "xnnpack", "delegates": delegated, "outside_delegates": dict(outside)}


def logits_close(got: np.ndarray, want: np.ndarray) -> dict:
    """Max-abs difference and top-1 agreement of two (tokens, vocab) logit arrays."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return {
        "max_abs_error": float(np.abs(got - want).max()),
        "top1_agreement": float(np.mean(got.argmax(-1) == want.argmax(-1))),
    }
