"""Reading bundles back: verify every file against the manifest and run check.npz in the bundle's runtime.

The checks are the on-device runner's own (``edgepipe.harness.runner``), so ``edgepipe check`` here and
``edgepipe bench`` on a device judge a bundle by exactly the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgepipe.config import Target
from edgepipe.errors import BundleError
from edgepipe.harness import runner
from edgepipe.manifest import read_manifest
from edgepipe.runtimes import get_runtime


@dataclass
class CheckReport:
    bundle: Path
    manifest: dict
    result: dict  # runner.compare_outputs: passed, problems, max_abs_error, min/mean cosine, per-output figures

    @property
    def passed(self) -> bool:
        return self.result["passed"]


def open_bundle(path: Path) -> dict:
    """Read a bundle's manifest and verify the sha256 and size of every file it lists.

    Raises:
        BundleError: No manifest, bad schema, or a missing/changed file.
    """
    manifest = read_manifest(path)
    problems = runner.verify_files(str(path), manifest)["problems"]
    if problems:
        listed = "; ".join(f"{p['path']}: {p['problem']}" for p in problems[:3])
        raise BundleError(
            f"Bundle {path} does not match its manifest: {listed}.",
            hint="Copy the bundle again or rebuild it with `edgepipe build`.",
        )
    return manifest


def check_bundle(path: Path) -> CheckReport:
    """Run the bundle's check.npz in its runtime here and compare with the expected outputs.

    Raises:
        BundleError: The bundle is incomplete, corrupt, or cannot run on this machine.
        MissingExtraError: The bundle's runtime is not installed here.
    """
    path = Path(path)
    manifest = open_bundle(path)
    runtime = get_runtime(manifest["runtime"])
    target = Target(**manifest["target"])
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(
            f"Bundle {path} cannot run on this machine: {why}.", hint="Run it on the device: `edgepipe bench`."
        )
    try:
        inputs, expected = runner.load_check(str(path))
    except runner.RunnerError as exc:
        raise BundleError(str(exc), hint="Rebuild the bundle.") from None
    outputs = runtime.load(path / manifest["graphs"]["model"], target).run(inputs)
    return CheckReport(path, manifest, runner.compare_outputs(outputs, expected, manifest["validation"]))
