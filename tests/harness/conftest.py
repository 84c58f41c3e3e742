"""The real OpenSSH server on 127.0.0.1 that the remote-harness tests deploy to (one per test module)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

try:
    from sshd import SshServer
except ImportError:  # tests/ imported as a package
    from tests.sshd import SshServer


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshServer]:
    pytest.importorskip("asyncssh", reason="asyncssh is the `remote` extra")
    reason = SshServer.unavailable()
    if reason:
        pytest.skip(f"cannot start sshd: {reason}")
    server = SshServer(tmp_path_factory.mktemp("sshd"))
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot start sshd: {e}")
    yield server
    server.stop()
