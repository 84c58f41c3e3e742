"""What every recipe of ``edgepipe build`` shares: stages through the cache, the precision fallback loop, the manifest's
common fields and the atomic bundle write (docs/architecture.md, "The build").

A recipe (``build.encoder``, ``build.decoder``, ``build.optimum``) holds one ``Build`` and calls it; nothing here
knows what a recipe lowers or how it measures fidelity.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe import __version__
from edgepipe.cache import StageCache, StageResult, disk_full, full_disk_error, publish
from edgepipe.config import RunConfig
from edgepipe.errors import BuildError, EdgepipeError, UsageError
from edgepipe.manifest import read_manifest, write_manifest
from edgepipe.precisions import fallback, tolerance
from edgepipe.progress import Progress

NOT_MEASURED = "not measurable on this machine; run `edgepipe bench` on the device"


@dataclass
class Bundle:
    """A written bundle: its directory and manifest (``edgepipe.build`` returns one)."""

    path: Path
    manifest: dict

    @property
    def fidelity(self) -> dict:
        """The manifest's fidelity record: each stage vs the teacher on held-back text, the bar and whether it held."""
        return self.manifest.get("fidelity", {})


@dataclass(frozen=True)
class Attempt:
    """One precision tried: its lowering and validation stages and its fidelity drop."""

    precision: str
    lowered: StageResult
    validated: StageResult
    drop: float  # 1 - agreement with the unquantized model on held-back data, as the recipe measures it


def writable_out(out_dir: Path) -> None:
    """Fail early, in one line, when ``--out`` cannot be written (before any stage runs)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".edgepipe-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise UsageError(
            f"Cannot write to --out '{out_dir}' ({exc.strerror or exc}).", hint="Pass a writable directory with --out."
        ) from None


def time_session(session, feeds: dict[str, np.ndarray], warmup: int = 5, runs: int = 30) -> dict:
    """p50/p90 milliseconds of ``session.run(feeds)`` on this machine, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        session.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "where": "this machine",
    }


def machine() -> list:
    """What a latency measured here depends on (part of the latency stage's cache key)."""
    return [platform.machine(), platform.processor(), os.cpu_count()]


@contextmanager
def staged_bundle(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest`` that replaces ``dest`` when the block succeeds and vanishes if it fails.

    A failed or interrupted build never leaves a half-written bundle, and a previous bundle at ``dest`` is swapped
    out only once the new one is complete.
    """
    made = not dest.parent.exists()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
        try:
            yield tmp
            publish(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if made:
                with contextlib.suppress(OSError):  # another build may have put its bundle beside this one
                    dest.parent.rmdir()
            raise
    except (OSError, EdgepipeError) as exc:
        if full := disk_full(exc):
            raise full_disk_error(full, dest.parent, f"bundle {dest.name}") from None
        raise


class Build:
    """One build's cache, stage records and bundle; a recipe holds one and calls it."""

    def __init__(self, cfg: RunConfig, cache: StageCache, progress: Progress, versions: dict | None = None) -> None:
        self.cfg, self.cache, self.progress = cfg, cache, progress
        self.recipe, self.target = cfg.recipe, cfg.target
        self.records: list[dict] = []
        self.versions = versions or cache.versions

    def stage(
        self,
        name: str,
        payload: dict,
        fn: Callable[[Path], dict],
        label: str,
        config: dict | None = None,
        resumable: bool = False,
    ) -> StageResult:
        """Run one stage through the cache and append its manifest record.

        A resumable stage draws its own progress bars (rich allows one live display at a time), so it gets no spinner.
        """
        if resumable:
            result = self.cache.run(name, payload, fn, resumable=True)
        else:
            with self.progress.stage(label):
                result = self.cache.run(name, payload, fn)
        self.records.append(
            {
                "stage": name,
                "config": config if config is not None else payload,
                "cache_key": result.key,
                "cache_hit": result.cache_hit,
                "seconds": round(result.meta.get("seconds", 0.0) if result.cache_hit else result.seconds, 3),
                "metrics": {k: v for k, v in result.meta.items() if k != "seconds"},
            }
        )
        self.progress.done(label, result)
        return result

    def fit_precision(
        self, attempt: Callable[[str], Attempt], allowed: tuple[str, ...], family: str, measure: str
    ) -> Attempt:
        """Lower and validate at the requested precision; while the drop breaks the budget, take the family's fallback.

        Args:
            attempt: Lowers and validates at one precision.
            allowed: The plans this target can take (a fallback outside them is an error).
            family: ``encoder`` or ``decoder``: whose fallback chain (``precisions.PLANS``) applies.
            measure: What the drop is, for the messages ("mean cosine vs the unquantized model on held-back text").

        Raises:
            BuildError: The drop breaks the budget and no allowed plan is left to fall back to.
        """
        precision, budget = self.cfg.precision, self.recipe.quantize.fidelity_budget
        while True:
            tried = attempt(precision)
            if not math.isfinite(tried.drop):  # NaN compares false both ways: it would ship as fp32
                raise BuildError(
                    f"The {precision} {family} gives non-finite outputs on held-back text ({measure}: {tried.drop}).",
                    hint="A training setting diverged (distill.lr?); lower it and rebuild with --force.",
                )
            if precision == "fp32" or tried.drop <= budget:
                return tried
            nxt = fallback(precision, family)
            if nxt is None or nxt not in allowed:
                raise BuildError(
                    f"Precision {precision} loses {tried.drop:.4f} {measure} (budget {budget}); no fallback plan on "
                    f"target {self.target.name}.",
                    hint="Raise quantize.fidelity_budget with --set, or pick another --precision.",
                )
            self.records[-1]["decision"] = f"{precision} dropped {tried.drop:.4f} > budget {budget}: fall back to {nxt}"
            self.progress.note(
                f"{precision} broke the fidelity budget ({tried.drop:.4f} > {budget}); falling back to {nxt}"
            )
            precision = nxt

    def latency(self, payload: dict, fn: Callable[[Path], dict], target=None) -> StageResult | None:
        """The latency stage, where a measurement on this machine says something about ``target`` (else None)."""
        from edgepipe.runtimes import get_runtime

        target = target or self.target
        if not get_runtime(target.runtime).same_machine(target):
            return None
        return self.stage("latency", {**payload, "machine": machine()}, fn, "latency estimate here")

    def manifest(self, *, kind: str, family: str, best: Attempt, latency: StageResult | None, **fields) -> dict:
        """The manifest: the fields every bundle has, around the recipe's own ``fields`` (route, graphs, io, ...)."""
        recipe, target = self.recipe, self.target
        head = {
            "edgepipe_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": recipe.name,
            "kind": kind,
        }
        return {
            **head,
            "route": fields.pop("route"),
            "source_model": fields.pop("source_model"),
            "recipe": recipe.to_dict(),
            "target": target.to_dict(),
            "runtime": target.runtime,
            "precision": best.precision,
            "requested_precision": self.cfg.precision,
            **fields,
            "validation": {**tolerance(best.precision, family), "held_out": best.validated.meta},
            "lowering": best.lowered.meta["report"],
            "latency": latency.meta if latency else {"where": NOT_MEASURED},
            "stages": self.records,
            "versions": self.versions,
        }

    def write_bundle(
        self, files: dict[str, Path], manifest: dict, write: Callable[[Path], None] | None = None
    ) -> Bundle:
        """Copy ``files`` (bundle name -> source), let ``write`` add its own (check.npz), then the manifest; the bundle
        appears at ``cfg.bundle_dir`` whole or not at all."""
        with staged_bundle(self.cfg.bundle_dir) as tmp, self.progress.stage("write bundle"):
            for name, src in files.items():
                shutil.copy2(src, tmp / name)
            if write is not None:
                write(tmp)
            write_manifest(tmp, manifest)
        return Bundle(self.cfg.bundle_dir, read_manifest(self.cfg.bundle_dir))
