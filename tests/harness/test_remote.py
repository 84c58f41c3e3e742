"""remote.py against a real OpenSSH server on 127.0.0.1 (tests/sshd.py), plus `local` and adb where attached."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import cli
from edgepipe.errors import BundleError, DeviceError, UsageError
from edgepipe.harness import remote, report
from edgepipe.harness import runner as _runner

try:
    import fake_adb
    from harness_fixtures import make_onnx_bundle
    from sshd import SshServer
except ImportError:  # tests/ imported as a package
    from tests import fake_adb
    from tests.harness_fixtures import make_onnx_bundle
    from tests.sshd import SshServer

pytest.importorskip("asyncssh", reason="asyncssh is the `remote` extra")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_bundle(tmp_path_factory.mktemp("artifacts") / "tiny-encoder" / "host-cpu")


def ssh_options(server: SshServer, **overrides: object) -> dict:
    """The device's Python is this venv's interpreter: the loopback 'device' is this machine."""
    return {
        "known_hosts": server.known_hosts,
        "identity_file": server.identity,
        "python": sys.executable,
        "timeout": 10.0,
        **overrides,
    }


def test_deploy_bench_compare_round_trip_over_ssh(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    device_dir = str(tmp_path / "device" / "tiny-encoder")
    first = remote.deploy(bundle, sshd.url, remote_dir=device_dir, **ssh_options(sshd))
    assert first.copied and first.files == 4 and first.runtime == "onnxruntime" and first.runtime_version
    assert first.verify["ok"] and first.verify["files"]["checked"] == 3
    assert sorted(p.name for p in Path(device_dir).iterdir()) == [
        ".edgepipe-deployment",
        "check.npz",
        "manifest.json",
        "model.onnx",
        "tokenizer.json",
    ]
    # the runner runs from its own directory beside the deployment, which holds nothing else
    assert first.runner == f"{Path(device_dir).parent}/.edgepipe-runner/{remote.RUNNER_ID}/runner.py"
    assert sorted(p.name for p in Path(first.runner).parent.iterdir()) == sorted(["runner.py", *_runner.SHIPPED])
    assert sorted(p.name for p in Path(device_dir).parent.iterdir()) == [".edgepipe-runner", "tiny-encoder"]
    again = remote.deploy(bundle, sshd.url, remote_dir=device_dir, **ssh_options(sshd))
    assert not again.copied  # same manifest and runner already there

    results = tmp_path / "results"
    path = remote.bench(
        bundle,
        sshd.url,
        runs=20,
        warmup=2,
        batch=2,
        seq=16,
        results_dir=results,
        remote_dir=device_dir,
        **ssh_options(sshd),
    )
    assert path.parent == results and path.name.startswith(
        f"tiny-encoder__host-cpu__{sshd.user}@127.0.0.1-{sshd.port}__"
    )
    assert [p.name for p in results.iterdir()] == [path.name]  # no partial files left
    record = json.loads(path.read_text())
    assert record["device"]["url"] == sshd.url and record["check"]["passed"]
    assert record["inputs"]["input_ids"]["shape"] == [2, 16]
    assert 0 < record["latency_ms"]["p50"] <= record["latency_ms"]["p90"]
    assert not list(Path(device_dir).parent.glob("*.bench-*.json"))  # the device copy is cleaned up

    local = remote.bench(bundle, "local", runs=10, warmup=1, results_dir=results)
    loaded = report.load_results([path, local])
    table = report.compare_table(loaded)
    assert table.row_count == 2 and [c.header for c in table.columns][:4] == ["model", "target", "device", "precision"]
    rows = [report.row(r) for r in loaded]
    assert rows[0]["device"] == sshd.url and rows[1]["device"].startswith("local")


def test_deploy_rejects_a_host_key_that_does_not_match(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    device_dir = tmp_path / "device"
    with pytest.raises(DeviceError, match="does NOT match the one recorded"):
        remote.deploy(
            bundle, sshd.url, remote_dir=str(device_dir), **ssh_options(sshd, known_hosts=sshd.wrong_known_hosts)
        )
    assert not device_dir.exists()
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError, match="is not in .*known_hosts"):
        remote.deploy(bundle, sshd.url, remote_dir=str(device_dir), **ssh_options(sshd, known_hosts=empty))
    result = remote.deploy(
        bundle,
        sshd.url,
        remote_dir=str(device_dir),
        insecure_host_key=True,
        **ssh_options(sshd, known_hosts=sshd.wrong_known_hosts),
    )
    assert result.copied and (device_dir / "model.onnx").is_file()


def test_deploy_reports_auth_failure(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    stranger = sshd.root / "other_host_ed25519"  # a valid key that is not in authorized_keys
    with pytest.raises(DeviceError, match="Authentication failed"):
        remote.deploy(bundle, sshd.url, remote_dir=str(tmp_path / "d"), **ssh_options(sshd, identity_file=stranger))


def test_bench_reports_sha256_mismatch_on_the_device(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    device_dir = tmp_path / "device"
    remote.deploy(bundle, sshd.url, remote_dir=str(device_dir), **ssh_options(sshd))
    model = device_dir / "model.onnx"
    model.write_bytes(model.read_bytes()[:-1] + b"\0")  # the device's copy rots
    results = tmp_path / "results"
    with pytest.raises(DeviceError, match=r"failed its check: .*model.onnx \(sha256 mismatch\)"):
        remote.bench(
            bundle,
            sshd.url,
            runs=3,
            results_dir=results,
            remote_dir=str(device_dir),
            deploy_first=False,
            **ssh_options(sshd),
        )
    assert not results.exists() or not list(results.iterdir())
    repaired = remote.deploy(bundle, sshd.url, remote_dir=str(device_dir), **ssh_options(sshd))
    assert repaired.copied and repaired.verify["ok"]


def test_deploy_refuses_a_corrupt_local_bundle(sshd: SshServer, tmp_path: Path) -> None:
    local = make_onnx_bundle(tmp_path / "b")
    (local / "check.npz").write_bytes(b"not the file the manifest hashed")
    with pytest.raises(BundleError, match=r"check.npz \(size"):
        remote.deploy(local, sshd.url, remote_dir=str(tmp_path / "device"), **ssh_options(sshd))
    assert not (tmp_path / "device").exists()


def test_deploy_says_which_packages_the_device_lacks(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    python = "/usr/bin/python3"
    if not Path(python).exists() or subprocess.run([python, "-c", "import numpy"], capture_output=True).returncode == 0:
        pytest.skip(f"needs a Python without numpy at {python} (the system python3 of Debian)")
    with pytest.raises(DeviceError) as info:
        remote.deploy(bundle, sshd.url, remote_dir=str(tmp_path / "d"), **ssh_options(sshd, python=python))
    message = str(info.value)
    assert f"numpy, onnxruntime are not installed on {sshd.user}@127.0.0.1:{sshd.port} ({python} 3." in message
    assert "pip install numpy onnxruntime==1.32.0" in message
    with pytest.raises(DeviceError, match="python9 is not found"):
        remote.deploy(bundle, sshd.url, remote_dir=str(tmp_path / "d"), **ssh_options(sshd, python="python9"))


def test_deploy_reports_no_space_on_the_device(sshd: SshServer, tmp_path: Path) -> None:
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) to make a small filesystem")
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 256 kB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        big = make_onnx_bundle(tmp_path / "big", padding_bytes=1 << 20)
        with pytest.raises(DeviceError, match=r"No space on .*needs 1\.\d+ MB .* MB are free"):
            remote.deploy(big, sshd.url, remote_dir=str(small / "bundle"), **ssh_options(sshd))
        assert [p.name for p in small.iterdir()] == [".edgepipe-runner"]  # the runner went first; no bundle, no partial
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_unreachable_port_fails_fast(bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    start = time.monotonic()
    with pytest.raises(DeviceError, match="Cannot reach .* Connection refused"):
        remote.deploy(bundle, f"ssh://nobody@127.0.0.1:{port}", insecure_host_key=True, timeout=3)
    assert time.monotonic() - start < 5


def test_silent_server_hits_the_connect_timeout(bundle: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(server.accept()[0]), daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(DeviceError, match="did not complete an SSH handshake within 1.5 s"):
            remote.deploy(
                bundle, f"ssh://nobody@127.0.0.1:{server.getsockname()[1]}", insecure_host_key=True, timeout=1.5
            )
        assert time.monotonic() - start < 8
    finally:
        for s in [*held, server]:
            s.close()


def test_local_deploy_verifies_in_place(bundle: Path) -> None:
    result = remote.deploy(bundle, "local")
    assert not result.copied and result.remote_dir == str(bundle.resolve()) and result.runner == str(remote.RUNNER)
    assert result.verify["ok"]


@pytest.mark.parametrize(
    ("url", "parsed"),
    [
        ("local", remote.DeviceURL("local")),
        ("ssh://pi@orin.local", remote.DeviceURL("ssh", host="orin.local", user="pi")),
        ("ssh://nvidia@10.0.0.7:2222", remote.DeviceURL("ssh", host="10.0.0.7", user="nvidia", port=2222)),
        ("ssh://[::1]:22", remote.DeviceURL("ssh", host="::1")),
        ("adb://R58M123ABC", remote.DeviceURL("adb", serial="R58M123ABC")),
    ],
)
def test_device_url_parse(url: str, parsed: remote.DeviceURL) -> None:
    assert remote.DeviceURL.parse(url) == parsed


@pytest.mark.parametrize("url", ["orin.local", "ssh://", "ssh://pi@host:99999", "adb://", "http://x", "ssh://a b"])
def test_device_url_parse_rejects(url: str) -> None:
    with pytest.raises(UsageError, match="Accepted: local, ssh://"):
        remote.DeviceURL.parse(url)


def _adb_serial() -> str | None:
    if shutil.which("adb") is None:
        return None
    listed = subprocess.run(["adb", "devices"], capture_output=True, text=True, timeout=30).stdout.splitlines()[1:]
    return next((ln.split()[0] for ln in listed if ln.strip().endswith("device")), None)


@pytest.mark.device
def test_adb_round_trip(bundle: Path, tmp_path: Path) -> None:
    serial = _adb_serial()
    if serial is None:
        pytest.skip("no adb, or no Android device attached (adb devices lists none)")
    python = "/data/local/tmp/python3"  # a device-side Python with numpy + onnxruntime, pushed beforehand
    path = remote.bench(bundle, f"adb://{serial}", runs=10, warmup=2, results_dir=tmp_path, python=python)
    assert json.loads(path.read_text())["check"]["passed"]


# ----------------------------------------------------------------------------------------------- connection failures


def _queue_full_port() -> tuple[socket.socket, list[socket.socket]]:
    """A port whose accept queue is full: Linux drops further SYNs, so a connect gets no answer at all."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(server.getsockname())
        fillers.append(s)
    time.sleep(0.2)
    return server, fillers


def _one_shot_server(reply: bytes) -> socket.socket:
    """A TCP server that answers every connection with ``reply`` and closes it (an HTTP server, say)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.sendall(reply)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_each_connection_failure_gets_its_own_line(sshd: SshServer, bundle: Path, tmp_path: Path) -> None:
    def fails(url: str, **options) -> str:
        with pytest.raises((DeviceError, UsageError)) as info:
            remote.deploy(bundle, url, remote_dir=str(tmp_path / "d"), **{"timeout": 1.5, **options})
        return str(info.value)

    assert "Cannot resolve the host name 'nonexistent.invalid': Name or service not known" in fails(
        "ssh://nobody@nonexistent.invalid", insecure_host_key=True
    )
    full, fillers = _queue_full_port()
    try:
        message = fails(f"ssh://nobody@127.0.0.1:{full.getsockname()[1]}", insecure_host_key=True)
        assert "did not answer on port" in message and "within 1.5 s" in message, message
    finally:
        for s in [*fillers, full]:
            s.close()
    http = _one_shot_server(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        message = fails(f"ssh://nobody@127.0.0.1:{http.getsockname()[1]}", insecure_host_key=True)
        assert "accepted the connection on port" in message and "did not speak SSH" in message, message
    finally:
        http.close()
    locked = tmp_path / "locked_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(locked)], check=True)
    message = fails(sshd.url, **ssh_options(sshd, identity_file=locked))
    assert "is encrypted with a passphrase" in message and f"ssh-add {locked}" in message
    assert "does not exist" in fails(sshd.url, **ssh_options(sshd, identity_file=tmp_path / "no-such-key"))
    # refused, handshake timeout, bad auth and wrong or unknown host key: the tests above
    assert not (tmp_path / "d").exists()


def test_agent_forwarding_stays_off_when_the_ssh_config_asks_for_it(
    sshd: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import asyncssh

    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not agent_sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        home = tmp_path / "home"
        (home / ".ssh").mkdir(parents=True)
        (home / ".ssh" / "config").write_text("Host *\n    ForwardAgent yes\n")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.setenv("SSH_AUTH_SOCK", str(agent_sock))
        probe = ["sh", "-c", "echo ${SSH_AUTH_SOCK:-none}"]

        async def as_configured() -> str:  # the positive control: asyncssh alone follows the config
            options = {"known_hosts": str(sshd.known_hosts), "client_keys": [str(sshd.identity)]}
            async with asyncssh.connect(sshd.host, sshd.port, username=sshd.user, **options) as conn:
                return (await conn.run(" ".join(probe[:2]) + " '" + probe[2] + "'")).stdout.strip()

        assert asyncio.run(as_configured()).startswith("/")  # the device got a socket to the user's agent
        device = remote.DeviceURL.parse(sshd.url)
        options = {"known_hosts": sshd.known_hosts, "identity_file": sshd.identity, "timeout": 10.0}
        with remote._connect(device, **options) as t:
            rc, out, _ = t.run(probe, 30)
        assert rc == 0 and out.strip() == "none"
    finally:
        agent.terminate()
        agent.wait()


class _Proxy:
    """TCP between the client and sshd that can go silent: both directions stop, the sockets stay open (a device
    that drops off the network without a reset)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target, self.silent = target, threading.Event()
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        while not self.silent.is_set():
            try:
                data = src.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.silent.is_set():
                return
            dst.sendall(data)
        while True:  # silent: hold the sockets open, forward nothing
            time.sleep(1)

    def close(self) -> None:
        self.server.close()


def test_a_device_that_stops_answering_fails_in_one_line_not_a_hang(
    sshd: SshServer, bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(remote, "KEEPALIVE_INTERVAL_S", 0.5)
    monkeypatch.setattr(remote, "KEEPALIVE_COUNT_MAX", 2)
    proxy = _Proxy((sshd.host, sshd.port))
    known = tmp_path / "known_hosts"  # the proxy's port, sshd's key
    known.write_text(sshd.known_hosts.read_text().replace(f"]:{sshd.port} ", f"]:{proxy.port} "))
    started = tmp_path / "started"
    python = tmp_path / "python"  # the device's interpreter: says when the timed runs start, then runs them
    python.write_text(f'#!/bin/sh\ncase "$*" in *--runs*) touch {started};; esac\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    url = f"ssh://{sshd.user}@127.0.0.1:{proxy.port}"
    options = {"known_hosts": known, "identity_file": sshd.identity, "python": str(python), "timeout": 10.0}
    threading.Thread(target=_silence, args=(started, proxy), daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(DeviceError, match=r"Lost the ssh connection to .* during .*keepalive"):
            remote.bench(
                bundle, url, runs=20, remote_dir=str(tmp_path / "device"), results_dir=tmp_path / "r", **options
            )
        assert time.monotonic() - start < 60  # keepalives, not RUN_TIMEOUT_S (30 min)
        assert not (tmp_path / "r").exists() or not list((tmp_path / "r").iterdir())
    finally:
        proxy.close()


def _silence(started: Path, proxy: _Proxy) -> None:
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.silent.set()


# ------------------------------------------------------------------ adb, through the CLI, with a fake adb on PATH

SERIAL = "FAKE0042"


@pytest.fixture
def phone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An "attached" Android device: tests/fake_adb.py as ``adb`` on PATH, its storage a directory here."""
    root = tmp_path / "phone"
    fake_adb.install(tmp_path / "bin", root, SERIAL)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return root


def _cli(*args: str):
    done = CliRunner().invoke(cli, list(args), terminal_width=240)
    return done, " ".join(done.output.split())


def test_adb_deploy_bench_and_compare_through_the_cli(bundle: Path, phone: Path, tmp_path: Path) -> None:
    device = ["--device", f"adb://{SERIAL}", "--python", sys.executable]
    first, said = _cli("deploy", str(bundle), *device)
    assert first.exit_code == 0, first.output
    remote_dir = "/data/local/tmp/edgepipe/tiny-encoder/host-cpu"  # adb's default place
    assert f"-> adb://{SERIAL}:{remote_dir} (copied 4 files" in said and "runtime on the device: onnxruntime" in said
    on_phone = phone / remote_dir.lstrip("/")
    names = ["check.npz", "manifest.json", "model.onnx", "tokenizer.json"]
    assert sorted(p.name for p in on_phone.iterdir()) == [remote.MARKER, *names]
    assert not on_phone.with_name("host-cpu.edgepipe-partial").exists()
    assert all((on_phone / n).read_bytes() == (bundle / n).read_bytes() for n in names)
    runner_dir = on_phone.parent / ".edgepipe-runner" / remote.RUNNER_ID  # beside the bundle, never in it
    assert sorted(p.name for p in runner_dir.iterdir()) == sorted(["runner.py", *_runner.SHIPPED])
    again, said = _cli("deploy", str(bundle), *device)
    assert again.exit_code == 0 and "already there, unchanged" in said
    (on_phone / "model.onnx").write_bytes(b"rotten")  # the phone's copy fails its sha256: deploy copies again
    repaired, said = _cli("deploy", str(bundle), *device)
    assert (
        repaired.exit_code == 0
        and "(copied 4 files" in said
        and (on_phone / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    )

    results = tmp_path / "results"
    benched, said = _cli("bench", str(bundle), *device, "--runs", "5", "--warmup", "1", "--results", str(results))
    assert benched.exit_code == 0, benched.output
    (path,) = results.glob("*.json")  # pulled back from the phone with adb pull
    record = json.loads(path.read_text())
    assert record["device"]["url"] == f"adb://{SERIAL}" and record["check"]["passed"]
    assert 0 < record["latency_ms"]["min"] <= record["latency_ms"]["p50"] <= record["latency_ms"]["max"]
    assert not list(on_phone.parent.glob("*.bench-*.json"))  # the device copy of the result is cleaned up

    local = remote.bench(bundle, "local", runs=5, warmup=1, results_dir=results)
    table, plot = tmp_path / "compare.csv", tmp_path / "compare.png"
    compared, said = _cli("compare", str(path), str(local), "--csv", str(table), "--plot", str(plot))
    assert compared.exit_code == 0, compared.output
    rows = list(csv.DictReader(table.open()))
    assert [r["device"] for r in rows] == [f"adb://{SERIAL}", report.row(json.loads(local.read_text()))["device"]]
    assert float(rows[0]["p50_ms"]) == pytest.approx(record["latency_ms"]["p50"])
    assert rows[0]["source"] == str(path) and f"Wrote {table}" in said
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adb_device_that_is_not_attached_is_one_line(bundle: Path, phone: Path) -> None:
    done, said = _cli("deploy", str(bundle), "--device", "adb://OTHER1", "--python", sys.executable)
    assert done.exit_code == 1 and "Traceback" not in done.output
    assert said.startswith("error: adb device OTHER1 is not attached") and f"adb devices lists: {SERIAL}" in said
    assert list((phone / "data" / "local" / "tmp").iterdir()) == []  # nothing was copied
