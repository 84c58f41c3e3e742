"""Move a bundle and runner.py to a device, verify it there, run the benchmark and fetch its JSON.

Device URLs: ``local`` (a subprocess here), ``ssh://user@host[:port]`` (asyncssh; host keys checked against
known_hosts, key or agent auth) and ``adb://serial`` (the ``adb`` tool, list arguments only). The device needs
Python 3.8+, numpy and the bundle's runtime; ``deploy`` says exactly what is missing.

A bundle is untrusted input (docs/architecture.md, "The harness"): the runner is copied to its own directory beside
the deployments (``.edgepipe-runner/<sha256>/runner.py``) and started from there, with ``python -P`` where the
device's Python has it (3.11+), so no bundle file can shadow a module it imports. Model and target names from the
manifest become remote path segments only when each is one safe segment, and deploy replaces only a directory that
holds its own marker file (``.edgepipe-deployment``), an empty one or none.

A deploy copies into ``<remote_dir>.edgepipe-partial`` and renames it into place, then runs ``runner.py --verify``
on the device and checks the manifest's sha256 there. A re-deploy of the same bundle and runner copies nothing.
Results are written to a temporary file in ``results_dir`` and renamed, so a failed bench leaves nothing
half-written.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import os
import posixpath
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from edgepipe.errors import BundleError, DeviceError, MissingExtraError, UsageError
from edgepipe.harness import runner as _runner
from edgepipe.precisions import tolerance as _plan_tolerance

RUNNER = Path(_runner.__file__)
RUNNER_SHA256 = _runner.sha256_file(str(RUNNER))
# runner.py and the modules that travel with it (runner.SHIPPED): what the runner's own directory on a device holds
SHIPPED_SHA256 = {name: _runner.sha256_file(str(RUNNER.parent / name)) for name in _runner.SHIPPED}
RUNNER_ID = hashlib.sha256(json.dumps([RUNNER_SHA256, SHIPPED_SHA256], sort_keys=True).encode()).hexdigest()[:16]
MARKER = _runner.DEPLOY_MARKER
CONNECT_TIMEOUT_S = 10.0
RUN_TIMEOUT_S = 1800.0
KEEPALIVE_INTERVAL_S = 15.0  # a device that misses KEEPALIVE_COUNT_MAX keepalives in a row is gone
KEEPALIVE_COUNT_MAX = 4
TRANSFER_BASE_S = 60.0


@dataclass(frozen=True)
class DeviceURL:
    """A parsed device URL. ``where`` names it in messages (``pi@host:2222``), ``slug`` in file names."""

    scheme: str
    host: str | None = None
    user: str | None = None
    port: int = 22
    serial: str | None = None

    @classmethod
    def parse(cls, url: str) -> DeviceURL:
        """Parse ``local``, ``ssh://user@host[:port]`` or ``adb://serial``.

        Raises:
            UsageError: Anything else.
        """
        accepted = "Accepted: local, ssh://user@host[:port], adb://serial."
        if not isinstance(url, str):
            raise UsageError("No device given (--device).", hint=accepted)
        if url == "local":
            return cls("local")
        m = re.fullmatch(r"ssh://(?:([^@/:\s]+)@)?(\[[0-9a-fA-F:]+\]|[^@/:\s\[\]]+)(?::(\d{1,5}))?/?", url)
        if m:
            port = int(m.group(3) or 22)
            if not 0 < port < 65536:
                raise UsageError(f"Device '{url}' has port {port}; ports run 1-65535.", hint=accepted)
            return cls("ssh", host=m.group(2).strip("[]"), user=m.group(1), port=port)
        m = re.fullmatch(r"adb://([A-Za-z0-9._:-]+)", url)
        if m:
            return cls("adb", serial=m.group(1))
        raise UsageError(f"Device '{url}' is not a device URL.", hint=accepted)

    @property
    def where(self) -> str:
        if self.scheme == "ssh":
            host = f"[{self.host}]" if ":" in str(self.host) else str(self.host)  # IPv6
            return f"{self.user + '@' if self.user else ''}{host}{'' if self.port == 22 else f':{self.port}'}"
        return f"adb device {self.serial}" if self.scheme == "adb" else "this machine"

    @property
    def url(self) -> str:
        if self.scheme == "ssh":
            return f"ssh://{self.where}"
        return f"adb://{self.serial}" if self.scheme == "adb" else "local"

    @property
    def slug(self) -> str:
        raw = {"local": "local", "adb": f"adb-{self.serial}"}.get(self.scheme) or self.where.replace(":", "-")
        return re.sub(r"[^A-Za-z0-9._@-]+", "-", raw)


@dataclass
class DeployResult:
    """What ``deploy`` did. ``verify`` is the runner's ``edgepipe.verify/1`` report from the device."""

    url: str
    remote_dir: str
    runner: str
    python: str
    python_version: str
    runtime: str
    runtime_version: str | None
    copied: bool
    files: int
    bytes: int
    seconds: float
    verify: dict = field(repr=False)
    engine: dict | None = None  # TensorRT bundles: runner.py --engine's edgepipe.engine/1 state on the device

    @property
    def engine_line(self) -> str | None:
        return engine_line(self.engine) if self.engine is not None else None


# ----------------------------------------------------------------------------------------------- transports


class _Transport(Protocol):
    where: str

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]: ...
    def put(self, pairs: list[tuple[Path, str]]) -> None: ...
    def get(self, remote: str, local: Path) -> None: ...
    def close(self) -> None: ...


class _LocalTransport:
    where = "this machine"

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except FileNotFoundError:
            return 127, "", f"{argv[0]}: not found"
        except subprocess.TimeoutExpired:
            raise DeviceError(f"'{' '.join(argv[:2])} ...' did not finish within {timeout:.0f} s here.") from None
        return done.returncode, done.stdout, done.stderr

    def put(self, pairs: list[tuple[Path, str]]) -> None:
        for local, remote in pairs:
            Path(remote).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, remote)

    def get(self, remote: str, local: Path) -> None:
        shutil.copyfile(remote, local)

    def close(self) -> None:
        pass


class _SshTransport:
    """asyncssh behind a synchronous face: one private event loop per connection.

    Agent forwarding is always off (an ssh config's ``ForwardAgent yes`` would hand every device the user's keys);
    keepalives close a connection whose device stopped answering, and every transfer has a deadline, so a dropped
    device ends in one line instead of a hang. Each way a connection fails gets its own line: the name does not
    resolve, nothing listens, no answer, not an SSH server, host key unknown or changed, keys refused, an identity
    file that is encrypted or unreadable.
    """

    def __init__(
        self,
        device: DeviceURL,
        *,
        known_hosts: Path | None,
        insecure_host_key: bool,
        identity_file: Path | None,
        timeout: float,
    ) -> None:
        try:
            import asyncssh
        except ImportError:
            raise MissingExtraError("asyncssh (for ssh:// devices)", "remote") from None
        self._asyncssh, self.where, self._device = asyncssh, device.where, device
        login = f"{device.user + '@' if device.user else ''}{device.host}"
        self._first_contact = (
            f"Connect once with `ssh -p {device.port} {login}` and accept its key after checking the fingerprint, "
            "or pass --insecure-host-key (lab only)."
        )
        known = None if insecure_host_key else Path(known_hosts or Path.home() / ".ssh" / "known_hosts").expanduser()
        if known is not None and not known.is_file():
            raise DeviceError(
                f"No known_hosts file at {known}, so the host key of {self.where} cannot be checked.",
                hint=self._first_contact,
            )
        options = {
            "known_hosts": str(known) if known else None,
            "connect_timeout": timeout,
            "agent_forwarding": False,  # wins over ForwardAgent in ~/.ssh/config
            "keepalive_interval": KEEPALIVE_INTERVAL_S,
            "keepalive_count_max": KEEPALIVE_COUNT_MAX,
        }
        if identity_file is not None:
            options["client_keys"] = [_identity(asyncssh, Path(identity_file).expanduser())]
        if device.user:
            options["username"] = device.user
        reached = []  # the TCP connection is up once the client's connection_made has run
        self._lost: list[str] = []  # why the connection went down (asyncssh's reason: an unanswered keepalive, ...)
        lost = self._lost

        class _Client(asyncssh.SSHClient):
            def connection_made(self, conn) -> None:
                reached.append(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                lost.append(getattr(exc, "reason", None) or str(exc or "closed by the device"))

        self._loop = asyncio.new_event_loop()
        try:
            self._conn = self._loop.run_until_complete(
                asyncio.wait_for(
                    asyncssh.connect(device.host, device.port, client_factory=_Client, **options), timeout + 5
                )
            )
        except BaseException as e:
            self._loop.close()
            raise self._connect_error(e, known, timeout, bool(reached)) from None

    def _connect_error(self, e: BaseException, known: Path | None, timeout: float, reached: bool) -> BaseException:
        """The one line for a failed connect (or ``e`` itself when it is no connection failure)."""
        asyncssh, where, port = self._asyncssh, self.where, self._device.port
        check = "Check the host and port in the device URL, and that the device is on."
        if isinstance(e, asyncssh.HostKeyNotVerifiable):
            return self._host_key_error(known, e)
        if isinstance(e, asyncssh.PermissionDenied):
            return DeviceError(
                f"Authentication failed for {where}: the server accepted none of the offered keys.",
                hint="Add your public key to ~/.ssh/authorized_keys on the device, load it into "
                "ssh-agent, or pass an identity file.",
            )
        if isinstance(e, socket.gaierror):
            return DeviceError(f"Cannot resolve the host name {self._device.host!r}: {e.strerror}.", hint=check)
        if isinstance(e, ConnectionRefusedError):
            return DeviceError(
                f"Cannot reach {where} over ssh: Connection refused (nothing listens on port {port}).",
                hint="Check that sshd runs on the device and the port is right.",
            )
        if isinstance(e, TimeoutError | asyncssh.TimeoutError) and reached:
            return DeviceError(
                f"{where} did not complete an SSH handshake within {timeout:g} s (port {port} took the connection).",
                hint="Check that the port is sshd's, or raise the timeout.",
            )
        if isinstance(e, TimeoutError | asyncssh.TimeoutError):
            return DeviceError(
                f"{where} did not answer on port {port} within {timeout:g} s (no reply: host down, wrong address, or "
                "a firewall dropping it).",
                hint=check,
            )
        if isinstance(e, asyncssh.ProtocolError | asyncssh.ConnectionLost) or reached and isinstance(e, OSError):
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            return DeviceError(
                f"{where} accepted the connection on port {port} but did not speak SSH: {reason}.",
                hint="Check that the port is sshd's.",
            )
        if isinstance(e, OSError | asyncssh.Error):
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or str(e) or type(e).__name__
            return DeviceError(f"Cannot reach {where} over ssh: {reason}.", hint=check)
        return e

    def _host_key_error(self, known: Path, error: Exception) -> DeviceError:
        try:
            recorded = self._asyncssh.read_known_hosts(str(known)).match(self._device.host, "", self._device.port)[0]
        except Exception:  # an unreadable known_hosts: fall back to the generic message
            recorded = ()
        if recorded:
            host, port = self._device.host, self._device.port
            entry = host if port == 22 else f"[{host}]:{port}"
            return DeviceError(
                f"The host key of {self.where} does NOT match the one recorded in {known}.",
                hint="The device was reinstalled, or someone is in between. Check its key, then "
                f"remove the old entry (ssh-keygen -f {known} -R '{entry}').",
            )
        return DeviceError(f"The host key of {self.where} is not in {known} ({error}).", hint=self._first_contact)

    def _wait(self, work, timeout: float, what: str):
        """Run ``work`` on this connection's loop; a deadline or a dead connection is one DeviceError line."""
        try:
            return self._loop.run_until_complete(asyncio.wait_for(work, timeout))
        except (TimeoutError, self._asyncssh.TimeoutError):
            raise DeviceError(f"{what} did not finish within {timeout:.0f} s on {self.where}.") from None
        except (OSError, self._asyncssh.Error) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise DeviceError(
                f"Lost the ssh connection to {self.where} during {what}: {reason}.",
                hint="The device stopped answering (keepalives unanswered) or dropped the link; check it and retry.",
            ) from None

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        what = f"'{shlex.join(argv[:2])} ...'"
        done = self._wait(self._conn.run(shlex.join(argv), check=False), timeout, what)
        if done.exit_status is None and self._lost:  # the channel closed with the connection: no exit status came
            raise DeviceError(
                f"Lost the ssh connection to {self.where} during {what}: {self._lost[0]}.",
                hint="The device stopped answering (keepalives unanswered) or dropped the link; check it and retry.",
            )
        status = done.exit_status if done.exit_status is not None else 255
        return status, str(done.stdout or ""), str(done.stderr or "")

    def put(self, pairs: list[tuple[Path, str]]) -> None:
        async def _put() -> None:
            async with self._conn.start_sftp_client() as sftp:
                for local, remote in pairs:
                    await sftp.makedirs(os.path.dirname(remote) or ".", exist_ok=True)
                    await sftp.put(str(local), remote)

        size = sum(local.stat().st_size for local, _ in pairs)
        self._wait(_put(), _transfer_timeout(size), f"the copy of {len(pairs)} file(s)")

    def get(self, remote: str, local: Path) -> None:
        async def _get() -> None:
            async with self._conn.start_sftp_client() as sftp:
                await sftp.get(remote, str(local))

        self._wait(_get(), _transfer_timeout(0), f"fetching {remote}")

    def close(self) -> None:
        self._conn.close()
        try:  # an abort: a dead device has nothing to say
            self._loop.run_until_complete(asyncio.wait_for(self._conn.wait_closed(), KEEPALIVE_INTERVAL_S))
        except (TimeoutError, OSError, self._asyncssh.Error):
            pass
        self._loop.close()


def _identity(asyncssh, path: Path):
    """The private key of ``--identity``, read here so an encrypted or unreadable one is one line (edgepipe never
    prompts for a passphrase)."""
    try:
        return asyncssh.read_private_key(str(path))
    except FileNotFoundError:
        raise UsageError(f"--identity {path} does not exist.", hint="Pass the path of a private key file.") from None
    except OSError as e:
        raise UsageError(f"Cannot read --identity {path} ({e.strerror}).", hint="Check its permissions.") from None
    except asyncssh.KeyImportError as e:
        if "assphrase" in str(e):
            raise UsageError(
                f"--identity {path} is encrypted with a passphrase, which edgepipe does not ask for.",
                hint=f"Load it into ssh-agent (ssh-add {path}) and leave out --identity.",
            ) from None
        raise UsageError(f"--identity {path} is not a private key asyncssh can read ({e}).") from None


def _transfer_timeout(nbytes: int) -> float:
    """A copy's deadline: a minute, plus a second per MB at the slowest link we expect (1 MB/s)."""
    return TRANSFER_BASE_S + nbytes / 1e6


class _AdbTransport:
    """``adb -s SERIAL shell|push|pull``. The device needs a Python reachable from adb shell (e.g. a static build
    pushed to /data/local/tmp, pass ``python=``); Termux's Python runs under another uid and is not reachable."""

    def __init__(self, device: DeviceURL, timeout: float) -> None:
        adb = shutil.which("adb")
        if adb is None:
            raise DeviceError("adb is not installed here.", hint="Install Android platform-tools (apt install adb).")
        self._adb, self.where = [adb, "-s", str(device.serial)], device.where
        try:
            state = subprocess.run([*self._adb, "get-state"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"{self.where} did not answer within {timeout:g} s.") from None
        if state.stdout.strip() != "device":
            listed = subprocess.run([adb, "devices"], capture_output=True, text=True, timeout=timeout).stdout
            serials = [ln.split()[0] for ln in listed.splitlines()[1:] if ln.strip()]
            raise DeviceError(
                f"{self.where} is not attached ({state.stderr.strip() or state.stdout.strip()}).",
                hint=f"adb devices lists: {', '.join(serials) or 'nothing'}.",
            )

    def _adb_run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        try:
            return subprocess.run([*self._adb, *args], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeviceError(f"adb {args[0]} did not finish within {timeout:.0f} s on {self.where}.") from None

    def run(self, argv: list[str], timeout: float) -> tuple[int, str, str]:
        done = self._adb_run(["shell", shlex.join(argv)], timeout)  # adb shell hands one string to the device's sh
        return done.returncode, done.stdout, done.stderr

    def put(self, pairs: list[tuple[Path, str]]) -> None:
        for local, remote in pairs:
            self._adb_run(["shell", shlex.join(["mkdir", "-p", os.path.dirname(remote)])], 60)
            done = self._adb_run(["push", str(local), remote], 600)
            if done.returncode != 0:
                raise DeviceError(f"adb push {local.name} to {self.where} failed: {done.stderr.strip()}")

    def get(self, remote: str, local: Path) -> None:
        done = self._adb_run(["pull", remote, str(local)], 120)
        if done.returncode != 0:
            raise DeviceError(f"adb pull {remote} from {self.where} failed: {done.stderr.strip()}")

    def close(self) -> None:
        pass


@contextmanager
def _connect(device: DeviceURL, **options) -> Iterator[_Transport]:
    if device.scheme == "ssh":
        transport = _SshTransport(
            device,
            known_hosts=options.get("known_hosts"),
            insecure_host_key=options.get("insecure_host_key", False),
            identity_file=options.get("identity_file"),
            timeout=options["timeout"],
        )
    elif device.scheme == "adb":
        transport = _AdbTransport(device, options["timeout"])
    else:
        transport = _LocalTransport()
    try:
        yield transport
    finally:
        transport.close()


# ----------------------------------------------------------------------------------------------- deploy


def _local_bundle(bundle_dir: Path) -> dict:
    """Read the manifest and check the local copy before sending it anywhere."""
    try:
        manifest = _runner.load_manifest(str(bundle_dir))
    except _runner.RunnerError as e:
        raise BundleError(str(e), hint="Pass a directory written by `edgepipe build`.") from None
    for what, name in (("model", manifest.get("model")), ("target name", _target_name(manifest))):
        problem = _runner.name_problem(name)
        if problem:
            raise BundleError(
                f"Bundle {bundle_dir}: its manifest's {what} {name!r} is {problem}, so it cannot name a directory.",
                hint="A bundle from elsewhere may be hostile: rebuild it with `edgepipe build`; nothing was copied.",
            )
    problems = _runner.verify_files(str(bundle_dir), manifest)["problems"]
    if problems:
        listed = "; ".join(f"{p['path']} ({p['problem']})" for p in problems)
        raise BundleError(
            f"Bundle {bundle_dir} does not match its manifest: {listed}.",
            hint="Rebuild it with `edgepipe build`; nothing was copied.",
        )
    return manifest


def _target_name(manifest: dict) -> str | None:
    target = manifest.get("target")
    return target.get("name") if isinstance(target, dict) else None


def _default_remote_dir(device: DeviceURL, manifest: dict) -> str:
    tail = f"edgepipe/{manifest['model']}/{_target_name(manifest)}"  # both checked by _local_bundle
    return f"/data/local/tmp/{tail}" if device.scheme == "adb" else tail  # ssh: relative to the login directory


def _check_remote_dir(remote_dir: str) -> str:
    """A ``--remote-dir`` deploy may create and replace: not a root, home or runner directory (one line if not)."""
    path = remote_dir.rstrip("/")
    base = posixpath.basename(path)
    if not path or any(c in remote_dir for c in "\x00\n\r") or base in ("", ".", "..", "~", _runner.RUNNER_DIR):
        raise UsageError(
            f"--remote-dir {remote_dir!r} cannot hold a deployment (deploy replaces that directory as a whole).",
            hint="Pass a directory of its own, e.g. edgepipe/my-model/my-target.",
        )
    if path.startswith("~"):
        raise UsageError(
            f"--remote-dir {remote_dir!r} starts with '~', which is not expanded on the device.",
            hint="Relative paths are relative to the login directory: drop the '~/'.",
        )
    return path


def _runner_path(remote_dir: str) -> str:
    """Where the runner goes: its own directory beside the deployment, named by its sha256, holding nothing else."""
    parent = posixpath.dirname(remote_dir) or "."
    return f"{parent}/{_runner.RUNNER_DIR}/{RUNNER_ID}/runner.py"


# Device-side steps in POSIX sh (toybox and busybox have these), every path a positional argument. `ours` holds for
# a path deploy may replace: none there, an empty directory, or a directory with edgepipe's marker file.
_OURS = (
    'ours() { [ ! -L "$1" ] && { [ ! -e "$1" ] || [ -f "$1/$m" ] || { [ -d "$1" ] && [ -z "$(ls -A "$1")" ]; }; }; }'
)
_BEGIN = (
    _OURS + '; d=$1; s=$2; m=$3; for p in "$d" "$s"; do ours "$p" || { echo "$p"; exit 3; }; done; '
    'rm -rf "$s" && mkdir -p "$s" && printf "%s\\n" "$4" > "$s/$m"'
)
_COMMIT = (
    _OURS + '; d=$1; s=$2; m=$3; o=$4; for p in "$d" "$o"; do ours "$p" || { echo "$p"; exit 3; }; done; '
    '[ -f "$s/$m" ] || exit 4; rm -rf "$o" || exit 5; if [ -e "$d" ]; then mv "$d" "$o" || exit 5; fi; '
    'mv "$s" "$d" || { [ -e "$o" ] && mv "$o" "$d"; exit 5; }; rm -rf "$o"'
)
# An existing runner directory of that id is kept (two deploys at once install the same files) unless "$3" = force.
_RUNNER_INSTALL = (
    '[ -L "$1" ] && exit 3; if [ -d "$1" ] && [ "$3" != force ]; then rm -rf "$2"; else rm -rf "$1" && mv "$2" "$1"; fi'
)
# Prints the interpreter's version; `import sys` reads no file, so the directory it starts in cannot matter.
_PROBE = "import sys; print('.'.join(map(str, sys.version_info[:3])))"


def _interpreter(t: _Transport, device: DeviceURL, python: str) -> list[str]:
    """``[python]``, plus ``-P`` where the device's Python has it (3.11+: the script's directory is not on sys.path)."""
    rc, out, err = t.run([python, "-c", _PROBE], 60)
    version = out.strip().splitlines()[-1] if out.strip() else ""
    if rc == 127 or not re.fullmatch(r"\d+\.\d+\.\d+", version):
        if rc == 127 or "not found" in err or "No such file" in err:
            raise DeviceError(
                f"{python} is not found on {device.where}.",
                hint="Install Python 3.8+ there (e.g. apt install python3) or pass the interpreter's path.",
            )
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"{python} on {device.where} does not run Python code (exit {rc}): {last}")
    return [python, "-P"] if tuple(map(int, version.split("."))) >= (3, 11) else [python]


def _run_verify(t: _Transport, python: list[str], runner: str, remote_dir: str, timeout: float):
    rc, out, err = t.run([*python, runner, remote_dir, "--verify"], timeout)
    try:
        report = json.loads(out)
    except ValueError:
        return rc, None, err
    return rc, report if isinstance(report, dict) and report.get("schema") == _runner.VERIFY_SCHEMA else None, err


def _pins(manifest: dict, missing: list[str]) -> str:
    versions = manifest.get("versions") or manifest.get("packages") or {}
    return " ".join(f"{m}=={versions[m]}" if isinstance(versions, dict) and versions.get(m) else m for m in missing)


def _raise_for_report(report: dict, device: DeviceURL, python: str, manifest: dict) -> None:
    problems = report["files"]["problems"]
    if problems:
        listed = "; ".join(f"{p['path']} ({p['problem']})" for p in problems)
        raise DeviceError(
            f"sha256 check failed on {device.where} for {len(problems)} file(s): {listed}.",
            hint="The copy on the device is damaged or its storage is failing; deploy again.",
        )
    runtime = report["runtime"]
    if not runtime["importable"]:
        missing = runtime["missing"]
        pyver = ".".join(report["python"]["version"].split(".")[:2])
        verb = "is" if len(missing) == 1 else "are"
        if not missing:
            raise DeviceError(f"Runtime {runtime['name']!r} cannot run on {device.where}: {runtime['error']}.")
        raise DeviceError(
            f"{', '.join(missing)} {verb} not installed on {device.where} ({python} {pyver}): "
            f"pip install {_pins(manifest, missing)}",
            hint=f"(import error: {runtime['error']})",
        )


def _free_bytes(t: _Transport, path: str) -> int | None:
    rc, out, _ = t.run(["df", "-Pk", path], 30)
    try:
        return int(out.strip().splitlines()[-1].split()[3]) * 1024 if rc == 0 else None
    except (IndexError, ValueError):
        return None


def _not_ours(device: DeviceURL, path: str) -> DeviceError:
    return DeviceError(
        f"{path} on {device.where} exists and is not an edgepipe deployment (no {MARKER} in it), so deploy leaves it "
        "alone.",
        hint="Pass a --remote-dir of its own (one that does not exist yet, or an earlier deployment).",
    )


def _runner_current(report: dict | None) -> bool:
    return (
        report is not None
        and report.get("runner_sha256") == RUNNER_SHA256
        and report.get("shipped_sha256", {}) == SHIPPED_SHA256
    )


def _install_runner(t: _Transport, device: DeviceURL, runner: str, force: bool = False) -> None:
    """Copy runner.py and the modules it ships with into the runner's own directory, all at once: they go to a
    staging directory that is renamed into place, so a cut copy is never run. ``force`` replaces a damaged one."""
    runner_dir = posixpath.dirname(runner)
    partial = f"{posixpath.dirname(runner_dir)}/.{posixpath.basename(runner_dir)}-{uuid.uuid4().hex[:12]}.partial"
    files = [(RUNNER, f"{partial}/runner.py"), *((RUNNER.parent / n, f"{partial}/{n}") for n in _runner.SHIPPED)]
    try:
        t.put(files)
    except Exception as e:  # OSError, DeviceError, asyncssh.SFTPError
        t.run(["rm", "-rf", partial], 60)
        raise DeviceError(f"Copying runner.py to {device.where} failed: {e}.") from None
    rc, _, err = t.run(["sh", "-c", _RUNNER_INSTALL, "sh", runner_dir, partial, "force" if force else ""], 60)
    if rc != 0:
        t.run(["rm", "-rf", partial], 60)
        raise DeviceError(f"Cannot put runner.py into {runner_dir} on {device.where}: {err.strip() or 'a symlink'}")


def _copy(t: _Transport, device: DeviceURL, bundle: Path, manifest: dict, remote_dir: str) -> tuple[int, int]:
    """Copy manifest-listed files to remote_dir via a staging dir, marker first; returns (files, bytes)."""
    rels = ["manifest.json", *sorted(manifest["files"])]
    staging, old = f"{remote_dir}.edgepipe-partial", f"{remote_dir}.edgepipe-old"
    pairs = [(bundle / rel, f"{staging}/{rel}") for rel in rels]
    need = sum(local.stat().st_size for local, _ in pairs)
    marker = json.dumps(
        {"schema": "edgepipe.deployment/1", "manifest_sha256": _runner.sha256_file(str(bundle / "manifest.json"))}
    )
    rc, out, err = t.run(["sh", "-c", _BEGIN, "sh", remote_dir, staging, MARKER, marker], 60)
    if rc == 3:
        raise _not_ours(device, out.strip() or remote_dir)
    if rc != 0:
        raise DeviceError(f"Cannot create {staging} on {device.where}: {err.strip()}", hint="Pass another remote dir.")
    free = _free_bytes(t, staging)
    if free is not None and free < need:
        t.run(["rm", "-rf", staging], 60)
        raise DeviceError(
            f"No space on {device.where}: the bundle needs {need / 1e6:.2f} MB in {remote_dir}, "
            f"{free / 1e6:.2f} MB are free.",
            hint="Free space there or pass another remote dir.",
        )
    try:
        t.put(pairs)
    except Exception as e:  # OSError, DeviceError, asyncssh.SFTPError (SFTP v3 reports ENOSPC as a bare "Failure")
        free = _free_bytes(t, staging)
        t.run(["rm", "-rf", staging], 60)
        if free is not None and free < 64 * 1024:
            raise DeviceError(
                f"No space on {device.where}: the copy to {remote_dir} ran out of room ({need / 1e6:.2f} MB needed).",
                hint="Free space there or pass another remote dir.",
            ) from None
        raise DeviceError(f"Copying the bundle to {device.where} failed: {e}.") from None
    rc, out, err = t.run(["sh", "-c", _COMMIT, "sh", remote_dir, staging, MARKER, old], 120)
    if rc == 3:
        t.run(["rm", "-rf", staging], 60)
        raise _not_ours(device, out.strip() or remote_dir)
    if rc != 0:
        raise DeviceError(f"Cannot move the bundle into {remote_dir} on {device.where}: {err.strip()}")
    return len(pairs), need


def _engine_on_device(
    t: _Transport,
    device: DeviceURL,
    interpreter: list[str],
    runner: str,
    remote_dir: str,
    manifest: dict,
    timeout: float,
) -> dict | None:
    """TensorRT bundles: build the engine on the device from the bundle's plan unless its cache has it (runner.py
    --engine; the cache sits beside the bundle, so a redeploy keeps it). None for other runtimes."""
    if manifest.get("runtime") != "tensorrt" or "build_plan.json" not in manifest["files"]:
        return None
    rc, out, err = t.run([*interpreter, runner, remote_dir, "--engine"], timeout)
    try:
        state = json.loads(out)
    except ValueError:
        last = (err.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        raise DeviceError(f"runner.py --engine failed on {device.where} (exit {rc}): {last}") from None
    if state.get("error"):
        raise DeviceError(f"Building the TensorRT engine on {device.where} failed: {state['error']}")
    return state


def engine_line(engine: dict) -> str:
    """One line on a TensorRT bundle's engine on the device."""
    if engine.get("built"):
        return f"engine: built into {engine['dir']}."
    if engine.get("cached"):
        return f"engine: cached in {engine['dir']} (key {engine['key']})."
    return f"engine: not built ({engine.get('skipped')})."


def _deploy(
    t: _Transport, device: DeviceURL, bundle: Path, manifest: dict, remote_dir: str | None, python: str, timeout: float
) -> DeployResult:
    start = time.perf_counter()
    in_place = device.scheme == "local" and remote_dir is None
    if in_place:
        remote_dir, runner = str(bundle.resolve()), str(RUNNER)  # edgepipe's own runner, in edgepipe's package
    else:
        remote_dir = _check_remote_dir(remote_dir) if remote_dir else _default_remote_dir(device, manifest)
        runner = _runner_path(remote_dir)
    interpreter = _interpreter(t, device, python)
    manifest_sha = _runner.sha256_file(str(bundle / "manifest.json"))
    files, nbytes, copied = 0, 0, False
    rc, report, err = _run_verify(t, interpreter, runner, remote_dir, timeout)
    for force in (False, True):  # a runner directory of this id that does not verify is replaced
        if in_place or _runner_current(report):
            break
        _install_runner(t, device, runner, force)
        rc, report, err = _run_verify(t, interpreter, runner, remote_dir, timeout)
    current = (
        report is not None
        and not report["files"]["problems"]
        and report["manifest_sha256"] == manifest_sha
        and (in_place or report.get("deployment"))
    )
    if not current and not in_place:
        files, nbytes = _copy(t, device, bundle, manifest, remote_dir)
        copied = True
        rc, report, err = _run_verify(t, interpreter, runner, remote_dir, timeout)
    if report is None:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise DeviceError(f"runner.py --verify failed on {device.where} (exit {rc}): {last}")
    engine = _engine_on_device(t, device, interpreter, runner, remote_dir, manifest, timeout)
    try:
        _raise_for_report(report, device, python, manifest)
    except DeviceError as e:
        if engine is not None:  # say what became of the engine cache too
            e.hint = f"{e.hint or ''} {engine_line(engine)}".strip()
        raise
    if not _runner_current(report) or report["manifest_sha256"] != manifest_sha:
        which = "runner.py" if not _runner_current(report) else "manifest.json"
        raise DeviceError(
            f"The {which} on {device.where} is not the one deployed (sha256 differs) in {remote_dir}.",
            hint="Something on the device changed it; deploy again and check who else writes there.",
        )
    return DeployResult(
        url=device.url,
        remote_dir=remote_dir,
        runner=runner,
        python=python,
        python_version=report["python"]["version"],
        runtime=report["runtime"]["name"],
        runtime_version=report["runtime"]["version"],
        copied=copied,
        files=files,
        bytes=nbytes,
        seconds=time.perf_counter() - start,
        verify=report,
        engine=engine,
    )


def deploy(
    bundle_dir: Path,
    url: str,
    *,
    insecure_host_key: bool = False,
    known_hosts: Path | None = None,
    identity_file: Path | None = None,
    remote_dir: str | None = None,
    python: str | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    run_timeout: float = RUN_TIMEOUT_S,
) -> DeployResult:
    """Copy a bundle and runner.py to a device and prove it can run there.

    Args:
        bundle_dir: A bundle written by ``edgepipe build`` (manifest.json, model file, check.npz).
        url: ``local``, ``ssh://user@host[:port]`` or ``adb://serial``.
        insecure_host_key: Skip the host key check (lab devices only).
        known_hosts: known_hosts file to check the host key against (default ~/.ssh/known_hosts).
        identity_file: Private key to log in with (default: ssh-agent and ~/.ssh/id_*).
        remote_dir: Where the bundle goes (ssh default: ~/edgepipe/<model>/<target>; local default: in place).
        python: The device's interpreter (default ``python3``; ``local``: this interpreter).
        timeout: Seconds to reach the device and log in.
        run_timeout: Seconds any one command on the device may take.

    Returns:
        What was copied and the device's verify report.

    Raises:
        UsageError: A bad device URL.
        BundleError: The local bundle does not match its manifest (nothing is copied).
        DeviceError: Unreachable, host key, auth, no space, sha256 mismatch on the device, missing runtime.
    """
    device = DeviceURL.parse(url)
    bundle = Path(bundle_dir)
    manifest = _local_bundle(bundle)
    python = python or (sys.executable if device.scheme == "local" else "python3")
    with _connect(
        device,
        known_hosts=known_hosts,
        insecure_host_key=insecure_host_key,
        identity_file=identity_file,
        timeout=timeout,
    ) as t:
        return _deploy(t, device, bundle, manifest, remote_dir, python, run_timeout)


# ----------------------------------------------------------------------------------------------- bench


def check_tolerance(manifest: dict) -> dict:
    """The check tolerance edgepipe's own table (precisions.py) gives the bundle's plan and family, never the
    manifest's: a bundle from elsewhere could loosen its own.

    Raises:
        BundleError: The manifest names a plan the table has no tolerance for.
    """
    family, precision = _runner.bench_kind(manifest), manifest.get("precision")
    try:
        return _plan_tolerance(precision, family)
    except (KeyError, TypeError):
        raise BundleError(
            f"The bundle's manifest names precision {precision!r}, which has no {family} check tolerance in "
            "edgepipe's table.",
            hint="Rebuild the bundle with `edgepipe build`.",
        ) from None


def result_name(manifest: dict, device: DeviceURL, when: datetime.datetime) -> str:
    """``<model>__<target>__<device>__<UTC time>.json``, safe as a file name."""
    parts = [str(manifest.get("model", "model")), _target_name(manifest), device.slug, when.strftime("%Y%m%dT%H%M%SZ")]
    return "__".join(re.sub(r"[^A-Za-z0-9._@-]+", "-", p) for p in parts) + ".json"


def _bench_native(bundle, device, manifest, when, results_dir, runner, runs, warmup, *unsupported) -> Path:
    """bench --runner native (harness/native.py): this machine only so far."""
    from edgepipe.harness import native

    if runner != "native":
        raise UsageError(f"Unknown runner {runner!r}.", hint="Accepted: python, native.")
    if device.scheme != "local":
        raise UsageError(
            f"--runner native runs on --device local only so far, not {device.url}.",
            hint="Use the Python runner there (drop --runner native).",
        )
    names = ("batch", "seq", "threads", "context", "profile")
    tolerance = check_tolerance(manifest)  # edgepipe's table, as for the Python runner
    record = native.bench_local(bundle, runs=runs, warmup=warmup, tolerance=tolerance, **dict(zip(names, unsupported)))
    results_dir.mkdir(parents=True, exist_ok=True)
    final = results_dir / result_name(manifest, device, when)
    partial = results_dir / f".{final.name}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(partial, final)
    return final


def bench(
    bundle_dir: Path,
    url: str,
    *,
    runs: int = 50,
    warmup: int = 10,
    batch: int | None = None,
    seq: int | None = None,
    threads: int | None = None,
    context: str | None = None,
    profile: bool = False,
    runner: str = "python",
    results_dir: Path = Path("results"),
    deploy_first: bool = True,
    insecure_host_key: bool = False,
    known_hosts: Path | None = None,
    identity_file: Path | None = None,
    remote_dir: str | None = None,
    python: str | None = None,
    timeout: float = CONNECT_TIMEOUT_S,
    run_timeout: float = RUN_TIMEOUT_S,
) -> Path:
    """Run the benchmark on a device and fetch its ``edgepipe.bench/1`` JSON into ``results_dir``.

    Args:
        bundle_dir: The local bundle (its manifest names the result file).
        url: ``local``, ``ssh://user@host[:port]`` or ``adb://serial``.
        runs, warmup, batch, seq, threads: Passed to runner.py (see its --help).
        context: Decoders: comma-separated context lengths to time decode at (runner.py --context).
        profile: Per-op times from the runtime's own profiler after the timed runs (runner.py --profile).
        runner: "python" (runner.py on the device) or "native" (edgepipe's C++ runner, harness/native.py; local only).
        results_dir: Where the JSON lands, as ``<model>__<target>__<device>__<time>.json``.
        deploy_first: Deploy (a no-op when the device already holds this bundle) before running.
        Others: As for :func:`deploy`.

    Returns:
        The path of the result JSON. A failed output check still returns it (``check.passed`` is false).

    Raises:
        DeviceError: As for deploy, or the runner failed on the device (its last error line is quoted).
    """
    device = DeviceURL.parse(url)
    bundle = Path(bundle_dir)
    manifest = _local_bundle(bundle)
    python = python or (sys.executable if device.scheme == "local" else "python3")
    results_dir = Path(results_dir)
    when = datetime.datetime.now(datetime.UTC)
    if runner != "python":
        return _bench_native(
            bundle, device, manifest, when, results_dir, runner, runs, warmup, batch, seq, threads, context, profile
        )
    with _connect(
        device,
        known_hosts=known_hosts,
        insecure_host_key=insecure_host_key,
        identity_file=identity_file,
        timeout=timeout,
    ) as t:
        if deploy_first:
            deployed = _deploy(t, device, bundle, manifest, remote_dir, python, run_timeout)
            remote_dir, runner = deployed.remote_dir, deployed.runner
        elif device.scheme == "local" and remote_dir is None:
            remote_dir, runner = str(bundle.resolve()), str(RUNNER)
        else:
            remote_dir = _check_remote_dir(remote_dir) if remote_dir else _default_remote_dir(device, manifest)
            runner = _runner_path(remote_dir)
        interpreter = _interpreter(t, device, python)
        stamp = when.strftime("%Y%m%dT%H%M%S%fZ")
        # beside the bundle on a device; in the temp dir here, so a read-only artifacts/ still benches
        remote_json = (
            os.path.join(tempfile.gettempdir(), f"edgepipe-bench-{os.getpid()}-{stamp}.json")
            if device.scheme == "local"
            else f"{remote_dir}.bench-{stamp}.json"
        )
        argv = [*interpreter, runner, remote_dir, "--runs", str(runs), "--warmup", str(warmup), "--json", remote_json]
        argv += ["--tolerance", json.dumps(check_tolerance(manifest))]
        for flag, value in (("--batch", batch), ("--seq", seq), ("--threads", threads), ("--context", context)):
            if value is not None:
                argv += [flag, str(value)]
        if profile:
            argv.append("--profile")
        rc, _, err = t.run(argv, run_timeout)
        last = (err.strip().splitlines() or ["no output"])[-1].removeprefix("error: ")
        if rc == _runner.EXIT_USAGE:
            raise UsageError(f"runner.py on {device.where} refused the request: {last}")
        if rc == _runner.EXIT_BAD_FILES:
            raise DeviceError(
                f"The bundle on {device.where} failed its check: {last}",
                hint="Deploy again (bench deploys first unless told not to).",
            )
        if rc == _runner.EXIT_MISSING_RUNTIME:
            raise DeviceError(f"The runtime cannot run on {device.where}: {last}")
        if rc not in (_runner.EXIT_OK, _runner.EXIT_CHECK_FAILED):
            raise DeviceError(f"runner.py failed on {device.where} (exit {rc}): {last}")
        results_dir.mkdir(parents=True, exist_ok=True)
        final = results_dir / result_name(manifest, device, when)
        for n in range(2, 1000):  # two runs in one second keep both results
            if not final.exists():
                break
            final = final.with_name(f"{result_name(manifest, device, when)[:-5]}-{n}.json")
        partial = results_dir / f".{final.name}.partial"
        try:
            t.get(remote_json, partial)
            record = json.loads(partial.read_text())
            if not isinstance(record, dict) or record.get("schema") != _runner.SCHEMA:
                raise DeviceError(f"{device.where} returned a result that is not {_runner.SCHEMA}.")
            record["device"]["url"] = device.url
            partial.write_text(json.dumps(record, indent=1) + "\n")
            os.replace(partial, final)
        finally:
            partial.unlink(missing_ok=True)
            t.run(["rm", "-f", remote_json], 60)
    return final
