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
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from edgepipe.config import Target
from edgepipe.errors import BuildError
from edgepipe.runtimes import Lowered, QuantInputs, cpu_has_vnni

OPSET = 17
FUSED_OPS = ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "BiasGelu", "FastGelu", "Gelu")


def precisions() -> tuple[str, ...]:
    return ("fp32", "fp16", "int8-dynamic")


def can_run_here(target: Target | None) -> tuple[bool, str]:
    """ORT CPU graphs are portable: a graph for an aarch64 CPU validates here as a numeric proxy."""
    providers = (
        target.runtime_options.get("providers", ["CPUExecutionProvider"]) if target else ["CPUExecutionProvider"]
    )
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


def fuse_for_ort(path: Path, num_heads: int, hidden: int) -> dict[str, int]:
    """Rewrite the graph at ``path`` with ORT's BERT fusions in place; return the fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = optimize_model(str(path), model_type="bert", num_heads=num_heads, hidden_size=hidden, opt_level=0)
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
    """
    if precision not in precisions():
        raise BuildError(
            f"Runtime onnxruntime cannot lower precision '{precision}'; it lowers {', '.join(precisions())}.",
            hint=f"Use --precision {precisions()[0]} or another target.",
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path = out_dir / "model.fp32.onnx"
    inputs = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask"))
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "sentence_embedding": {0: "batch"},
    }
    export_onnx(model, inputs, fp32_path, ["input_ids", "attention_mask"], ["sentence_embedding"], axes)
    report: dict = {"exporter": f"torch.onnx (TorchScript) opset {OPSET}"}
    if target.runtime_options.get("fuse", True):
        report["fused_ops"] = fuse_for_ort(fp32_path, model.cfg.heads, model.cfg.hidden)
    path = out_dir / "model.onnx"
    report.update(apply_precision(fp32_path, path, precision))
    fp32_path.unlink()
    report["ops"] = dict(Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node))
    return Lowered(files={"model": path}, report=report)


def apply_precision(src: Path, dst: Path, precision: str) -> dict:
    """Write ``src`` at ``precision`` to ``dst`` with ORT's own tooling; return what was done."""
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
        reduce_range = not cpu_has_vnni()
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
        return {"precision": "int8-dynamic", "per_channel": True, "reduce_range": reduce_range}
    raise BuildError(f"Runtime onnxruntime cannot lower precision '{precision}'; it lowers {', '.join(precisions())}.")


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


class OrtSession:
    """An ``onnxruntime.InferenceSession`` behind the ``Session`` interface."""

    def __init__(self, path: Path, providers: list[str] | None = None, threads: int | None = None) -> None:
        opts = ort.SessionOptions()
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
    providers = target.runtime_options.get("providers") if target else None
    return OrtSession(artifact, providers, threads)
