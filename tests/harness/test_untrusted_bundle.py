"""Hostile bundles against the real runner: over a real sshd on 127.0.0.1 (tests/sshd.py) and locally.

Each bundle is written the way an attacker would: files placed by hand and a manifest that lists them with their
true sha256 (so only edgepipe's rules stop them), or one that lies. A shadowing module writes a canary file when it
is imported; every test asserts the canary never appears and that nothing outside the deployment changed. One
positive control shows the canary does appear when a runner is started from inside such a bundle (the layout
edgepipe used before), so the absence means something.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.config import load_target
from edgepipe.errors import BundleError, DeviceError, UsageError
from edgepipe.harness import remote, runner
from edgepipe.manifest import SCHEMA

try:
    from harness_fixtures import make_onnx_bundle
    from sshd import SshServer
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle
    from tests.sshd import SshServer

EDGEPIPE = [sys.executable, "-m", "edgepipe.cli"]


def ssh(server: SshServer) -> dict:
    return {"known_hosts": server.known_hosts, "identity_file": server.identity, "python": sys.executable}


def shadow(canary: Path) -> str:
    """A module body that leaves a canary when it runs: the attack's payload."""
    return f"open({str(canary)!r}, 'w').write('ran')\n"


def relist(bundle: Path, **changes) -> Path:
    """Rewrite the manifest by hand: every file listed with its true sha256 (no write_manifest checks), then
    ``changes`` on top (a lying manifest)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {}
    for path in sorted(p for p in bundle.rglob("*") if (p.is_file() or p.is_symlink()) and p.name != "manifest.json"):
        data = path.read_bytes()
        files[path.relative_to(bundle).as_posix()] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    manifest = {**manifest, "schema": SCHEMA, "files": files, **changes}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return bundle


def hostile(tmp_path: Path, canary: Path) -> Path:
    """A bundle that shadows json (imported by the runner first thing) and numpy (imported by every check)."""
    bundle = make_onnx_bundle(tmp_path / "hostile" / "tiny-encoder" / "host-cpu")
    (bundle / "json.py").write_text(shadow(canary))
    (bundle / "numpy").mkdir()
    (bundle / "numpy" / "__init__.py").write_text(shadow(canary))
    return relist(bundle)


def snapshot(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, str]:
    """Every path under ``root`` (outside ``skip``) with its content hash: "nothing else changed" is equality."""
    out = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skip):
            continue
        out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGEPIPE, *args], capture_output=True, text=True, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    err = " ".join(proc.stderr.split())
    assert err.startswith("error:"), err
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------------------------------------- shadowing modules


def test_positive_control_a_runner_started_inside_the_bundle_runs_its_modules(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    bundle = hostile(tmp_path, canary)
    shutil.copy(runner.__file__, bundle / "runner.py")  # the old layout: runner.py beside the bundle's files
    subprocess.run([sys.executable, str(bundle / "runner.py"), str(bundle), "--verify"], capture_output=True)
    assert canary.read_text() == "ran"  # the payload ran before any check: what the new layout prevents


def test_shadowing_bundle_is_refused_over_ssh_and_nothing_runs(sshd: SshServer, tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    bundle = hostile(tmp_path, canary)
    device = tmp_path / "device"
    device.mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match=r"json.py \(a code file.*numpy/__init__.py \(a Python package file\)"):
        remote.deploy(bundle, sshd.url, remote_dir=str(device / "tiny-encoder"), **ssh(sshd))
    assert not canary.exists() and snapshot(tmp_path) == before  # refused here: nothing reached the device


def test_shadowing_files_planted_in_a_deployment_never_run_on_the_device(sshd: SshServer, tmp_path: Path) -> None:
    """The device's copy is tampered with after deploy: the runner, started from its own directory with -P,
    refuses the deployment, and the planted modules never run."""
    canary = tmp_path / "canary"
    clean = make_onnx_bundle(tmp_path / "clean" / "tiny-encoder" / "host-cpu")
    target = tmp_path / "device" / "tiny-encoder"
    deployed = remote.deploy(clean, sshd.url, remote_dir=str(target), **ssh(sshd))
    (target / "json.py").write_text(shadow(canary))
    (target / "numpy").mkdir()
    (target / "numpy" / "__init__.py").write_text(shadow(canary))
    relist(target)  # the manifest on the device now lists them, with their true sha256
    before = snapshot(tmp_path)
    with pytest.raises(DeviceError, match=r"failed its check: .*json.py \(a code file"):
        remote.bench(clean, sshd.url, runs=2, remote_dir=str(target), deploy_first=False, **ssh(sshd))
    assert not canary.exists() and snapshot(tmp_path) == before
    # the same deployment verified by the runner alone, on an interpreter without -P (3.8 / 3.9 where installed)
    old = next((p for p in map(shutil.which, ("python3.8", "python3.9")) if p and "/shims/" not in p), None)
    old = old or next(iter(sorted(Path.home().glob(".pyenv/versions/3.[89]*/bin/python"))), None)
    if old is not None:
        done = subprocess.run([str(old), deployed.runner, str(target), "--verify"], capture_output=True, text=True)
        assert done.returncode == runner.EXIT_BAD_FILES and "a code file" in done.stdout, done.stderr
        assert not canary.exists()


def test_shadowing_bundle_is_refused_locally_and_nothing_runs(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    bundle = hostile(tmp_path, canary)
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match="json.py"):
        remote.deploy(bundle, "local")
    with pytest.raises(BundleError, match="json.py"):
        remote.deploy(bundle, "local", remote_dir=str(tmp_path / "device" / "x"))
    assert_one_line(run_cli("check", str(bundle)), "does not match its manifest", "json.py")
    assert_one_line(run_cli("inspect", str(bundle)), "numpy/__init__.py")
    done = subprocess.run([sys.executable, "-P", runner.__file__, str(bundle), "--verify"], capture_output=True)
    assert done.returncode == runner.EXIT_BAD_FILES
    assert not canary.exists() and snapshot(tmp_path) == before


# ----------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"model": "../../.ssh"}, "model '../../.ssh' is not one segment"),
        ({"model": ".."}, "model '..' is not one segment"),
        ({"target": {"name": "../x", "runtime": "onnxruntime"}}, "target name '../x' is not one segment"),
        ({"model": "/etc"}, "model '/etc' is not one segment"),
    ],
)
def test_manifest_names_that_leave_the_deployment_are_refused(
    sshd: SshServer, tmp_path: Path, changes: dict, needle: str
) -> None:
    bundle = relist(make_onnx_bundle(tmp_path / "b"), **changes)
    before = snapshot(tmp_path)
    home = Path.home() / "edgepipe"
    had_home = home.exists()
    with pytest.raises(BundleError, match=needle.replace(".", r"\.")):
        remote.deploy(bundle, sshd.url, **ssh(sshd))  # the default remote dir is built from these names
    assert snapshot(tmp_path) == before and home.exists() == had_home
    assert_one_line(run_cli("inspect", str(bundle)), needle)


def test_file_names_that_leave_the_bundle_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "secret.txt"
    outside.write_text("not the bundle's")
    bundle = make_onnx_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    sha = hashlib.sha256(outside.read_bytes()).hexdigest()
    lies = {"../secret.txt": {"sha256": sha, "bytes": outside.stat().st_size}, str(outside): {"sha256": sha}}
    relist(bundle, files={**manifest["files"], **lies})
    before = snapshot(tmp_path)
    with pytest.raises(BundleError, match=r"\.\./secret.txt \(path leaves the bundle\).*secret.txt \(absolute path\)"):
        remote.deploy(bundle, "local", remote_dir=str(tmp_path / "device" / "b"))
    assert snapshot(tmp_path) == before


def test_symlinks_in_a_bundle_are_refused(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    (bundle / "tokenizer.json").unlink()
    (bundle / "tokenizer.json").symlink_to("/etc/hostname")
    relist(bundle)  # listed with the target's true sha256
    assert_one_line(run_cli("check", str(bundle)), "tokenizer.json (a symlink)")


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_remote_dir_that_is_not_a_deployment_is_left_alone(sshd: SshServer, tmp_path: Path, transport: str) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    url, options = (sshd.url, ssh(sshd)) if transport == "ssh" else ("local", {})
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("years of work")
    (tmp_path / "plain-file").write_text("a file, not a directory")
    before = snapshot(tmp_path)
    for target in (precious, tmp_path / "plain-file"):
        with pytest.raises(DeviceError, match=r"exists and is not an edgepipe deployment"):
            remote.deploy(bundle, url, remote_dir=str(target), **options)
    assert snapshot(tmp_path, skip=(tmp_path / runner.RUNNER_DIR,)) == before
    # a partial directory deploy did not make is not deploy's to remove either
    (tmp_path / "fresh.edgepipe-partial").mkdir()
    (tmp_path / "fresh.edgepipe-partial" / "keep").write_text("someone else's")
    runner_dir = tmp_path / runner.RUNNER_DIR  # the runner's own directory is deploy's
    before = snapshot(tmp_path, skip=(runner_dir,))
    with pytest.raises(DeviceError, match=r"fresh.edgepipe-partial .*is not an edgepipe deployment"):
        remote.deploy(bundle, url, remote_dir=str(tmp_path / "fresh"), **options)
    assert snapshot(tmp_path, skip=(runner_dir,)) == before and (precious / "notes.txt").read_text() == "years of work"
    # an empty directory, or an earlier deployment, it does replace
    (tmp_path / "empty").mkdir()
    first = remote.deploy(bundle, url, remote_dir=str(tmp_path / "empty"), **options)
    assert first.copied and (tmp_path / "empty" / runner.DEPLOY_MARKER).is_file()
    again = remote.deploy(make_onnx_bundle(tmp_path / "b2", seed=3), url, remote_dir=str(tmp_path / "empty"), **options)
    assert again.copied and again.verify["ok"]


@pytest.mark.parametrize("remote_dir", ["/", ".", "..", "~/edgepipe/x", f"x/{runner.RUNNER_DIR}"])
def test_remote_dirs_deploy_never_takes(tmp_path: Path, remote_dir: str) -> None:
    with pytest.raises(UsageError, match="--remote-dir"):
        remote.deploy(make_onnx_bundle(tmp_path / "b"), "local", remote_dir=remote_dir)


# ----------------------------------------------------------------------------------------------- lying manifests


def test_a_graph_the_manifest_does_not_list_is_refused(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]["model.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(run_cli("check", str(bundle)), "model.onnx (a graph the manifest's files do not list)")
    manifest["graphs"]["model"] = str(bundle / "model.onnx")  # absolute: outside every list
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(run_cli("check", str(bundle)), "a graph the manifest's files do not list")


def test_an_empty_file_list_or_an_unlisted_file_is_refused(tmp_path: Path) -> None:
    bundle = relist(make_onnx_bundle(tmp_path / "b"), files={})
    assert_one_line(run_cli("inspect", str(bundle)), "manifest.json (lists no files)")
    other = make_onnx_bundle(tmp_path / "c")
    (other / "extra.onnx").write_bytes((other / "model.onnx").read_bytes())
    assert_one_line(run_cli("check", str(other)), "extra.onnx (not listed in the manifest)")


def test_session_entries_a_bundle_may_not_set_are_refused_by_the_runner(tmp_path: Path) -> None:
    bundle = relist(make_onnx_bundle(tmp_path / "b"), session_config={"session.use_env_allocators": "1"})
    done = subprocess.run([sys.executable, runner.__file__, str(bundle), "--runs", "2"], capture_output=True, text=True)
    assert done.returncode == runner.EXIT_BAD_FILES and "session.use_env_allocators" in done.stderr


def test_a_bundle_cannot_loosen_its_own_check(sshd: SshServer, tmp_path: Path) -> None:
    """check.npz from other weights and a manifest that accepts anything: edgepipe's table still fails it."""
    target = load_target("host-cpu").to_dict()  # what `edgepipe check` rebuilds the target from
    bundle = make_onnx_bundle(tmp_path / "b", validation={"atol": 1e9, "min_cosine": -1.0}, target=target)
    wrong = make_onnx_bundle(tmp_path / "w", seed=7)
    shutil.copy(wrong / "check.npz", bundle / "check.npz")
    relist(bundle)
    checked = run_cli("check", str(bundle))
    assert_one_line(checked, "fails its check", "max-abs error")
    assert "tolerance: edgepipe's table for fp32 (encoder); the bundle's manifest says" in checked.stdout
    path = remote.bench(
        bundle, sshd.url, runs=3, warmup=1, results_dir=tmp_path / "r", remote_dir=str(tmp_path / "d"), **ssh(sshd)
    )
    check = json.loads(path.read_text())["check"]
    assert not check["passed"] and check["tolerance_source"] == "edgepipe"
    assert check["atol"] == 1e-4 and check["min_cosine_required"] == 0.9999


def test_a_build_engine_py_that_is_not_edgepipes_is_refused(tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "b")
    engine = Path(runner.__file__).parent.parent / "runtimes" / "build_engine.py"
    (bundle / "build_engine.py").write_text(engine.read_text() + "\nimport os  # a line added on the way\n")
    relist(bundle)
    assert_one_line(run_cli("inspect", str(bundle)), "build_engine.py (not edgepipe's build_engine.py")
    shutil.copy(engine, bundle / "build_engine.py")
    relist(bundle)
    assert run_cli("inspect", str(bundle)).returncode == 0  # edgepipe's own copy is the one .py a bundle carries


def test_the_runner_knows_edgepipes_build_engine_py() -> None:
    engine = Path(runner.__file__).parent.parent / "runtimes" / "build_engine.py"
    assert runner.BUILD_ENGINE_SHA256 == runner.sha256_file(str(engine)), (
        "build_engine.py changed: set harness/runner.py BUILD_ENGINE_SHA256 to its new sha256"
    )


@pytest.mark.parametrize(
    ("rel", "problem"),
    [
        ("model.onnx", None),
        ("onnx/model.onnx_data", None),
        ("build_engine.py", None),
        ("json.py", "a code file"),
        ("sub/build_engine.py", "a code file"),
        ("libx.so.1", "a code file"),
        ("evil.pth", "a code file"),
        ("numpy/__init__.cpython-311.pyc", "a Python package file"),
        ("__pycache__/x.bin", "a Python package file"),
        (".hidden", "not one segment"),
        ("a//b", "not one segment"),
        ("a\\b", "not a relative POSIX path"),
        ("/etc/passwd", "absolute path"),
        ("x/../../y", "path leaves the bundle"),
        ("manifest.json", "does not list itself"),
        (os.sep.join(["ok", "name"]), None),
    ],
)
def test_bundle_path_rules(rel: str, problem: str | None) -> None:
    found = runner.bundle_path_problem(rel)
    assert found is None if problem is None else problem in found


def test_an_incomplete_or_mistyped_manifest_gets_one_line(tmp_path: Path) -> None:
    """Every field of a real manifest removed, or given the wrong type, one at a time: inspect, check and a local
    deploy each succeed or say what is wrong in one line; no traceback escapes (in-process, for speed)."""
    from click.testing import CliRunner

    from edgepipe.cli import cli

    good = make_onnx_bundle(tmp_path / "good", target=load_target("host-cpu").to_dict())
    manifest = json.loads((good / "manifest.json").read_text())
    cases = [(key, None) for key in manifest] + [(key, ("x", [], 7)[i % 3]) for i, key in enumerate(manifest)]
    cases += [(f"target.{key}", None) for key in manifest["target"]] + [("validation", {"atol": "loose"})]
    deploy_reads = ("model", "kind", "runtime", "precision", "target", "graphs", "files", "target.name")
    for n, (key, value) in enumerate(cases):
        bundle = tmp_path / f"b{n}"
        shutil.copytree(good, bundle)
        broken = json.loads(json.dumps(manifest))
        node, leaf = (broken["target"], key[7:]) if key.startswith("target.") else (broken, key)
        node.pop(leaf) if value is None else node.__setitem__(leaf, value)
        (bundle / "manifest.json").write_text(json.dumps(broken))
        for args in (["inspect", str(bundle)], ["check", str(bundle)]):
            result = CliRunner().invoke(cli, args)
            assert result.exception is None or isinstance(result.exception, SystemExit), (key, value, args)
            errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
            assert result.exit_code == 0 or len(errors) == 1, (key, value, args, result.output)
        if key in deploy_reads:
            try:
                remote.deploy(bundle, "local", remote_dir=str(tmp_path / "device" / f"d{n}"))
            except (BundleError, DeviceError, UsageError):
                pass
