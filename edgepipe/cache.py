"""Content-addressed stage cache: a stage's output is reused when its inputs, config, package versions and edgepipe's
own code match.

Each entry is a directory ``<root>/<stage>/<key>/`` holding the stage's files, ``meta.json`` (its metrics) and
``entry.json`` (the size of every file). It is safe under concurrent builds (docs/architecture.md, "The stage
cache"):

- one writer per entry: a build takes the entry's file lock (``.<key>.lock``, ``fcntl.flock``) before it computes,
  and a build that waited on it finds the entry the other one published;
- writers publish by rename: a stage writes into ``.<key>.partial`` and the complete directory is renamed into
  place, so a reader sees a whole entry or none, and an entry whose files no longer match ``entry.json`` is
  recomputed rather than served;
- a resumable stage (distillation) finds its partial directory again, under the same lock, and picks up from the
  last checkpoint that ``save_checkpoint`` completed.

The key holds ``code_hash()``: the sha256 of every source file of the package a build runs, so an upgraded or edited
stage never serves an older stage's output.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgepipe.errors import BuildError, EdgepipeError
from edgepipe.manifest import package_versions, sha256_file

PACKAGE = Path(__file__).resolve().parent
# Source files a build never runs: the command line and comparing results: editing them keeps the cache
# (tests/test_cache.py checks that no build module imports them). bundle.py and harness/remote.py count: a built
# Bundle opens itself through them (Bundle.load).
NOT_BUILD_CODE = ("cli.py", "harness/report.py")
ENTRY = "entry.json"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def default_cache_root() -> Path:
    """``$EDGEPIPE_CACHE``, else ``$XDG_CACHE_HOME/edgepipe``, else ``~/.cache/edgepipe``."""
    if env := os.environ.get("EDGEPIPE_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe"


def digest(payload: object) -> str:
    """sha256 of a JSON-serialisable payload (keys sorted), 16 hex digits."""
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def code_hash(package: Path = PACKAGE) -> str:
    """sha256 (16 hex digits) of every ``.py`` file of the package a build runs, by relative path: any change to a
    stage, a model, a runtime or what they import changes every key."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).as_posix()
        if rel not in NOT_BUILD_CODE and "__pycache__" not in path.parts:
            h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


@cache
def _this_code() -> str:  # hashed once per process: a build's code does not change under it
    return code_hash(PACKAGE)


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


def disk_full(exc: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT behind ``exc`` (itself, or what it was raised from: a runtime's one-line error), or None."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in FULL_DISK:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def full_disk_error(exc: OSError, where: Path, what: str) -> BuildError:
    """One line for ENOSPC / EDQUOT while writing ``what`` under ``where``."""
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:.1f} MB free"
    except OSError:
        free = "free space unknown"
    return BuildError(
        f"No space left writing {what} in {where} ({os.strerror(exc.errno)}; {free}); nothing half-written was kept.",
        hint="Free space there, or point EDGEPIPE_CACHE / --out at a disk with room.",
    )


def publish(tmp: Path, dest: Path) -> None:
    """Put the complete directory ``tmp`` at ``dest`` by rename; an existing ``dest`` is moved aside first."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)


@contextmanager
def file_lock(path: Path, waiting: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created); ``waiting()`` is called once if another process holds it.
    The kernel drops it when the process dies, ``kill -9`` included."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _complete(entry: Path) -> dict | None:
    """The meta of a whole entry (meta.json readable, every file at the size entry.json records), else None."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        files = json.loads((entry / ENTRY).read_text())["files"]
        if all((entry / rel).stat().st_size == size for rel, size in files.items()):
            return meta
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _write_json(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


@dataclass
class StageResult:
    stage: str
    key: str
    dir: Path
    meta: dict
    cache_hit: bool
    seconds: float


class StageCache:
    """Runs stages through the cache; ``force`` recomputes every stage (and refreshes its entry).

    ``waiting(stage)`` is called when a stage waits for another build computing the same entry (a progress note).
    """

    def __init__(
        self, root: Path | None = None, force: bool = False, waiting: Callable[[str], None] | None = None
    ) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.force = force
        self.versions = package_versions()
        self.code = _this_code()
        self.waiting = waiting

    def key(self, stage: str, payload: dict) -> str:
        return digest({"stage": stage, "payload": payload, "versions": self.versions, "code": self.code})

    def lookup(self, stage: str, payload: dict) -> Path | None:
        """The complete entry for (stage, payload), or None: nothing is computed."""
        entry = self.root / stage / self.key(stage, payload)
        return entry if _complete(entry) is not None else None

    def work_dir(self, stage: str, payload: dict) -> Path:
        """Where (stage, payload) is computed before it is renamed into place (kept across runs when resumable)."""
        return self.root / stage / f".{self.key(stage, payload)}.partial"

    def run(self, stage: str, payload: dict, fn: Callable[[Path], dict], resumable: bool = False) -> StageResult:
        """Return the cached result for (stage, payload, versions, code) or compute it with ``fn(out_dir)``.

        Args:
            stage: Stage name (a directory under the cache root).
            payload: Everything the output depends on: input hashes and the stage's config.
            fn: Writes the stage's files into the directory it is given and returns metrics (JSON-serialisable).
            resumable: Keep the work directory of an interrupted run, so ``fn`` can resume from what it left there.

        Raises:
            BuildError: The disk filled up (the entry is not published; a resumable stage keeps its checkpoint).
        """
        key = self.key(stage, payload)
        entry = self.root / stage / key
        start = time.perf_counter()
        if not self.force and (meta := _complete(entry)) is not None:
            return StageResult(stage, key, entry, meta, True, time.perf_counter() - start)
        try:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
            waiting = (lambda: self.waiting(stage)) if self.waiting else None
            with file_lock(self.root / stage / f".{key}.lock", waiting):
                if not self.force and (meta := _complete(entry)) is not None:  # made while this build waited
                    return StageResult(stage, key, entry, meta, True, time.perf_counter() - start)
                meta = self._compute(entry, fn, resumable, start)
        except (OSError, EdgepipeError) as exc:
            if full := disk_full(exc):
                raise full_disk_error(full, self.root, f"stage {stage}") from None
            raise
        return StageResult(stage, key, entry, meta, False, time.perf_counter() - start)

    def _compute(self, entry: Path, fn: Callable[[Path], dict], resumable: bool, start: float) -> dict:
        """``fn`` into the partial directory, then the entry published whole (the caller holds the lock)."""
        tmp = entry.with_name(f".{entry.name}.partial")
        if tmp.exists() and not resumable:
            shutil.rmtree(tmp)
        tmp.mkdir(exist_ok=True)
        try:
            meta = {**fn(tmp), "seconds": round(time.perf_counter() - start, 3)}
            files = {
                p.relative_to(tmp).as_posix(): p.stat().st_size
                for p in sorted(tmp.rglob("*"))
                if p.is_file() and p.name not in (ENTRY, "meta.json")
            }
            _write_json(tmp / "meta.json", meta)
            _write_json(tmp / ENTRY, {"files": files})
            publish(tmp, entry)
        except BaseException:
            if not resumable:  # a resumable stage keeps its last complete checkpoint (save_checkpoint)
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        return meta


# ----------------------------------------------------------------------------------------------- checkpoints

RESUME = "resume.json"


def save_checkpoint(directory: Path, step: int, weights: dict, state: dict) -> None:
    """Write one training step's weights (safetensors) and state (``torch.save``: optimizer, step, plain data), then
    point ``resume.json`` at the pair: a kill at any moment leaves the previous complete pair in force.

    Args:
        directory: The stage's work directory (the cache entry's partial directory).
        step: Steps done.
        weights: Tensors by name (contiguous, no shared storage).
        state: What ``torch.load(weights_only=True)`` reads back: tensors, numbers, lists, dicts.
    """
    import torch
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(directory / f"checkpoint-{step}.safetensors"), metadata={"step": str(step)})
    torch.save({**state, "step": step}, directory / f"state-{step}.pt")
    _write_json(directory / RESUME, {"step": step})
    for old in (*directory.glob("checkpoint-*.safetensors"), *directory.glob("state-*.pt")):
        if old.stem.rsplit("-", 1)[-1] != str(step):
            old.unlink(missing_ok=True)


def load_checkpoint(directory: Path) -> tuple[int, dict, dict] | None:
    """The pair ``resume.json`` points at: (step, weights, state), or None when there is none or it does not read
    back (the run then starts over: correct, only slower)."""
    import torch
    from safetensors.torch import load_file, safe_open

    try:
        step = int(json.loads((directory / RESUME).read_text())["step"])
        weights_path, state_path = directory / f"checkpoint-{step}.safetensors", directory / f"state-{step}.pt"
        with safe_open(str(weights_path), "pt") as f:
            if (f.metadata() or {}).get("step") != str(step):
                return None
        state = torch.load(state_path, weights_only=True)
        if int(state["step"]) != step:
            return None
        return step, load_file(str(weights_path)), state
    except Exception:  # safetensors, torch's unpickler and a torn JSON each fail their own way: start over
        return None


def remove_checkpoints(directory: Path) -> None:
    """Drop the resume files once the stage's output is written (they would bloat the entry)."""
    (directory / RESUME).unlink(missing_ok=True)
    for old in (*directory.glob("checkpoint-*.safetensors"), *directory.glob("state-*.pt")):
        old.unlink(missing_ok=True)


def atomic_npz(path: Path, arrays: dict) -> None:
    """``np.savez`` to a private temporary name beside ``path``, renamed over it: concurrent writers never mix,
    readers see the old file or the new one."""
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npz", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
