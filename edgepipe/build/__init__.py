"""``edgepipe build``: pick the route for a model, run that recipe over the shared driver, return the bundle.

Three recipes (``encoder``, ``decoder``, ``optimum``) each hold one ``driver.Build``; ``route`` decides which one a
model takes (docs/architecture.md, "The build"). Nothing below this package imports it.
"""

from __future__ import annotations

from pathlib import Path

from edgepipe.build.driver import Bundle, writable_out
from edgepipe.cache import StageCache
from edgepipe.config import RunConfig, resolve_teacher
from edgepipe.progress import Progress

__all__ = ["Bundle", "build"]


def build(
    cfg: RunConfig, *, force: bool = False, cache_root: Path | None = None, progress: Progress | None = None
) -> Bundle:
    """Build the bundle for ``cfg``: every stage cached, the bundle written atomically.

    Raises:
        EdgepipeError: Any user-facing failure (bad input, export, validation, fidelity budget).
    """
    # The recipes import torch and their runtimes: only when a build runs, so `import edgepipe.build` stays light.
    from edgepipe.build.decoder import build_decoder
    from edgepipe.build.encoder import build_encoder
    from edgepipe.build.optimum import build_optimum
    from edgepipe.build.route import choose_route, decoder_route

    writable_out(cfg.out_dir)
    progress = progress or Progress(quiet=True)
    cache = StageCache(cache_root, force=force)
    if cfg.recipe.kind == "decoder":
        return build_decoder(cfg, cache, progress, decoder_route(cfg).to_dict())
    checkpoint = resolve_teacher(cfg.recipe)
    route = choose_route(cfg, checkpoint)  # edgepipe's own models, or Optimum for architectures it lacks
    if route.path == "optimum":
        return build_optimum(cfg, route, checkpoint, cache, progress)
    return build_encoder(cfg, cache, progress, route.to_dict())
