"""TensorRT engines on the device: the cache key, the cache beside the bundle that a redeploy keeps, and the build
step skipped with its reason where TensorRT is missing (here: no GPU, no TensorRT; the build itself is untested).

A cached engine below is a file written where engines.build would put one: this machine cannot make a real
engine, and the cache treats engines as opaque files (the runner loads whatever the key points at)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.errors import DeviceError
from edgepipe.harness import engines, remote, runner

try:
    from harness_fixtures import make_trt_bundle
    from sshd import SshServer
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_trt_bundle
    from tests.sshd import SshServer

RUNNER = Path(runner.__file__)
pytestmark = pytest.mark.skipif(
    runner.runtime_status("tensorrt")["importable"], reason="TensorRT is installed: these test the skipped build"
)


def engine_json(bundle: Path) -> tuple[int, dict]:
    done = subprocess.run([sys.executable, str(RUNNER), str(bundle), "--engine"], capture_output=True, text=True)
    return done.returncode, json.loads(done.stdout)


def fake_previous_build(state: dict) -> Path:
    """What engines.build leaves: <dir>/model.plan and engine.json with the key."""
    where = Path(state["dir"])
    where.mkdir(parents=True)
    (where / "model.plan").write_bytes(b"engine bytes from an earlier build")
    (where / "engine.json").write_text(json.dumps({"schema": engines.ENGINE_SCHEMA, "key": state["key"]}))
    return where / "model.plan"


def test_engine_key_covers_graphs_plan_tensorrt_and_device() -> None:
    manifest = {"files": {"model.onnx": {"sha256": "a"}, "check.npz": {"sha256": "c"}, "weights.bin": {"sha256": "w"}}}
    key = engines.engine_key(manifest, "plan", "10.3.0", "NVIDIA Jetson Orin Nano | R36")
    assert key == engines.engine_key(
        json.loads(json.dumps(manifest)), "plan", "10.3.0", "NVIDIA Jetson Orin Nano | R36"
    )
    other_graph = {"files": dict(manifest["files"], **{"weights.bin": {"sha256": "w2"}})}
    other_check = {"files": dict(manifest["files"], **{"check.npz": {"sha256": "c2"}})}
    assert engines.engine_key(other_check, "plan", "10.3.0", "NVIDIA Jetson Orin Nano | R36") == key
    variants = [
        engines.engine_key(other_graph, "plan", "10.3.0", "NVIDIA Jetson Orin Nano | R36"),
        engines.engine_key(manifest, "plan2", "10.3.0", "NVIDIA Jetson Orin Nano | R36"),
        engines.engine_key(manifest, "plan", "10.4.0", "NVIDIA Jetson Orin Nano | R36"),
        engines.engine_key(manifest, "plan", "10.3.0", "NVIDIA Jetson AGX Orin | R36"),
    ]
    assert len({key, *variants}) == 5


def test_engine_build_is_skipped_with_its_reason_and_a_cached_engine_is_found(tmp_path: Path) -> None:
    bundle = make_trt_bundle(tmp_path / "jetson-orin-nano")
    rc, state = engine_json(bundle)
    assert rc == runner.EXIT_MISSING_RUNTIME and state["schema"] == engines.ENGINE_SCHEMA
    assert not state["cached"] and not state["built"] and state["error"] is None
    assert state["skipped"].startswith("TensorRT cannot run on this device: missing tensorrt")
    assert Path(state["dir"]).parent == tmp_path / "jetson-orin-nano.engines"  # beside the bundle, not in it
    assert state["device"] == runner.device_id() and state["engines"] == {"model.plan": state["dir"] + "/model.plan"}
    assert not (bundle / "model.plan").exists() and not Path(state["dir"]).exists()

    manifest = runner.load_manifest(str(bundle))
    with pytest.raises(runner.RunnerError, match="has no TensorRT engine model.plan"):
        runner.graph_path(str(bundle), manifest)
    engine = fake_previous_build(state)
    rc, again = engine_json(bundle)
    assert rc == 0 and again["cached"] and not again["built"] and again["key"] == state["key"]
    assert runner.graph_path(str(bundle), manifest) == str(engine)

    rebuilt = make_trt_bundle(tmp_path / "rebuilt" / "jetson-orin-nano", seed=1)  # other weights: another key
    rc, other = engine_json(rebuilt)
    assert rc == runner.EXIT_MISSING_RUNTIME and other["key"] != state["key"] and not other["cached"]


def test_redeploy_over_ssh_keeps_the_engine_cache(sshd: SshServer, tmp_path: Path) -> None:
    bundle = make_trt_bundle(tmp_path / "artifacts" / "tiny-encoder" / "jetson-orin-nano")
    device_dir = tmp_path / "device" / "jetson-orin-nano"
    options = {"known_hosts": sshd.known_hosts, "identity_file": sshd.identity, "python": sys.executable}
    with pytest.raises(DeviceError) as first:
        remote.deploy(bundle, sshd.url, remote_dir=str(device_dir), **options)
    text = str(first.value)
    assert "tensorrt is not installed on" in text  # deploy still refuses a device that cannot run the bundle
    assert "engine: not built (TensorRT cannot run on this device: missing tensorrt" in text
    assert (device_dir / "build_plan.json").is_file()

    rc, state = engine_json(device_dir)  # the device's own view, as runner.py --engine prints it there
    assert Path(state["dir"]).parent == Path(str(device_dir) + ".engines")
    engine = fake_previous_build(state)

    onnx = device_dir / "model.onnx"  # the device's copy rots: the next deploy copies the bundle again whole
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(DeviceError) as second:
        remote.deploy(bundle, sshd.url, remote_dir=str(device_dir), **options)
    assert runner.verify_files(str(device_dir), runner.load_manifest(str(device_dir)))["problems"] == []  # recopied
    assert f"engine: cached in {state['dir']} (key {state['key']})" in str(second.value)
    assert engine.read_bytes() == b"engine bytes from an earlier build"
    assert runner.graph_path(str(device_dir), runner.load_manifest(str(device_dir))) == str(engine)
