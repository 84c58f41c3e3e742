"""Reading bundles back: verify every file against the manifest and run check.npz in the bundle's runtime."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.errors import BundleError
from edgepipe.manifest import read_manifest, verify_files
from edgepipe.runtimes import get_runtime
from edgepipe.stages.validate import compare


@dataclass
class CheckReport:
    bundle: Path
    manifest: dict
    metrics: dict[str, dict]  # output name -> mean/min cosine, max_abs
    passed: bool


def open_bundle(path: Path) -> dict:
    """Read a bundle's manifest and verify the sha256 of every file it lists.

    Raises:
        BundleError: No manifest, bad schema, or a missing/changed file.
    """
    manifest = read_manifest(path)
    problems = verify_files(path, manifest)
    if problems:
        raise BundleError(
            f"Bundle {path} does not match its manifest: {'; '.join(problems[:3])}.",
            hint="Copy the bundle again or rebuild it with `edgepipe build`.",
        )
    return manifest


def load_check(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs and expected outputs from a bundle's check.npz."""
    try:
        with np.load(path / "check.npz") as data:
            inputs = {k.removeprefix("input."): data[k] for k in data.files if k.startswith("input.")}
            outputs = {k.removeprefix("output."): data[k] for k in data.files if k.startswith("output.")}
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}/check.npz cannot be read ({exc}).", hint="Rebuild the bundle.") from None
    return inputs, outputs


def check_bundle(path: Path) -> CheckReport:
    """Run the bundle's check.npz in its runtime here and compare with the expected outputs.

    Raises:
        BundleError: The bundle is incomplete or corrupt.
        MissingExtraError: The bundle's runtime is not installed here.
    """
    path = Path(path)
    manifest = open_bundle(path)
    runtime = get_runtime(manifest["runtime"])
    from edgepipe.config import Target

    target = Target(**manifest["target"]) if "target" in manifest else None
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(
            f"Bundle {path} cannot run on this machine: {why}.", hint="Run it on the device with `edgepipe bench`."
        )
    session = runtime.load(path / manifest["graphs"]["model"], target)
    inputs, expected = load_check(path)
    outputs = session.run(inputs)
    tol = manifest["validation"]
    metrics = {name: compare(outputs[name].astype(np.float32), ref) for name, ref in expected.items()}
    passed = all(m["min_cosine"] >= tol["min_cosine"] and m["max_abs"] <= tol["atol"] for m in metrics.values())
    return CheckReport(path, manifest, metrics, passed)
