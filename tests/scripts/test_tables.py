"""scripts/tables.py turns a record of a real (tiny) benchmark run into the README table that cites it."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
sys.path.insert(0, str(SCRIPTS))

import benchrecord  # noqa: E402
import tables  # noqa: E402


def _run(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(SCRIPTS / script), *args], capture_output=True, text=True, env=env)
    assert done.returncode in (0, 1), done.stderr
    return done


def test_tables_renders_the_record_of_a_real_smoke_run_and_cites_it(tmp_path):
    records = tmp_path / "benchmarks"
    record_path = records / "bench_runner_overhead-here-smoke.json"
    ran = _run("bench_runner_overhead.py", "--runs", "5", "--rounds", "2", "--json", str(record_path))
    assert ran.returncode == 0
    record = benchrecord.load(record_path)
    assert [r["loop"] for r in record["rows"]] == ["bare", "runner"] and all(len(r["ms"]) == 10 for r in record["rows"])
    assert record["git"]["commit"] and record["machine"]["cpu"] == benchrecord.cpu()

    readme = tmp_path / "README.md"
    earlier = "From an earlier machine, no record:\n\n| a | b |\n| --- | ---: |\n| x | 1.0 |\n"
    readme.write_text(
        "# t\n\n<!-- table:bench_runner_overhead:smoke -->\nstale\n<!-- /table -->\n\n"
        f"<!-- table:bench_precision -->\n{earlier}<!-- /table -->\n"
    )
    done = _run("tables.py", "--readme", str(readme), "--records", str(records))
    assert done.returncode == 0 and "table:bench_precision: no record" in done.stderr
    text = readme.read_text()
    block = re.search(r"<!-- table:bench_runner_overhead:smoke -->\n(.*?)<!-- /table -->", text, re.S)[1]
    cpu = record["machine"]["cpu"]
    first = block.splitlines()[0]
    assert first.startswith("Record [`bench_runner_overhead-here-smoke.json`]")
    assert cpu["model"] in first and f"{cpu['cores_available']} of {cpu['cores_logical']} cores" in first
    assert record["git"]["commit"][:10] in first and "--runs 5 --rounds 2" in first
    for row in record["rows"]:  # the medians follow from the record's raw figures
        p50 = tables.fmt_ms(statistics.median(row["block_p50_ms"]))
        assert f"| {row['loop']} | {p50} |" in block
    assert f"paired ratio runner / bare {record['settings']['paired_ratio']:.4f}" in block
    assert earlier in text and "stale" not in text  # a block without a record is left as it is

    assert _run("tables.py", "--readme", str(readme), "--records", str(records), "--check").returncode == 1  # unbacked
    readme.write_text(text.replace(f"<!-- table:bench_precision -->\n{earlier}<!-- /table -->\n", ""))
    assert _run("tables.py", "--readme", str(readme), "--records", str(records), "--check").returncode == 0
    readme.write_text(readme.read_text().replace("| bare |", "| bare | 0.001 |"))
    assert _run("tables.py", "--readme", str(readme), "--records", str(records), "--check").returncode == 1


def test_every_readme_table_marker_has_a_renderer_and_every_bench_script_writes_a_record():
    specs = tables.MARKER.findall((ROOT / "README.md").read_text())
    assert specs, "the README has no generated tables"
    assert {spec.partition(":")[0] for spec, _ in specs} <= set(tables.RENDERERS)
    for script in sorted(SCRIPTS.glob("bench_*.py")):
        if script.stem == "bench_default":  # kept by its own change
            continue
        source = script.read_text()
        assert re.search(r"from benchrecord import .*\bRecord\b", source) and '"--json"' in source, script.name


def test_a_marker_naming_an_unknown_script_is_one_clear_error(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table:bench_nothing -->\n<!-- /table -->\n")
    done = _run("tables.py", "--readme", str(readme), "--records", str(tmp_path))
    assert done.returncode == 1 and "no renderer for bench_nothing" in done.stderr and "Traceback" not in done.stderr
    assert json.dumps(readme.read_text()) == json.dumps("<!-- table:bench_nothing -->\n<!-- /table -->\n")
