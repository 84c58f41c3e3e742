"""The stage cache under concurrent builds, kills and full disks, and its keys under code changes.

The races are real processes on one cache directory; the builds are real ``edgepipe build`` runs of a tiny
checkpoint (and a tiny student for the kill mid-distillation), checked afterwards with ``edgepipe check``.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgepipe import cache as cache_mod
from edgepipe.cache import StageCache, code_hash, load_checkpoint, save_checkpoint

PACKAGE = Path(cache_mod.__file__).resolve().parent
REPO = PACKAGE.parent
EDGEPIPE = [sys.executable, "-m", "edgepipe.cli"]
FAST = ["--precision", "fp32", "--set", "validate.samples=32", "--set", "validate.max_len=32"]


def env(cache: Path) -> dict:
    return {**os.environ, "EDGEPIPE_CACHE": str(cache), "PYTHONPATH": str(REPO)}


def build(model: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    argv = [*EDGEPIPE, "build", "--model", str(model), "--out", str(out), *FAST, *extra]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(cache))


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


def entries(cache: Path) -> tuple[list[Path], list[Path]]:
    """(complete entries, anything else a reader could trip over: partial directories, old copies)."""
    stages = [d for d in cache.iterdir() if d.is_dir()] if cache.exists() else []
    whole = [e for s in stages for e in s.iterdir() if e.is_dir() and not e.name.startswith(".")]
    other = [e for s in stages for e in s.iterdir() if e.is_dir() and e.name.startswith(".")]
    return whole, other


def assert_checks(bundle: Path, cache: Path) -> dict:
    done = subprocess.run([*EDGEPIPE, "check", str(bundle)], capture_output=True, text=True, env=env(cache))
    assert done.returncode == 0 and "check passed" in done.stdout, done.stderr
    return json.loads((bundle / "manifest.json").read_text())


# ----------------------------------------------------------------------------------------------- keys


def test_code_hash_changes_with_any_build_source_and_not_with_the_cli(tmp_path: Path) -> None:
    copy = tmp_path / "edgepipe"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    base = code_hash(copy)
    assert base == code_hash(PACKAGE)
    (copy / "cli.py").write_text((copy / "cli.py").read_text() + "\n# a help text changed\n")
    assert code_hash(copy) == base  # the command line never changes what a stage computes
    (copy / "stages" / "distill.py").write_text((copy / "stages" / "distill.py").read_text() + "\nX = 1\n")
    assert code_hash(copy) != base
    cache = StageCache(tmp_path / "c")
    assert cache.code == base and cache.key("lower", {"a": 1}) == StageCache(tmp_path / "d").key("lower", {"a": 1})
    edited = StageCache(tmp_path / "c")
    edited.code = code_hash(copy)  # what the key is after the edit above
    assert edited.key("lower", {"a": 1}) != cache.key("lower", {"a": 1})


def _imports(path: Path) -> set[str]:
    """edgepipe modules a file imports (anywhere in it, lazily too) or names as a string (get_runtime's table).

    The package's ``__getattr__`` (PEP 562) is left out: it resolves the public API (``edgepipe.load``) for users on
    attribute access; every build imports ``edgepipe`` for ``__version__`` and never touches those names.
    """
    tree = ast.parse(path.read_text())
    if path == PACKAGE / "__init__.py":
        tree.body = [n for n in tree.body if not (isinstance(n, ast.FunctionDef) and n.name == "__getattr__")]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgepipe"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("edgepipe"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("edgepipe."):
            out.add(node.value)
    return out


def _file(module: str) -> Path | None:
    base = PACKAGE.parent / module.replace(".", "/")
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return base / "__init__.py" if (base / "__init__.py").is_file() else None  # a name, not a module


def test_no_build_module_imports_the_files_the_code_hash_leaves_out() -> None:
    """What a build runs is the closure of edgepipe.build's imports: the files left out of the key are not in it."""
    seen, todo = set(), ["edgepipe.build", *(f"edgepipe.build.{p.stem}" for p in (PACKAGE / "build").glob("*.py"))]
    while todo:
        path = _file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += sorted(_imports(path))
    reached = {p.relative_to(PACKAGE).as_posix() for p in seen}
    assert "stages/distill.py" in reached and "runtimes/onnxruntime.py" in reached  # the walk does find modules
    assert not reached & set(cache_mod.NOT_BUILD_CODE)


# ----------------------------------------------------------------------------------------------- one entry


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from edgepipe.cache import StageCache

    root, log, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]

    def slow(out: Path) -> dict:
        with open(log, "a") as f:
            f.write(name + "\\n")
        for i in range(20):  # written piece by piece: a reader of a half entry would see fewer lines
            with open(out / "data.txt", "a") as f:
                f.write(f"{i}\\n")
            time.sleep(0.02)
        return {"by": name}

    result = StageCache(root).run("stage", {"x": 1}, slow)
    lines = (result.dir / "data.txt").read_text().splitlines()
    print(result.cache_hit, result.meta["by"], len(lines))
    """
)


def test_two_processes_racing_on_one_entry_compute_it_once_and_both_read_it_whole(tmp_path: Path) -> None:
    log = tmp_path / "ran.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(tmp_path / "cache"), str(log), name],
            stdout=subprocess.PIPE,
            text=True,
            env=env(tmp_path / "cache"),
        )
        for name in ("a", "b")
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(log.read_text().splitlines()) == 1  # the stage ran once
    assert sorted(o[0] for o in outputs) == ["False", "True"]  # one computed it, the other waited and read it
    assert {o[1] for o in outputs} == {log.read_text().strip()} and {o[2] for o in outputs} == {"20"}
    whole, other = entries(tmp_path / "cache")
    assert len(whole) == 1 and other == []


def test_a_writer_killed_mid_stage_leaves_no_entry_and_no_lock(tmp_path: Path) -> None:
    log = tmp_path / "ran.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", RACER, str(tmp_path / "cache"), str(log), "killed"], env=env(tmp_path)
    )
    deadline = time.monotonic() + 60
    while not list((tmp_path / "cache" / "stage").glob(".*.partial/data.txt")) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert entries(tmp_path / "cache")[0] == []  # nothing a later run could take for a complete entry
    done = subprocess.run(
        [sys.executable, "-c", RACER, str(tmp_path / "cache"), str(log), "after"],
        capture_output=True,
        text=True,
        env=env(tmp_path),
        timeout=60,  # the dead writer's lock went with it
    )
    assert done.stdout.split() == ["False", "after", "20"]


def test_an_entry_whose_files_changed_is_recomputed_not_served(tmp_path: Path) -> None:
    cache = StageCache(tmp_path)
    runs = []

    def fn(out: Path) -> dict:
        runs.append(1)
        (out / "model.bin").write_bytes(b"x" * 100)
        return {}

    first = cache.run("s", {}, fn)
    (first.dir / "model.bin").write_bytes(b"x" * 10)  # torn by a crash or a full disk elsewhere
    assert cache.lookup("s", {}) is None
    second = cache.run("s", {}, fn)
    assert not second.cache_hit and len(runs) == 2 and (second.dir / "model.bin").stat().st_size == 100


def test_a_checkpoint_cut_before_its_pointer_leaves_the_previous_one_in_force(tmp_path: Path) -> None:
    import torch

    save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, {"optimizer": {"lr": 1.0}})
    (tmp_path / "checkpoint-10.safetensors").write_bytes(b"half a file")  # killed while writing step 10
    step, weights, state = load_checkpoint(tmp_path)
    assert step == 5 and torch.equal(weights["w"], torch.ones(3)) and state["optimizer"] == {"lr": 1.0}
    (tmp_path / "state-5.pt").write_bytes(b"torn")
    assert load_checkpoint(tmp_path) is None  # unreadable: the stage starts over rather than resume from junk


# ----------------------------------------------------------------------------------------------- real builds


def test_two_builds_racing_on_one_cache_make_two_correct_bundles(tmp_path: Path, tiny_checkpoint: Path) -> None:
    cache = tmp_path / "cache"
    procs = [build(tiny_checkpoint, tmp_path / name, cache) for name in ("a", "b")]
    for proc in procs:
        rc, _, err = finish(proc)
        assert rc == 0, err
    bundles = [tmp_path / name / tiny_checkpoint.name / "host-cpu" for name in ("a", "b")]
    manifests = [assert_checks(b, cache) for b in bundles]
    for a, b in zip(manifests[0]["stages"], manifests[1]["stages"], strict=True):
        assert a["cache_key"] == b["cache_key"]
        assert [a["cache_hit"], b["cache_hit"]].count(False) == 1, (a["stage"], a["cache_hit"], b["cache_hit"])
    assert manifests[0]["files"] == manifests[1]["files"]  # byte for byte the same bundle
    whole, other = entries(cache)
    assert other == [] and len(whole) == len(manifests[0]["stages"])


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a small filesystem needs mount(8) as root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs here: {done.stderr.decode().strip()}")


def test_a_full_disk_leaves_no_half_bundle_and_no_corrupt_cache_entry(tmp_path: Path, tiny_checkpoint: Path) -> None:
    small_cache, small_out = tmp_path / "small-cache", tmp_path / "small-out"
    _mount_tmpfs(small_cache, "1m")  # the reference fits, the lowered graph (about 8 MB) does not
    try:
        _mount_tmpfs(small_out, "4m")
    except BaseException:
        subprocess.run(["umount", str(small_cache)], check=True)
        raise
    try:
        rc, _, err = finish(build(tiny_checkpoint, tmp_path / "out", small_cache))
        assert rc == 1 and "Traceback" not in err and "No space left writing stage lower" in " ".join(err.split())
        whole, other = entries(small_cache)
        assert other == [] and [e.parent.name for e in whole] == ["reference"]  # the stage before: whole
        assert not (tmp_path / "out" / tiny_checkpoint.name).exists()

        cache = tmp_path / "cache"
        rc, _, err = finish(build(tiny_checkpoint, small_out, cache))
        assert rc == 1 and "Traceback" not in err and "No space left writing bundle host-cpu" in " ".join(err.split())
        assert [p.name for p in small_out.iterdir()] == []  # no bundle, no temporary directory
        rc, out, err = finish(build(tiny_checkpoint, tmp_path / "out", cache))  # room again: every stage a hit
        assert rc == 0 and out.count(" hit ") == 4, err
        assert_checks(tmp_path / "out" / tiny_checkpoint.name / "host-cpu", cache)
    finally:
        for path in (small_cache, small_out):
            subprocess.run(["umount", str(path)], check=True)


STUDENT = """description = "a tiny student"
kind = "encoder"
teacher = "{teacher}"
[student]
layers = [0, 2]
[distill]
steps = 60
batch_size = 4
max_len = 16
sentences = 32
warmup_steps = 2
"""


def test_kill_9_mid_distillation_then_a_rebuild_resumes_and_is_correct(tmp_path: Path, tiny_checkpoint: Path) -> None:
    recipe = tmp_path / "tiny-student.toml"
    recipe.write_text(STUDENT.format(teacher=tiny_checkpoint))
    cache = tmp_path / "cache"
    proc = build(recipe, tmp_path / "out", cache)
    deadline = time.monotonic() + 600
    pointer = None
    while pointer is None and proc.poll() is None and time.monotonic() < deadline:
        pointer = next(iter((cache / "distill").glob(".*.partial/resume.json")), None) if cache.exists() else None
        time.sleep(0.02)
    assert pointer is not None, "the distillation never wrote a checkpoint"
    proc.send_signal(signal.SIGKILL)  # mid-stage: steps 50-60, after the checkpoint at 50
    proc.communicate()
    step = json.loads(pointer.read_text())["step"]
    assert not (tmp_path / "out" / "tiny-student").exists() and step == 50
    rc, _, err = finish(build(recipe, tmp_path / "out", cache))
    assert rc == 0, err
    manifest = assert_checks(tmp_path / "out" / "tiny-student" / "host-cpu", cache)
    distill = next(r for r in manifest["stages"] if r["stage"] == "distill")
    assert distill["metrics"]["resumed_from"] == step and distill["metrics"]["steps"] == 60
    assert distill["metrics"]["held_out"]["mean_cosine"] > 0.9
    whole, other = entries(cache)
    assert other == []
    assert not list((cache / "distill").glob("*/resume.json"))  # the entry holds the student, not the checkpoints
