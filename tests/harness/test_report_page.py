"""`edgepipe compare --html` in a real browser: Debian's Chromium, headless, driven by playwright.

The page is built from real runner results (tiny ONNX bundles timed in onnxruntime at two targets and three input
shapes). The test loads it, expects no console error, every plot image decoded (naturalWidth > 0) and a screenshot
written (to $EDGEPIPE_SCREENSHOT_DIR where set, else the test's temporary folder).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import cli
from edgepipe.harness import runner

try:
    from harness_fixtures import make_onnx_bundle
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = [
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(),
        reason="needs Debian's chromium (apt-get install -y chromium chromium-driver; .ci/run installs it)",
    ),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="needs playwright (the test extra)"),
    pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs matplotlib (the plot extra)"),
]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    """Four real results: two targets, three input shapes (check.npz's own 2 x 8, 1 x 16, 4 x 32)."""
    root = tmp_path_factory.mktemp("page")
    paths = []
    for target, shape in [("host-cpu", None), ("host-cpu", (1, 16)), ("x86-64-cpu", (1, 16)), ("x86-64-cpu", (4, 32))]:
        spec = {"name": target, "runtime": "onnxruntime", "precision": "fp32", "hardware": {}}
        bundle = make_onnx_bundle(root / f"{target}-{len(paths)}", target=spec)
        out = root / f"{len(paths)}.json"
        size = ["--batch", str(shape[0]), "--seq", str(shape[1])] if shape else []
        argv = [str(bundle), "--runs", "10", "--warmup", "2", "--threads", "1", *size, "--json", str(out)]
        assert runner.main(argv) == 0
        paths.append(out)
    return paths


def test_compare_page_renders_in_headless_chromium(results: list[Path], tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    page_file = tmp_path / "compare.html"
    run = CliRunner().invoke(cli, ["compare", *map(str, results), "--html", str(page_file)])
    assert run.exit_code == 0, run.output
    shots = Path(os.environ.get("EDGEPIPE_SCREENSHOT_DIR") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    screenshot = shots / "compare-page.png"
    problems: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.goto(page_file.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "imgs => imgs.map(i => ({alt: i.alt, done: i.complete, w: i.naturalWidth, h: i.naturalHeight}))"
            )
            rows = page.locator("tbody tr").count()
            title = page.title()
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    assert problems == []
    assert title == "edgepipe bench" and rows == len(results)
    assert [i["alt"] for i in images] == ["latency vs fidelity, per target", "latency per input shape"]
    assert all(i["done"] and i["w"] > 300 and i["h"] > 200 for i in images), images
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
