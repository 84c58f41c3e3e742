"""ExecuTorch: torch.export, PT2E quantization with the backend's own quantizer, delegation, a .pte file.

The target's ``[executorch] backend`` picks the delegate:

- ``xnnpack`` (android-arm64, raspberry-pi-5): XNNPACK CPU kernels, dynamic batch and sequence length. The .pte
  runs here in ExecuTorch's own runtime on XNNPACK's x86 kernels: a faithful numeric proxy for arm64 CPUs, not a
  latency figure for them.
- ``ethos-u`` (ethos-u55-128, ethos-u85-256): Arm's backend: the Arm quantizer, TOSA, then Vela. Static shapes
  (batch 1, ``seq_len`` tokens; the session pads). Vela's performance estimate goes into the report; the TOSA graph
  Vela compiled is run on the TOSA reference model while lowering (the .pte itself needs an FVP or the device).
  Needs the ``ethos-u`` extra (ethos-u-vela, tosa-tools).
- ``coreml`` (apple-coreml): the Core ML delegate, lowered here, run only on Apple hardware.

Precision plans (docs/architecture.md, edgepipe/precisions.py) and how they are realised here:

- ``fp32``; ``fp16`` (weights and compute in fp16; token ids in, an fp32 embedding out, pooling in fp32).
- ``int8-dynamic``: XNNPACK dynamic int8 Linears (int8 per-channel weights, activations quantized at run time).
- ``w8a8``: every Linear static int8 (calibrated per-tensor activations, per-channel weights), the rest fp32.
- ``int8-fp16``: static int8 on the Linears that keep the fidelity budget, fp16 for the rest. Layers leave the
  int8 set most-sensitive first (sensitivity: the held-back cosine drop with that Linear alone in int8, measured
  in PyTorch with the quantizer's own observers); the plan is then checked in the ExecuTorch runtime. On Ethos-U,
  which has no float, the higher-precision slot is a16w8 (int16 activations, int8 weights).

Only Linears are annotated: QKᵀ / attention·V matmuls, softmax, LayerNorm and the residual adds stay in float on
XNNPACK, because quantizing them collapses fidelity (static int8 on everything: ≈ 0.38 cosine; docs/architecture.md,
"Toolchain constraints").
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import logging
import math
import platform
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import executorch  # noqa: F401  (a missing runtime fails here: get_runtime turns it into a MissingExtraError)
import numpy as np
import torch
from torch import Tensor, nn

from edgepipe.config import Target
from edgepipe.errors import BuildError, MissingExtraError
from edgepipe.precisions import STATIC
from edgepipe.runtimes import Lowered, QuantInputs
from edgepipe.runtimes import decoder_graphs as dg
from edgepipe.stages.validate import compare, embed_torch

BACKEND_PRECISIONS = {
    "xnnpack": ("fp32", "fp16", "int8-dynamic", "w8a8", "int8-fp16"),
    "ethos-u": ("w8a8", "int8-fp16"),
    "coreml": ("fp32", "fp16"),
}
MAX_BATCH = 64  # upper bound of the exported batch Dim; the session splits larger batches
SENSITIVITY_SAMPLES = 64  # held-back sentences for the one-layer-at-a-time sensitivity (one pass per Linear)
SEARCH_SAMPLES = 128  # held-back sentences for the budget search steps and the runtime check of a plan
SEARCH_MARGIN = 0.8  # the PyTorch search aims at 80% of the budget: XNNPACK's int8 rounding differs slightly
PROXY_SAMPLES = 64  # held-back sentences run on the TOSA reference model (an interpreter: slow per sentence)
OUTPUT = "sentence_embedding"
_FREE_OPS = ("getitem", "sym_size", "sym_numel", "alloc", "_local_scalar_dense")
_QDQ_OPS = ("quantize_per", "dequantize_per", "choose_qparams", "_to_dim_order_copy", "_clone_dim_order")
log = logging.getLogger(__name__)


def precisions(target: Target | None = None) -> tuple[str, ...]:
    """The plans lowered for ``target``'s backend (XNNPACK's when no target is given)."""
    return BACKEND_PRECISIONS[backend_of(target)]


def backend_of(target: Target | None) -> str:
    """The target's delegate: ``[executorch] backend``, default xnnpack."""
    backend = target.runtime_options.backend if target else "xnnpack"
    if backend not in BACKEND_PRECISIONS:
        raise BuildError(
            f"Target {target.name}: [executorch] backend = '{backend}' is unknown; "
            f"accepted: {', '.join(BACKEND_PRECISIONS)}."
        )
    return backend


def host_arch() -> str:
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def ethos_tools_missing() -> str | None:
    """Why the Ethos-U path cannot run here (a missing package), or None."""
    missing = [m for m in ("ethosu.vela", "tosa_reference_model", "tosa_serializer") if not _has_module(m)]
    return f"Python modules {', '.join(missing)} are missing" if missing else None


def _has_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def can_run_here(target: Target | None) -> tuple[bool, str]:
    """XNNPACK .pte files run here; Ethos-U and Core ML ones need their hardware (Ethos-U numerics: TOSA reference)."""
    backend, here = backend_of(target), host_arch()
    if backend == "xnnpack":
        if target and target.arch and target.arch != here:
            return True, f"ExecuTorch runtime with XNNPACK on {here} (numeric proxy for {target.arch})"
        return True, f"ExecuTorch runtime with XNNPACK on {here}"
    if backend == "ethos-u":
        missing = ethos_tools_missing()
        if missing:
            return False, f"Ethos-U needs the NPU or a Corstone FVP; {missing} (pip install 'edgepipe[ethos-u]')"
        return False, (
            "an Ethos-U .pte runs only on the NPU or a Corstone FVP; its TOSA graph is run on the TOSA reference "
            "model while lowering (manifest lowering.proxy)"
        )
    return False, "Core ML runs only on Apple hardware (macOS, iOS); not validated on this machine"


def same_machine(target: Target) -> bool:
    """Latency here says something only about an XNNPACK target of this machine's architecture."""
    return backend_of(target) == "xnnpack" and target.arch in ("", host_arch())


# -- lowering ---------------------------------------------------------------------------------------------------------
def lower_encoder(
    model: nn.Module,
    example: dict[str, np.ndarray],
    target: Target,
    precision: str,
    out_dir: Path,
    quant: QuantInputs | None = None,
) -> Lowered:
    """Export a sentence encoder, quantize it per ``precision``, delegate it and write ``out_dir/model.pte``.

    Args:
        model: ``Encoder``; forward(input_ids, attention_mask) -> sentence_embedding.
        example: Tokenized real inputs (``input_ids``, ``attention_mask``: int64 (batch, seq)), used to trace.
        target: The target; its ``[executorch]`` table picks the backend and its options.
        precision: A plan of ``BACKEND_PRECISIONS[backend]``.
        out_dir: Where to write.
        quant: Calibration and held-back data; required by static plans and by Ethos-U.

    Raises:
        BuildError: Unsupported precision, export or lowering failure, an op a full-delegation target cannot run.
    """
    backend = backend_of(target)
    allowed = BACKEND_PRECISIONS[backend]
    if precision not in allowed:
        raise BuildError(
            f"Target {target.name} (executorch/{backend}) cannot lower precision '{precision}'; "
            f"it lowers {', '.join(allowed)}.",
            hint=f"Use --precision {target.precision} or another target.",
        )
    if quant is None and (precision in STATIC or backend == "ethos-u"):
        raise BuildError(f"Precision {precision} on {target.name} needs calibration data (quantize.calibration).")
    out_dir.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(model).eval()
    start = time.perf_counter()
    with _quiet():
        if backend == "xnnpack":
            report = _lower_xnnpack(model, example, target, precision, out_dir, quant)
        elif backend == "ethos-u":
            report = _lower_ethos(model, example, target, precision, out_dir, quant)
        else:
            report = _lower_coreml(model, example, target, precision, out_dir)
    report["seconds"] = round(time.perf_counter() - start, 1)
    return Lowered(files={"model": out_dir / "model.pte"}, report=report)


def _lower_xnnpack(model, example, target, precision, out_dir, quant) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    half = precision in ("fp16", "int8-fp16")
    graph_model, prefix = (HalfEncoder(model), "enc.") if half else (model, "")
    multiple = seq_multiple(model)
    max_seq = getattr(getattr(model, "cfg", None), "max_positions", 512)
    report: dict = {
        "backend": "xnnpack",
        "exporter": "torch.export",
        "dynamic_shapes": {"batch": [1, MAX_BATCH], "seq": [1, max_seq]},
        "seq_multiple_of": multiple,  # blocked attention / SSD chunks export only for seq = multiple * n
        "float_dtype": "float16" if half else "float32",
    }
    consts = {"seq_multiple_of": multiple, "max_batch": MAX_BATCH, "max_seq": max_seq, "static_seq": 0}

    def build(int8: list[str] | None) -> tuple[dict, object]:
        ep = _export_dynamic(graph_model, example, multiple, max_seq, target)
        if precision == "int8-dynamic":
            ep = _quantize_xnnpack(ep, graph_model, example, multiple, max_seq, target, quant, [], prefix, True)
        elif int8 is not None:
            ep = _quantize_xnnpack(ep, graph_model, example, multiple, max_seq, target, quant, int8, prefix, False)
        edge = _to_backend(ep, [XnnpackPartitioner()], consts, target)
        delegation = read_back(edge, prefix)  # before to_executorch, which rewrites the graph to out-variants
        (out_dir / "model.pte").write_bytes(edge.to_executorch().buffer)
        return delegation, edge

    if precision not in STATIC:
        delegation, _ = build(None)
        plan = _plan(model, precision, frozenset(_names(model)) if precision == "int8-dynamic" else frozenset())
    else:
        fit = Int8Fit(model, quant, precision, fallback="fp16" if precision == "int8-fp16" else "fp32")
        for _ in range(3):  # the runtime has the last word: move the next most sensitive layer out if it breaks
            delegation, _ = build(sorted(fit.int8))
            fit.runtime_drop = fit.check(PteSession(out_dir / "model.pte"))
            if fit.runtime_drop <= fit.budget or precision == "w8a8" or not fit.int8:
                break
            fit.demote()
        plan = fit.plan()
        report["budget"] = fit.budget_report()
        report["calibration"] = fit.calibration
        report["quantization"] = {
            "tool": "PT2E XNNPACKQuantizer (executorch 1.5.1, torchao)",
            "activations": "int8 per-tensor affine, calibrated (static)",
            "weights": "int8 per-channel symmetric",
            "observer": fit.observer,
            "annotated": "Linear layers only: attention matmuls, softmax, norms and residual adds stay float",
        }
    report.update(_layer_report(plan, delegation))
    check_delegation(delegation, target, "xnnpack")
    return report


def _lower_coreml(model, example, target, precision, out_dir) -> dict:
    import coremltools as ct
    from executorch.backends.apple.coreml.compiler import CoreMLBackend
    from executorch.backends.apple.coreml.partition import CoreMLPartitioner

    opts = target.runtime_options
    seq = opts.seq_len
    ids, mask = _pad_rows(example, seq, rows=1)
    ep = _export_static(model, (ids, mask), target)
    specs = CoreMLBackend.generate_compile_specs(
        minimum_deployment_target=getattr(ct.target, opts.minimum_deployment_target),
        compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
        compute_unit=getattr(ct.ComputeUnit, opts.compute_unit),
    )
    consts = {"seq_multiple_of": 1, "max_batch": 1, "max_seq": seq, "static_seq": seq}
    edge = _to_backend(ep, [CoreMLPartitioner(compile_specs=specs)], consts, target)
    delegation = read_back(edge, "")
    (out_dir / "model.pte").write_bytes(edge.to_executorch().buffer)
    report = {"backend": "coreml", "exporter": "torch.export", "static_shape": [1, seq], "validated": False}
    report.update(_layer_report(_plan(model, precision, frozenset()), delegation))
    check_delegation(delegation, target, "coreml")
    return report


# -- export -----------------------------------------------------------------------------------------------------------
class HalfEncoder(nn.Module):
    """An encoder with fp16 weights and compute: int64 ids and mask in, an fp32 embedding out.

    ``Encoder.forward`` casts the mask to fp32, which would mix dtypes in a half model; this runs the same layers
    with an fp16 mask and pools in fp32 (a sum over up to 512 tokens). LayerNorms compute in fp32: XNNPACK does not
    delegate them, and ExecuTorch's portable fp16 kernel overflows on MiniLM's residual stream (|x| reaches ~200
    after ffn_out, its squares summed over 384 channels pass fp16's 65504) and returns NaN.
    """

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.enc = copy.deepcopy(encoder).half()
        # The head (a narrow student's projection to the teacher's size, Dense layers) runs in fp32 on the fp32
        # pooled state.
        self.project = copy.deepcopy(encoder.project).float() if encoder.project is not None else None
        self.dense = copy.deepcopy(encoder.dense).float()
        for module in list(self.enc.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(module, name, Fp32LayerNorm(child))

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        from edgepipe.models.transformer import sentence_head

        mask = attention_mask.to(torch.float16)
        x = self.enc.embed(input_ids)
        for layer in self.enc.layers:
            x = layer(x, mask)
        return sentence_head(x.float(), attention_mask.to(torch.float32), self.enc.cfg, self.project, self.dense)


class Fp32LayerNorm(nn.Module):
    """LayerNorm in fp32 inside an fp16 graph: x: (..., hidden) any float dtype -> same dtype."""

    def __init__(self, norm: nn.LayerNorm) -> None:
        super().__init__()
        self.norm = copy.deepcopy(norm).float()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.float()).to(x.dtype)


def seq_multiple(model: nn.Module) -> int:
    """The sequence length the exported graph needs a multiple of: the window of blocked attention, the SSD chunk.

    Reshape-into-blocks forms export only for ``seq = w * Dim``; a free Dim fails on guards (docs/architecture.md,
    "Toolchain constraints").
    """
    multiple = 1
    for module in model.modules():
        spec = getattr(module, "spec", None)
        if getattr(spec, "kind", None) == "windowed":
            multiple = math.lcm(multiple, spec.window)
        chunk = getattr(getattr(module, "cfg", None), "chunk_size", None)
        if isinstance(chunk, int) and chunk > 1:
            multiple = math.lcm(multiple, chunk)
    return multiple


def _pad_rows(example: dict[str, np.ndarray], seq: int, rows: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad (ids 0, mask 0) or refuse to ``seq`` tokens; keep the first ``rows`` rows (all when None)."""
    ids, mask = example["input_ids"], example["attention_mask"]
    if ids.shape[1] > seq:
        raise BuildError(f"Example has {ids.shape[1]} tokens; this graph takes at most {seq}.")
    pad = seq - ids.shape[1]
    ids, mask = (np.pad(a, ((0, 0), (0, pad))) for a in (ids, mask))
    ids, mask = (ids[:rows], mask[:rows]) if rows else (ids, mask)
    return torch.from_numpy(np.ascontiguousarray(ids, np.int64)), torch.from_numpy(np.ascontiguousarray(mask, np.int64))


def _export_dynamic(model: nn.Module, example: dict[str, np.ndarray], multiple: int, max_seq: int, target: Target):
    """torch.export with a dynamic batch and a dynamic sequence length (a multiple of ``multiple``)."""
    from torch.export import Dim

    seq = -(-example["input_ids"].shape[1] // multiple) * multiple
    ids, mask = _pad_rows(example, max(seq, 2 * multiple if multiple > 1 else 2))
    if ids.shape[0] < 2:  # an example batch of 1 would specialise the batch Dim
        ids, mask = ids.repeat(2, 1), mask.repeat(2, 1)
    batch = Dim("batch", min=1, max=MAX_BATCH)
    tokens = (
        Dim("seq", min=1, max=max_seq) if multiple == 1 else multiple * Dim("blocks", min=1, max=max_seq // multiple)
    )
    shapes = {"input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}
    return _export(model, (ids, mask), target, dynamic_shapes=shapes)


def _export_static(model: nn.Module, inputs: tuple[Tensor, Tensor], target: Target):
    return _export(model, inputs, target)


def _export(model, inputs, target, **kwargs):
    try:
        with torch.no_grad():
            return torch.export.export(model, inputs, **kwargs)
    except Exception as exc:  # export raises many types; the first line names the guard or op
        raise BuildError(
            f"torch.export failed for {target.name}: {_first_line(exc)}",
            hint="Run with --debug for the exporter's trace; the README's 'Attention forms at long sequences' lists "
            "the forms that export.",
        ) from exc


def _to_backend(ep, partitioners, consts: dict, target: Target):
    from executorch.exir import to_edge_transform_and_lower

    try:
        return to_edge_transform_and_lower(ep, partitioner=partitioners, constant_methods=consts)
    except Exception as exc:  # backend passes raise bare Exceptions; the first line names the pass or op
        raise BuildError(
            f"ExecuTorch lowering for {target.name} failed: {_first_line(exc)}",
            hint="Run with --debug for the trace, or pick another --precision / target.",
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# -- quantization -----------------------------------------------------------------------------------------------------
def linear_layers(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _act_observer(method: str):
    """Activation observer for ``quantize.method``: minmax, or the XNNPACK default histogram (L2-optimal range).

    PT2E has no percentile or entropy observer; both map to the histogram observer, and the report says so.
    """
    from torchao.quantization.pt2e import HistogramObserver, MinMaxObserver

    return MinMaxObserver if method == "minmax" else HistogramObserver


def _xnnpack_config(dynamic: bool, observer=None):
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    cfg = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=dynamic)
    if dynamic or observer is None:
        return cfg
    act = cfg.input_activation
    spec = dataclasses.replace(act, observer_or_fake_quant_ctr=observer.with_args(eps=2**-12))
    return dataclasses.replace(cfg, input_activation=spec, output_activation=spec)


def _module_filter(names: list[str]):
    from torchao.quantization.pt2e.quantizer import get_module_name_filter

    filters = [get_module_name_filter(n) for n in names]
    return lambda node: any(f(node) for f in filters)


def _quantize_xnnpack(ep, model, example, multiple, max_seq, target, quant, int8, prefix, dynamic):
    """PT2E with the XNNPACK quantizer on the Linears only (``int8`` names; all of them when dynamic)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer()
    observer = None if dynamic else _act_observer(quant.config.method)
    quantizer.set_operator_type(torch.ops.aten.linear.default, _xnnpack_config(dynamic, observer))
    if not dynamic:
        quantizer.set_filter_function(_module_filter([prefix + n for n in int8]))
    prepared = prepare_pt2e(ep.module(), quantizer)
    # Dynamic plans still need one pass: it is what fills the weight observers.
    batches = quant.calibration if quant is not None and not dynamic else [example]
    with torch.no_grad():
        for b in batches:
            prepared(*_pad_rows(b, -(-b["input_ids"].shape[1] // multiple) * multiple))
    converted = convert_pt2e(prepared)
    return _export_dynamic(converted, example, multiple, max_seq, target)


class Int8Simulation:
    """XNNPACK's static int8 Linear in PyTorch, calibrated with the quantizer's own observers.

    Per-tensor affine int8 on each Linear's input and output, per-channel symmetric int8 weights, everything else
    float: what the PT2E-annotated graph computes, cheap enough to measure one layer at a time.
    """

    def __init__(self, model: nn.Module, calibration: list[dict[str, np.ndarray]], observer) -> None:
        from torchao.quantization.pt2e import PerChannelMinMaxObserver

        self.model = model
        self.linears = dict(linear_layers(model))
        make = lambda: observer(dtype=torch.int8, quant_min=-128, quant_max=127, eps=2**-12)  # noqa: E731
        seen = {n: (make(), make()) for n in self.linears}  # input and output observer per Linear
        hooks = [
            lin.register_forward_hook(lambda m, i, o, n=n: (seen[n][0](i[0].detach()), seen[n][1](o.detach()), None)[2])
            for n, lin in self.linears.items()
        ]
        try:
            embed_torch(model, calibration)
        finally:
            for h in hooks:
                h.remove()
        self.qparams = {n: tuple(_qparam(o) for o in seen[n]) for n in self.linears}
        self.fq_weight = {}
        for n, lin in self.linears.items():
            obs = PerChannelMinMaxObserver(
                ch_axis=0, dtype=torch.int8, quant_min=-127, quant_max=127, qscheme=torch.per_channel_symmetric
            )
            obs(lin.weight.detach())
            scale, zp = obs.calculate_qparams()
            self.fq_weight[n] = torch.fake_quantize_per_channel_affine(
                lin.weight.detach(), scale.float(), zp.to(torch.int32), 0, -127, 127
            )

    @contextmanager
    def int8(self, names: frozenset[str]) -> Iterator[None]:
        """Run the model with ``names`` fake-quantized."""
        saved, hooks = {}, []
        for n in names:
            lin, (a_in, a_out) = self.linears[n], self.qparams[n]
            saved[n] = lin.weight.data
            lin.weight.data = self.fq_weight[n]
            hooks.append(lin.register_forward_pre_hook(lambda m, i, q=a_in: (_fq(i[0], q),)))
            hooks.append(lin.register_forward_hook(lambda m, i, o, q=a_out: _fq(o, q)))
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            for n, w in saved.items():
                self.linears[n].weight.data = w


class Int8Fit:
    """Which Linears stay int8: sensitivity per layer, then most-sensitive-first out of int8 within the budget.

    Measured in PyTorch (``Int8Simulation``) on ``SEARCH_SAMPLES`` held-back sentences against the unquantized
    model; the search aims at ``SEARCH_MARGIN`` of the budget, and the lowered program is checked in the runtime.
    """

    def __init__(self, model: nn.Module, quant: QuantInputs, precision: str, fallback: str) -> None:
        from edgepipe.stages import calibrate as cal
        from edgepipe.stages import quantize as q

        method = cal.check_method(quant.config.method)
        self.model, self.precision, self.fallback = model, precision, fallback
        self.budget = quant.config.fidelity_budget
        self.observer = "MinMaxObserver" if method == "minmax" else f"HistogramObserver (for '{method}': PT2E has no "
        self.observer += "" if method == "minmax" else "percentile/entropy observer; the histogram one minimises L2)"
        self.calibration = cal.describe(quant.calibration, method).to_report()
        self.held, self.ref = _first_rows(quant.held_out, quant.reference, SEARCH_SAMPLES)
        self.sim = Int8Simulation(model, quant.calibration, _act_observer(method))
        names = _names(model)
        self.sensitivity: dict[str, float] | None = None
        self.steps: list[dict] = []
        self.runtime_drop: float | None = None
        if precision == "w8a8":
            self.int8, self.moved = frozenset(names), []
            self.drop = self.measure(self.int8)
            return
        few = _first_rows(self.held, self.ref, SENSITIVITY_SAMPLES)
        self.sensitivity = q.rank_sensitivity(names, lambda s: self.measure(s, *few))
        fit = q.fit_budget(names, self.sensitivity, self.measure, self.budget * SEARCH_MARGIN)
        self.int8, self.moved, self.drop, self.steps = fit.int8, list(fit.moved), fit.drop, fit.steps

    def measure(self, int8: frozenset[str], held: list[dict] | None = None, ref: np.ndarray | None = None) -> float:
        """Held-back drop with ``int8`` simulated (on ``SEARCH_SAMPLES`` sentences unless ``held``/``ref`` given)."""
        from edgepipe.stages.quantize import cosine_drop

        with self.sim.int8(int8):
            held = self.held if held is None else held
            return round(cosine_drop(embed_torch(self.model, held), self.ref if ref is None else ref), 6)

    def check(self, session) -> float:
        """The held-back drop of the lowered program in its runtime."""
        from edgepipe.stages.quantize import cosine_drop
        from edgepipe.stages.validate import embed_session

        out = embed_session(session, self.held)
        if not np.isfinite(out).all():  # max(0, 1 - nan) would read as "no drop"
            return 1.0
        return round(cosine_drop(out, self.ref), 6)

    def demote(self) -> None:
        """Move the most sensitive layer still in int8 out of it (the runtime broke the budget)."""
        order = sorted(self.int8, key=lambda n: (self.sensitivity or {}).get(n, 0.0), reverse=True)
        self.moved.append(order[0])
        self.int8 = self.int8 - {order[0]}
        self.steps.append({"moved": order[0], "int8_layers": len(self.int8), "why": "runtime drop over budget"})

    def plan(self) -> list[dict]:
        return _plan(self.model, self.precision, self.int8, self.fallback, self.sensitivity, self.moved)

    def budget_report(self) -> dict:
        return {
            "budget": self.budget,
            "search": f"PyTorch simulation of the int8 Linears, aiming at {SEARCH_MARGIN:.0%} of the budget"
            if self.sensitivity
            else "none (w8a8: every Linear int8)",
            "simulated_drop": self.drop,
            "runtime_drop": self.runtime_drop,
            "checked_in": "ExecuTorch runtime" if self.runtime_drop is not None else None,
            "steps": self.steps,
            "sentences": len(self.ref),
            "sensitivity_sentences": min(len(self.ref), SENSITIVITY_SAMPLES),
        }


def _names(model: nn.Module) -> list[str]:
    return [n for n, _ in linear_layers(model)]


def _plan(model, precision, int8, fallback=None, sensitivity=None, moved=None) -> list[dict]:
    """The per-Linear plan record, in the shape ``stages.quantize.make_plan`` gives every runtime."""
    from edgepipe.stages.quantize import Gemm, make_plan

    gemms = [Gemm(n, n, "linear", lin.in_features, lin.out_features) for n, lin in linear_layers(model)]
    float_precision = fallback or ("fp32" if precision in ("int8-dynamic", "w8a8") else precision)
    plan = make_plan(precision, gemms, frozenset(int8), float_precision, float_precision, sensitivity, moved)
    return plan.to_report()


def _qparam(observer) -> tuple[float, int]:
    scale, zp = observer.calculate_qparams()
    return float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0])


def _fq(x: Tensor, q: tuple[float, int]) -> Tensor:
    return torch.fake_quantize_per_tensor_affine(x, q[0], q[1], -128, 127)


def _first_rows(batches: list[dict], ref: np.ndarray, n: int) -> tuple[list[dict], np.ndarray]:
    out, rows = [], 0
    for b in batches:
        if rows >= n:
            break
        take = min(n - rows, len(b["input_ids"]))
        out.append({k: v[:take] for k, v in b.items()})
        rows += take
    return out, ref[:rows]


# -- what was delegated -----------------------------------------------------------------------------------------------
def _op_name(target) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.replace("aten::", "aten.").split("(")[0]


def _module_path(node, prefix: str = "") -> str:
    """``layers.0.mixer.query`` for a node, from the nn_module_stack torch.export recorded."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\._modules\['([^']+)'\]", r".\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path).strip(".")
    return path[len(prefix) :] if prefix and path.startswith(prefix) else path


def _linear_kind(node) -> str:
    """How a linear node computes: int8 (static), int8-dynamic, a16w8, or its float dtype."""
    weight, act = node.args[1], node.args[0]
    w_name = _op_name(getattr(weight, "target", ""))
    a_name = _op_name(getattr(act, "target", ""))
    if "dequantize_per_channel" in w_name or "dequantize_per_tensor" in w_name:
        if "dequantize_per_tensor" in a_name:
            if a_name.endswith(".tensor") or "choose_qparams" in _op_name(getattr(act.args[1], "target", "")):
                return "int8-dynamic"
            dtype = act.args[-1] if act.args else None
            return "a16w8" if dtype == torch.int16 else "int8"
        return "int8 weights"
    val = weight.meta.get("val") if hasattr(weight, "meta") else None
    return {torch.float16: "fp16", torch.float32: "fp32"}.get(getattr(val, "dtype", None), "float")


def read_back(edge, prefix: str) -> dict:
    """Walk the lowered program: delegate calls, ops left outside, and how each Linear really runs."""
    gm = edge.exported_program().graph_module
    delegates: Counter = Counter()
    outside: Counter = Counter()
    outside_at: list[tuple[str, str]] = []
    layers: dict[str, dict] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = _op_name(node.target)
        if "executorch_call_delegate" in name:
            lowered = getattr(gm, node.args[0].target)
            delegates[lowered.backend_id] += 1
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function" and _op_name(inner.target).startswith("aten.linear"):
                    layers[_module_path(inner, prefix)] = {"delegated": True, "runs_as": _linear_kind(inner)}
            continue
        if any(f in name for f in _FREE_OPS):
            continue
        if name.startswith("aten.linear"):
            layers[_module_path(node, prefix)] = {"delegated": False, "runs_as": _linear_kind(node)}
        if any(q in name for q in _QDQ_OPS):
            continue
        outside[name] += 1
        outside_at.append((name, _module_path(node, prefix)))
    return {
        "delegate_calls": sum(delegates.values()),
        "backends": dict(delegates),
        "ops_outside": dict(outside.most_common()),
        "outside_at": outside_at,
        "linears": layers,
    }


def check_delegation(delegation: dict, target: Target, backend: str) -> None:
    """Fail when an attention/mixer op stayed outside the delegate on a target that requires full delegation.

    Raises:
        BuildError: One line naming the op, the layer and the target, and the fallback.
    """
    if not target.runtime_options.full_delegation:
        return
    for op, path in delegation["outside_at"]:
        if ".mixer" in f".{path}" or path.startswith("mixer"):
            raise BuildError(
                f"Op {op} in {path} did not go to the {backend} delegate on target {target.name}; "
                f"it would run on the host CPU, and this target requires full delegation.",
                hint="Pick a target whose accelerator runs it (e.g. ethos-u85-256 runs activation matmuls), a "
                "student attention it supports, or set [executorch] full_delegation = false to accept CPU fallback.",
            )


def _layer_report(
    plan: list[dict],
    delegation: dict,
    int8_kinds: tuple[str, ...] = ("int8", "int8-dynamic"),
    scope: str = "weight GEMMs (Linear layers) as delegated in the .pte; attention QKᵀ and softmax·V run float",
) -> dict:
    """The plan with what each Linear really runs as (read back from the program), and the int8 coverage.

    Coverage has the shape of ``stages.quantize.int8_coverage``: the share of weight-GEMM FLOPs in int8.
    """
    layers, blocks, total, int8 = {}, {}, 0, 0
    for lp in plan:
        got = delegation["linears"].get(lp["layer"], {"delegated": False, "runs_as": "missing"})
        lp.update(runs_as=got["runs_as"], delegated=got["delegated"])
        is_int8 = got["runs_as"] in int8_kinds
        layers[lp["layer"]] = "int8" if is_int8 else "float"
        block = ".".join(lp["layer"].split(".")[:2]) if lp["layer"].startswith("layers.") else lp["layer"]
        done, all_ = blocks.get(block, (0, 0))
        blocks[block] = (done + lp["flops_per_token"] * is_int8, all_ + lp["flops_per_token"])
        total += lp["flops_per_token"]
        int8 += lp["flops_per_token"] * is_int8
    return {
        "plan": plan,
        "delegation": {k: v for k, v in delegation.items() if k not in ("linears", "outside_at")},
        "int8_coverage": {
            "total": round(int8 / total, 4) if total else 0.0,
            "int8_flops_per_token": int8,
            "gemm_flops_per_token": total,
            "blocks": {b: round(d / a, 4) for b, (d, a) in blocks.items()},
            "layers": layers,
            "scope": scope,
        },
    }


# -- Ethos-U ----------------------------------------------------------------------------------------------------------
def masked_softmax_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False):
    """Full attention with the padding mask applied after ``exp`` (multiplicative), for integer NPUs.

    ``full_attention`` adds ``finfo.min`` to padded scores; quantized, that range swamps every real score (and the
    Arm backend's int16 exp table overflows building it). Zeroing padded keys after the exp gives the same result.
    The max subtracted before the exp is taken over the real keys only (padded keys are lowered to the row's
    minimum first): padded keys can outscore every real one (the default student's layer 0: by up to 17 at 128
    tokens), and a max over them shrinks the normaliser to ~5e-8, whose reciprocal's calibrated range then wrecks
    the quantized division (a16w8: the int16 MUL after the reciprocal overflows the RESCALE that follows it, which
    the TOSA reference model reports as UNPREDICTABLE; w8a8: the real rows' weights round away).
    q, k, v: (batch, heads, seq, head_dim); key_mask: (batch, seq) 1/0 -> (batch, heads, seq, head_dim).
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    keep = None if key_mask is None else key_mask[:, None, None, :].to(scores.dtype)
    if keep is not None:  # padded keys lowered to the row's minimum: exp(. - max) stays in (0, 1] for every key
        floor = scores.amin(dim=-1, keepdim=True)
        scores = floor + (scores - floor) * keep
    weights = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    if keep is not None:
        weights = weights * keep
    if causal:
        n = q.shape[-2]
        weights = weights * torch.tril(torch.ones(n, n, dtype=weights.dtype, device=weights.device))
    return torch.matmul(weights / weights.sum(dim=-1, keepdim=True), v)


def _npu_form(model: nn.Module) -> nn.Module:
    """The same model with full attention written as ``masked_softmax_attention`` (identical in float)."""
    npu = copy.deepcopy(model)
    for module in npu.modules():
        if getattr(getattr(module, "spec", None), "kind", None) == "full" and hasattr(module, "attend"):
            module.attend = masked_softmax_attention
    return npu


def _lower_ethos(model, example, target, precision, out_dir, quant) -> dict:
    why = ethos_tools_missing()
    if why:
        raise MissingExtraError(f"The Arm Ethos-U toolchain ({why})", "ethos-u")
    from executorch.backends.arm.ethosu import EthosUCompileSpec, EthosUPartitioner
    from executorch.backends.arm.quantizer import (
        EthosUQuantizer,
        get_symmetric_a16w8_quantization_config,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    opts = target.runtime_options
    npu_name, seq = opts.npu or target.name, opts.seq_len
    work = out_dir / "vela"
    work.mkdir(exist_ok=True)
    spec = EthosUCompileSpec(
        npu_name,
        system_config=opts.system_config,
        memory_mode=opts.memory_mode,
        extra_flags=list(opts.vela_flags) or None,
    )
    spec.dump_intermediate_artifacts_to(str(work))
    npu_model = _npu_form(model)
    example_1 = _pad_rows(example, seq, rows=1)

    fit = Int8Fit(model, quant, precision, fallback="a16w8")  # the NPU has no float: the wider slot is a16w8
    quantizer = EthosUQuantizer(spec)
    quantizer.set_global(
        get_symmetric_quantization_config() if precision == "w8a8" else get_symmetric_a16w8_quantization_config()
    )
    if precision != "w8a8":
        for name in sorted(fit.int8):
            quantizer.set_module_name(name, get_symmetric_quantization_config())
    # The embedding tables stay float on the host: quantized, each run would dequantize the whole table.
    quantizer.set_module_type(nn.Embedding, None)
    # TODO(torch>2.13): export(...).module() keeps guards that prepare_pt2e trips over; check_guards=False avoids it.
    graph = _export_static(npu_model, example_1, target).module(check_guards=False)
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for b in quant.calibration:
            for row in range(len(b["input_ids"])):
                prepared(*_pad_rows({k: v[row : row + 1] for k, v in b.items()}, seq))
    converted = convert_pt2e(prepared)
    ep = _export_static(converted, example_1, target)
    consts = {"seq_multiple_of": 1, "max_batch": 1, "max_seq": seq, "static_seq": seq}
    edge = _to_backend(ep, [EthosUPartitioner(spec)], consts, target)
    delegation = read_back(edge, "")
    check_delegation(delegation, target, "ethos-u")  # before the slow reference run
    graphs = _tosa_graphs(edge)
    proxy = _tosa_reference(edge, graphs, spec, quant, seq)
    (out_dir / "model.pte").write_bytes(edge.to_executorch().buffer)
    np.save(out_dir / "proxy_outputs.npy", proxy.pop("outputs"))
    fit.runtime_drop = proxy["drop"]
    report = {
        "backend": "ethos-u",
        "npu": npu_name,
        "static_shape": [1, seq],
        "activations": "int8 everywhere" if precision == "w8a8" else "int16 (a16w8) except the int8 Linears",
        "attention_form": "softmax with a multiplicative padding mask (masked_softmax_attention)",
        "embeddings": "float32 tables, looked up on the host CPU (quantized tables would be dequantized whole per run)",
        "vela": _vela_estimate(graphs, spec),
        "proxy": {**proxy, "outputs": "proxy_outputs.npy"},
        "budget": {**fit.budget_report(), "checked_in": "TOSA reference model"},
        "calibration": fit.calibration,
        "quantization": {
            "tool": "PT2E EthosUQuantizer (executorch 1.5.1 Arm backend)",
            "activations": "int8" if precision == "w8a8" else "int16 (a16w8), int8 on the planned Linears",
            "weights": "int8 per-channel symmetric",
            "annotated": "every op (the NPU is integer-only); embedding tables stay float on the host",
        },
    }
    scope = "weight GEMMs (Linear layers) with int8 activations; the rest of the NPU graph runs a16w8 or int8"
    report.update(_layer_report(fit.plan(), delegation, int8_kinds=("int8",), scope=scope))
    return report


def _tosa_graphs(edge) -> dict[bytes, bytes]:
    """The TOSA flatbuffer of every Ethos-U delegate, keyed by the delegate's Vela payload.

    The Ethos-U backend compiles TOSA and hands it to Vela without keeping it; the partition's program is kept
    unmodified (backends preprocess a copy), so running the same TOSA preprocessing on a copy rebuilds it exactly.
    """
    from executorch.backends.arm.ethosu import EthosUCompileSpec
    from executorch.backends.arm.tosa.backend import TOSABackend

    gm = edge.exported_program().graph_module
    graphs = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and "executorch_call_delegate" in _op_name(node.target):
            lowered = getattr(gm, node.args[0].target)
            if lowered.backend_id == "EthosUBackend":
                spec = TOSABackend.filter_tosa_compile_specs(EthosUCompileSpec._from_list(lowered.compile_specs))
                program = copy.deepcopy(lowered.original_module)
                graphs[bytes(lowered.processed_bytes)] = TOSABackend._preprocess(program, spec).processed_bytes
    return graphs


def _tosa_reference(edge, graphs: dict[bytes, bytes], spec, quant: QuantInputs, seq: int) -> dict:
    """Run the lowered program with every Ethos-U delegate replaced by its TOSA graph on the TOSA reference model.

    Vela compiles exactly these TOSA graphs, so this checks the integer numerics the NPU runs; the host ops
    (embedding lookup, ops left outside) run in PyTorch.
    """
    import tosa_reference_model as refmodel
    from torch.overrides import TorchFunctionMode

    tosa_spec = spec.tosa_spec

    class Dispatch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch._higher_order_ops.executorch_call_delegate:
                lowered, inputs = args[0], args[1:]
                graph = graphs[bytes(lowered.processed_bytes)]
                arrays = [t.detach().contiguous().numpy() for t in inputs]
                outputs, status = refmodel.run(
                    graph, arrays, verbosity="LOW", initialize_variable_tensor_from_numpy=True
                )
                if status != refmodel.GraphStatus.TOSA_VALID:
                    raise BuildError(f"The TOSA reference model rejected an Ethos-U delegate: {status}.")
                vals = lowered.original_module.graph.output_node().args[0]
                return tuple(
                    torch.from_numpy(np.asarray(o)).reshape(v.meta["val"].shape).to(v.meta["val"].dtype)
                    for o, v in zip(outputs, vals)
                )
            return func(*args, **(kwargs or {}))

    held, ref = _first_rows(quant.held_out, quant.reference, PROXY_SAMPLES)
    program = edge.exported_program().module()
    rows = []
    start = time.perf_counter()
    with torch.no_grad(), Dispatch():
        for b in held:
            for row in range(len(b["input_ids"])):
                out = program(*_pad_rows({k: v[row : row + 1] for k, v in b.items()}, seq))
                rows.append((out[0] if isinstance(out, (tuple, list)) else out).float().numpy())
    outputs = np.concatenate(rows).astype(np.float32)
    from edgepipe.stages.quantize import cosine_drop

    return {
        "drop": round(cosine_drop(outputs, ref), 6) if np.isfinite(outputs).all() else 1.0,
        "runtime": "TOSA reference model",
        "tosa_spec": str(tosa_spec),
        "samples": len(outputs),
        "seconds": round(time.perf_counter() - start, 1),
        "vs_pytorch": compare(outputs, ref),
        "outputs": outputs,
    }


def _vela_estimate(graphs: dict[bytes, bytes], spec) -> dict:
    """Vela's performance estimate per delegate: Vela run again on each TOSA graph, its summary CSV read back."""
    from ethosu.vela import vela

    parts, row = [], {}
    for i, graph in enumerate(graphs.values()):
        with tempfile.TemporaryDirectory() as tmp, _quiet_stdout():
            (Path(tmp) / "delegate.tosa").write_bytes(graph)
            flags = [f for f in spec.compiler_flags if not f.startswith("--output-format")]
            vela.main([*flags, f"--output-dir={tmp}/out", f"{tmp}/delegate.tosa"])
            summary = next(Path(tmp, "out").glob("*_summary_*.csv"), None)
            if summary is None:
                continue
            row = dict(zip(*list(csv.reader(summary.open()))[:2]))
        parts.append(
            {
                "delegate": i,
                "cycles": int(float(row["cycles_total"])),
                "inference_ms": round(float(row["inference_time"]) * 1e3, 4),
                "sram_kib": round(float(row["sram_memory_used"]), 2),
                "flash_kib": round(
                    float(row["off_chip_flash_memory_used"]) + float(row["on_chip_flash_memory_used"]), 2
                ),
                "macs": int(float(row["nn_macs"])),
            }
        )
    return {
        "accelerator": row.get("accelerator_configuration"),
        "system_config": row.get("system_config"),
        "memory_mode": row.get("memory_mode"),
        "delegates": parts,
        "npu_cycles": sum(p["cycles"] for p in parts),
        "npu_inference_ms": round(sum(p["inference_ms"] for p in parts), 4),
        "peak_sram_kib": max((p["sram_kib"] for p in parts), default=0.0),
        "note": "Vela's estimate for the NPU part only; host-CPU ops (embedding lookup, ops left outside) not included",
    }


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Vela prints its whole summary to stdout; keep the build output clean (the numbers go in the report)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    """ExecuTorch's and the Arm backend's loggers warn per op (int64 casts, deprecations); keep them to errors."""
    import warnings

    names = ("executorch", "torchao", "torch._export", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# -- running a .pte ---------------------------------------------------------------------------------------------------
class PteSession:
    """A .pte in ExecuTorch's runtime behind the ``Session`` interface: numpy in, numpy out.

    Pads the sequence to the graph's ``seq_multiple_of`` (ids 0, mask 0: padded keys are masked, pooling skips
    them) and splits batches larger than the graph's bound.
    """

    def __init__(self, path: Path, threads: int | None = None) -> None:
        from edgepipe.harness.runner import executorch_runtime

        runtime = executorch_runtime().get()
        if threads:
            import executorch.extension.pybindings.portable_lib as binding

            binding._unsafe_reset_threadpool(threads)
        try:
            program = runtime.load_program(str(path))
            self.method = program.load_method("forward")
        except Exception as exc:  # the binding raises RuntimeError with the ExecuTorch error code
            raise BuildError(f"ExecuTorch cannot load {path}: {_first_line(exc)}", hint="Rebuild the bundle.") from None
        names = program.method_names
        self.consts = {
            k: int(program.load_method(k).execute([])[0]) if k in names else default
            for k, default in (("seq_multiple_of", 1), ("max_batch", MAX_BATCH), ("max_seq", 512), ("static_seq", 0))
        }
        self.input_names = ["input_ids", "attention_mask"]
        self.output_names = [OUTPUT]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(feeds["input_ids"], np.int64)
        mask = np.ascontiguousarray(feeds["attention_mask"], np.int64)
        c = self.consts
        seq = c["static_seq"] or -(-ids.shape[1] // c["seq_multiple_of"]) * c["seq_multiple_of"]
        if seq > c["max_seq"] or ids.shape[1] > seq:
            raise BuildError(f"Input has {ids.shape[1]} tokens; this graph takes at most {c['max_seq']}.")
        if seq > ids.shape[1]:
            ids, mask = (np.pad(a, ((0, 0), (0, seq - a.shape[1]))) for a in (ids, mask))
        step = c["max_batch"]
        outs = [
            self.method.execute([torch.from_numpy(ids[i : i + step]), torch.from_numpy(mask[i : i + step])])[0]
            for i in range(0, len(ids), step)
        ]
        return {OUTPUT: np.concatenate([o.detach().float().numpy() for o in outs])}


def load(artifact: Path, target: Target | None = None, threads: int | None = None) -> PteSession:
    """Load a .pte for this machine's ExecuTorch runtime.

    Raises:
        BuildError: The target's .pte cannot run here (Ethos-U, Core ML), or the file does not load.
    """
    runnable, why = can_run_here(target)
    if not runnable:
        raise BuildError(f"Cannot run {artifact} here: {why}.", hint="Run it on the device with `edgepipe bench`.")
    return PteSession(Path(artifact), threads)


# -- decoders -------------------------------------------------------------------------------------------
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
    """``prefill.pte`` + ``decode.pte`` of ``model`` through XNNPACK (fp32; a8w16: the module's INT8 KV cache).

    The arguments are ``runtimes.Runtime.lower_decoder``'s; static plans are TensorRT's, so calibration, method,
    fit and budget go unused here.
    """
    lower = partial(_lower_decoder_graph, model, target=target)
    files, report = dg.write_graphs(model, target, precision, out_dir, calibration, ".pte", lower)
    return Lowered(files=files, report=dg.finish_report(model, precision, report))


def _lower_decoder_graph(model: nn.Module, inputs: tuple[Tensor, ...], target: Target, path: Path) -> dict:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    from edgepipe.models.decoder import DecodeGraph

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
