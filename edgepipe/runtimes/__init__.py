"""Runtimes behind one interface (``Runtime``), imported lazily so ``import edgepipe`` pulls in none of them.

Every module named in ``RUNTIMES`` satisfies ``Runtime`` (tests/runtimes/test_protocol.py checks it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from edgepipe.config import QuantizeConfig
from edgepipe.errors import MissingExtraError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

    from edgepipe.config import Target

RUNTIMES = {
    "onnxruntime": "edgepipe.runtimes.onnxruntime",
    "executorch": "edgepipe.runtimes.executorch",
    "tensorrt": "edgepipe.runtimes.tensorrt",
    "openvino": "edgepipe.runtimes.openvino",
}
EXTRAS = {"onnxruntime": "onnxruntime", "executorch": "executorch", "tensorrt": "tensorrt", "openvino": "openvino"}


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


@runtime_checkable
class Runtime(Protocol):
    """What every runtime module provides; ``get_runtime(name)`` returns one."""

    def precisions(self, target: Target | None = None) -> tuple[str, ...]:
        """The encoder precision plans it lowers (executorch's depend on the target's backend)."""
        ...

    def can_run_here(self, target: Target | None) -> tuple[bool, str]:
        """Whether this machine can execute the artifact (or a faithful numeric proxy of it), and how."""
        ...

    def same_machine(self, target: Target) -> bool:
        """Whether latency measured here says anything about the target."""
        ...

    def lower_encoder(
        self, model: nn.Module, example: dict, target: Target, precision: str, out_dir: Path, quant=None
    ) -> Lowered:
        """Write a sentence encoder's artifact for ``target`` at ``precision``."""
        ...

    def lower_decoder(
        self,
        model: nn.Module,
        target: Target,
        precision: str,
        out_dir: Path,
        calibration: dict | None = None,
        method: str = "minmax",
        fit: Callable[[dict[str, Path], bool], float] | None = None,
        budget: float = 0.0,
    ) -> Lowered:
        """Write a decoder's prefill and decode graphs (``runtimes.decoder_graphs`` holds their contract)."""
        ...

    def load(self, artifact: Path, target: Target | None = None, threads: int | None = None) -> Session:
        """A session over ``artifact`` on this machine."""
        ...


def get_runtime(name: str) -> Runtime:
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


def cpu_flags() -> set[str]:
    """The kernel's feature flags of this CPU (/proc/cpuinfo ``flags``; empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.partition(":")[2].split())


def cpu_has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (int8 dot products); without it ORT's S8S8 int8 path overflows."""
    return bool(cpu_flags() & {"avx512_vnni", "avx_vnni"})


BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX-BF16); elsewhere bf16 is emulated or ignored."""
    return bool(cpu_flags() & set(BF16_FLAGS))


def candidate_note(candidate: str) -> str:
    """Why this machine cannot measure a target's ``runtime:precision`` candidate, as a suffix ("" when it can)."""
    runtime, _, plan = candidate.partition(":")
    try:
        get_runtime(runtime)
    except (MissingExtraError, UsageError):
        return " (not installed)"
    return " (no native bf16 on this CPU)" if plan == "bf16" and not cpu_has_bf16() else ""
