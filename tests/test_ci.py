""".ci/counted.py: CI says how many tests a suite ran and fails one in which nothing passed (Ethos-U all skipped)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

COUNTED = Path(__file__).resolve().parent.parent / ".ci" / "counted.py"


def _suite(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_suite.py").write_text("import pytest\n\n" + body)
    return subprocess.run(
        [sys.executable, str(COUNTED), "ethos-u", "-q", str(tmp_path / "test_suite.py")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )


def test_a_suite_in_which_every_test_skips_fails_ci(tmp_path):
    done = _suite(tmp_path, "@pytest.mark.skip(reason='no ethos-u extra')\ndef test_a():\n    pass\n")
    assert done.returncode == 1
    assert "ethos-u: 1 tests, 0 passed, 1 skipped, 0 failed, 0 errors" in done.stdout
    assert "no test passed" in done.stderr


def test_a_suite_that_collects_nothing_fails_ci(tmp_path):
    done = _suite(tmp_path, "def helper():\n    pass\n")
    assert done.returncode != 0 and "0 passed" in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("body", "code"), [("def test_a():\n    assert True\n", 0), ("def test_a():\n    assert 0\n", 1)]
)
def test_a_suite_that_ran_reports_its_counts_and_pytests_exit_code(tmp_path, body, code):
    done = _suite(tmp_path, body + "\n@pytest.mark.skip\ndef test_b():\n    pass\n")
    assert done.returncode == code
    passed = 1 - code
    assert f"ethos-u: 2 tests, {passed} passed, 1 skipped, {code} failed, 0 errors" in done.stdout
