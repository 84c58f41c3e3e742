"""A real OpenSSH server on 127.0.0.1 for the remote-harness tests.

Everything lives in one temp dir: host key, user key, authorized_keys, known_hosts (right and wrong), config and
log. sshd runs as the current user (root in CI, hence PermitRootLogin prohibit-password and StrictModes no) on a
free port, in the foreground, and is stopped by its own pid.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().split()[1]


class SshServer:
    """Start with `start()`, stop with `stop()`; `unavailable()` says why it cannot run here (or None)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.host, self.port, self.user = "127.0.0.1", free_port(), getpass.getuser()
        self.identity = root / "user_ed25519"
        self.known_hosts = root / "known_hosts"
        self.wrong_known_hosts = root / "known_hosts.wrong"
        self.log = root / "sshd.log"
        self._proc: subprocess.Popen | None = None

    @staticmethod
    def unavailable() -> str | None:
        if not os.path.isfile(SSHD):
            return f"no sshd at {SSHD} (apt-get install -y openssh-server)"
        if shutil.which("ssh-keygen") is None:
            return "no ssh-keygen (apt-get install -y openssh-client)"
        return None

    @property
    def url(self) -> str:
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> None:
        root = self.root
        host_key = root / "host_ed25519"
        host_pub = _keygen(host_key)
        _keygen(self.identity)
        wrong_pub = _keygen(root / "other_host_ed25519")
        (root / "authorized_keys").write_text(self.identity.with_suffix(".pub").read_text())
        self.known_hosts.write_text(f"[{self.host}]:{self.port} ssh-ed25519 {host_pub}\n")
        self.wrong_known_hosts.write_text(f"[{self.host}]:{self.port} ssh-ed25519 {wrong_pub}\n")
        config = root / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {host_key}",
                    f"PidFile {root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {root / 'authorized_keys'}",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 100",
                    "LogLevel VERBOSE",
                    "",
                ]
            )
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir the Debian unit creates
        with open(self.log, "wb") as log:  # the child keeps its own copy of the descriptor
            self._proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited with {self._proc.returncode}: {self.log.read_text()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    if s.recv(8).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"sshd did not answer on port {self.port} within {timeout:g} s: {self.log.read_text()[-500:]}"
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
