"""Per-layer precision plans: which weight GEMM runs int8, which falls back to fp16/fp32, and why.

Runtime-neutral plan logic (sensitivity ranking, the "move the most sensitive layer out of int8 until the fidelity
budget holds" loop, the plan record for the manifest) plus the ONNX helpers the onnxruntime and TensorRT lowerings
share: finding the weight GEMMs of a graph, composing a plan from one fully quantized Q/DQ graph, and reading the
INT8 coverage back from a lowered graph.

A "layer" here is one weight GEMM (a Linear): ``layers.0.mixer.query``, ``layers.1.ffn_out``. The attention score
and value matmuls (QKᵀ, softmax·V) have no weights, are never planned and always stay in float: quantizing them
collapses fidelity (mean cosine ≈ 0.3 on MiniLM).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from edgepipe.stages.validate import compare

GEMM_OPS = ("MatMul", "Gemm")
# Ops whose presence means the GEMM itself runs on int8 operands (ORT's dynamic and QOperator forms).
INT8_GEMM_OPS = (
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "MatMulIntegerToFloat",
    "QGemm",
    "QAttention",
)
_WEIGHT_INPUT = {"QLinearMatMul": 3, "QGemm": 3}  # index of the weight (B) input where it is not 1
_INT8_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)


@dataclass(frozen=True)
class Gemm:
    """One weight GEMM of an ONNX graph: ``y = x @ W``, W of shape (k, n)."""

    node: str  # ONNX node name
    layer: str  # the model's module path, e.g. "layers.0.mixer.query"
    op: str
    k: int
    n: int

    @property
    def flops_per_token(self) -> int:
        return 2 * self.k * self.n


@dataclass(frozen=True)
class LayerPlan:
    """One layer's precision in a plan and why it got it."""

    layer: str
    node: str
    precision: str  # int8 | fp16 | fp32: what the plan asks for
    runs_as: str  # what the runtime really executes (fp16 layers run fp32 on ORT's CPU EP)
    why: str
    flops_per_token: int
    sensitivity: float | None = None  # drop in held-back mean cosine with only this layer in int8


@dataclass(frozen=True)
class PrecisionPlan:
    """A named plan: one ``LayerPlan`` per weight GEMM, in graph order."""

    name: str
    layers: tuple[LayerPlan, ...]

    @property
    def int8_nodes(self) -> frozenset[str]:
        return frozenset(lp.node for lp in self.layers if lp.precision == "int8")

    def to_report(self) -> list[dict]:
        return [{k: v for k, v in asdict(lp).items() if v is not None} for lp in self.layers]


def layer_name(node_name: str) -> str:
    """The module path in an exported node name: ``/layers.0/mixer/query/MatMul`` -> ``layers.0.mixer.query``.

    Names ORT's tools derive (``..._quant``) keep the module path; names without one are returned as they are.
    """
    parts = node_name.strip("/").split("/")
    return ".".join(parts[:-1]) if node_name.startswith("/") and len(parts) > 1 else node_name


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _weight_shape(
    name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]
) -> tuple[int, ...] | None:
    """Shape of a constant weight, looking through Q/DQ (int8 W -> DQ, or float W -> Q -> DQ for TensorRT)."""
    for _ in range(3):
        if name in inits:
            return tuple(inits[name].dims)
        node = producers.get(name)
        if node is None or node.op_type not in ("DequantizeLinear", "QuantizeLinear"):
            return None
        name = node.input[0]
    return None


def weight_gemms(model: onnx.ModelProto) -> list[Gemm]:
    """Every GEMM of ``model`` whose second operand is a constant weight, in graph order.

    MatMuls of two activations (attention scores, attention·V, pooling) are not weight GEMMs and are left out.
    ORT's fused ``Attention`` / ``QAttention`` count as one GEMM of their packed QKV weight (hidden, 3*hidden).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    gemms = []
    for node in graph.node:
        if node.op_type not in (*GEMM_OPS, *INT8_GEMM_OPS, "Attention"):
            continue
        idx = _WEIGHT_INPUT.get(node.op_type, 1)
        if len(node.input) <= idx:
            continue
        shape = _weight_shape(node.input[idx], inits, producers)
        if shape is None or len(shape) != 2:
            continue
        k, n = shape
        if node.op_type in ("Gemm", "QGemm") and any(a.name == "transB" and a.i for a in node.attribute):
            k, n = n, k
        gemms.append(Gemm(node.name, layer_name(node.name), node.op_type, int(k), int(n)))
    return gemms


def _dq_int8(name: str, inits: dict[str, onnx.TensorProto], producers: dict[str, onnx.NodeProto]) -> bool:
    """Whether tensor ``name`` is the output of a DequantizeLinear of 8-bit integers (weights or a Q'd activation)."""
    node = producers.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return False
    src = node.input[0]
    if src in inits:
        return inits[src].data_type in _INT8_TYPES
    q = producers.get(src)
    if q is None or q.op_type != "QuantizeLinear":
        return False
    if len(q.input) < 3 or not q.input[2]:
        return True  # a Q without a zero point quantizes to uint8 (ONNX spec)
    return q.input[2] in inits and inits[q.input[2]].data_type in _INT8_TYPES


def int8_coverage(model: onnx.ModelProto) -> dict:
    """Share of weight-GEMM FLOPs that run in int8 in ``model``, read back from the graph itself.

    A GEMM counts as int8 when it is an integer op (MatMulInteger, DynamicQuantizeMatMul, QAttention, ...) or a
    MatMul/Gemm whose two operands both come from 8-bit DequantizeLinear nodes (a Q/DQ pair on the activation and
    a DQ on the weight), which ONNX Runtime and TensorRT fuse into an int8 GEMM.

    Returns:
        ``{"total": share, "layers": {layer: "int8" | "float"}, "blocks": {"layers.0": share, ...},
        "int8_flops_per_token", "gemm_flops_per_token", "scope"}``.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = _producers(graph)
    nodes = {n.name: n for n in graph.node}
    layers, blocks = {}, {}
    total = int8 = 0
    for g in weight_gemms(model):
        node = nodes[g.node]
        is_int8 = g.op in INT8_GEMM_OPS or (
            g.op in GEMM_OPS and all(_dq_int8(node.input[i], inits, producers) for i in (0, 1))
        )
        layers[g.layer] = "int8" if is_int8 else "float"
        block = ".".join(g.layer.split(".")[:2]) if g.layer.startswith("layers.") else g.layer
        done, all_ = blocks.get(block, (0, 0))
        blocks[block] = (done + g.flops_per_token * is_int8, all_ + g.flops_per_token)
        total += g.flops_per_token
        int8 += g.flops_per_token * is_int8
    return {
        "total": round(int8 / total, 4) if total else 0.0,
        "int8_flops_per_token": int8,
        "gemm_flops_per_token": total,
        "blocks": {b: round(d / a, 4) for b, (d, a) in blocks.items()},
        "layers": layers,
        "scope": "weight GEMMs (Linear layers); attention QKᵀ and softmax·V always run in float",
    }


def compose(float_model: onnx.ModelProto, qdq_model: onnx.ModelProto, int8_nodes: Iterable[str]) -> onnx.ModelProto:
    """The float graph with only ``int8_nodes`` taken from a fully quantized Q/DQ graph of the same model.

    ORT's QDQ quantizer derives each GEMM's Q/DQ parameters from the float model's calibration ranges alone, so the
    Q/DQ nodes of one GEMM do not depend on which other GEMMs are quantized: quantizing once and composing gives
    every plan the fallback loop tries, without calibrating again.

    Raises:
        KeyError: A node in ``int8_nodes`` is missing from either graph.
    """
    wanted = set(int8_nodes)
    q_nodes = {n.name: n for n in qdq_model.graph.node}
    q_inits = {i.name: i for i in qdq_model.graph.initializer}
    q_producers = _producers(qdq_model.graph)
    missing = sorted(wanted - set(q_nodes)) or sorted(wanted - {n.name for n in float_model.graph.node})
    if missing:
        raise KeyError(f"nodes not in both graphs: {missing[:5]}")

    out = onnx.ModelProto()
    out.CopyFrom(float_model)
    del out.graph.node[:]
    added: set[str] = set()
    new_inits: dict[str, onnx.TensorProto] = {}

    def cone(tensor: str) -> list[onnx.NodeProto]:
        """The Q/DQ nodes that produce ``tensor`` in the quantized graph, producers first."""
        node = q_producers.get(tensor)
        if node is None or node.op_type not in ("QuantizeLinear", "DequantizeLinear") or node.name in added:
            return []
        added.add(node.name)
        chain = [n for inp in node.input for n in cone(inp)]
        for inp in node.input:
            if inp in q_inits:
                new_inits[inp] = q_inits[inp]
        return [*chain, node]

    for node in float_model.graph.node:
        if node.name in wanted:
            qnode = q_nodes[node.name]
            out.graph.node.extend([n for inp in qnode.input for n in cone(inp)])
            out.graph.node.append(qnode)
        else:
            out.graph.node.append(node)
    existing = {i.name for i in out.graph.initializer}
    out.graph.initializer.extend(t for name, t in new_inits.items() if name not in existing)
    _drop_unused_initializers(out)
    _merge_opsets(out, qdq_model)
    return out


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _merge_opsets(model: onnx.ModelProto, other: onnx.ModelProto) -> None:
    """Take the higher opset per domain (the quantizer may raise the default domain's for per-channel Q/DQ)."""
    versions = {o.domain: o.version for o in model.opset_import}
    for o in other.opset_import:
        versions[o.domain] = max(versions.get(o.domain, 0), o.version)
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in versions.items())


def cosine_drop(out: np.ndarray, reference: np.ndarray) -> float:
    """1 - mean row cosine between ``out`` and ``reference`` (n, dim): the pipeline's fidelity-budget measure."""
    return max(0.0, 1.0 - compare(out, reference[: len(out)])["mean_cosine"])


def rank_sensitivity(
    layers: list[str], measure: Callable[[frozenset[str]], float], on_layer: Callable[[str], None] | None = None
) -> dict[str, float]:
    """Each layer's sensitivity: the held-back drop when only that layer runs int8 (``measure({layer})``)."""
    result = {}
    for layer in layers:
        if on_layer:
            on_layer(layer)
        result[layer] = measure(frozenset([layer]))
    return result


@dataclass
class BudgetFit:
    """Outcome of ``fit_budget``: the int8 set, its measured drop and every step taken."""

    int8: frozenset[str]
    drop: float
    moved: list[str]  # layers taken out of int8, most sensitive first
    steps: list[dict]


def fit_budget(
    layers: list[str],
    sensitivity: dict[str, float],
    measure: Callable[[frozenset[str]], float],
    budget: float,
) -> BudgetFit:
    """Start with every layer in int8; move layers out most-sensitive first until ``measure(int8) <= budget``.

    ``measure`` runs the candidate in the target runtime on held-back data; the last step (no int8 at all) is the
    float model itself and is not measured.
    """
    order = sorted(layers, key=lambda layer: sensitivity.get(layer, 0.0), reverse=True)
    int8 = set(layers)
    drop = measure(frozenset(int8)) if int8 else 0.0
    steps = [{"int8_layers": len(int8), "drop": round(drop, 6)}]
    moved = []
    for layer in order:
        if drop <= budget:
            break
        int8.discard(layer)
        moved.append(layer)
        drop = measure(frozenset(int8)) if int8 else 0.0
        steps.append({"moved": layer, "int8_layers": len(int8), "drop": round(drop, 6)})
    return BudgetFit(frozenset(int8), drop, moved, steps)


def make_plan(
    name: str,
    gemms: list[Gemm],
    int8: frozenset[str],
    float_precision: str,
    float_runs_as: str,
    sensitivity: dict[str, float] | None = None,
    moved: list[str] | None = None,
    float_note: str = "",
) -> PrecisionPlan:
    """The per-layer record of a plan (``int8`` holds node names; ``sensitivity`` and ``moved`` are by node).

    Args:
        name: The plan's name (``w8a8``, ``int8-fp16``).
        gemms: Every weight GEMM of the graph.
        int8: Node names that run int8.
        float_precision: What the plan gives the other layers (``fp16``, or ``fp32`` where there is no fp16).
        float_runs_as: What the runtime executes for them (``fp32`` on ORT's CPU EP).
        sensitivity: Per-node drop with only that node in int8, when measured.
        moved: Nodes taken out of int8 by the budget loop, most sensitive first.
        float_note: Appended to the reason of float layers (e.g. why fp16 layers run fp32).
    """
    sensitivity, moved = sensitivity or {}, moved or []
    rank = {node: i + 1 for i, node in enumerate(moved)}
    layers = []
    for g in gemms:
        s = sensitivity.get(g.node)
        if g.node in int8:
            why = f"int8: drop {_num(s)}" if s is not None else f"int8: {name} puts every weight GEMM in int8"
            layers.append(LayerPlan(g.layer, g.node, "int8", "int8", why, g.flops_per_token, s))
            continue
        if g.node in rank:
            why = f"{float_precision}: #{rank[g.node]} most sensitive, drop {_num(s)}; moved to hold the budget"
        else:
            why = f"{float_precision}: not quantized"
        layers.append(
            LayerPlan(g.layer, g.node, float_precision, float_runs_as, why + float_note, g.flops_per_token, s)
        )
    return PrecisionPlan(name, tuple(layers))


def _num(x: float | None) -> str:
    if x is None:
        return "not measured"
    return f"{x:.4f}" if x >= 1e-4 or x == 0 else f"{x:.1e}"
