"""ONNX Runtime: export to ONNX, fuse for ORT, quantize with ORT's own tooling, run with the CPU (or a GPU) EP.

Export uses the TorchScript-based exporter: its graphs match the patterns ONNX Runtime's transformer optimizer
fuses (Attention, SkipLayerNormalization, BiasGelu), which makes encoders 1.7-2x faster at seq 512 than unfused
exports. The dynamo exporter's graphs (torch 2.13) are not fused by that optimizer.
"""

from __future__ import annotations

import logging
import os
import platform
import warnings
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from edgepipe.config import Target, host_cpu_features
from edgepipe.errors import BuildError
from edgepipe.precisions import STATIC
from edgepipe.runtimes import Lowered, QuantInputs
from edgepipe.runtimes import decoder_graphs as dg

OPSET = 17
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")
# Per-layer sensitivity runs on the first few held-back batches (64 sentences): enough to rank layers, cheap
# enough to run once per weight GEMM. The budget itself is always checked on the whole held-back set.
SENSITIVITY_BATCHES = 2

log = logging.getLogger(__name__)


def precisions(target: Target | None = None) -> tuple[str, ...]:
    return ("fp32", "fp16", "int8-dynamic", *STATIC)


def can_run_here(target: Target | None) -> tuple[bool, str]:
    """ORT CPU graphs are portable: a graph for an aarch64 CPU validates here as a numeric proxy."""
    providers = target.runtime_options.providers if target else ["CPUExecutionProvider"]
    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:
        return False, f"{', '.join(missing)} not available here"
    here = host_arch()
    if target and target.arch and target.arch != here:
        return True, f"onnxruntime CPU on {here} (numeric proxy for {target.arch})"
    return True, f"onnxruntime CPU on {here}"


def host_arch() -> str:
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def same_machine(target: Target) -> bool:
    """Whether latency measured here says something about the target (same arch, CPU provider)."""
    return can_run_here(target)[0] and target.arch in ("", host_arch())


VNNI = ("avx512_vnni", "avx_vnni")


def int8_kernels(target: Target | None) -> dict:
    """Which of ORT's x86 int8 kernels a bundle for ``target`` may rely on: the target's declared CPU features decide,
    never the building machine's (a bundle built on a VNNI host must not saturate on a target without VNNI).

    Without VNNI ORT's x86 int8 GEMM multiplies u8 x s8 pairs into saturating 16-bit sums; 7-bit weights
    (``reduce_range``) or u8 x u8 avoid that. The host only validates: where the target declares VNNI and this
    machine has none, the held-back drop measured here runs the saturating kernel and overstates the target's.
    """
    features = list(target.cpu_features) if target is not None else []
    vnni = any(f in features for f in VNNI)
    host = host_cpu_features()
    kernels = {"cpu_features": features, "vnni": vnni, "host_cpu_features": list(host)}
    if vnni and not any(f in host for f in VNNI):
        kernels["validated_here"] = (
            "this machine has no VNNI: its u8 x s8 kernel can saturate where the target's "
            "does not, so the held-back drop measured here is pessimistic"
        )
    return kernels


def export_onnx(
    model: nn.Module,
    example_inputs: tuple[torch.Tensor, ...],
    path: Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Export ``model`` to ONNX (opset 17) with the given dynamic axes.

    Raises:
        BuildError: torch.onnx could not export the model (the op that failed is in the message).
    """
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                model,
                example_inputs,
                str(path),
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
            )
    except Exception as exc:  # the exporter raises many types; the first line names the op
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BuildError(f"ONNX export failed: {first}", hint="Run with --debug for the exporter's trace.") from exc


ENCODER_AXES = {
    "input_ids": {0: "batch", 1: "seq"},
    "attention_mask": {0: "batch", 1: "seq"},
    "sentence_embedding": {0: "batch"},
}


def export_encoder(model: nn.Module, example: dict[str, np.ndarray], path: Path) -> str:
    """The plain (unfused) ONNX export of a sentence encoder, dynamic batch and sequence; returns the exporter's name.

    ONNX Runtime fuses it afterwards (``fuse_for_ort``); OpenVINO lowers it as it is, since it cannot read ORT's
    contrib ops.
    """
    inputs = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask"))
    export_onnx(model, inputs, path, ["input_ids", "attention_mask"], ["sentence_embedding"], ENCODER_AXES)
    return f"torch.onnx (TorchScript) opset {OPSET}"


def fuse_for_ort(path: Path, num_heads: int, hidden: int, attention: bool = True) -> dict[str, int]:
    """Rewrite the graph at ``path`` with ORT's BERT fusions in place; return the fused op counts.

    ``attention=False`` keeps the Q/K/V projections as plain MatMuls (ORT's fused ``Attention`` op packs them into
    one float weight that its static QDQ quantizer cannot reach), for static int8 plans. ``hidden`` is the
    attention's width (heads x head dim); a narrow student's stream is narrower, which ORT fuses correctly while
    logging that the two differ, so its logging is quieted as the quantizer's is.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
    with _quiet_ort_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(
            str(path),
            model_type="bert",
            num_heads=num_heads,
            hidden_size=hidden,
            opt_level=0,
            optimization_options=options,
        )
    opt.save_model_to_file(str(path))
    counts = Counter(node.op_type for node in opt.model.graph.node)
    return {op: counts[op] for op in FUSED_OPS if counts[op]}


def lower_encoder(
    model: nn.Module,
    example: dict[str, np.ndarray],
    target: Target,
    precision: str,
    out_dir: Path,
    quant: QuantInputs | None = None,
) -> Lowered:
    """Export a sentence encoder to ``out_dir/model.onnx``, fuse it for ORT and apply ``precision``.

    Args:
        model: ``Encoder``; forward(input_ids, attention_mask) -> sentence_embedding.
        example: Tokenized real inputs (``input_ids``, ``attention_mask``), used to trace.
        target: The target (its ``[onnxruntime]`` table may set ``fuse = false``).
        precision: One of ``precisions()``.
        out_dir: Where to write.
        quant: Calibration and held-back data for static plans (unused by fp32, fp16 and int8-dynamic).

    Raises:
        BuildError: Unknown precision, a static plan without ``quant``, or an export failure.
    """
    if precision not in precisions():
        raise BuildError(
            f"Runtime onnxruntime cannot lower precision '{precision}'; it lowers {', '.join(precisions())}.",
            hint=f"Use --precision {precisions()[0]} or another target.",
        )
    if precision in STATIC and quant is None:
        raise quant_required_error(precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / "model.fp32.onnx"
    report: dict = {"exporter": export_encoder(model, example, fp32_path)}
    static = precision in STATIC
    if target.runtime_options.fuse:
        width = model.cfg.attention_width  # ORT's hidden_size is the attention's heads x head dim
        report["fused_ops"] = fuse_for_ort(fp32_path, model.cfg.heads, width, attention=not static)
        if static:
            report["fusion_note"] = "Attention not fused: static int8 needs the Q/K/V projections as plain MatMuls"
    path = out_dir / "model.onnx"
    flavor = ort_qdq_flavor(target) if static else None
    report.update(apply_precision(fp32_path, path, precision, quant=quant, flavor=flavor, target=target))
    fp32_path.unlink()
    report["ops"] = dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))
    return Lowered(files={"model": path}, report=report)


def apply_precision(
    src: Path,
    dst: Path,
    precision: str,
    quant: QuantInputs | None = None,
    flavor: QdqFlavor | None = None,
    target: Target | None = None,
) -> dict:
    """Write ``src`` at ``precision`` to ``dst`` with ORT's own tooling; return what was done.

    Static plans (``w8a8``, ``int8-fp16``) need ``quant`` (calibration + held-back data) and use ``flavor``
    (default: ONNX Runtime's CPU flavour for ``target``). Int8 choices follow ``target``'s declared CPU features
    (``int8_kernels``); no target: the choices safe on every x86-64 CPU.
    """
    if precision == "fp32":
        dst.write_bytes(src.read_bytes())
        return {"precision": "fp32"}
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        onnx.save(model, str(dst))
        return {"precision": "fp16", "note": "weights and compute in fp16, fp32 inputs/outputs"}
    if precision == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # Without VNNI, u8 activations x s8 weights can saturate the 16-bit accumulators: keep 7-bit weights there.
        kernels = int8_kernels(target)
        reduce_range = not kernels["vnni"]
        with _quiet_ort_logging():
            quantize_dynamic(
                str(src),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce_range,
                # ORT's shape inference cannot type the outputs of fused contrib ops (Attention, SkipLayerNorm).
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
        return {"precision": "int8-dynamic", "per_channel": True, "reduce_range": reduce_range, "int8_kernels": kernels}
    if precision in STATIC:
        if quant is None:
            raise quant_required_error(precision)
        return quantize_static_plan(src, dst, precision, quant, flavor or ort_qdq_flavor(target))
    raise BuildError(f"Runtime onnxruntime cannot lower precision '{precision}'; it lowers {', '.join(precisions())}.")


def quant_required_error(precision: str) -> BuildError:
    return BuildError(
        f"Precision {precision} needs calibration and held-back data; none was given.",
        hint="Build through `edgepipe build` (it tokenizes calibration_data/), or pass QuantInputs.",
    )


@contextmanager
def _quiet_ort_logging():
    """ORT's quantizer logs advice to the root logger ("consider pre-processing"); keep the build output clean."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


@dataclass(frozen=True)
class QdqFlavor:
    """How ORT's QDQ quantizer writes a static int8 graph for one runtime, and how to run candidates here.

    The onnxruntime flavour targets ORT's own int8 kernels; the TensorRT flavour (``runtimes.tensorrt``) writes
    symmetric explicit Q/DQ and measures candidates with ORT's QDQ fusion off, i.e. exact fake-quant numerics.
    """

    runtime: str
    activation_type: str  # "uint8" | "int8"
    weight_type: str
    reduce_range: bool
    extra_options: dict = field(default_factory=dict)
    session_config: dict = field(default_factory=dict)  # ORT session config entries for measuring candidates
    kernels: dict = field(default_factory=dict)  # int8_kernels(target): the CPU features the choice followed
    float_precision: str = "fp16"  # what int8-fp16 gives the layers it keeps out of int8
    float_runs_as: str = "fp32"
    float_note: str = ""
    why: str = ""


def ort_qdq_flavor(target: Target | None) -> QdqFlavor:
    """ONNX Runtime's static int8 for the target's CPU: U8 activations; S8 weights where the target declares VNNI,
    else U8 weights.

    Without VNNI ORT's x86 int8 GEMM multiplies u8 x s8 pairs into saturating 16-bit sums (reduce_range's 7-bit
    weights avoid that at the cost of a bit) and its S8S8 path gives wrong results; u8 x u8 takes a non-saturating
    path and keeps all 8 weight bits, so it is the choice there.
    """
    providers = (target.runtime_options.providers if target else None) or ["CPUExecutionProvider"]
    cpu_only = all(p == "CPUExecutionProvider" for p in providers)
    kernels = int8_kernels(target)
    vnni = kernels["vnni"]
    return QdqFlavor(
        runtime="onnxruntime",
        activation_type="uint8",
        weight_type="int8" if vnni else "uint8",
        reduce_range=False,
        float_precision="fp16",
        float_runs_as="fp32",
        float_note=", runs fp32 (ORT's CPU EP has no fast fp16 kernels)"
        if cpu_only
        else ", runs fp32 (fp16 conversion of the float part is not implemented for GPU providers yet)",
        why=(
            "the target declares VNNI: u8 activations x s8 weights"
            if vnni
            else "the target declares no VNNI: u8 activations x u8 weights (ORT's s8 paths saturate or are wrong "
            "without it)"
        ),
        kernels=kernels,
    )


def _quant_type(name: str):
    from onnxruntime.quantization import QuantType

    return {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[name]


class _Candidates:
    """Runs candidate plans composed from one Q/DQ graph in ORT, cheaply.

    The float weights are written once as external data beside the candidate graphs, so composing and loading a
    candidate copies kilobytes of graph and the int8 weights of its quantized layers, not the whole model.
    """

    def __init__(self, float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, flavor: QdqFlavor, work: Path) -> None:
        from onnx.external_data_helper import convert_model_to_external_data

        self.qdq_model, self.flavor, self.work = qdq_model, flavor, work
        model = onnx.ModelProto()
        model.CopyFrom(float_model)
        convert_model_to_external_data(model, all_tensors_to_one_file=True, location="weights.bin", size_threshold=1024)
        onnx.save(model, str(work / "float.onnx"))
        self.float_ref = onnx.load(str(work / "float.onnx"), load_external_data=False)
        self.inputs = [i.name for i in float_model.graph.input]

    def outputs(self, int8: frozenset[str], batches: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The first graph output (n, dim) of the candidate with ``int8`` quantized, over ``batches``."""
        from edgepipe.stages.quantize import compose

        path = self.work / "candidate.onnx"
        onnx.save(compose(self.float_ref, self.qdq_model, int8), str(path))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = os.cpu_count() or 1
        opts.log_severity_level = 3
        for key, value in self.flavor.session_config.items():
            opts.add_session_config_entry(key, value)
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        feeds = [{k: b[k] for k in self.inputs} for b in batches]
        return np.concatenate([session.run(None, f)[0] for f in feeds]).astype(np.float32)


def export_decoder_graph(
    model: nn.Module, inputs: tuple[Tensor, ...], precision: str, path: Path, target: Target | None = None
) -> dict:
    """One decoder step graph (runtimes.decoder_graphs) as ONNX at ``precision``; the report of what it holds."""
    from edgepipe.models.decoder import DecodeGraph

    names = ["input_ids", "position", *model.state_names]
    outputs = ["logits", *(n + "_out" for n in model.state_names)]
    fp32 = path.with_suffix(".fp32.onnx")
    export_onnx(DecodeGraph(model), inputs, fp32, names, outputs, {})
    plan = {"a8w16": "fp32"}.get(precision, precision)  # a8w16: fp32 weights over the INT8 cache (the module's own)
    try:
        done = apply_precision(fp32, path, plan, target=target)
    finally:
        fp32.unlink(missing_ok=True)
    graph = onnx.load(str(path), load_external_data=False).graph
    return {**done, "ops": dict(Counter(n.op_type for n in graph.node)), "inputs": [i.name for i in graph.input]}


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
    """``prefill.onnx`` + ``decode.onnx`` of ``model`` at ``precision``, their weights stored once (``weights.bin``).

    The arguments are ``runtimes.Runtime.lower_decoder``'s; static plans are TensorRT's, so calibration, method,
    fit and budget go unused here.
    """
    export = partial(export_decoder_graph, model, precision=precision, target=target)
    files, report = dg.write_graphs(model, target, precision, out_dir, calibration, ".onnx", export)
    files["weights"] = dg.share_weights([files["prefill"], files["decode"]], out_dir / "weights.bin")
    report["shared_weights"] = {"file": "weights.bin", "bytes": files["weights"].stat().st_size}
    return Lowered(files=files, report=dg.finish_report(model, precision, report))


def quantize_static_plan(src: Path, dst: Path, precision: str, quant: QuantInputs, flavor: QdqFlavor) -> dict:
    """Static int8 on the weight GEMMs of ``src`` with ORT's QDQ quantizer, planned per layer; write ``dst``.

    Calibrates once on real calibration text, quantizes every weight GEMM once, then composes plans from that
    graph: ``w8a8`` keeps them all int8; ``int8-fp16`` ranks layers by their held-back drop (each alone in int8,
    run in ORT) and moves the most sensitive out of int8 until the whole held-back set is within the budget.

    Returns:
        The report for the manifest: ``plan`` (per layer: precision, what runs, why), ``calibration``,
        ``int8_coverage`` (read back from the written graph), ``quantization`` (tool, types, budget steps).
    """
    import tempfile

    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    from edgepipe.stages import calibrate as cal
    from edgepipe.stages import quantize as q

    cfg = quant.config
    # ORT's calibrator only calibrates tensors with a known float type; ONNX's own shape inference cannot type the
    # outputs of ORT's contrib ops (SkipLayerNormalization feeds every Q/K/V and FFN projection), so without ORT's
    # symbolic inference those GEMMs would silently get weight-only Q/DQ.
    notes = []
    try:
        float_model = SymbolicShapeInference.infer_shapes(onnx.load(str(src)), auto_merge=True)
    except Exception as exc:  # ORT's symbolic inference raises bare exceptions on ops it does not know
        float_model = onnx.load(str(src))
        notes.append(f"symbolic shape inference failed ({type(exc).__name__}); untyped GEMM inputs stay float")
    gemms = q.weight_gemms(float_model)
    if not gemms:
        raise BuildError(f"Precision {precision}: the graph has no weight GEMM to quantize.", hint="Use fp16 or fp32.")
    nodes = [g.node for g in gemms]
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=dst.parent) as tmp:
        work = Path(tmp)
        qdq_model = quantize_all(float_model, nodes, quant, flavor, work)
        candidates = _Candidates(float_model, qdq_model, flavor, work)

        def drop(int8: frozenset[str], batches: list[dict[str, np.ndarray]]) -> float:
            return q.cosine_drop(candidates.outputs(int8, batches), quant.reference)

        report: dict = {}
        if precision == "w8a8":
            int8, sensitivity, moved = frozenset(nodes), None, None
            report["budget"] = {"budget": cfg.fidelity_budget, "checked_by": "the validate stage (fallback: int8-fp16)"}
        else:
            subset = quant.held_out[:SENSITIVITY_BATCHES]
            sensitivity = q.rank_sensitivity(nodes, lambda s: drop(s, subset))
            fit = q.fit_budget(nodes, sensitivity, lambda s: drop(s, quant.held_out), cfg.fidelity_budget)
            int8, moved = fit.int8, fit.moved
            report["budget"] = {
                "budget": cfg.fidelity_budget,
                "drop": round(fit.drop, 6),
                "steps": fit.steps,
                "sensitivity_sentences": int(sum(len(b["input_ids"]) for b in subset)),
                "held_out_sentences": int(sum(len(b["input_ids"]) for b in quant.held_out)),
            }
    float_precision = "fp32" if precision == "w8a8" else flavor.float_precision
    float_runs_as = "fp32" if precision == "w8a8" else flavor.float_runs_as
    plan = q.make_plan(precision, gemms, int8, float_precision, float_runs_as, sensitivity, moved, flavor.float_note)
    final = q.compose(float_model, qdq_model, int8)
    del final.graph.value_info[:]  # symbolic dims from shape inference; the runtime re-infers
    onnx.save(final, str(dst))
    coverage = q.int8_coverage(final)
    # The plan says what was asked; what runs is read back from the graph (a GEMM whose activation could not be
    # calibrated keeps only its weight DQ and runs float).
    layers = plan.to_report()
    for lp in layers:
        if lp["precision"] == "int8" and coverage["layers"].get(lp["layer"]) != "int8":
            lp["runs_as"] = "fp32"
            lp["why"] += "; runs fp32: the graph has no int8 GEMM here (activation not calibrated)"
    log.info("%s: %d of %d weight GEMMs in int8", precision, len(int8), len(gemms))
    report.update(
        {
            "precision": precision,
            "plan": layers,
            "calibration": cal.describe(quant.calibration, cfg.method).to_report(),
            "int8_coverage": coverage,
            "quantization": {
                "tool": f"onnxruntime {ort.__version__} quantize_static (QDQ)",
                "activations": flavor.activation_type,
                "weights": f"{flavor.weight_type} per-channel",
                "reduce_range": flavor.reduce_range,
                "gemm_outputs_quantized": False,
                "why": flavor.why,
                **({"int8_kernels": flavor.kernels} if flavor.kernels else {}),
                **({"notes": notes} if notes else {}),
            },
        }
    )
    return report


def quantize_all(
    float_model: onnx.ModelProto, nodes: list[str], quant: QuantInputs, flavor: QdqFlavor, work: Path
) -> onnx.ModelProto:
    """Calibrate on ``quant.calibration`` and put Q/DQ on every node in ``nodes``; return the Q/DQ graph."""
    from onnxruntime.quantization import QuantFormat, quantize_static

    from edgepipe.stages import calibrate as cal
    from edgepipe.stages.quantize import GEMM_OPS

    typed, out = work / "typed.onnx", work / "qdq-all.onnx"
    onnx.save(float_model, str(typed))  # quantize_static rewrites a ModelProto's weights in place: give it a file
    extra = {
        # ORT's shape inference cannot type the outputs of fused contrib ops (SkipLayerNormalization, BiasGelu).
        "DefaultTensorType": onnx.TensorProto.FLOAT,
        # Only GEMM inputs get Q/DQ: quantizing a GEMM's output adds error and puts DQ in front of Add/BiasGelu.
        "OpTypesToExcludeOutputQuantization": list(GEMM_OPS),
        # One batch of intermediate outputs in memory at a time (ORT keeps all of them per collect call).
        "CalibStridedMinMax": 1,
        **cal.ort_calibration_options(quant.config.method),
        **flavor.extra_options,
    }
    with _quiet_ort_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(typed),
            str(out),
            cal.OrtCalibrationReader(quant.calibration, [i.name for i in float_model.graph.input]),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(GEMM_OPS),
            nodes_to_quantize=nodes,
            per_channel=True,
            reduce_range=flavor.reduce_range,
            activation_type=_quant_type(flavor.activation_type),
            weight_type=_quant_type(flavor.weight_type),
            calibrate_method=cal.ort_method(quant.config.method),
            extra_options=extra,
        )
    return onnx.load(str(out))


class OrtSession:
    """An ``onnxruntime.InferenceSession`` behind the ``Session`` interface."""

    def __init__(
        self,
        path: Path,
        providers: list[str] | None = None,
        threads: int | None = None,
        options: ort.SessionOptions | None = None,
    ) -> None:
        opts = options or ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph types
            raise BuildError(
                f"onnxruntime cannot load {path}: {str(exc).splitlines()[0]}", hint="Rebuild the bundle."
            ) from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs))


def load(artifact: Path, target: Target | None = None, threads: int | None = None) -> OrtSession:
    providers = target.runtime_options.providers if target else None
    return OrtSession(artifact, providers, threads)
