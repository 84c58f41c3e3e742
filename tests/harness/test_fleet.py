"""bench --devices: one bundle on two real OpenSSH servers on loopback (127.0.0.1 and 127.0.0.2, two "machines")
and an unreachable device; one result per device, failures one line each, compare side by side."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from edgepipe.cli import cli
from edgepipe.errors import ConfigError
from edgepipe.harness import fleet, report

try:
    from harness_fixtures import make_onnx_bundle
    from sshd import SshServer, free_port
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle
    from tests.sshd import SshServer, free_port

pytest.importorskip("asyncssh", reason="asyncssh is the `remote` extra")


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[SshServer]]:
    reason = SshServer.unavailable()
    if reason:
        pytest.skip(f"cannot start sshd: {reason}")
    started = []
    try:
        for host in ("127.0.0.1", "127.0.0.2"):  # the whole of 127/8 is loopback on Linux: two addresses, two hosts
            server = SshServer(tmp_path_factory.mktemp("sshd"))
            server.host = host
            server.start()
            started.append(server)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        for server in started:
            server.stop()
        pytest.skip(f"cannot start sshd: {e}")
    yield started
    for server in started:
        server.stop()


def devices_toml(path: Path, servers: list[SshServer], device_root: Path) -> Path:
    lines = []
    for name, server in zip(("pi5", "orin"), servers):
        lines += [
            f"[devices.{name}]",
            f'url = "{server.url}"',
            f'python = "{sys.executable}"',  # the loopback "device" is this machine
            f'remote_dir = "{device_root / name / "tiny-encoder"}"',  # two machines: two disks, as here two dirs
            f'known_hosts = "{server.known_hosts}"',
            f'identity = "{server.identity}"',
            "threads = 1",
            "",
        ]
    dead = free_port()  # nothing listens there: the same host as pi5, so it runs after pi5
    lines += ["[devices.gone]", f'url = "ssh://{servers[0].user}@127.0.0.1:{dead}"']
    lines += [f'known_hosts = "{servers[0].known_hosts}"', ""]
    path.write_text("\n".join(lines))
    return path


def test_bench_devices_runs_every_device_and_reports_the_dead_one_in_one_line(
    servers: list[SshServer], tmp_path: Path
) -> None:
    bundle = make_onnx_bundle(tmp_path / "artifacts" / "tiny-encoder" / "host-cpu")
    toml = devices_toml(tmp_path / "devices.toml", servers, tmp_path / "device")
    devices = fleet.load_devices(toml)
    assert [d.name for d in devices] == ["pi5", "orin", "gone"]
    assert [d.machine for d in devices] == ["ssh:127.0.0.1", "ssh:127.0.0.2", "ssh:127.0.0.1"]

    results = tmp_path / "results"
    start = time.perf_counter()
    outcomes = fleet.bench_fleet(bundle, devices, runs=10, warmup=1, profile=True, results_dir=results, timeout=5.0)
    wall = time.perf_counter() - start
    assert [o.device.name for o in outcomes] == ["pi5", "orin", "gone"]
    pi5, orin, gone = outcomes
    assert pi5.error is None and orin.error is None
    assert gone.path is None and gone.error.startswith("Cannot reach ") and "\n" not in gone.error
    assert wall < sum(o.seconds for o in outcomes)  # the two machines overlapped
    records = [json.loads(o.path.read_text()) for o in (pi5, orin)]
    assert [r["device"]["url"] for r in records] == [servers[0].url, servers[1].url]
    for record in records:
        assert record["check"]["passed"] and record["env"]["runtime"]["threads"] == 1
        assert record["profile"]["source"] == "onnxruntime profiling"  # --profile reached both devices
    assert sorted(p.name for p in results.iterdir()) == sorted(o.path.name for o in (pi5, orin))

    loaded = report.load_results([pi5.path, orin.path])
    side = report.device_table(loaded)
    assert [c.header for c in side.columns] == ["model / target / precision", servers[0].url, servers[1].url]
    assert side.row_count == 1
    assert report.device_table(loaded[:1]) is None


def test_cli_bench_devices_prints_each_outcome_and_exits_1_when_one_failed(
    servers: list[SshServer], tmp_path: Path
) -> None:
    bundle = make_onnx_bundle(tmp_path / "artifacts" / "tiny-encoder" / "host-cpu")
    toml = devices_toml(tmp_path / "devices.toml", servers, tmp_path / "device")
    args = ["bench", str(bundle), "--devices", str(toml), "--runs", "5", "--warmup", "1", "--results", str(tmp_path)]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 1, done.output
    lines = done.output.splitlines()
    assert sum(line.startswith("done pi5 ") or line.startswith("done orin ") for line in lines) == 2
    failed = [line for line in lines if line.startswith("failed gone ")]
    assert len(failed) == 1 and "Cannot reach" in failed[0]
    assert "2 of 3 devices measured, 1 failed" in done.output and "p50 ms per device" in done.output
    assert len(list(tmp_path.glob("tiny-encoder__host-cpu__*.json"))) == 2

    both = CliRunner().invoke(cli, ["bench", str(bundle), "--device", "local", "--devices", str(toml)])
    assert both.exit_code == 2 and "exactly one of --device and --devices" in both.output


def test_load_devices_reports_every_problem_at_once(tmp_path: Path) -> None:
    toml = tmp_path / "devices.toml"
    toml.write_text(
        "[devices.a]\nurl = 'ftp://x'\n[devices.b]\nthreads = 'four'\n[devices.c]\nurl = 'local'\nport = 22\n"
    )
    with pytest.raises(ConfigError) as e:
        fleet.load_devices(toml)
    problems = e.value.problems
    assert any("devices.a.url" in p and "not a device URL" in p for p in problems)
    assert any("devices.b.threads must be int" in p for p in problems)
    assert any("devices.b has no url" in p for p in problems)
    assert any("devices.c: unknown keys ['port']" in p for p in problems)
    toml.write_text("[device.a]\nurl = 'local'\n")
    with pytest.raises(ConfigError, match=r"no \[devices.NAME\] tables"):
        fleet.load_devices(toml)


def test_compare_shows_devices_side_by_side(servers: list[SshServer], tmp_path: Path) -> None:
    bundle = make_onnx_bundle(tmp_path / "artifacts" / "tiny-encoder" / "host-cpu")
    toml = devices_toml(tmp_path / "devices.toml", servers, tmp_path / "device")
    devices = fleet.load_devices(toml)[:2]
    outcomes = fleet.bench_fleet(bundle, devices, runs=5, warmup=1, results_dir=tmp_path / "r")
    done = CliRunner().invoke(cli, ["compare", *(str(o.path) for o in outcomes)])
    assert done.exit_code == 0, done.output
    console = Console(record=True, width=200)
    console.print(report.device_table(report.load_results([o.path for o in outcomes])))
    text = console.export_text()
    p50s = [json.loads(o.path.read_text())["latency_ms"]["p50"] for o in outcomes]
    assert all(f"{p:.3f}" in text for p in p50s) and "p50 ms per device" in done.output
