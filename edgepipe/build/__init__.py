"""``edgepipe build``: pick the route for a model, run that recipe over the shared driver, return the bundle.

Three recipes (``encoder``, ``decoder``, ``optimum``) each hold one ``driver.Build``; ``route`` decides which one a
model takes (docs/architecture.md, "The build"). Nothing below this package imports it.

The package is also the Python API's build: ``edgepipe.build(model=..., target=..., precision=...)`` calls
``build_bundle`` (the module is callable, see the end of this file).
"""

from __future__ import annotations

import inspect
import os
import sys
import types
from pathlib import Path

from edgepipe.build.driver import Bundle, writable_out
from edgepipe.cache import StageCache, StageResult
from edgepipe.config import RunConfig, overrides_from, resolve_run_config, resolve_teacher
from edgepipe.errors import UsageError
from edgepipe.progress import Progress

__all__ = ["Bundle", "build", "build_bundle", "distill"]


def build(
    cfg: RunConfig,
    *,
    force: bool = False,
    cache_root: Path | None = None,
    progress: Progress | None = None,
    student: Path | None = None,
) -> Bundle:
    """Build the bundle for ``cfg``: every stage cached, the bundle written atomically.

    ``student``: a student `edgepipe distill` wrote (its directory, maybe copied from another machine), used instead
    of the distill stage once its recipe hash matches ``cfg``'s recipe.

    Raises:
        EdgepipeError: Any user-facing failure (bad input, export, validation, fidelity budget).
    """
    # The recipes import torch and their runtimes: only when a build runs, so `import edgepipe.build` stays light.
    from edgepipe.build.decoder import build_decoder
    from edgepipe.build.encoder import build_encoder
    from edgepipe.build.optimum import build_optimum
    from edgepipe.build.route import choose_route, decoder_route

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        raise UsageError(
            f"edgepipe build runs as one process; it was launched as {world} (WORLD_SIZE={world}).",
            hint="Train under the launcher with `edgepipe distill --model M`, then run `edgepipe build --model M` "
            "once: it finds the student in the stage cache.",
        )
    writable_out(cfg.out_dir)
    progress = progress or Progress(quiet=True)
    waiting = lambda stage: progress.note(f"{stage}: waiting for another build computing the same stage")  # noqa: E731
    cache = StageCache(cache_root, force=force, waiting=waiting)
    if student is not None and cfg.recipe.kind == "decoder":
        raise UsageError(
            f"--student takes an encoder student from `edgepipe distill`; {cfg.recipe.name} is a decoder recipe.",
            hint="Drop --student: decoder students distill inside `edgepipe build`.",
        )
    if cfg.recipe.kind == "decoder":
        return build_decoder(cfg, cache, progress, decoder_route(cfg).to_dict())
    checkpoint = resolve_teacher(cfg.recipe)
    route = choose_route(cfg, checkpoint)  # edgepipe's own models, or Optimum for architectures it lacks
    if route.path == "optimum":
        if student is not None:
            raise UsageError(
                f"--student applies to edgepipe's own encoder recipes; {cfg.recipe.name} builds through Optimum.",
                hint="Drop --student.",
            )
        return build_optimum(cfg, route, checkpoint, cache, progress)
    return build_encoder(cfg, cache, progress, route.to_dict(), student)


def build_bundle(
    model: str | Path | None = None,
    target: str = "host-cpu",
    precision: str | None = None,
    *,
    out: str | Path = "artifacts",
    task: str | None = None,
    strict: bool = False,
    force: bool = False,
    progress: bool = False,
    **sets,
) -> Bundle:
    """``edgepipe build`` from Python: the same resolution, stages, cache and bundle, returned instead of printed.

    Args:
        model: A recipe name (``edgepipe models``), a recipe TOML or a checkpoint directory (None: the default).
        target: A target name (``edgepipe targets``) or a TOML path.
        precision: A precision plan (None: the target's default, or its measured candidates).
        out: The output root; the bundle is ``out/<model>/<target>``.
        task: Optimum's export task for a checkpoint directory (None: from its config.json).
        strict: A missed fidelity bar raises instead of shipping with a warning (``validate.strict``).
        force: Recompute every stage instead of using the cache.
        progress: Draw stage spinners and bars on stderr.
        **sets: Recipe overrides, as ``--set`` takes them: ``distill__steps=200``, ``validate={"samples": 64}``
            or ``**{"quantize.fidelity_budget": 0.02}``.

    Returns:
        The bundle: ``path``, ``manifest``, ``fidelity``; ``edgepipe.load(bundle.path)`` opens it in its runtime.

    Raises:
        EdgepipeError: What the CLI reports in one line (bad input, export, validation, a missed bar with strict).
    """
    overrides = overrides_from(sets) + (("validate.strict=true",) if strict else ())
    cfg = resolve_run_config(None if model is None else str(model), target, precision, out, overrides, task=task)
    return build(cfg, force=force, progress=Progress(quiet=not progress))


def distill(
    cfg: RunConfig, *, force: bool = False, cache_root: Path | None = None, progress: Progress | None = None
) -> StageResult | None:
    """The distill stage of ``cfg``'s build alone, into the cache entry ``build(cfg)`` then reads.

    Runs as one process or as each of N that torchrun or ``accelerate launch`` started (``stages.parallel``): rank 0
    computes the teacher's held-back reference, owns the cache entry and returns it; the other ranks return None.

    Raises:
        UsageError: The recipe has no encoder student to distill.
    """
    from edgepipe.build.encoder import EncoderBuild
    from edgepipe.build.route import choose_route
    from edgepipe.stages.parallel import init, shutdown

    recipe = cfg.recipe
    if recipe.kind != "encoder" or recipe.student is None:
        what = "a decoder recipe" if recipe.kind == "decoder" else "a recipe without a [student] table"
        raise UsageError(
            f"edgepipe distill trains encoder students; {recipe.name} is {what}.",
            hint="Pass --model an encoder recipe with a [student] table (see `edgepipe models`); decoder students "
            "distill inside `edgepipe build`.",
        )
    ranks = init()
    try:
        progress = progress if progress is not None and ranks.main else Progress(quiet=True)
        cache = StageCache(cache_root, force=force)
        run = EncoderBuild(cfg, cache, progress, choose_route(cfg, resolve_teacher(recipe)).to_dict())
        return run.student_stage(run.reference() if ranks.main else None, ranks)
    finally:
        shutdown()


class _CallableModule(types.ModuleType):
    """``edgepipe.build`` is this package (an attribute Python sets on import) and the API's build function."""

    __call__ = staticmethod(build_bundle)


sys.modules[__name__].__class__ = _CallableModule
__signature__ = inspect.signature(build_bundle)  # what help() and IDEs show for edgepipe.build(...)
