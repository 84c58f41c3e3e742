"""OpenVINO: the plain ONNX export converted to OpenVINO IR (``model.xml`` + ``model.bin``), run by its CPU plugin.

OpenVINO lowers the unfused TorchScript export (``onnxruntime.export_encoder``): it cannot read ONNX Runtime's
contrib ops (Attention, SkipLayerNormalization), and it fuses attention itself (``ScaledDotProductAttention``).

Plans (``precisions.PLANS``):

- ``fp32``: inference precision f32.
- ``bf16``: the same IR, inference precision bf16 (the CPU plugin converts weights and activations at compile
  time). Only on CPUs with native bf16 (AVX512-BF16 or AMX-BF16): elsewhere OpenVINO silently runs f32, so a build
  here refuses it in one line rather than ship a bundle validated in another precision.
- ``w8a8``: NNCF post-training quantization (``nncf.quantize``, ``ModelType.TRANSFORMER``) calibrated on real
  calibration text, every weight GEMM INT8; MatMuls of two activations (pooling) stay float.
- ``int8-fp16``: the mixed plan: NNCF's accuracy-controlled quantization returns the weight GEMMs NNCF ranks most
  sensitive to float until the held-back drop (1 - mean cosine vs the unquantized model, measured in OpenVINO)
  is within ``quantize.fidelity_budget``. The float layers run fp32 (the CPU plugin has no fp16 GEMMs on x86
  without AVX512-FP16).

The inference precision is written into the IR (``rt_info`` ``runtime_options/INFERENCE_PRECISION_HINT``, OpenVINO's
own key) and passed explicitly at compile time by ``load`` and the device runner, so the bundle runs in the
precision it was validated in on any CPU (f32 for the INT8 plans' float parts, even where the CPU's default is bf16).
"""

from __future__ import annotations

import io
import logging
import platform
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager, redirect_stdout
from functools import partial
from pathlib import Path

import numpy as np
import openvino as ov
from torch import nn

from edgepipe.config import OpenVinoOptions, Target
from edgepipe.errors import BuildError, MissingExtraError, UsageError
from edgepipe.runtimes import BF16_FLAGS, Lowered, QuantInputs, cpu_has_bf16
from edgepipe.runtimes import decoder_graphs as dg

PLANS = ("fp32", "bf16", "w8a8", "int8-fp16")
HINTS = {"fp32": "f32", "bf16": "bf16", "w8a8": "f32", "int8-fp16": "f32"}  # INFERENCE_PRECISION_HINT per plan
HINT_KEY = ["runtime_options", "INFERENCE_PRECISION_HINT"]
# Per-layer sensitivity runs on the first held-back batches (64 sentences), the budget on the whole held-back set.
SENSITIVITY_BATCHES = 2
# Ops a weight's path may pass through between its Constant and the MatMul (NNCF's compressed int8 weights:
# Constant(i8) -> Convert -> Subtract -> Multiply; FakeQuantize over a float weight before compression).
_WEIGHT_PATH = ("Constant", "Convert", "Subtract", "Multiply", "FakeQuantize", "Reshape", "Transpose")

log = logging.getLogger(__name__)


def precisions(target: Target | None = None) -> tuple[str, ...]:
    return PLANS


def host_arch() -> str:
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def can_run_here(target: Target | None) -> tuple[bool, str]:
    """OpenVINO IR runs on any device OpenVINO has here; another CPU's IR validates here as a numeric proxy."""
    device = _options(target).device
    available = ov.Core().available_devices
    if device.split(".")[0] not in available:
        return False, f"OpenVINO device {device} not available here (has {', '.join(available)})"
    here = host_arch()
    if target and target.arch and target.arch != here:
        return True, f"openvino {device} on {here} (numeric proxy for {target.arch})"
    return True, f"openvino {device} on {here}"


def same_machine(target: Target) -> bool:
    return can_run_here(target)[0] and target.arch in ("", host_arch())


def _options(target: Target | None) -> OpenVinoOptions:
    options = target.runtime_options if target else None
    return options if isinstance(options, OpenVinoOptions) else OpenVinoOptions()


def bf16_refusal() -> UsageError:
    return UsageError(
        f"Precision bf16 needs a CPU with native bf16 ({' or '.join(BF16_FLAGS)} in /proc/cpuinfo); this CPU "
        f"({_cpu_model()}) has neither, and OpenVINO would run the bundle in f32 here.",
        hint="Use --precision fp32 or w8a8, or build on a CPU with AVX512-BF16 or AMX.",
    )


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    line = next((ln for ln in text.splitlines() if ln.startswith("model name")), "")
    return line.partition(":")[2].strip() or platform.processor() or "unknown"


def lower_encoder(
    model: nn.Module,
    example: dict[str, np.ndarray],
    target: Target,
    precision: str,
    out_dir: Path,
    quant: QuantInputs | None = None,
) -> Lowered:
    """Export a sentence encoder to plain ONNX, convert it to ``out_dir/model.xml`` + ``model.bin`` at ``precision``.

    Args:
        model: ``Encoder``; forward(input_ids, attention_mask) -> sentence_embedding.
        example: Tokenized real inputs, used to trace.
        target: The target (its ``[openvino]`` table: device, performance hint, threads).
        precision: One of ``precisions()``.
        out_dir: Where to write.
        quant: Calibration and held-back data (w8a8, int8-fp16).

    Raises:
        UsageError: bf16 on a CPU without native bf16.
        BuildError: Unknown precision, an INT8 plan without ``quant``, or an export/conversion failure.
        MissingExtraError: NNCF is not installed (INT8 plans).
    """
    from edgepipe.runtimes.onnxruntime import export_encoder

    if precision not in PLANS:
        raise BuildError(
            f"Runtime openvino cannot lower precision '{precision}'; it lowers {', '.join(PLANS)}.",
            hint="Use --precision fp32 or another target.",
        )
    if precision == "bf16" and not cpu_has_bf16():
        raise bf16_refusal()
    if precision in ("w8a8", "int8-fp16") and quant is None:
        raise BuildError(
            f"Precision {precision} needs calibration and held-back data; none was given.",
            hint="Build through `edgepipe build` (it tokenizes calibration_data/), or pass QuantInputs.",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / "model.plain.onnx"
    report: dict = {"exporter": export_encoder(model, example, onnx_path)}
    try:
        ov_model = convert(onnx_path)
    finally:
        onnx_path.unlink(missing_ok=True)
    report["converter"] = f"openvino {ov.__version__} convert_model (the plain ONNX export, not ORT-fused)"
    if precision in ("w8a8", "int8-fp16"):
        ov_model, quantized = quantize(ov_model, precision, quant, _options(target))
        report.update(quantized)
    path = out_dir / "model.xml"
    save(ov_model, path, HINTS[precision])
    report.update(describe(ov.Core().read_model(str(path)), precision))
    runs = report.get("int8_coverage", {}).get("layers", {})
    for lp in report.get("plan", []):  # what was planned, checked against what the saved IR runs
        if runs.get(lp["layer"], lp["runs_as"]) != lp["runs_as"]:
            lp["runs_as"] = runs[lp["layer"]]
            lp["why"] += f"; the IR runs it {runs[lp['layer']]}"
    return Lowered(files={"model": path, "weights": path.with_suffix(".bin")}, report=report)


def convert(onnx_path: Path) -> ov.Model:
    """``openvino.convert_model`` of an ONNX file, its failure as one line."""
    try:
        return ov.convert_model(str(onnx_path))
    except Exception as exc:  # OpenVINO's frontends raise their own types; the first line names the op
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BuildError(f"OpenVINO could not convert {onnx_path.name}: {first}", hint="Run with --debug.") from exc


def save(model: ov.Model, path: Path, hint: str) -> None:
    """``model.xml`` + ``model.bin`` with the inference precision in the IR's rt_info; fp32 weights stay fp32."""
    model.set_rt_info(hint, HINT_KEY)
    ov.save_model(model, str(path), compress_to_fp16=False)


def weight_gemms(model: ov.Model) -> list:
    """The MatMuls of ``model`` whose second operand is a constant weight (through its dequantization), in order."""

    def constant(output, depth: int = 0) -> bool:
        node = output.get_node()
        kind = node.get_type_name()
        if kind == "Constant":
            return True
        if kind not in _WEIGHT_PATH or depth > 6:
            return False
        return all(constant(node.input_value(i), depth + 1) for i in range(node.get_input_size()))

    return [n for n in model.get_ordered_ops() if n.get_type_name() == "MatMul" and constant(n.input_value(1))]


def _quantized_input(output) -> bool:
    """Whether a MatMul operand is INT8: a FakeQuantize's output, or an 8-bit Constant through its dequantization."""
    node = output.get_node()
    for _ in range(4):
        kind = node.get_type_name()
        if kind == "FakeQuantize":
            return True
        if kind == "Constant":
            return node.get_element_type().get_type_name() in ("i8", "u8")
        if kind not in _WEIGHT_PATH:
            return False
        node = node.input_value(0).get_node()
    return False


def describe(model: ov.Model, precision: str) -> dict:
    """What runs in what, read back from the saved IR: op counts and, for INT8 plans, each weight GEMM's precision."""
    from edgepipe.stages.quantize import layer_name

    ops = Counter(n.get_type_name() for n in model.get_ordered_ops())
    hint = model.get_rt_info(HINT_KEY).astype(str) if model.has_rt_info(HINT_KEY) else "f32"
    report: dict = {
        "precision": precision,
        "inference_precision": hint,
        "ops": {k: v for k, v in sorted(ops.items()) if k not in ("Constant", "Parameter", "Result")},
    }
    if precision not in ("w8a8", "int8-fp16"):
        report["weights"] = "fp32 in the IR" + ("; the CPU plugin converts them to bf16 at compile" * (hint == "bf16"))
        return report
    layers, total, int8 = {}, 0, 0
    for node in weight_gemms(model):
        shape = node.input_value(1).get_partial_shape()
        k, n = (int(d.get_length()) for d in shape) if shape.rank.get_length() == 2 else (0, 0)
        is_int8 = all(_quantized_input(node.input_value(i)) for i in (0, 1))
        layers[layer_name(node.get_friendly_name())] = "int8" if is_int8 else "fp32"
        total += 2 * k * n
        int8 += 2 * k * n * is_int8
    report["int8_coverage"] = {
        "total": round(int8 / total, 4) if total else 0.0,
        "int8_flops_per_token": int8,
        "gemm_flops_per_token": total,
        "layers": layers,
        "scope": "weight GEMMs (Linear layers); attention (ScaledDotProductAttention) and pooling run in float",
    }
    return report


def _nncf():
    try:
        import nncf
    except ModuleNotFoundError:
        raise MissingExtraError("NNCF (Python package 'nncf', OpenVINO's quantizer)", "openvino") from None
    return nncf


def sentences(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Each sentence of tokenized batches alone, its padding cut: NNCF's statistics see no pad tokens."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            out.append({"input_ids": ids[None, :n].copy(), "attention_mask": mask[None, :n].copy()})
    return out


def quantize(model: ov.Model, precision: str, quant: QuantInputs, options: OpenVinoOptions) -> tuple[ov.Model, dict]:
    """``model`` quantized with NNCF at ``precision`` (w8a8 | int8-fp16); the report of how.

    Calibrates on every calibration sentence (``quantize.samples``), one sentence a call. w8a8 takes NNCF's full
    recipe for transformers (SmoothQuant, fast bias correction). int8-fp16 quantizes without them, so that a weight
    GEMM taken back out of INT8 is exactly the float layer, then plans per layer as the other runtimes do
    (``stages.quantize``): each GEMM's held-back drop alone in INT8, measured in OpenVINO, ranks them, and the most
    sensitive move to fp32 until the whole held-back set is within ``quantize.fidelity_budget``.
    """
    from edgepipe.stages import calibrate as cal
    from edgepipe.stages import quantize as q

    nncf = _nncf()
    calibration = sentences(quant.calibration)
    gemms = weight_gemms(model)
    if not gemms:
        raise BuildError(f"Precision {precision}: the graph has no weight GEMM to quantize.", hint="Use fp32.")
    # Only weight GEMMs are quantized; MatMuls of two activations (the pooling) keep float, as on the other runtimes.
    weights = {n.get_friendly_name() for n in gemms}
    others = [n.get_friendly_name() for n in model.get_ordered_ops() if n.get_type_name() == "MatMul"]
    kwargs: dict = dict(
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(calibration),
        ignored_scope=nncf.IgnoredScope(names=[n for n in others if n not in weights], validate=False),
    )
    if precision == "int8-fp16":
        from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters as Advanced
        from nncf.quantization.advanced_parameters import AdvancedSmoothQuantParameters as Smooth

        kwargs.update(
            fast_bias_correction=False,
            advanced_parameters=Advanced(smooth_quant_alphas=Smooth(convolution=-1, matmul=-1)),
        )
    with _quiet_nncf():
        quantized = nncf.quantize(model, nncf.Dataset(calibration), **kwargs)
    report: dict = {
        "calibration": cal.describe(quant.calibration, "minmax").to_report(),
        "quantization": {
            "tool": f"nncf {nncf.__version__} quantize",
            "model_type": "TRANSFORMER",
            "calibration_sentences": len(calibration),
            "recipe": "SmoothQuant + fast bias correction"
            if precision == "w8a8"
            else "no SmoothQuant or bias correction (a layer moved out of INT8 is exactly the float layer)",
            "not_quantized": "MatMuls of two activations (pooling); attention is OpenVINO's own fused op",
        },
    }
    records = [
        q.Gemm(n.get_friendly_name(), q.layer_name(n.get_friendly_name()), "MatMul", *_weight_shape(n)) for n in gemms
    ]
    if precision == "w8a8":
        report["plan"] = q.make_plan(precision, records, frozenset(r.node for r in records), "fp32", "fp32").to_report()
        return quantized, report

    candidates = _Candidates(model, quantized, options)
    names = [n.get_friendly_name() for n in gemms]

    def drop(int8: frozenset[str], feeds: list[dict[str, np.ndarray]]) -> float:
        return q.cosine_drop(candidates.outputs(int8, feeds), quant.reference)

    subset = quant.held_out[:SENSITIVITY_BATCHES]
    sensitivity = q.rank_sensitivity(names, lambda s: drop(s, subset))
    budget = quant.config.fidelity_budget
    fit = q.fit_budget(names, sensitivity, lambda s: drop(s, quant.held_out), budget)
    plan = q.make_plan(precision, records, fit.int8, "fp32", "fp32", sensitivity, fit.moved)
    report["plan"] = plan.to_report()
    report["budget"] = {
        "budget": budget,
        "drop": round(fit.drop, 6),
        "steps": fit.steps,
        "measure": "1 - mean cosine vs the unquantized model on held-back text, in OpenVINO",
        "sensitivity_sentences": int(sum(len(b["input_ids"]) for b in subset)),
        "held_out_sentences": int(sum(len(b["input_ids"]) for b in quant.held_out)),
    }
    return candidates.model(fit.int8), report


def _weight_shape(node) -> tuple[int, int]:
    """(k, n) of a weight GEMM ``y = x @ W``."""
    shape = [int(d.get_length()) for d in node.input_value(1).get_partial_shape()]
    if len(shape) != 2:
        return 0, 0
    return (shape[1], shape[0]) if node.get_attributes().get("transpose_b") else (shape[0], shape[1])


class _Candidates:
    """Plans composed from one NNCF-quantized model: the GEMMs outside the INT8 set get their activation's
    FakeQuantize bypassed and their original fp32 weight back, so each candidate is exactly float there."""

    def __init__(self, float_model: ov.Model, quantized: ov.Model, options: OpenVinoOptions) -> None:
        self.quantized, self.options = quantized, options
        nodes = {n.get_friendly_name(): n.input_value(1).get_node() for n in weight_gemms(float_model)}
        not_constant = [k for k, w in nodes.items() if w.get_type_name() != "Constant"]
        if not_constant:
            raise BuildError(f"OpenVINO's graph has weight GEMMs without a plain fp32 weight: {not_constant[:3]}.")
        # one writable copy each, shared by every candidate's Constant (get_data() is a read-only view)
        self.weights = {k: np.array(w.get_data()) for k, w in nodes.items()}

    def model(self, int8: frozenset[str]) -> ov.Model:
        import openvino.opset13 as ops

        model = self.quantized.clone()
        for node in weight_gemms(model):
            name = node.get_friendly_name()
            if name in int8 or name not in self.weights:
                continue
            src = node.input_value(0)
            if src.get_node().get_type_name() == "FakeQuantize":
                node.input(0).replace_source_output(src.get_node().input_value(0))
            weight = ops.constant(self.weights[name], shared_memory=True)
            node.input(1).replace_source_output(weight.output(0))
        model.validate_nodes_and_infer_types()
        return model

    def outputs(self, int8: frozenset[str], feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
        """The embeddings (n, dim) of the candidate with ``int8`` (node names) in INT8, run in OpenVINO."""
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        compiled = ov.Core().compile_model(self.model(int8), self.options.device, config)
        return np.concatenate([compiled(f)[compiled.output(0)] for f in feeds]).astype(np.float32)


@contextmanager
def _quiet_nncf():
    """NNCF logs each algorithm and draws rich progress bars on stdout: keep the build's own output clean."""
    from nncf.common.logging.logger import nncf_logger

    level = nncf_logger.level
    nncf_logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)


def export_decoder_graph(model: nn.Module, inputs: tuple, path: Path) -> dict:
    """One decoder step graph (``runtimes.decoder_graphs``) as OpenVINO IR in fp32, via the plain ONNX export."""
    from edgepipe.runtimes.onnxruntime import export_decoder_graph as export_onnx_graph

    onnx_path = path.with_suffix(".plain.onnx")
    try:
        done = export_onnx_graph(model, inputs, "fp32", onnx_path)
        ov_model = convert(onnx_path)
    finally:
        onnx_path.unlink(missing_ok=True)
    save(ov_model, path, "f32")
    return {"precision": "fp32", "inputs": done["inputs"], **describe(ov_model, "fp32")}


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
    """``prefill.xml`` + ``decode.xml`` (each with its ``.bin``) of ``model`` in fp32, the only decoder plan here.

    The arguments are ``runtimes.Runtime.lower_decoder``'s; calibration, method, fit and budget go unused.
    """
    files, report = dg.write_graphs(
        model, target, precision, out_dir, calibration, ".xml", partial(export_decoder_graph, model)
    )
    for graph in dg.GRAPHS:
        files[f"{graph}_weights"] = files[graph].with_suffix(".bin")
    return Lowered(files=files, report=dg.finish_report(model, precision, report))


class OpenVinoSession:
    """A compiled OpenVINO model behind the ``Session`` interface, in the precision its IR records."""

    def __init__(self, path: Path, options: OpenVinoOptions | None = None, threads: int | None = None) -> None:
        options = options or OpenVinoOptions()
        core = ov.Core()
        try:
            model = core.read_model(str(path))
            config = {
                "PERFORMANCE_HINT": options.performance_hint,
                "INFERENCE_PRECISION_HINT": model.get_rt_info(HINT_KEY).astype(str)
                if model.has_rt_info(HINT_KEY)
                else "f32",
            }
            if threads or options.num_threads:
                config["INFERENCE_NUM_THREADS"] = int(threads or options.num_threads)
            self.compiled = core.compile_model(model, options.device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError with the plugin's message
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BuildError(f"OpenVINO cannot load {path}: {first}", hint="Rebuild the bundle.") from None
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.request = self.compiled.create_infer_request()

    @property
    def inference_precision(self) -> str:
        """What the plugin really computes in (bf16 asked on a CPU without it reads f32)."""
        return self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = self.request.infer({k: feeds[k] for k in self.input_names})
        return {name: np.array(result[out]) for name, out in zip(self.output_names, self.compiled.outputs)}


def load(artifact: Path, target: Target | None = None, threads: int | None = None) -> OpenVinoSession:
    return OpenVinoSession(artifact, _options(target), threads)
