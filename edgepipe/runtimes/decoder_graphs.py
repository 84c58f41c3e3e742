"""Decoder bundles' two graphs, a chunked prefill step and a one-token decode step: the runtime-neutral part.

Each runtime's ``lower_decoder`` (``runtimes.Runtime``) writes the graphs; this module holds what they share: the
contract below, the trace inputs, the manifest's I/O entries, the calibration feeds and one weights file for both.

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

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from edgepipe.config import Target
from edgepipe.errors import BuildError, UsageError
from edgepipe.precisions import DECODER_PLANS, STATIC

GRAPHS = ("prefill", "decode")
PREFILL_TOKENS = 32


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


def check_plan(target: Target, precision: str, calibration) -> None:
    """What every runtime's ``lower_decoder`` checks first.

    Raises:
        UsageError: A runtime or precision decoder bundles do not support.
        BuildError: A static INT8 plan without calibration feeds.
    """
    runtime = target.runtime
    if runtime not in DECODER_PLANS:
        raise UsageError(
            f"Target {target.name} runs {runtime}; decoder bundles lower to {', '.join(DECODER_PLANS)} targets.",
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


def write_graphs(
    model: nn.Module,
    target: Target,
    precision: str,
    out_dir: Path,
    calibration,
    suffix: str,
    lower: Callable[..., dict],
) -> tuple[dict[str, Path], dict]:
    """What every runtime's ``lower_decoder`` starts with: check the plan, then ``lower(inputs=..., path=...)`` each
    graph to ``<graph><suffix>`` in ``out_dir``; returns the files and the report (each graph's under its name)."""
    check_plan(target, precision, calibration)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, report = {}, {"prefill_tokens": prefill_tokens(model), "precision": precision}
    for graph, tokens in (("prefill", prefill_tokens(model)), ("decode", 1)):
        files[graph] = out_dir / f"{graph}{suffix}"
        report[graph] = lower(inputs=example_inputs(model, tokens), path=files[graph])
    return files, report


def finish_report(model: nn.Module, precision: str, report: dict) -> dict:
    """The lowering report's plain-words lines: where the weights are and what a8w16 keeps in INT8."""
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
    return report


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
