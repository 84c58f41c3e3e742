"""Many ``edgepipe.bench/1`` JSONs -> one comparison: a rich table, CSV, an HTML page with its plots, and a plot.

One row per result: model, target, device, precision, latency p50/p90, throughput, peak RSS, bundle size,
fidelity (the on-device check against check.npz; the build's cosine vs the teacher where the manifest has it) and
power where the device exposes it. Decoder rows time one decode step (p50/p90) and count generated tokens/s.

The HTML page (``write_html``) is one self-contained file: the table, then two plots embedded as PNG data URIs
(matplotlib, the ``plot`` extra): latency vs fidelity with one series per target, and p50 bars (p90 whiskers) per
input shape. No script runs in it.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

from rich.table import Table

from edgepipe.errors import MissingExtraError, UsageError

SCHEMA = "edgepipe.bench/1"
REQUIRED = ("bundle", "device", "latency_ms", "throughput", "memory", "check", "power", "env")

# (header, key in row(), format); the order is the table's, the CSV's and the HTML's.
COLUMNS = [
    ("model", "model", "{}"),
    ("target", "target", "{}"),
    ("device", "device", "{}"),
    ("precision", "precision", "{}"),
    ("p50 ms", "p50_ms", "{:.3f}"),
    ("p90 ms", "p90_ms", "{:.3f}"),
    ("items/s", "items_per_s", "{:.1f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("model MB", "model_peak_mb", "{:.1f}"),
    ("size MB", "size_mb", "{:.2f}"),
    ("fidelity", "fidelity", "{}"),
    ("cos vs teacher", "teacher_cos", "{:.4f}"),
    ("power W", "power_w", "{:.2f}"),
]


def load_results(paths: list[Path]) -> list[dict]:
    """Read bench results, in the order given.

    Raises:
        UsageError: A file is missing, not JSON, or not an edgepipe.bench/1 result (the message names it).
    """
    results = []
    for path in map(Path, paths):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file.", hint="Pass result JSONs written by `edgepipe bench`.") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise UsageError(
                f"{path} is not valid JSON ({e}).", hint="Pass result JSONs written by `edgepipe bench`."
            ) from None
        schema = record.get("schema") if isinstance(record, dict) else None
        if schema != SCHEMA:
            raise UsageError(
                f"{path} is not an edgepipe bench result (schema {schema!r}, expected {SCHEMA!r}).",
                hint="Pass result JSONs written by `edgepipe bench`.",
            )
        missing = [k for k in REQUIRED if not isinstance(record.get(k), dict)]
        if missing:
            raise UsageError(
                f"{path} is an incomplete {SCHEMA} result: no {', '.join(missing)}.",
                hint="Re-run `edgepipe bench`; the file may be truncated or hand-edited.",
            )
        record.setdefault("_path", str(path))
        results.append(record)
    return results


def row(result: dict) -> dict:
    """The flat values one result contributes to the table (None where unknown)."""
    bundle, lat, check = result["bundle"], result["latency_ms"], result["check"]
    device = result["device"].get("url") or result["device"].get("name") or result["env"].get("hostname")
    if device == "local":
        device = f"local ({result['env'].get('hostname')})"
    decoder = result.get("decoder") is not None
    if decoder and "token_agreement" in check:  # p50/p90 are decode steps; items/s are generated tokens/s
        fidelity = f"{'ok' if check.get('passed') else 'FAIL'} tokens {check['token_agreement']:.3f}"
    elif check.get("min_cosine") is None:
        fidelity = "FAIL" if check.get("passed") is False else None
    else:
        fidelity = f"{'ok' if check.get('passed') else 'FAIL'} cos {check['min_cosine']:.4f}"
    files_bytes = bundle.get("files_bytes")
    return {
        "model": bundle.get("model"),
        "target": bundle.get("target"),
        "device": device,
        "precision": bundle.get("precision"),
        "p50_ms": lat.get("p50"),
        "p90_ms": lat.get("p90"),
        "items_per_s": result["throughput"].get("tokens_per_s" if decoder else "items_per_s"),
        "peak_rss_mb": result["memory"].get("peak_rss_mb"),
        # the model's own peak: RSS above the idle baseline (runtime imported, nothing loaded), same run
        "model_peak_mb": result["memory"].get("model_peak_mb"),
        "size_mb": files_bytes / 1e6 if files_bytes is not None else None,
        "fidelity": fidelity,
        # build-time mean cosine of the lowered model vs the teacher, where the manifest records it
        "teacher_cos": ((bundle.get("fidelity") or {}).get("lowered") or {}).get("mean_cosine"),
        "power_w": result["power"].get("mean_w"),
    }


def _cell(fmt: str, value: object) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def compare_table(results: list[dict]) -> Table:
    """One rich table row per result, in the order given."""
    table = Table(title="edgepipe bench", header_style="bold")
    for header, key, _ in COLUMNS:
        numeric = key not in ("model", "target", "device", "precision", "fidelity")
        table.add_column(header, justify="right" if numeric else "left", no_wrap=key in ("p50_ms", "p90_ms"))
    for result in results:
        values = row(result)
        cells = [_cell(fmt, values[key]) for _, key, fmt in COLUMNS]
        style = "red" if result["check"].get("passed") is False else None
        table.add_row(*cells, style=style)
    return table


def _where(values: dict) -> str:
    return f"{values['model']} / {values['target']} / {values['device']}"


def profile_table(results: list[dict], types: int = 4) -> Table | None:
    """Where the time goes, per result that has a `profile` (bench --profile): the runtime's profiler, its mean
    run, the largest layer types with their share and the single slowest op. None when no result has one."""
    profiled = [r for r in results if r.get("profile")]
    if not profiled:
        return None
    table = Table(title="where the time goes (bench --profile)", header_style="bold")
    for header in ("bundle / device", "profiler", "run ms", "top layer types (share of op time)", "slowest op"):
        table.add_column(header, justify="right" if header == "run ms" else "left")
    for result in profiled:
        profile = result["profile"]
        top = ", ".join(
            f"{t['type']} {t['share']:.0%}" if t.get("share") is not None else t["type"]
            for t in profile.get("types", [])[:types]
        )
        op = (profile.get("top_ops") or [None])[0]
        slowest = f"{op['name']} ({op['type']}) {op['ms']:.3f} ms" if op else "-"
        table.add_row(
            _where(row(result)), profile.get("source", "?"), _cell("{:.3f}", profile.get("total_ms")), top, slowest
        )
    return table


def device_table(results: list[dict]) -> Table | None:
    """The same bundles side by side across devices (p50 ms, check): one row per model / target / precision, one
    column per device. None unless the results span more than one device."""
    rows = [row(r) for r in results]
    devices = list(dict.fromkeys(r["device"] for r in rows))
    if len(devices) < 2:
        return None
    table = Table(title="p50 ms per device", header_style="bold")
    table.add_column("model / target / precision")
    for device in devices:
        table.add_column(str(device), justify="right")
    cells: dict = {}
    for values in rows:
        key = f"{values['model']} / {values['target']} / {values['precision']}"
        mark = "" if values["fidelity"] is None or not str(values["fidelity"]).startswith("FAIL") else " FAIL"
        cells.setdefault(key, {})[values["device"]] = _cell("{:.3f}", values["p50_ms"]) + mark
    for key, by_device in cells.items():
        table.add_row(key, *(by_device.get(d, "-") for d in devices))
    return table


def extra_tables(results: list[dict]) -> list[Table]:
    """What follows the main table: the devices side by side, and the profiles (each only where it applies)."""
    return [t for t in (device_table(results), profile_table(results)) if t is not None]


def write_csv(results: list[dict], path: Path) -> Path:
    """The table's rows as CSV with unformatted numbers (empty where unknown)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([key for _, key, _ in COLUMNS] + ["p99_ms", "source"])
        for result in results:
            values = row(result)
            writer.writerow(
                [("" if values[k] is None else values[k]) for _, k, _ in COLUMNS]
                + [result["latency_ms"].get("p99"), result.get("_path", "")]
            )
    tmp.replace(path)
    return path


def write_html(results: list[dict], path: Path) -> Path:
    """A self-contained HTML page: the comparison table (every value escaped) and its plots (``page_figures``; a
    line saying matplotlib is missing where it is)."""
    path = Path(path)
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in COLUMNS)
    body = []
    for i, result in enumerate(results, start=1):
        values = row(result)
        failed = ' class="fail"' if result["check"].get("passed") is False else ""
        cells = "".join(f"<td>{html.escape(_cell(fmt, values[k]))}</td>" for _, k, fmt in COLUMNS)
        body.append(f"<tr{failed}><td>{i}</td>{cells}</tr>")
    try:
        figures = "\n".join(
            f'<figure><img alt="{html.escape(title)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode()}"><figcaption>{html.escape(title)}'
            "</figcaption></figure>"
            for title, png, (w, h) in page_figures(results)
        )
    except MissingExtraError as exc:
        figures = f"<p>{html.escape(exc.message)} {html.escape(exc.hint or '')}</p>"
    page = (
        '<!doctype html>\n<html><head><meta charset="utf-8"><title>edgepipe bench</title>\n'
        '<link rel="icon" href="data:,">\n<style>'
        "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"
        "td{text-align:right}td:nth-child(-n+5){text-align:left}tr.fail{background:#fdd}"
        "figure{display:inline-block;margin:16px 16px 0 0}img{max-width:100%;height:auto}</style></head>\n"
        f"<body><h1>edgepipe bench</h1>\n<table><thead><tr><th>#</th>{head}</tr></thead>\n<tbody>\n"
        + "\n".join(body)
        + f"\n</tbody></table>\n{figures}\n</body></html>\n"
    )
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path


def shape_label(result: dict) -> str:
    """The timed input shape of a result: ``batch x seq`` (encoders), ``decode @ context N`` (decoders)."""
    contexts = (result.get("decoder") or {}).get("contexts") or []
    if contexts:
        return f"decode @ context {contexts[0].get('context')}"
    shapes = [v.get("shape") for v in (result.get("inputs") or {}).values() if isinstance(v, dict)]
    return " x ".join(map(str, shapes[0])) if shapes and shapes[0] else "?"


def _png(fig) -> tuple[bytes, tuple[int, int]]:
    buf = io.BytesIO()
    dpi = 100
    fig.savefig(buf, format="png", dpi=dpi)
    w, h = fig.get_size_inches()
    return buf.getvalue(), (int(w * dpi), int(h * dpi))


def page_figures(results: list[dict]) -> list[tuple[str, bytes, tuple[int, int]]]:
    """The HTML page's plots as (title, PNG bytes, (width, height) px): latency vs fidelity per target, and p50 per
    input shape (bars; whiskers to p90). Points and bars are numbered by table row.

    Fidelity is the build's mean cosine vs the teacher where the manifest has it, else the on-device check's min
    cosine against check.npz (the axis label says which the page shows).

    Raises:
        MissingExtraError: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingExtraError("matplotlib (for the plots of --html)", "plot") from None
    rows = [row(r) for r in results]
    teacher = any(r["teacher_cos"] is not None for r in rows)
    by_target: dict[str, list[tuple[float, float, int]]] = {}
    for i, (r, res) in enumerate(zip(rows, results), start=1):
        fid = r["teacher_cos"] if teacher else res["check"].get("min_cosine")
        if fid is not None and r["p50_ms"] is not None:
            by_target.setdefault(str(r["target"]), []).append((r["p50_ms"], fid, i))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for target, points in by_target.items():
        ax.scatter([p[0] for p in points], [p[1] for p in points], label=target, s=40)
        for x, y, i in points:
            ax.annotate(str(i), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if by_target:
        ax.legend(title="target", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no result has both a latency and a fidelity", ha="center", transform=ax.transAxes)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("p50 latency, ms")
    ax.set_ylabel("mean cosine vs teacher (build)" if teacher else "min cosine vs check.npz (on device)")
    ax.set_title("latency vs fidelity, per target")
    fig.tight_layout()
    scatter = _png(fig)

    shapes = list(dict.fromkeys(shape_label(r) for r in results))
    fig = Figure(figsize=(max(9, 1.2 * len(results) + 5), 4.5))
    ax = fig.subplots()
    width = 0.8 / max(1, max(sum(shape_label(r) == s for r in results) for s in shapes))
    for x, shape in enumerate(shapes):
        members = [i for i, r in enumerate(results) if shape_label(r) == shape]
        for j, i in enumerate(members):
            p50, p90 = rows[i]["p50_ms"] or 0.0, rows[i]["p90_ms"] or 0.0
            pos = x + width * (j - (len(members) - 1) / 2)
            label = f"{i + 1}: {rows[i]['model']} / {rows[i]['target']} / {rows[i]['precision']}"
            whisker = [[0.0], [max(p90 - p50, 0.0)]]
            ax.bar(pos, p50, width * 0.9, yerr=whisker, capsize=3, color=f"C{i % 10}", label=label)
            ax.annotate(
                str(i + 1), (pos, max(p50, p90)), ha="center", fontsize=8, xytext=(0, 3), textcoords="offset points"
            )
    ax.set_xticks(range(len(shapes)), shapes)
    ax.set_xlabel("input shape")
    ax.set_ylabel("latency ms (bar p50, whisker p90)")
    ax.set_title("latency per input shape (numbers = table row)")
    ax.margins(y=0.15)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    bars = _png(fig)
    return [("latency vs fidelity, per target", *scatter), ("latency per input shape", *bars)]


def plot(results: list[dict], path: Path) -> Path:
    """Latency (p50 bar, p90 whisker) per result, and fidelity vs p50 where the check has a cosine.

    Raises:
        MissingExtraError: matplotlib is not installed (the ``plot`` extra).
    """
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the caller
    except ImportError:
        raise MissingExtraError("matplotlib (for --plot)", "plot") from None
    rows = [row(r) for r in results]
    labels = [f"{r['model']} / {r['target']}\n{r['device']} / {r['precision']}" for r in rows]
    p50 = [r["p50_ms"] or 0.0 for r in rows]
    p90 = [max((r["p90_ms"] or 0.0) - (r["p50_ms"] or 0.0), 0.0) for r in rows]
    fig = Figure(figsize=(12, 1.5 + 0.6 * len(rows)))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    ypos = list(range(len(rows)))
    left.barh(ypos, p50, xerr=[[0.0] * len(rows), p90], color="#4c72b0", capsize=3)
    left.set_yticks(ypos, labels, fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("latency ms (bar p50, whisker p90)")
    cos = [
        (r["p50_ms"], res["check"].get("min_cosine"), i)
        for i, (r, res) in enumerate(zip(rows, results))
        if res["check"].get("min_cosine") is not None and r["p50_ms"] is not None
    ]
    if cos:
        right.scatter([c[0] for c in cos], [c[1] for c in cos], color="#dd8452")
        for x, y, i in cos:
            right.annotate(str(i + 1), (x, y), fontsize=8, xytext=(3, 3), textcoords="offset points")
    right.ticklabel_format(axis="y", useOffset=False)
    right.set_xlabel("p50 ms")
    right.set_ylabel("min cosine vs check.npz")
    right.set_title("fidelity vs latency (numbers = row)", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path
