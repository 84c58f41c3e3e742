"""Regenerate the README's benchmark tables from the records in benchmarks/ (``scripts/bench_*.py --json``).

A table sits between two marker comments in README.md:

    <!-- table:bench_precision -->
    (generated: the record it comes from, the CPU it ran on, the command, then the table)
    <!-- /table -->

``table:SCRIPT`` takes the newest record (by its ``finished`` time) of ``benchmarks/SCRIPT-*.json``;
``table:SCRIPT:WHAT`` the newest of ``benchmarks/SCRIPT-*-WHAT.json`` (one script, several tables: e.g.
``bench_student:stream``). Every figure is computed here from the record's raw timings. A block with no record yet
is left as it is and listed; nothing is invented.

    python scripts/tables.py                 # rewrite README.md's tables in place
    python scripts/tables.py --check         # exit 1 if a table is not what its record gives (or has no record)
"""

from __future__ import annotations

import argparse
import re
import shlex
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from benchrecord import ROOT, load

MARKER = re.compile(r"<!-- table:(?P<spec>[\w:.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


def median(ms: list[float]) -> float:
    return statistics.median(ms)


def fmt_ms(ms: float) -> str:
    return f"{ms:.1f}" if ms >= 100 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> list[str]:
    align = ["---" if i < numeric_from else "---:" for i in range(len(head))]
    return [f"| {' | '.join(head)} |", f"| {' | '.join(align)} |", *(f"| {' | '.join(r)} |" for r in rows)]


def citation(path: Path, rec: dict) -> str:
    """Where a table comes from: the record file, the machine, the commit and the exact command."""
    cpu, git = rec["machine"]["cpu"], rec["git"]
    ident = cpu.get("id") or {}
    family = ", ".join(f"{k} {v}" for k, v in ident.items() if k in ("cpu family", "model", "CPU part"))
    flags = " ".join(cpu.get("flags") or []) or "no listed kernel flags"
    commit = (git.get("commit") or "unknown")[:10] + (" (dirty tree)" if git.get("dirty") else "")
    command = shlex.join(["python", *rec["command"][1:]])
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return (
        f"Record [`{path.name}`]({rel}): {cpu['model']} ({family}; {flags}), {cpu['cores_available']} of "
        f"{cpu['cores_logical']} cores, {rec['machine'].get('memory_gib')} GiB; commit {commit}, "
        f"{rec.get('finished', rec['started'])[:10]}; `{command}`"
    )


# -- one renderer per script: rows of the record -> markdown lines -------------------------------------------------


def bench_precision(rec: dict) -> list[str]:
    budget = rec["settings"].get("fidelity_budget")
    rows = []
    for r in rec["rows"]:
        if "error" in r:
            rows.append([r["runtime"], r["plan"], "-", "-", f"failed: {r['error'][:60]}", "-", "-"])
            continue
        by = {shape: median(ms) for shape, ms in (r.get("ms_by_shape") or {}).items()}
        drop = r["drop_vs_fp32_model"]
        over = " (over budget)" if budget is not None and drop > budget else ""
        cov = r.get("int8_coverage")
        rows.append(
            [
                r["runtime"],
                r["plan"],
                fmt_ms(by["1x128"]) if "1x128" in by else "",
                fmt_ms(by["1x512"]) if "1x512" in by else "",
                f"{drop:.4f}{over}",
                f"{cov:.0%}" if isinstance(cov, int | float) else "-",
                f"{r['bytes'] / 1e6:.1f}",
            ]
        )
    head = ["runtime", "plan", "ms 1x128", "ms 1x512", "drop", "int8 share of GEMM FLOPs", "MB"]
    runs = rec["settings"].get("timed_runs")
    return [
        f"Median of {runs} timed runs per shape; drop = 1 - held-back mean cosine vs the unquantized model "
        f"(budget {budget}); no ms: not timed on this machine.",
        "",
        *table(head, rows, numeric_from=2),
    ]


def bench_student(rec: dict) -> list[str]:
    by: dict[str, dict] = {}
    for r in rec["rows"]:
        by.setdefault(r["name"], {})[r["seq"]] = r
    anchor = {seq: median(r["ms"]) for name, rs in by.items() if name.startswith("anchor") for seq, r in rs.items()}
    rows = []
    for name, rs in by.items():
        first = next(iter(rs.values()))
        cells = [first.get("point", name), first.get("precision", "int8-dynamic")]
        for seq in (128, 512):
            if seq in rs:
                ms = median(rs[seq]["ms"])
                cells += [fmt_ms(ms), f"{anchor[seq] / ms:.2f}"]
            else:
                cells += ["-", "-"]
        cos = [f"{first[k]:.3f}" if k in first else "-" for k in ("mean_cosine", "min_cosine")]
        rows.append(cells + cos)
    head = ["point", "precision", "ms 1x128", "vs anchor", "ms 1x512", "vs anchor", "mean cos", "min cos"]
    n = len(next(iter(by.values()))[128]["ms"]) if by else 0
    return [
        f"Median of {n} timed runs per shape, interleaved with the anchor (ORT int8-dynamic on the teacher) in this "
        "run; vs anchor = anchor ms / row ms; cosine: held-back, vs the teacher.",
        "",
        *table(head, rows, numeric_from=2),
    ]


def bench_attention(rec: dict) -> list[str]:
    best: dict[tuple, dict] = {}
    for r in rec["rows"]:
        key = (r["runtime"], r["scope"], r["form"], r["n"])
        if key not in best or median(r["ms"]) < median(best[key]["ms"]):
            best[key] = r
    rows = []
    for runtime, scope, n in sorted({(k[0], k[1], k[3]) for k in best}, key=lambda k: (k[0], k[1], k[2])):
        full = best.get((runtime, scope, "full", n))
        cells = [runtime, scope, str(n)]
        cells.append(f"{fmt_ms(median(full['ms']))} ({full['variant']})" if full else "-")
        for form in ("windowed", "linear"):
            r = best.get((runtime, scope, form, n))
            if r is None or full is None:
                cells += ["-", "-"]
                continue
            speed, ratio = median(full["ms"]) / median(r["ms"]), full["gflop"] / r["gflop"]
            cells += [fmt_ms(median(r["ms"])), f"{speed:.2f}x of {ratio:.2f}x"]
        rates = [
            r["gflop"] / median(r["ms"]) * 1e3 for f in ("full", "windowed") if (r := best.get((runtime, scope, f, n)))
        ]
        cells.append(" / ".join(f"{x:.1f}" if x < 10 else f"{x:.0f}" for x in rates) or "-")
        rows.append(cells)
    head = ["runtime", "scope", "n", "full ms (variant)", "windowed ms", "full / windowed (FLOP ratio)"]
    head += ["linear ms", "full / linear (FLOP ratio)", "GFLOP/s full / windowed"]
    s = rec["settings"]
    return [
        f"Window {s['window']}, hidden {s['hidden']}, {s['heads']} heads, FFN {s['ffn']}, batch 1, {s['threads']} "
        f"threads; median of {s['rounds'] * s['repeats']} timed calls per variant, the fastest full variant per n. "
        "The FLOP ratio counts matmuls only: full attention's (heads, n, n) softmax is not in it.",
        "",
        *table(head, rows, numeric_from=2),
    ]


def bench_decode(rec: dict) -> list[str]:
    contexts = sorted({r["context"] for r in rec["rows"]})
    by = {(r["runtime"], r["form"], r["context"]): r for r in rec["rows"]}
    rows, notes = [], []
    for runtime in dict.fromkeys(r["runtime"] for r in rec["rows"]):
        for form in dict.fromkeys(r["form"] for r in rec["rows"]):
            pts = [by.get((runtime, form, c)) for c in contexts]
            if not any(pts):
                continue
            state = " / ".join(dict.fromkeys(f"{p['state_bytes'] / 2**20:.2f}" for p in pts if p))
            rows.append([runtime, form, state, *(fmt_ms(median(p["ms"])) if p else "-" for p in pts)])
        last = contexts[-1]
        full = by.get((runtime, "full", last))
        if full:
            ratios = [
                f"{form} {median(full['ms']) / median(p['ms']):.1f}x"
                for (rt, form, c), p in by.items()
                if rt == runtime and c == last and form != "full"
            ]
            notes.append(f"{runtime} at {last}: full attention's step costs " + ", ".join(ratios))
    s = rec["settings"]
    head = ["runtime", "form", "state MiB", *(f"ms @{c}" for c in contexts)]
    return [
        f"Median ms per decode step, {s['rounds'] * s['block']} timed steps per point, every point of a runtime "
        f"interleaved; caches filled by prefilling real text to each context; {s['threads']} thread(s).",
        "",
        *table(head, rows, numeric_from=3),
        "",
        "; ".join(notes) + "." if notes else "",
    ]


def bench_decoder(rec: dict) -> list[str]:
    contexts = sorted({r["context"] for r in rec["rows"]})
    last = contexts[-1]
    by = {(r["model"], r["precision"], r["runtime"], r["context"]): r for r in rec["rows"]}
    rows = []
    for model, precision, runtime in dict.fromkeys(k[:3] for k in by):
        pts = [by.get((model, precision, runtime, c)) for c in contexts]
        tps = [1e3 / median(p["ms"]) if p else None for p in pts]
        teacher = by.get(("teacher", "fp32", runtime, last))
        vs = f"{tps[-1] / (1e3 / median(teacher['ms'])):.2f}" if teacher and tps[-1] else "-"
        end = pts[-1] or next(p for p in pts if p)
        rows.append(
            [model, precision, runtime]
            + [f"{t:.1f}" if t else "-" for t in tps]
            + [vs, f"{end['cache_bytes'] / 2**20:.2f}", f"{end['ppl']:.1f}", f"{end['agreement']:.3f}"]
        )
    head = ["model", "precision", "runtime", *(f"tokens/s @{c}" for c in contexts), f"vs teacher @{last}"]
    head += [f"cache MiB @{last}", "perplexity", "top-1 vs teacher"]
    s = rec["settings"]
    return [
        f"Tokens/s of the median of {s['steps']} timed decode steps per configuration, interleaved; "
        f"{s['threads']} thread(s) per session; perplexity and top-1 teacher-forced on held-back text.",
        "",
        *table(head, rows, numeric_from=3),
    ]


def bench_runner_overhead(rec: dict) -> list[str]:
    rows = [
        [r["loop"], fmt_ms(median(r["block_p50_ms"])), " ".join(fmt_ms(x) for x in r["block_p50_ms"])]
        for r in rec["rows"]
    ]
    s = rec["settings"]
    return [
        f"{s['model']}, inputs {s['inputs']}: {s['rounds']} alternating blocks of {s['runs']} runs; paired ratio "
        f"runner / bare {s['paired_ratio']:.4f} (goal: within 1.05).",
        "",
        *table(["loop", "p50 ms (median of blocks)", "block p50s"], rows),
    ]


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    f.__name__: f
    for f in (bench_precision, bench_student, bench_attention, bench_decode, bench_decoder, bench_runner_overhead)
}


def find_record(spec: str, records: Path) -> Path | None:
    """The newest record for ``SCRIPT`` or ``SCRIPT:WHAT`` in ``records``, by its ``finished`` time."""
    script, _, what = spec.partition(":")
    pattern = f"{script}-*-{what}.json" if what else f"{script}-*.json"
    found = [(load(p).get("finished", ""), p) for p in records.glob(pattern)]
    return max(found)[1] if found else None


def render(spec: str, records: Path) -> str | None:
    """The block for ``spec`` from its newest record, or None when there is none yet."""
    script = spec.partition(":")[0]
    if script not in RENDERERS:
        raise SystemExit(f"README marker table:{spec}: no renderer for {script}; known: {', '.join(RENDERERS)}")
    path = find_record(spec, records)
    if path is None:
        return None
    rec = load(path)
    if rec["script"] != script:
        raise SystemExit(f"{path}: a record of {rec['script']}, the marker asks for {script}")
    lines = [citation(path, rec), "", *RENDERERS[script](rec)]
    return "\n".join(lines).rstrip() + "\n"


def regenerate(text: str, records: Path) -> tuple[str, list[str]]:
    """``text`` with every marked block rendered from its record; and the specs that have no record yet."""
    missing = []

    def block(m: re.Match) -> str:
        body = render(m["spec"], records)
        if body is None:
            missing.append(m["spec"])
            return m[0]
        return f"<!-- table:{m['spec']} -->\n{body}<!-- /table -->"

    return MARKER.sub(block, text), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--records", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is stale or unbacked")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    new, missing = regenerate(text, args.records)
    for spec in missing:
        print(f"table:{spec}: no record in {args.records} yet; left as it is", file=sys.stderr)
    if args.check:
        stale = new != text
        if stale:
            print(f"{args.readme}: tables differ from their records; run python scripts/tables.py", file=sys.stderr)
        return 1 if stale or missing else 0
    if new != text:
        args.readme.write_text(new, encoding="utf-8")
        print(f"wrote {args.readme} ({len(MARKER.findall(text)) - len(missing)} tables from records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
