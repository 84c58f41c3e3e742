"""Runtimes behind one small interface, imported lazily so ``import edgepipe`` pulls in none of them.

Each runtime module provides:

- ``precisions() -> tuple[str, ...]``: the precision plans it can lower.
- ``lower_encoder(model, example, target, precision, out_dir, quant=None) -> Lowered``: write the artifact.
- ``load(artifact, target) -> Session``: a session whose ``run(feeds) -> dict`` maps numpy inputs to outputs.
- ``can_run_here(target) -> tuple[bool, str]``: whether this machine can execute the artifact (or a faithful
  numeric proxy of it), and how.
- ``same_machine(target) -> bool``: whether latency measured here says anything about the target.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Protocol

import numpy as np

from edgepipe.config import QuantizeConfig
from edgepipe.errors import MissingExtraError, UsageError

RUNTIMES = {
    "onnxruntime": "edgepipe.runtimes.onnxruntime",
    "executorch": "edgepipe.runtimes.executorch",
    "tensorrt": "edgepipe.runtimes.tensorrt",
}
EXTRAS = {"onnxruntime": "onnxruntime", "executorch": "executorch", "tensorrt": "tensorrt"}


class Session(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass
class QuantInputs:
    """What a runtime needs to quantize with a fidelity budget: real calibration text and a held-back check."""

    calibration: list[dict[str, np.ndarray]]  # tokenized batches of the calibration split
    held_out: list[dict[str, np.ndarray]]  # tokenized held-back batches, for per-layer sensitivity
    reference: np.ndarray  # the unquantized model's held-back embeddings, (n, dim)
    config: QuantizeConfig


@dataclass
class Lowered:
    """What ``lower`` wrote: the artifact's files (relative to out_dir) and a report for the manifest."""

    files: dict[str, Path]  # role -> path, e.g. {"model": out_dir / "model.onnx"}
    report: dict = field(default_factory=dict)


def get_runtime(name: str) -> ModuleType:
    """Import the runtime module for ``name``.

    Raises:
        UsageError: Unknown runtime name.
        MissingExtraError: The runtime's package is not installed.
    """
    if name not in RUNTIMES:
        raise UsageError(f"Unknown runtime '{name}'. Accepted: {', '.join(RUNTIMES)}.")
    try:
        return importlib.import_module(RUNTIMES[name])
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing == "edgepipe":
            raise
        raise MissingExtraError(f"Runtime '{name}' (Python package '{missing}')", EXTRAS[name]) from None


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products); without it ORT's S8S8 int8 path overflows."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags
