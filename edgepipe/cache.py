"""Content-addressed stage cache: a stage's output is reused when its inputs, config and package versions match.

Each entry is a directory ``<root>/<stage>/<key>/`` holding the stage's files and ``meta.json`` (its metrics).
Entries are written to a ``.<key>.partial`` directory and renamed into place, so an interrupted stage never leaves a
half entry that a later run would trust; a resumable stage (distillation) finds its partial directory again and picks
up from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepipe.manifest import package_versions, sha256_file


def default_cache_root() -> Path:
    """``$EDGEPIPE_CACHE``, else ``$XDG_CACHE_HOME/edgepipe``, else ``~/.cache/edgepipe``."""
    if env := os.environ.get("EDGEPIPE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe"


def digest(payload: object) -> str:
    """sha256 of a JSON-serialisable payload (keys sorted), 16 hex digits."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


CHECKPOINT_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json")


def checkpoint_hash(path: Path, files: tuple[str, ...] = CHECKPOINT_FILES, weights: bool = False) -> str:
    """Content hash of the files that define a checkpoint directory.

    Args:
        path: The checkpoint directory.
        files: The file names that count (those present).
        weights: Also count every ``*.safetensors`` / ``*.bin`` file (sharded or differently named weights).
    """
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and (p.name in files or weights and p.suffix in (".safetensors", ".bin"))
    )
    return digest({n: sha256_file(path / n) for n in names})


@dataclass
class StageResult:
    stage: str
    key: str
    dir: Path
    meta: dict
    cache_hit: bool
    seconds: float


class StageCache:
    """Runs stages through the cache; ``force`` recomputes every stage (and refreshes its entry)."""

    def __init__(self, root: Path | None = None, force: bool = False) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.force = force
        self.versions = package_versions()

    def key(self, stage: str, payload: dict) -> str:
        return digest({"stage": stage, "payload": payload, "versions": self.versions})

    def lookup(self, stage: str, payload: dict) -> Path | None:
        """The complete entry for (stage, payload), or None: nothing is computed."""
        entry = self.root / stage / self.key(stage, payload)
        return entry if (entry / "meta.json").is_file() else None

    def run(self, stage: str, payload: dict, fn: Callable[[Path], dict], resumable: bool = False) -> StageResult:
        """Return the cached result for (stage, payload, package versions) or compute it with ``fn(out_dir)``.

        Args:
            stage: Stage name (a directory under the cache root).
            payload: Everything the output depends on: input hashes and the stage's config.
            fn: Writes the stage's files into the directory it is given and returns metrics (JSON-serialisable).
            resumable: Keep the work directory of an interrupted run, so ``fn`` can resume from what it left there.
        """
        key = self.key(stage, payload)
        entry = self.root / stage / key
        start = time.perf_counter()
        if not self.force and (entry / "meta.json").is_file():
            meta = json.loads((entry / "meta.json").read_text())
            return StageResult(stage, key, entry, meta, True, time.perf_counter() - start)
        (self.root / stage).mkdir(parents=True, exist_ok=True)
        tmp = self.root / stage / f".{key}.partial"
        if tmp.exists() and not resumable:
            shutil.rmtree(tmp)
        tmp.mkdir(exist_ok=True)
        try:
            meta = fn(tmp)
            meta = {**meta, "seconds": round(time.perf_counter() - start, 3)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if entry.exists():
                shutil.rmtree(entry)
            tmp.rename(entry)
        except BaseException:
            if not resumable:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return StageResult(stage, key, entry, meta, False, time.perf_counter() - start)
