"""Run pytest and say how many tests ran; fail when the suite failed or when nothing passed.

A suite whose tests all skip (a missing extra, a marker that selects nothing) exits 0 under plain pytest, so CI
would stay green having checked nothing. Usage (any pytest arguments after the label):

    python .ci/counted.py ethos-u -m slow -k ethos tests/runtimes/test_executorch.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def counts(junit: Path) -> dict[str, int]:
    """tests, failures, errors and skipped summed over the junit XML's test suites; passed = the rest."""
    root = ET.parse(junit).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    total = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    total["passed"] = total["tests"] - total["failures"] - total["errors"] - total["skipped"]
    return total


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    label, args = argv[0], argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        code = subprocess.call([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", f"--junitxml={junit}", *args])
        if not junit.is_file():
            print(f"{label}: pytest wrote no report (exit {code})", file=sys.stderr)
            return code or 1
        c = counts(junit)
    print(
        f"{label}: {c['tests']} tests, {c['passed']} passed, {c['skipped']} skipped, {c['failures']} failed, "
        f"{c['errors']} errors"
    )
    if code != 0:
        return code
    if c["passed"] == 0:
        print(f"{label}: no test passed (all {c['tests']} skipped or none collected): failing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
