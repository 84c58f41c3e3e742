"""TensorRT: explicit Q/DQ ONNX that TensorRT fuses into int8 GEMMs, a build plan, and the engine built on the device.

Engines are tied to the GPU, the TensorRT version and the OS, so a bundle carries ``model.onnx`` (standard ONNX ops
only, symmetric int8 Q/DQ on the weight GEMMs), ``build_plan.json`` (precision flags, optimisation profile for the
dynamic batch and sequence, workspace) and ``build_engine.py``, which builds ``model.plan`` with TensorRT's Python
API on the device and checks it on ``check.npz``. Where TensorRT and a GPU are present, the build does the same here.

Elsewhere the graph is checked statically (``check_graph``: the placements TensorRT fuses, standard-domain ops,
opset, polygraphy's lint when installed) and its numerics are measured with onnxruntime on the CPU with ORT's Q/DQ
fusion turned off: every DequantizeLinear runs as written, i.e. exact fake-quant arithmetic, which is what an int8
GEMM with int32 accumulation computes. Layers TensorRT runs in fp16 run fp32 in that proxy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgepipe.config import Target
from edgepipe.errors import BuildError
from edgepipe.precisions import STATIC, tolerance
from edgepipe.runtimes import Lowered, QuantInputs
from edgepipe.runtimes import decoder_graphs as dg
from edgepipe.runtimes import onnxruntime as ort_rt
from edgepipe.runtimes.build_engine import PLAN_SCHEMA

OPSET_RANGE = (13, 17)  # per-channel Q/DQ needs opset 13; TensorRT 8.6 (JetPack 6.0) parses up to 17
GEMM_CONSUMERS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
STANDARD_DOMAINS = ("", "ai.onnx")
# ONNX ops TensorRT's parser rejects (onnx-tensorrt's operator matrix, TensorRT 8.6 / 10).
UNSUPPORTED_OPS = frozenset(
    "BitShift Compress ConcatFromSequence ConvInteger Det DynamicQuantizeLinear Hardmax MatMulInteger MaxRoiPool "
    "MaxUnpool MeanVarianceNormalization Mod Multinomial NegativeLogLikelihoodLoss NonZero OneHot QLinearConv "
    "QLinearMatMul RandomNormal RandomNormalLike RoiAlign SequenceAt SequenceConstruct SequenceEmpty SequenceErase "
    "SequenceInsert SequenceLength Shrink SoftmaxCrossEntropyLoss SplitToSequence StringNormalizer "
    "TfIdfVectorizer Unique".split()
)
PROXY = "onnxruntime CPU proxy of the Q/DQ graph"


def precisions(target: Target | None = None) -> tuple[str, ...]:
    return ("fp32", "fp16", *STATIC)


def tensorrt_here() -> str | None:
    """Why TensorRT engines cannot be built and run here (None when they can)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed here"
    from edgepipe.runtimes import build_engine

    return build_engine.cuda_problem()


def can_run_here(target: Target | None) -> tuple[bool, str]:
    """Always runnable: the engine where TensorRT and a GPU exist, else the Q/DQ graph in onnxruntime on the CPU."""
    problem = tensorrt_here()
    return True, PROXY if problem else "TensorRT engine on this GPU"


def same_machine(target: Target) -> bool:
    """Latency here (a CPU proxy, or a different GPU) says nothing about a Jetson or another GPU."""
    return False


# --------------------------------------------------------------------------------------------------- lowering
def trt_qdq_flavor() -> ort_rt.QdqFlavor:
    """ORT's QDQ quantizer set up for TensorRT's explicit quantization.

    Symmetric int8 activations and per-channel weights (zero point 0), no bias quantization, a dedicated Q/DQ pair
    per consumer, Q/DQ pairs on the float weights, and no Q/DQ on GEMM outputs, so every DequantizeLinear feeds a
    GEMM and TensorRT fuses each pair into the int8 GEMM's input.
    """
    return ort_rt.QdqFlavor(
        runtime="tensorrt",
        activation_type="int8",
        weight_type="int8",
        reduce_range=False,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "AddQDQPairToWeight": True,
            "DedicatedQDQPair": True,
        },
        # Exact fake-quant numerics in the proxy: ORT's fused s8s8 kernels are wrong on CPUs without VNNI.
        session_config={"session.disable_quant_qdq": "1"},
        float_precision="fp16",
        float_runs_as="fp16",
        float_note=" (TensorRT FP16; the onnxruntime proxy runs it fp32)",
        why="TensorRT explicit quantization: symmetric int8, per-channel weights, Q/DQ on GEMM inputs only",
    )


def lower_encoder(
    model: nn.Module,
    example: dict[str, np.ndarray],
    target: Target,
    precision: str,
    out_dir: Path,
    quant: QuantInputs | None = None,
) -> Lowered:
    """Write the TensorRT bundle files for a sentence encoder: model.onnx, build_plan.json, build_engine.py.

    Args:
        model: ``Encoder``; forward(input_ids, attention_mask) -> sentence_embedding.
        example: Tokenized real inputs, used to trace.
        target: A TensorRT target; its ``[tensorrt]`` table sets workspace_mb, batch and seq (min, opt, max).
        precision: One of ``precisions()``; fp16 is a builder flag, the ONNX stays fp32.
        out_dir: Where to write.
        quant: Calibration and held-back data (static plans only).

    Raises:
        BuildError: Unknown precision, export failure, or a graph TensorRT cannot fuse or parse (one line per node).
    """
    if precision not in precisions():
        raise BuildError(
            f"Runtime tensorrt cannot lower precision '{precision}'; it lowers {', '.join(precisions())}.",
            hint="Use --precision int8-fp16 (the default for TensorRT targets) or fp16.",
        )
    if precision in STATIC and quant is None:
        raise ort_rt.quant_required_error(precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp32_path, path = out_dir / "model.fp32.onnx", out_dir / "model.onnx"
    inputs = tuple(torch.from_numpy(example[k]) for k in ("input_ids", "attention_mask"))
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "sentence_embedding": {0: "batch"},
    }
    # No ORT fusion: TensorRT cannot run com.microsoft ops and does its own fusions.
    ort_rt.export_onnx(model, inputs, fp32_path, ["input_ids", "attention_mask"], ["sentence_embedding"], axes)
    report: dict = {"exporter": f"torch.onnx (TorchScript) opset {ort_rt.OPSET}, no ORT fusion"}
    if precision in STATIC:
        report.update(ort_rt.quantize_static_plan(fp32_path, path, precision, quant, trt_qdq_flavor()))
        fp32_path.unlink()
    else:
        fp32_path.replace(path)
        report["precision"] = precision
        if precision == "fp16":
            report["note"] = "fp16 is TensorRT's FP16 builder flag; model.onnx stays fp32 (the proxy runs fp32)"
    lint = True if target.runtime_options.polygraphy_lint else "skipped ([tensorrt].polygraphy_lint = false)"
    files = check_and_plan(
        target,
        {"model": path},
        out_dir,
        report,
        lambda checked: build_plan(target, precision, model.cfg.max_positions, checked),
        lint=lint,
    )
    return Lowered(files={"model": path, **files}, report=report)


def check_and_plan(
    target: Target,
    graphs: dict[str, Path],
    out_dir: Path,
    report: dict,
    make_plan: Callable[[dict], dict],
    lint: bool | str = False,
    hint: str = "Use --precision fp16 (no Q/DQ), or build for host-cpu.",
) -> dict[str, Path]:
    """The one TensorRT step every recipe ends with: check each graph against TensorRT's rules, write the build plan
    and build_engine.py, and build the engine here when this machine has TensorRT and a GPU.

    Args:
        graphs: Role -> ONNX graph (``model``; a decoder's ``prefill`` and ``decode``).
        report: The lowering report; each graph's checks land in it (``tensorrt_checks``, or per graph for several).
        make_plan: Builds build_plan.json's content from the report (its checks included).
        lint: Run polygraphy's per-node lint (True), or the reason it is skipped (a string), or skip it silently.
        hint: The error's hint when a node fails the rules.

    Returns:
        The bundle files this step wrote (role -> path): build_plan, build_engine and, when built here, engine.

    Raises:
        BuildError: A node TensorRT cannot fuse or parse (the first one named, the count of the rest).
    """
    for role, path in graphs.items():
        graph = onnx.load(str(path))  # with weights.bin: the rules read Q/DQ scales and weight shapes
        problems = check_graph(graph)
        if problems:
            raise BuildError(
                f"TensorRT cannot fuse or parse {len(problems)} node(s) of {path.name} for target {target.name}: "
                f"{problems[0]}" + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""),
                hint=hint,
            )
        checks = {
            "rules": "passed",
            "qdq_pairs": sum(n.op_type == "QuantizeLinear" for n in graph.graph.node),
            "standard_ops_only": True,
            "opset": default_opset(graph),
        }
        if lint is not False:
            # polygraphy runs every node in onnxruntime one by one (~10 s for a tiny model, minutes for MiniLM); the
            # validate stage runs the whole graph in onnxruntime anyway, so a target may turn it off.
            checks["polygraphy_lint"] = polygraphy_lint(path) if lint is True else lint
        if len(graphs) == 1:
            report["tensorrt_checks"] = checks
            report["ops"] = _op_counts(graph)
        else:
            report[role]["tensorrt_checks"] = checks
    plan = make_plan(report)
    (out_dir / "build_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    shutil.copy2(Path(__file__).with_name("build_engine.py"), out_dir / "build_engine.py")
    files = {"build_plan": out_dir / "build_plan.json", "build_engine": out_dir / "build_engine.py"}
    problem = tensorrt_here()
    if problem is not None:
        report["engine"] = f"not built here ({problem}); run `python3 build_engine.py` in the bundle on the device"
    elif "engines" in plan:
        report["engine"] = "built on the device: python3 build_engine.py in the bundle (prefill.plan, decode.plan)"
    else:
        report["engine"] = build_engine_here(out_dir, plan)
        files["engine"] = out_dir / plan["engine"]
    return files


def decoder_plan(target: Target, precision: str, graphs: dict[str, Path]) -> dict:
    """build_plan.json for a decoder: two static-shape engines (prefill, decode), checked by the runner."""
    opts = target.runtime_options
    return {
        "schema": PLAN_SCHEMA,
        "precision": precision,
        "engines": [{"graph": g, "onnx": p.name, "engine": f"{g}.plan"} for g, p in graphs.items()],
        # Q/DQ graphs are explicitly quantized: INT8 lets TensorRT use their scales, FP16 runs everything else.
        "flags": {"int8": precision in STATIC, "fp16": precision in ("fp16", *STATIC), "tf32": precision != "fp32"},
        "workspace_mb": opts.workspace_mb,
        "builder_optimization_level": opts.builder_optimization_level,
        "profiles": [],  # static shapes: no optimisation profile
        "min_tensorrt": "8.6",
        "check": {"note": "decoders are checked by runner.py (edgepipe bench): greedy tokens vs check.npz"},
        "target": {"name": target.name, **{k: v for k, v in target.hardware.items() if k in ("accelerator", "arch")}},
    }


def build_plan(target: Target, precision: str, max_positions: int, report: dict) -> dict:
    """What build_engine.py needs: files, builder flags, one optimisation profile, workspace, check tolerances."""
    opts = target.runtime_options
    batch = _triple(opts.batch, "batch", target)
    seq = _triple(opts.seq or [1, 128, max_positions], "seq", target)
    seq = [min(s, max_positions) for s in seq]
    shapes = {k: [int(b), int(s)] for k, b, s in zip(("min", "opt", "max"), batch, seq)}
    static = precision in STATIC
    return {
        "schema": PLAN_SCHEMA,
        "onnx": "model.onnx",
        "engine": "model.plan",
        "precision": precision,
        # Q/DQ graphs are explicitly quantized: INT8 lets TensorRT use the Q/DQ scales (it never calibrates), FP16
        # covers every layer left out of int8; TF32 stays off for fp32 so the engine keeps fp32 accuracy.
        "flags": {"int8": static, "fp16": precision != "fp32", "tf32": precision != "fp32"},
        "workspace_mb": opts.workspace_mb,
        "builder_optimization_level": opts.builder_optimization_level,
        "profiles": [{"input_ids": shapes, "attention_mask": shapes}],
        "min_tensorrt": "8.6",
        "check": {
            "file": "check.npz",
            "tolerance": tolerance(precision, "encoder"),
            "prefer": "manifest.json validation",
        },
        "target": {"name": target.name, **{k: v for k, v in target.hardware.items() if k in ("accelerator", "arch")}},
        "int8_layers": [lp["layer"] for lp in report.get("plan", []) if lp["precision"] == "int8"],
    }


def _triple(value, key: str, target: Target) -> list[int]:
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, int) and v > 0 for v in value)):
        raise BuildError(
            f"Target {target.name}: [tensorrt].{key} = {value!r}; expected [min, opt, max] positive integers.",
            hint=f"Fix {target.path or 'the target file'}, e.g. {key} = [1, 128, 512].",
        )
    if not value[0] <= value[1] <= value[2]:
        raise BuildError(f"Target {target.name}: [tensorrt].{key} = {value} must satisfy min <= opt <= max.")
    return value


def _op_counts(graph: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def default_opset(graph: onnx.ModelProto) -> int:
    return next((o.version for o in graph.opset_import if o.domain in STANDARD_DOMAINS), 0)


# ------------------------------------------------------------------------------------------------ rule checker
@dataclass(frozen=True)
class Violation:
    node: str
    op: str
    rule: str
    detail: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op}): {self.rule}: {self.detail}"


def check_graph(model: onnx.ModelProto) -> list[Violation]:
    """Every placement TensorRT cannot parse or fuse into int8 GEMMs, one ``Violation`` per node and rule.

    Rules: ``standard-domain`` (no com.microsoft or other custom ops), ``unsupported-op``, ``opset``,
    ``int8-only`` (Q/DQ are signed int8, no uint8/int32, so no bias quantization), ``zero-point`` (symmetric: all
    zero points 0), ``per-channel-weights`` (weight scales per output channel), ``dq-feeds-gemm`` (every
    DequantizeLinear feeds a GEMM), ``dedicated-pair`` (each Q feeds one DQ, each DQ one consumer), ``pair-params``
    (a DQ uses its Q's scale and zero point), ``both-operands`` (a GEMM with a DQ operand has DQ on both).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    found: list[Violation] = []

    def bad(node: onnx.NodeProto, rule: str, detail: str) -> None:
        found.append(Violation(node.name or node.output[0], node.op_type, rule, detail))

    opset = default_opset(model)
    if not OPSET_RANGE[0] <= opset <= OPSET_RANGE[1]:
        found.append(Violation("graph", "opset_import", "opset", f"opset {opset}; TensorRT needs {OPSET_RANGE}"))
    for node in graph.node:
        if node.domain not in STANDARD_DOMAINS:
            bad(node, "standard-domain", f"domain '{node.domain}' is not standard ONNX; TensorRT cannot run it")
            continue
        if node.op_type in UNSUPPORTED_OPS:
            bad(node, "unsupported-op", f"TensorRT's ONNX parser has no {node.op_type}")
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        _check_qdq_params(node, inits, bad)
        outs = consumers.get(node.output[0], [])
        if node.op_type == "QuantizeLinear":
            if len(outs) != 1 or outs[0].op_type != "DequantizeLinear":
                bad(node, "dedicated-pair", f"feeds {len(outs)} consumer(s) {[c.op_type for c in outs]}; needs one DQ")
            continue
        if len(outs) != 1:
            bad(node, "dedicated-pair", f"shared by {len(outs)} consumers {[c.name for c in outs]}")
        for c in outs:
            if c.op_type not in GEMM_CONSUMERS:
                bad(node, "dq-feeds-gemm", f"feeds {c.op_type} '{c.name}'; TensorRT fuses DQ only into GEMMs")
        src = producers.get(node.input[0])
        if node.input[0] not in inits and (src is None or src.op_type != "QuantizeLinear"):
            bad(node, "pair-params", "input is neither an int8 weight nor a QuantizeLinear output")
        elif src is not None and src.op_type == "QuantizeLinear" and list(src.input[1:]) != list(node.input[1:]):
            bad(node, "pair-params", f"scale/zero point differ from its QuantizeLinear '{src.name}'")
        weight = node.input[0] in inits or (src is not None and src.input[0] in inits)
        if weight:
            for c in outs:
                if c.op_type in GEMM_CONSUMERS:
                    _check_weight_axis(node, c, inits, src, bad)
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            dq = [producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in node.input[:2]]
            if any(dq) and not all(dq):
                bad(node, "both-operands", "only one operand has Q/DQ; TensorRT runs it in float, not int8")
    return found


def _check_qdq_params(node: onnx.NodeProto, inits: dict, bad) -> None:
    """int8 zero points, all zero; positive finite scales."""
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        if node.op_type == "QuantizeLinear":
            bad(node, "int8-only", "no zero point, so the output is uint8; TensorRT Q/DQ are int8")
        elif node.input[0] in inits and inits[node.input[0]].data_type != onnx.TensorProto.INT8:
            bad(node, "int8-only", f"input is {onnx.TensorProto.DataType.Name(inits[node.input[0]].data_type)}")
    elif node.input[2] in inits:
        zp = inits[node.input[2]]
        if zp.data_type != onnx.TensorProto.INT8:
            kind = onnx.TensorProto.DataType.Name(zp.data_type)
            what = "bias quantization (int32)" if zp.data_type == onnx.TensorProto.INT32 else kind
            bad(node, "int8-only", f"{what}; TensorRT takes signed int8 Q/DQ only")
        values = numpy_helper.to_array(zp)
        if np.any(values != 0):
            bad(node, "zero-point", f"asymmetric zero point {values.ravel()[:4].tolist()}; TensorRT needs 0")
    if node.input[1] in inits:
        scale = numpy_helper.to_array(inits[node.input[1]])
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            bad(node, "pair-params", "scale is not positive and finite")


def _check_weight_axis(dq: onnx.NodeProto, gemm: onnx.NodeProto, inits: dict, q, bad) -> None:
    """Weight scales must be per output channel: MatMul W (k, n) -> axis 1 (n scales); Gemm transB -> axis 0."""
    from onnx import numpy_helper

    weight = inits.get(dq.input[0]) or (inits.get(q.input[0]) if q is not None else None)
    if weight is None or dq.input[1] not in inits or len(weight.dims) != 2:
        return
    scale = numpy_helper.to_array(inits[dq.input[1]])
    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
    axis = axis % 2
    trans_b = any(a.name == "transB" and a.i for a in gemm.attribute) if gemm.op_type == "Gemm" else False
    out_axis = 0 if trans_b else 1
    if scale.size == 1:
        bad(dq, "per-channel-weights", f"per-tensor weight scale for {gemm.name}; needs {weight.dims[out_axis]}")
    elif axis != out_axis or scale.size != weight.dims[out_axis]:
        bad(dq, "per-channel-weights", f"scales along axis {axis} ({scale.size}); needs axis {out_axis}")


def polygraphy_lint(path: Path, timeout: int = 300) -> str:
    """polygraphy's ONNX lint (onnx.checker + onnxruntime node by node) when installed; one-line summary."""
    try:
        import polygraphy  # noqa: F401
    except ImportError:
        return 'not installed (pip install "edgepipe[tensorrt]")'
    report = path.with_name("polygraphy-lint.json")
    # Token ids and mask values must be valid: polygraphy feeds random data otherwise.
    cmd = [
        sys.executable,
        "-c",
        "import sys; from polygraphy.tools import main; sys.exit(main())",
        "check",
        "lint",
        str(path),
        "--input-shapes",
        "input_ids:[1,16]",
        "attention_mask:[1,16]",
        "--val-range",
        "input_ids:[100,1000]",
        "attention_mask:[1,1]",
        "-o",
        str(report),
        "--silent",
    ]
    try:
        subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        data = json.loads(report.read_text())
    except (OSError, ValueError, subprocess.TimeoutExpired) as exc:
        return f"did not run ({type(exc).__name__})"
    finally:
        report.unlink(missing_ok=True)
    errors = [e for e in data.get("lint_entries", data.get("linting_entries", [])) if e.get("level") == "exception"]
    failing = data.get("summary", {}).get("failing", [])
    if errors or failing:
        first = (errors[0].get("message", "") if errors else f"failing nodes {failing[:3]}").splitlines()[0]
        return f"{len(errors) or len(failing)} problem(s): {first}"
    return f"passed ({len(data.get('summary', {}).get('passing', []))} nodes)"


# ------------------------------------------------------------------------------------------------- sessions
def load(artifact: Path, target: Target | None = None, threads: int | None = None):
    """A session on the bundle: the TensorRT engine where it runs here, else the ORT proxy of ``artifact``.

    An engine beside ``artifact`` (``model.plan``) is loaded; without one, the engine is built from ``artifact`` into
    a private temporary directory: never into the bundle, nor to a path its build_plan.json names (a bundle from
    elsewhere is untrusted; docs/architecture.md, "The bundle").
    """
    if tensorrt_here() is None:
        from edgepipe.runtimes import build_engine

        artifact = Path(artifact)
        engine = artifact.with_name("model.plan")
        try:
            if engine.is_file():
                return build_engine.EngineRunner(engine)
            plan = json.loads(artifact.with_name("build_plan.json").read_text(encoding="utf-8"))
            with tempfile.TemporaryDirectory(prefix="edgepipe-engine-") as tmp:
                build_engine_here(Path(tmp), {**plan, "onnx": str(artifact.resolve()), "engine": "model.plan"})
                return build_engine.EngineRunner(Path(tmp) / "model.plan")  # deserialized: the file can go
        except build_engine.BuildFailure as exc:
            raise BuildError(str(exc), hint="Rebuild the engine with `python3 build_engine.py --force`.") from None
        except (OSError, ValueError, TypeError) as exc:
            raise BuildError(
                f"Cannot read {artifact.with_name('build_plan.json')} ({exc}).", hint="Rebuild the bundle."
            ) from None
    return ProxySession(Path(artifact), threads)


def build_engine_here(bundle: Path, plan: dict) -> dict:
    from edgepipe.runtimes import build_engine

    try:
        return build_engine.build(bundle, plan)
    except build_engine.BuildFailure as exc:
        raise BuildError(str(exc), hint="Try --precision fp16, or report the failing layer.") from None


class ProxySession(ort_rt.OrtSession):
    """The Q/DQ graph in onnxruntime on the CPU with Q/DQ fusion off: exact fake-quant numerics."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
        super().__init__(path, ["CPUExecutionProvider"], threads, options=opts)


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
    """``prefill.onnx`` + ``decode.onnx`` for TensorRT: fp32 graphs (fp16 is the builder flag) or, for int8-fp16,
    explicit Q/DQ on every weight GEMM but the LM head, fitted to ``budget`` by ``fit`` (``qdq_graphs``); checked
    against TensorRT's rules, with the build plan that builds both engines on the device.

    Args:
        calibration: Static INT8 plans: real feeds per graph (``decoder_graphs.calibration_feeds``).
        method: Calibration method for the activation scales (``stages.calibrate``).
        fit: Static INT8 plans: ``fit(graphs, quick)``, the fidelity drop of candidate graphs on held-back text
            (``quick``: a cheaper estimate, to rank the GEMMs).
        budget: The largest drop ``fit`` may report for the plan that ships.
    """
    # fp32 graphs: fp16 is TensorRT's builder flag, int8-fp16 adds Q/DQ below
    export = partial(ort_rt.export_decoder_graph, model, precision="fp32")
    files, report = dg.write_graphs(model, target, precision, out_dir, calibration, ".onnx", export)
    if precision in STATIC:
        planned = qdq_graphs(files, calibration, method, fit, budget)
        for graph in dg.GRAPHS:
            report[graph].update(planned[graph])
        report["int8_plan"] = planned["int8_plan"]
    files["weights"] = dg.share_weights([files["prefill"], files["decode"]], out_dir / "weights.bin")
    report["shared_weights"] = {"file": "weights.bin", "bytes": files["weights"].stat().st_size}
    graphs = {g: files[g] for g in dg.GRAPHS}
    hint = "Use an onnxruntime target for this decoder, or report the node."
    files.update(
        check_and_plan(target, graphs, out_dir, report, lambda _: decoder_plan(target, precision, graphs), hint=hint)
    )
    return Lowered(files=files, report=dg.finish_report(model, precision, report))


def qdq_graphs(
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
    from edgepipe.config import QuantizeConfig
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
            qdqs[graph] = ort_rt.quantize_all(floats[graph], nodes, quant, trt_qdq_flavor(), Path(tmp))
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
