"""Calibration for static INT8: which method, how many real samples, and a reader that feeds them to ORT.

Calibration data is real text from ``calibration_data/`` (the calibration split, never the held-back one),
tokenized by the pipeline into ``QuantInputs.calibration``. The method names are edgepipe's (``minmax``,
``percentile``, ``entropy``); ``ort_method`` maps them to ONNX Runtime's ``CalibrationMethod``, which both the
onnxruntime and the TensorRT (explicit Q/DQ) lowerings calibrate with.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from edgepipe.errors import UsageError

METHODS = ("minmax", "percentile", "entropy")
# The percentile kept by ``percentile`` calibration (ORT's default, TensorRT's usual choice). ORT 1.32's
# quantize_static does not pass a bin count through, so histograms use its defaults (percentile 2048, entropy 128).
PERCENTILE = 99.999


@dataclass(frozen=True)
class CalibrationSpec:
    """What the calibration ran on, for the manifest."""

    method: str
    samples: int  # sentences fed through the model
    batches: int
    tokens: int  # non-padding tokens seen

    def to_report(self) -> dict:
        return {"method": self.method, "samples": self.samples, "batches": self.batches, "tokens": self.tokens}


def check_method(method: str) -> str:
    """Return ``method`` if edgepipe knows it.

    Raises:
        UsageError: Unknown method, with the accepted ones.
    """
    if method not in METHODS:
        raise UsageError(
            f"Unknown calibration method '{method}'. Accepted: {', '.join(METHODS)}.",
            hint="Set it with --set quantize.method=percentile (or in the recipe's [quantize] table).",
        )
    return method


def ort_method(method: str):
    """ONNX Runtime's ``CalibrationMethod`` for an edgepipe method name."""
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[check_method(method)]


def ort_calibration_options(method: str) -> dict:
    """``extra_options`` for ``quantize_static`` that the method needs (histogram settings)."""
    check_method(method)
    return {"CalibPercentile": PERCENTILE} if method == "percentile" else {}


def describe(batches: list[dict[str, np.ndarray]], method: str) -> CalibrationSpec:
    """The manifest record of a calibration run over ``batches`` (each ``input_ids``/``attention_mask`` (b, s))."""
    return CalibrationSpec(
        method=check_method(method),
        samples=int(sum(len(b["input_ids"]) for b in batches)),
        batches=len(batches),
        tokens=int(sum(int(b["attention_mask"].sum()) for b in batches)),
    )


class OrtCalibrationReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over tokenized batches.

    ORT's calibrators call ``get_next()`` until it returns None; ``rewind()`` lets one reader serve several
    calibrations. Only the graph's own inputs are fed (a graph may not take every array a batch holds).

    Args:
        batches: Tokenized calibration batches, each ``{"input_ids": (b, s), "attention_mask": (b, s)}`` int64.
        input_names: The ONNX graph's input names.
    """

    def __init__(self, batches: list[dict[str, np.ndarray]], input_names: list[str]) -> None:
        missing = sorted({n for n in input_names for b in batches if n not in b})
        if missing:
            raise UsageError(f"Calibration batches lack graph inputs {missing}; they hold {sorted(batches[0])}.")
        self.batches = [{n: np.ascontiguousarray(b[n]) for n in input_names} for b in batches]
        self._it: Iterator[dict[str, np.ndarray]] = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:  # ORT's CalibStridedMinMax protocol
        self._it = iter(self.batches[start_index:end_index])
