"""Tiny real bundles for the harness tests: a seeded mean-pooling encoder in ONNX (and ExecuTorch).

The encoder: embedding -> masked mean over the sequence -> Linear -> tanh -> L2 normalise. Its expected outputs
come from a numpy reference, not from the runtime under test, so the runner's check really compares two
implementations. Bundles follow the contract in .notes/CONTRACTS.md and are written with edgepipe.manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgepipe.manifest import write_manifest

VOCAB, HIDDEN, DIM = 64, 16, 8


def tiny_weights(vocab: int = VOCAB, hidden: int = HIDDEN, dim: int = DIM, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "emb": rng.standard_normal((vocab, hidden)).astype(np.float32),
        "w": (rng.standard_normal((hidden, dim)) / np.sqrt(hidden)).astype(np.float32),
        "b": (0.1 * rng.standard_normal(dim)).astype(np.float32),
    }


def tiny_reference(w: dict[str, np.ndarray], ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """ids, mask: (batch, seq) int64 -> sentence_embedding (batch, dim) float32, in float64 numpy."""
    x = w["emb"].astype(np.float64)[ids] * mask[..., None]
    mean = x.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    y = np.tanh(mean @ w["w"].astype(np.float64) + w["b"])
    return (y / np.linalg.norm(y, axis=-1, keepdims=True)).astype(np.float32)


def check_inputs(batch: int = 2, seq: int = 8, vocab: int = VOCAB, seed: int = 1) -> dict[str, np.ndarray]:
    """Token ids with real padding: every row after the first loses its last `row` tokens to the mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    for row in range(1, batch):
        cut = min(row, seq - 1)
        mask[row, seq - cut :] = 0
        ids[row, seq - cut :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def tiny_onnx(w: dict[str, np.ndarray]):
    """The encoder as an ONNX graph with dynamic (batch, seq)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    def const(name: str, value: np.ndarray):
        return numpy_helper.from_array(value, name)

    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis_last"], ["m3"]),
        helper.make_node("Mul", ["x", "m3"], ["xm"]),
        helper.make_node("ReduceSum", ["xm", "axis_seq"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis_seq"], ["c"], keepdims=0),
        helper.make_node("Max", ["c", "eps"], ["c2"]),
        helper.make_node("Div", ["s", "c2"], ["mean"]),
        helper.make_node("MatMul", ["mean", "w"], ["y0"]),
        helper.make_node("Add", ["y0", "b"], ["y1"]),
        helper.make_node("Tanh", ["y1"], ["y"]),
        helper.make_node("ReduceL2", ["y"], ["n"], axes=[-1], keepdims=1),  # axes is an attribute until opset 18
        helper.make_node("Div", ["y", "n"], ["sentence_embedding"]),
    ]
    inputs = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]
    outputs = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", w["w"].shape[1]])]
    inits = [
        const("emb", w["emb"]),
        const("w", w["w"]),
        const("b", w["b"]),
        const("eps", np.float32([1e-9])),
        const("axis_last", np.int64([-1])),
        const("axis_seq", np.int64([1])),
    ]
    graph = helper.make_graph(nodes, "tiny_encoder", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgepipe-tests")
    model.ir_version = 9  # readable by onnxruntime >= 1.15 on older devices
    onnx.checker.check_model(model)
    return model


def _manifest(runtime: str, graph: str, target: dict, validation: dict, dim: int) -> dict:
    return {
        "edgepipe_version": "0.0.0+tests",
        "model": "tiny-encoder",
        "kind": "encoder",
        "target": target,
        "runtime": runtime,
        "precision": "fp32",
        "graphs": {"model": graph},
        "io": {
            "inputs": [
                {"name": n, "dtype": "int64", "shape": ["batch", "seq"]} for n in ("input_ids", "attention_mask")
            ],
            "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", dim]}],
        },
        "validation": validation,
        "stages": [],
        "fidelity": {"final": {"cosine_vs_teacher": 1.0}},
        "versions": {"onnxruntime": "1.32.0", "executorch": "1.5.1"},
    }


def _write_common(out: Path, w: dict, batch: int, seq: int, padding_bytes: int) -> None:
    inputs = check_inputs(batch, seq, vocab=w["emb"].shape[0])
    expected = tiny_reference(w, inputs["input_ids"], inputs["attention_mask"])
    np.savez(
        out / "check.npz", **{f"input.{k}": v for k, v in inputs.items()}, **{"output.sentence_embedding": expected}
    )
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}))
    if padding_bytes:  # a bundle of a chosen size, for the no-space test
        (out / "padding.bin").write_bytes(np.random.default_rng(0).bytes(padding_bytes))


def make_onnx_bundle(
    out: Path,
    *,
    batch: int = 2,
    seq: int = 8,
    seed: int = 0,
    validation: dict | None = None,
    target: dict | None = None,
    padding_bytes: int = 0,
) -> Path:
    """Write an onnxruntime encoder bundle into `out` (created) and return it."""
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    w = tiny_weights(seed=seed)
    onnx.save(tiny_onnx(w), str(out / "model.onnx"))
    _write_common(out, w, batch, seq, padding_bytes)
    target = target or {"name": "host-cpu", "runtime": "onnxruntime", "precision": "fp32", "hardware": {}}
    write_manifest(
        out,
        _manifest(
            "onnxruntime", "model.onnx", target, validation or {"atol": 1e-4, "min_cosine": 0.9999}, w["w"].shape[1]
        ),
    )
    return out


def make_pte_bundle(out: Path, *, batch: int = 2, seq: int = 8, seed: int = 0) -> Path:
    """Write an ExecuTorch (XNNPACK) encoder bundle into `out`. Needs torch + executorch (export side)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    w = tiny_weights(seed=seed)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Parameter(torch.from_numpy(w["emb"]))
            self.lin = torch.nn.Linear(*w["w"].shape)
            self.lin.weight.data = torch.from_numpy(w["w"].T.copy())
            self.lin.bias.data = torch.from_numpy(w["b"])

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            m = attention_mask.unsqueeze(-1).float()
            mean = (self.emb[input_ids] * m).sum(1) / m.sum(1).clamp_min(1e-9)
            return torch.nn.functional.normalize(torch.tanh(self.lin(mean)), dim=-1)

    out.mkdir(parents=True, exist_ok=True)
    example = tuple(torch.from_numpy(v) for v in check_inputs(batch, seq).values())
    program = to_edge_transform_and_lower(
        torch.export.export(Tiny().eval(), example), partitioner=[XnnpackPartitioner()]
    ).to_executorch()
    (out / "model.pte").write_bytes(program.buffer)
    _write_common(out, w, batch, seq, 0)
    target = {"name": "generic-cpu-executorch", "runtime": "executorch", "precision": "fp32", "hardware": {}}
    write_manifest(
        out, _manifest("executorch", "model.pte", target, {"atol": 1e-4, "min_cosine": 0.9999}, w["w"].shape[1])
    )
    return out


def make_trt_bundle(out: Path, *, seed: int = 0) -> Path:
    """Write a TensorRT encoder bundle as `edgepipe build` does for a Jetson: model.onnx, build_plan.json and
    build_engine.py (no engine: engines are built on the device)."""
    import shutil

    import onnx

    from edgepipe.runtimes.build_engine import PLAN_SCHEMA

    out.mkdir(parents=True, exist_ok=True)
    w = tiny_weights(seed=seed)
    onnx.save(tiny_onnx(w), str(out / "model.onnx"))
    _write_common(out, w, 2, 8, 0)
    shapes = {"min": [1, 1], "opt": [2, 8], "max": [4, 32]}
    plan = {
        "schema": PLAN_SCHEMA,
        "onnx": "model.onnx",
        "engine": "model.plan",
        "precision": "fp32",
        "flags": {"int8": False, "fp16": False, "tf32": False},
        "workspace_mb": 256,
        "profiles": [{"input_ids": shapes, "attention_mask": shapes}],
    }
    (out / "build_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    shutil.copy(Path(__file__).parents[1] / "edgepipe" / "runtimes" / "build_engine.py", out / "build_engine.py")
    target = {"name": "jetson-orin-nano", "runtime": "tensorrt", "precision": "fp32", "hardware": {"arch": "aarch64"}}
    write_manifest(
        out, _manifest("tensorrt", "model.onnx", target, {"atol": 1e-4, "min_cosine": 0.9999}, w["w"].shape[1])
    )
    return out
