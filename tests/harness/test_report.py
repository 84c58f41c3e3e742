"""report.py on real runner results: table, CSV, HTML, plot, and one clear line for bad files."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
from rich.console import Console

from edgepipe.errors import UsageError
from edgepipe.harness import report, runner

try:
    from harness_fixtures import make_onnx_bundle
except ImportError:  # tests/ imported as a package
    from tests.harness_fixtures import make_onnx_bundle


@pytest.fixture(scope="module")
def result_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real results from runner.main (in-process): a passing check and a failing one."""
    root = tmp_path_factory.mktemp("results")
    good = make_onnx_bundle(root / "good")
    strict = make_onnx_bundle(root / "strict", validation={"atol": 1e-12})
    paths = [root / "good.json", root / "strict.json"]
    assert runner.main([str(good), "--runs", "20", "--warmup", "2", "--threads", "1", "--json", str(paths[0])]) == 0
    assert runner.main([str(strict), "--runs", "10", "--batch", "4", "--seq", "16", "--json", str(paths[1])]) == 3
    return paths


def test_compare_table_has_one_row_per_result(result_paths: list[Path]) -> None:
    results = report.load_results(result_paths)
    table = report.compare_table(results)
    assert table.row_count == 2
    assert [c.header for c in table.columns] == [h for h, _, _ in report.COLUMNS]
    console = Console(record=True, width=200)
    console.print(table)
    text = console.export_text()
    assert text.count("tiny-encoder") == 2 and "ok cos 1.0000" in text and "FAIL cos" in text
    p50 = results[0]["latency_ms"]["p50"]
    assert f"{p50:.3f}" in text


def test_row_values_come_from_the_json(result_paths: list[Path]) -> None:
    good, strict = report.load_results(result_paths)
    row = report.row(good)
    assert row["model"] == "tiny-encoder" and row["target"] == "host-cpu" and row["precision"] == "fp32"
    assert row["p50_ms"] == good["latency_ms"]["p50"] and row["p90_ms"] >= row["p50_ms"]
    assert row["size_mb"] == pytest.approx(good["bundle"]["files_bytes"] / 1e6)
    assert row["peak_rss_mb"] > 0 and row["items_per_s"] > 0
    assert row["power_w"] == good["power"]["mean_w"]  # None where the machine has no readable sensor
    assert report.row(strict)["fidelity"].startswith("FAIL")


def test_write_csv_and_html(result_paths: list[Path], tmp_path: Path) -> None:
    results = report.load_results(result_paths)
    results[1]["bundle"]["model"] = "<script>alert(1)</script>"
    with open(report.write_csv(results, tmp_path / "c.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and float(rows[0]["p50_ms"]) == pytest.approx(results[0]["latency_ms"]["p50"])
    assert rows[1]["source"].endswith("strict.json") and rows[1]["fidelity"].startswith("FAIL")
    page = report.write_html(results, tmp_path / "c.html").read_text()
    assert page.count("<tr") == 3 and "&lt;script&gt;" in page and "<script>" not in page
    assert 'class="fail"' in page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv", "c.html"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib (the `plot` extra) is absent")
def test_plot_writes_a_png(result_paths: list[Path], tmp_path: Path) -> None:
    out = report.plot(report.load_results(result_paths), tmp_path / "compare.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert [p.name for p in tmp_path.iterdir()] == ["compare.png"]


def test_load_results_names_the_bad_file(result_paths: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"schema": "edgepipe.bench/1", ')
    with pytest.raises(UsageError, match=r"broken.json is not valid JSON"):
        report.load_results([result_paths[0], broken])
    foreign = tmp_path / "foreign.json"
    foreign.write_text(json.dumps({"schema": "edgepipe.manifest/1"}))
    with pytest.raises(
        UsageError, match=r"foreign.json is not an edgepipe bench result \(schema 'edgepipe.manifest/1'"
    ):
        report.load_results([foreign])
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(UsageError, match=r"list.json is not an edgepipe bench result \(schema None"):
        report.load_results([listed])
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"schema": "edgepipe.bench/1", "bundle": {}}))
    with pytest.raises(UsageError, match=r"partial.json is an incomplete .* no device, latency_ms"):
        report.load_results([partial])
    with pytest.raises(UsageError, match=r"missing.json: no such file"):
        report.load_results([tmp_path / "missing.json"])
