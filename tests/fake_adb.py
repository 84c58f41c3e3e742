"""A stand-in for Android's ``adb``: one attached "device" whose storage is a directory on this machine.

Installed as an executable named ``adb`` on PATH (``install(bin_dir, device_root, serial)``), it answers the calls
``harness.remote._AdbTransport`` makes, the way platform-tools does: ``devices``, ``-s SERIAL get-state``,
``-s SERIAL shell CMD`` (CMD run by ``sh`` on this machine), ``push`` and ``pull``. Device paths are rooted in the
directory (``/data/local/tmp/x`` -> ``DEVICE_ROOT/data/local/tmp/x``); everything else runs for real, so the deploy
code under test copies, verifies and benchmarks exactly as it would on a phone with a Python on it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

DEVICE_PREFIX = "/data/local/tmp"


def install(bin_dir: Path, device_root: Path, serial: str) -> Path:
    """Write ``bin_dir/adb`` (this file, run by this interpreter) for a device ``serial`` kept in ``device_root``."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (device_root / DEVICE_PREFIX.lstrip("/")).mkdir(parents=True, exist_ok=True)
    adb = bin_dir / "adb"
    adb.write_text(
        f"#!{sys.executable}\nimport sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"import fake_adb\nsys.exit(fake_adb.main(sys.argv[1:], {str(device_root)!r}, {serial!r}))\n"
    )
    adb.chmod(adb.stat().st_mode | stat.S_IXUSR)
    return adb


def _on_device(root: str, text: str) -> str:
    return text.replace(DEVICE_PREFIX, root + DEVICE_PREFIX)


def main(argv: list[str], root: str, serial: str) -> int:
    if argv == ["devices"]:
        print(f"List of devices attached\n{serial}\tdevice\n")
        return 0
    if len(argv) < 3 or argv[0] != "-s":
        print(f"fake adb: unexpected arguments {argv}", file=sys.stderr)
        return 1
    if argv[1] != serial:
        print(f"error: device '{argv[1]}' not found", file=sys.stderr)
        return 1
    command, args = argv[2], argv[3:]
    if command == "get-state":
        print("device")
        return 0
    if command == "shell":  # adb hands the one string to the device's sh
        done = subprocess.run(["sh", "-c", _on_device(root, " ".join(args))], capture_output=True, text=True)
        sys.stdout.write(done.stdout.replace(root, ""))
        sys.stderr.write(done.stderr.replace(root, ""))
        return done.returncode
    if command in ("push", "pull") and len(args) == 2:
        src, dst = args if command == "push" else (_on_device(root, args[0]), args[1])
        dst = _on_device(root, dst) if command == "push" else dst
        if not os.path.exists(src):
            print(f"adb: error: cannot stat '{args[0]}': No such file or directory", file=sys.stderr)
            return 1
        shutil.copyfile(src, dst)
        print(f"{args[0]}: 1 file {command}ed.")
        return 0
    print(f"fake adb: unknown command {command}", file=sys.stderr)
    return 1
