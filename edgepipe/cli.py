"""The edgepipe command line: flags -> config -> one library call -> a summary table.

Every command turns an ``EdgepipeError`` into one line (plus a hint) and a non-zero exit: 2 for usage errors,
1 for failures. ``--debug`` shows the traceback instead. ``--json`` makes a command print one JSON document on
stdout instead of tables, an error included (docs/cli-json.md); ``-q`` leaves only errors and the result, ``-v``
adds stage details.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgepipe.errors import EdgepipeError, UsageError

# Tables stay readable when piped or logged (rich falls back to 80 columns without a terminal).
console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
JSON_SCHEMA = 1  # docs/cli-json.md: the version of every --json document
_JSON, _PARTIAL = "edgepipe.json", "edgepipe.partial"  # ctx.meta keys: --json given; what a failing command had


def _document(command: str, ok: bool = True, **fields) -> None:
    """Print one --json document on stdout (plain text: no rich markup or wrapping)."""
    doc = json.dumps({"schema": JSON_SCHEMA, "command": command, "ok": ok, **fields}, indent=2, default=str)
    click.echo(doc, file=click.get_current_context().meta.get(_JSON))


def _as_json(ctx: click.Context, param, value: bool) -> bool:
    if value:
        ctx.meta[_JSON] = sys.stdout  # the document's stream; meta is shared with the group's error handler
        ctx.with_resource(contextlib.redirect_stdout(sys.stderr))  # whatever else prints goes to stderr
    return value


json_option = click.option(
    "--json", "as_json", is_flag=True, callback=_as_json, help="Print one JSON document on stdout (docs/cli-json.md)."
)


def _quiet() -> bool:
    return bool((click.get_current_context().find_root().obj or {}).get("quiet"))


def _verbose() -> bool:
    return bool((click.get_current_context().find_root().obj or {}).get("verbose"))


class _Group(click.Group):
    """Turns EdgepipeError into one line and an exit code; ``--debug`` re-raises."""

    def invoke(self, ctx: click.Context):
        try:
            try:
                return super().invoke(ctx)
            except OSError as exc:  # a full disk outside the build's own writes (results, --csv, ...): one line too
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                where = f" writing {exc.filename}" if exc.filename else ""
                raise EdgepipeError(
                    f"No space left on the device{where} ({exc.strerror}).", hint="Free space."
                ) from exc
        except EdgepipeError as exc:
            if ctx.params.get("debug"):
                raise
            if ctx.meta.get(_JSON):
                error = {
                    "type": type(exc).__name__,
                    "message": exc.message,
                    "hint": exc.hint,
                    "exit_code": exc.exit_code,
                }
                _document(ctx.invoked_subcommand or "", False, **ctx.meta.get(_PARTIAL, {}), error=error)
            err_console.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err_console.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False)  # "edgepipe[x]" is not markup
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing was written to the bundle directory.")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.option("-q", "--quiet", is_flag=True, help="Only errors and the result (no progress, notes or tables).")
@click.option("-v", "--verbose", is_flag=True, help="Stage details: cache keys and directories, decisions.")
@click.version_option(package_name="edgepipe")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, verbose: bool) -> None:
    """Distill, swap attention, quantize and lower small Transformer and Mamba models for edge devices.

    \b
    Example:
      edgepipe build                              # default student -> ONNX Runtime bundle for this CPU
      edgepipe build --target android-arm64       # the same model as an ExecuTorch .pte
      edgepipe check artifacts/minilm-student/host-cpu
    """
    if quiet and verbose:
        raise UsageError("-q and -v contradict each other.", hint="Pass one of them.")
    ctx.obj = {"quiet": quiet, "verbose": verbose}


@cli.command()
@click.option(
    "--model",
    "model",
    default=None,
    help="Recipe name (see `edgepipe models`), a recipe TOML, a checkpoint dir, or a Hugging Face Hub id.",
)
@click.option(
    "--target", default="host-cpu", show_default=True, help="Target name (see `edgepipe targets`) or a TOML path."
)
@click.option(
    "--precision", default=None, help="Precision plan; default: the target's (fp32, fp16, int8-dynamic, ...)."
)
@click.option(
    "--out", "out_dir", default="artifacts", show_default=True, type=click.Path(path_type=Path), help="Output root."
)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. distill.steps=200."
)
@click.option(
    "--task",
    default=None,
    help="Optimum export task for a checkpoint dir (default: from config.json), e.g. fill-mask, text-generation.",
)
@click.option("--force", is_flag=True, help="Recompute every stage instead of using the cache.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")
@click.option("--strict", is_flag=True, help="Exit 1 (no bundle) when a fidelity bar is missed (validate.strict).")
@json_option
@click.option(
    "--student",
    type=click.Path(path_type=Path, file_okay=False),
    help="A student `edgepipe distill` wrote (e.g. copied from a GPU machine): used once its recipe hash matches.",
)
@click.option("--revision", default=None, help="With a Hugging Face Hub id as --model: a branch, tag or commit.")
def build(
    model: str | None,
    target: str,
    precision: str | None,
    out_dir: Path,
    overrides,
    task: str | None,
    force: bool,
    dry_run: bool,
    strict: bool,
    as_json: bool,
    student: Path | None,
    revision: str | None,
) -> None:
    """Build a validated bundle for TARGET from MODEL: distill, swap attention, quantize, lower, validate.

    \b
    Examples:
      edgepipe build
      edgepipe build --target jetson-orin-nano
      edgepipe build --model edgepipe/recipes/models/minilm-windowed.toml --target android-arm64 --precision int8-fp16
      edgepipe build --model ~/ckpt/my-bert --set validate.samples=256
      edgepipe build --model BAAI/bge-small-en-v1.5 --revision main   # a hub id (needs a reachable hub)
      edgepipe build --model ~/ckpt/my-gpt2 --target jetson-orin-nano   # non-BERT: through Optimum
    """
    from edgepipe.build import build
    from edgepipe.config import resolve_run_config
    from edgepipe.progress import Progress

    overrides = (*overrides, "validate.strict=true") if strict else tuple(overrides)
    cfg = resolve_run_config(model, target, precision, out_dir, overrides, task=task, revision=revision)
    if dry_run:
        if as_json:
            _document("build", dry_run=True, config=cfg.to_dict())
        else:
            console.print_json(cfg.to_json())
        return
    progress = Progress(err_console, quiet=_quiet(), verbose=_verbose())
    bundle = build(cfg, force=force, progress=progress, student=student)
    if as_json:
        _document("build", **_build_fields(bundle))
    elif _quiet():
        click.echo(bundle.path)
    else:
        _print_build_summary(bundle)


def _build_fields(bundle) -> dict:
    """The --json document of a build: what CI asks of it; the whole manifest is in manifest.json."""
    m = bundle.manifest
    keys = ("model", "kind", "runtime", "precision", "requested_precision", "fidelity", "latency", "route")
    return {
        "bundle": str(bundle.path.resolve()),
        "manifest_path": str((bundle.path / "manifest.json").resolve()),
        **{k: m.get(k) for k in keys},
        "target": m["target"]["name"],
        "bytes": sum(f["bytes"] for f in m["files"].values()),
        "stages": [{k: rec[k] for k in ("stage", "seconds", "cache_hit", "cache_key")} for rec in m["stages"]],
        **({"selection": m["selection"]} if "selection" in m else {}),
    }


@cli.command()
@click.option("--model", "model", default=None, help="An encoder recipe with a [student] table: name or TOML path.")
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value, e.g. distill.steps=20000."
)
@click.option("--force", is_flag=True, help="Train again even where the cache holds this student.")
def distill(model: str | None, overrides, force: bool) -> None:
    """Distill MODEL's student into the stage cache entry that `edgepipe build --model MODEL` then reuses.

    Runs unchanged as one process, under torchrun and under accelerate launch: one process per GPU (NCCL), or per
    CPU share (gloo) where there is no GPU. An interrupted run, or one whose rank died, resumes from its last
    checkpoint when started again.

    \b
    Examples:
      edgepipe distill --model minilm-student --set distill.steps=20000
      torchrun --nproc_per_node=8 -m edgepipe.cli distill --model minilm-student
      accelerate launch --multi_gpu --num_processes 8 -m edgepipe.cli distill --model minilm-student
    """
    from edgepipe.build import distill as run_distill
    from edgepipe.config import resolve_run_config
    from edgepipe.progress import Progress
    from edgepipe.stages.parallel import launched_rank

    cfg = resolve_run_config(model, "host-cpu", None, Path("artifacts"), tuple(overrides))
    quiet = _quiet() or launched_rank() != 0  # progress from rank 0 only
    result = run_distill(cfg, force=force, progress=Progress(err_console, quiet=quiet, verbose=_verbose()))
    if result is None:  # a rank other than 0: rank 0 reports
        return
    m = result.meta
    table = Table(show_header=False, box=None)
    table.add_row("student", str(result.dir))
    table.add_row("cache", "hit (already distilled)" if result.cache_hit else f"ran in {result.seconds:.1f} s")
    table.add_row("held-back vs teacher", f"{_fmt_cos(m.get('held_out'))} (mean / min cosine)")
    where = f"{m.get('world_size', 1)} process(es) on {m.get('device', 'cpu')}, {m.get('precision')}"
    table.add_row("trained", f"{m.get('steps')} steps, {where}, {m.get('sentences_per_s')} sentences/s")
    again = " ".join(["edgepipe build --model", model or cfg.recipe.name, *(f"--set {o}" for o in overrides)])
    table.add_row("next", f"{again} (reuses this student; elsewhere: add --student with a copy of it)")
    console.print(table)


def _fmt_cos(rec: dict | None) -> str:
    if not rec:
        return "-"
    if "mean_cosine" not in rec:  # a bundle that could not run here (encoder.NOT_VALIDATED)
        return rec.get("not_validated", "-")
    return f"{rec['mean_cosine']:.4f} / {rec['min_cosine']:.4f}"


def _fmt_lm(rec: dict | None) -> str:
    """Held-back perplexity and top-1 agreement with the teacher of a decoder stage."""
    if not rec:
        return "-"
    return f"perplexity {rec['perplexity']:.1f}, top-1 vs teacher {rec['top1_vs_teacher']:.4f}"


def _print_build_summary(bundle) -> None:
    from edgepipe.harness.runner import bench_kind

    m = bundle.manifest
    stages = Table(
        title=f"{m['model']} -> {m['target']['name']} ({m['runtime']}, {m['precision']})", title_justify="left"
    )
    for col in ("stage", "seconds", "cache", "key metrics"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for rec in m["stages"]:
        cache = "hit" if rec["cache_hit"] else "ran"
        if _verbose():
            cache += f" {rec['cache_key'][:12]}" + (f"\n{rec['decision']}" if rec.get("decision") else "")
        stages.add_row(rec["stage"], f"{rec['seconds']:.1f}", cache, _key_metrics(rec))
    console.print(stages)
    size = sum(f["bytes"] for f in m["files"].values())
    lat = m.get("latency", {})
    fid = m.get("fidelity", {})
    table = Table(show_header=False, box=None)
    table.add_row("bundle", str(bundle.path))
    if m.get("route"):
        table.add_row("path", f"{m['route']['path']}: {m['route']['why']}")
    table.add_row("size", f"{size / 1e6:.1f} MB")
    if "ttft_ms" in lat:
        table.add_row(
            "latency here",
            f"time to first token {lat['ttft_ms']:.1f} ms ({lat['prompt_tokens']}-token prompt), "
            f"decode {lat['tokens_per_s']:.0f} tokens/s",
        )
    elif "p50_ms" in lat:
        table.add_row(
            "latency here",
            f"p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms at {lat['shape'][0]}x{lat['shape'][1]}",
        )
    else:
        table.add_row("latency", lat.get("where", "-"))
    if bench_kind(m) == "decoder":
        table.add_row("fidelity", f"{_fmt_lm(fid.get('lowered'))} (held-back text)")
    elif "not_validated" in (fid.get("lowered") or {}):
        table.add_row("fidelity vs teacher", fid["lowered"]["not_validated"])
    else:
        table.add_row("fidelity vs teacher", f"{_fmt_cos(fid.get('lowered'))} (mean / min cosine, held-back text)")
    if m.get("precision") != m.get("requested_precision"):
        table.add_row(
            "precision", f"{m['precision']} (asked {m['requested_precision']}; see the validate stage's decision)"
        )
    console.print(table)


def _key_metrics(rec: dict) -> str:
    met = rec.get("metrics", {})
    if rec["stage"] == "validate" and "lowered" in met:
        return _fmt_lm(met["lowered"])
    if rec["stage"] == "reference" and "model" in met:
        return f"teacher perplexity {met['teacher']['perplexity']:.1f}, model {_fmt_lm(met['model'])}"
    if rec["stage"] == "pretrain":
        return f"held-back perplexity {met.get('held_out_perplexity', 0):.1f}, {met.get('steps', '?')} steps"
    if rec["stage"] == "latency" and "ttft_ms" in met:
        return f"first token {met['ttft_ms']:.1f} ms, {met['tokens_per_s']:.0f} tokens/s"
    if rec["stage"] == "validate":
        return f"vs teacher {_fmt_cos(met.get('vs_teacher'))}, vs pytorch {_fmt_cos(met.get('vs_pytorch'))}"
    if rec["stage"] == "lower":
        report = met.get("report", {})
        coverage = (report.get("int8_coverage") or report.get("decode", {}).get("int8_coverage") or {}).get("total")
        fused, moved = report.get("fused_ops"), report.get("int8_plan", {}).get("fp16_layers")
        return (
            f"{met.get('bytes', 0) / 1e6:.1f} MB"
            + (f", fused {fused}" if fused else "")
            + (f", int8 on {coverage:.0%} of GEMM FLOPs" if coverage is not None else "")
            + (f" ({', '.join(moved)} moved to fp16)" if moved else "")
        )
    if rec["stage"] == "distill" and "perplexity" in (met.get("held_out") or {}):
        return f"{_fmt_lm(met['held_out'])}, {met.get('steps', '?')} steps"
    if rec["stage"] == "distill":
        return f"held-back {_fmt_cos(met.get('held_out'))}, {met.get('steps', '?')} steps"
    if rec["stage"] == "latency":
        return f"p50 {met.get('p50_ms', 0):.1f} ms"
    return ""


@cli.command()
@json_option
def targets(as_json: bool) -> None:
    """List the targets edgepipe can build for, one line each.

    \b
    Example:
      edgepipe targets
    """
    from edgepipe.config import load_target, target_names
    from edgepipe.runtimes import get_runtime

    table = Table("target", "runtime", "precision", "validated here", "description")
    rows = []
    for name in target_names():
        t = load_target(name)
        try:
            ok, why = get_runtime(t.runtime).can_run_here(t)
        except EdgepipeError as exc:
            ok, why = False, exc.message
        table.add_row(name, t.runtime, t.precision, "yes" if ok else f"no ({why})", t.description)
        keys = ("runtime", "precision", "precisions", "candidates", "description", "path")
        rows.append({"name": name, **{k: getattr(t, k) for k in keys}, "validated_here": ok, "why": why})
    _listing("targets", rows, table, as_json)
    if not as_json and not _quiet():  # builds that measure their runtime and plan here
        from edgepipe.runtimes import candidate_note

        for r in rows:
            if r["candidates"]:
                shown = ", ".join(c + candidate_note(c) for c in r["candidates"])
                console.print(f"{r['name']} without --precision ships the fastest inside the budget of {shown}")


@cli.command()
@json_option
def models(as_json: bool) -> None:
    """List the shipped model recipes.

    \b
    Example:
      edgepipe models
    """
    from edgepipe.config import DEFAULT_MODEL, load_recipe, model_names

    table = Table("model", "kind", "teacher", "student", "description")
    rows = []
    for name in model_names():
        r = load_recipe(name)
        layers = f"layers {list(r.student.layers)}" if r.student and r.student.layers else "all layers"
        student = f"{layers}, {r.student.attention}" if r.student else "-"
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), r.kind, r.teacher, student, r.description)
        rows.append(
            {"name": name, "default": name == DEFAULT_MODEL, "kind": r.kind, "teacher": r.teacher}
            | {"student": r.to_dict()["student"], "description": r.description, "path": r.path}
        )
    _listing("models", rows, table, as_json)


def _listing(command: str, rows: list[dict], table: Table, as_json: bool) -> None:
    """targets / models: the document, the names (-q) or the table."""
    if as_json:
        _document(command, **{command: rows})
    elif _quiet():
        click.echo("\n".join(r["name"] for r in rows))
    else:
        console.print(table)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@json_option
def inspect(bundle: Path, as_json: bool) -> None:
    """Summarise a bundle's manifest and verify the sha256 of every file.

    \b
    Example:
      edgepipe inspect artifacts/minilm-student/host-cpu
    """
    from edgepipe.bundle import manifest_fields, open_bundle
    from edgepipe.harness.runner import sha256_file

    m = open_bundle(bundle)
    # The files' hashes are only as good as the manifest: compare this with the one its publisher gives.
    sha = sha256_file(str(bundle / "manifest.json"))
    if as_json:
        files = len(m["files"])
        return _document("inspect", bundle=str(bundle.resolve()), files_verified=files, manifest_sha256=sha, manifest=m)
    if _quiet():
        what = f"{m['model']} -> {m['target']['name']} ({m['runtime']}, {m['precision']})"
        return click.echo(f"{what}: {len(m['files'])} files verified, manifest sha256 {sha}")
    with manifest_fields(bundle):  # a field edgepipe did not write gets one line
        _print_manifest(m, sha)


def _print_manifest(m: dict, manifest_sha256: str) -> None:
    from edgepipe.harness.runner import bench_kind

    head = Table(show_header=False, box=None)
    head.add_row("model", f"{m['model']} ({m['kind']})")
    head.add_row("target", f"{m['target']['name']}: {m['target'].get('description', '-')}")
    head.add_row("runtime / precision", f"{m['runtime']} / {m['precision']}")
    head.add_row("built", f"{m.get('created', '-')} with edgepipe {m.get('edgepipe_version', '-')}")
    head.add_row("versions", ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items()))
    head.add_row("manifest sha256", manifest_sha256)
    console.print(head)
    decoder = bench_kind(m) == "decoder"
    columns = ("perplexity", "top-1 vs teacher") if decoder else ("mean cosine", "min cosine")
    fid = Table("stage", *columns, title="fidelity vs the teacher (held-back text)", title_justify="left")
    for stage, rec in m.get("fidelity", {}).items():
        if isinstance(rec, dict) and "perplexity" in rec:
            fid.add_row(stage, f"{rec['perplexity']:.2f}", f"{rec['top1_vs_teacher']:.4f}")
        elif isinstance(rec, dict) and "mean_cosine" in rec:
            fid.add_row(stage, f"{rec['mean_cosine']:.4f}", f"{rec['min_cosine']:.4f}")
        elif isinstance(rec, dict) and "not_validated" in rec:
            fid.add_row(stage, rec["not_validated"], "")
    console.print(fid)
    if decoder:
        d = m["decoder"]
        console.print(
            f"decoder: {d['form']}, state {d['state_bytes'] / 2**20:.2f} MiB, cache {d['cache_len']} slots, "
            f"prefill {d['prefill_tokens']} tokens per call"
        )
    stages = Table("stage", "seconds", "cache", "metrics", title="stages", title_justify="left")
    for rec in m["stages"]:
        stages.add_row(rec["stage"], f"{rec['seconds']:.1f}", "hit" if rec["cache_hit"] else "ran", _key_metrics(rec))
    console.print(stages)
    plan = next((r["metrics"].get("report", {}).get("plan") for r in m["stages"] if r["stage"] == "lower"), None)
    if plan:
        _print_plan(plan)
    files = Table("file", "bytes", "sha256", title="files (sha256 verified)", title_justify="left")
    for rel, rec in m["files"].items():
        files.add_row(rel, f"{rec['bytes']:,}", rec["sha256"][:16] + "…")
    console.print(files)


def _print_plan(plan: list[dict]) -> None:
    """The per-layer precision plan of a lowered graph: what was asked, what runs, and why."""
    table = Table("layer", "precision", "runs as", "int8 drop", "why", title="precision plan", title_justify="left")
    for lp in plan:
        drop = lp.get("sensitivity")
        runs_as = lp.get("runs_as", lp["precision"])
        table.add_row(lp["layer"], lp["precision"], runs_as, "" if drop is None else f"{drop:.5f}", lp.get("why", ""))
    console.print(table)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option(
    "--text",
    type=click.Path(path_type=Path),
    help="Instead of check.npz: fidelity to the teacher on this text (one sentence per line; encoder bundles).",
)
@click.option("--samples", type=click.IntRange(1), default=512, show_default=True, help="Lines of --text to use.")
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    help="The teacher's checkpoint directory, where it is not where the bundle was built.",
)
@json_option
def check(bundle: Path, text: Path | None, samples: int, teacher: Path | None, as_json: bool) -> None:
    """Run the bundle's check.npz in its runtime here and report the error against its tolerances; with --text,
    measure how close the bundle stays to its teacher on your own text.

    \b
    Examples:
      edgepipe check artifacts/minilm-student/host-cpu
      edgepipe check artifacts/minilm-student/host-cpu --text my-domain.txt
    """
    from edgepipe.bundle import check_bundle
    from edgepipe.errors import BuildError

    if text is not None:
        _check_text(bundle, text, samples, teacher, as_json)
        return
    report = check_bundle(bundle)
    res = report.result
    failed = BuildError(
        f"Bundle {bundle} fails its check: {'; '.join(res['problems'])}.", hint="Rebuild it with --force."
    )
    if as_json:
        fields = {
            "bundle": str(bundle.resolve()),
            "runtime": report.manifest["runtime"],
            "precision": report.manifest["precision"],
            "tolerance": {**report.tolerance, "source": f"edgepipe's table ({report.family})"},
        }
        if not report.passed:
            click.get_current_context().meta[_PARTIAL] = {**fields, "passed": False, "result": res}
            raise failed
        return _document("check", **fields, passed=True, result=res)
    if _quiet():
        if not report.passed:
            raise failed
        return click.echo(f"check passed: {bundle}")
    table = Table("output", "mean cosine", "min cosine", "max abs", "tolerance")
    tolerance = f"cos ≥ {res['min_cosine_required']}, abs ≤ {res['atol']}"
    for name, m in res["outputs"].items():
        table.add_row(name, f"{m['mean_cosine']:.6f}", f"{m['min_cosine']:.6f}", f"{m['max_abs_error']:.2e}", tolerance)
    if "token_agreement" in res:
        need = report.tolerance.get("min_token_agreement", 1.0)
        table.add_row("greedy tokens", f"{res['token_agreement']:.4f} agree", "", "", f"agreement ≥ {need}")
    console.print(table)
    said = report.manifest_says
    unused = "" if said == report.tolerance else f"; the bundle's manifest says {said or 'none'}, not used"
    console.print(f"tolerance: edgepipe's table for {report.manifest['precision']} ({report.family}){unused}")
    if not report.passed:
        raise failed
    console.print(f"[green]check passed[/] ({report.manifest['runtime']}, {report.manifest['precision']})")


def _check_text(bundle: Path, text: Path, samples: int, teacher: Path | None, as_json: bool) -> None:
    from edgepipe.bundle import text_fidelity

    fid = text_fidelity(bundle, text, samples, teacher)
    m, res = fid.manifest, fid.result
    held = m.get("fidelity", {}).get("lowered") or {}
    if as_json:
        worst = [{"cosine": cos, "line": line} for cos, line in fid.worst]
        fields = {"bundle": str(bundle.resolve()), "text": str(text), "teacher": str(fid.teacher), "result": res}
        return _document("check", **fields, held_back=held or None, worst=worst)
    columns = ("text", "sentences", "mean cosine", "min cosine")
    table = Table(*columns, title="fidelity vs the teacher", title_justify="left")
    for name, rec in ((str(text), res), ("held-back (the build's)", held)):
        if "mean_cosine" in rec:
            table.add_row(name, str(rec["n"]), f"{rec['mean_cosine']:.4f}", f"{rec['min_cosine']:.4f}")
    console.print(table)
    worst = Table("cosine", "lowest lines", title="where it strays most", title_justify="left")
    for cos, line in fid.worst:
        worst.add_row(f"{cos:.4f}", line if len(line) <= 100 else line[:99] + "…")
    console.print(worst)
    console.print(f"({m['model']} in {m['runtime']}, {m['precision']}; the teacher {fid.teacher} in PyTorch, fp32)")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Text to continue.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(1), default=None, help="Runtime threads (default: the runtime's).")
def generate(bundle: Path, prompt: str, max_new_tokens: int, threads: int | None) -> None:
    """Greedy generation with a decoder bundle's prefill and decode graphs, in its runtime here.

    \b
    Example:
      edgepipe generate artifacts/tinylm-teacher/host-cpu --prompt "The kernel" --max-new-tokens 48
    """
    from edgepipe.bundle import generate as run_generate

    console.print(f"[bold]{escape(prompt)}[/]", end="")
    out = run_generate(
        bundle, prompt, max_new_tokens, threads, on_text=lambda piece: console.print(escape(piece), end="")
    )
    console.print()
    rate = f", decode {out.tokens_per_s:.1f} tokens/s" if out.tokens_per_s else ""
    if not _quiet():
        err_console.print(
            f"{out.prompt_tokens} prompt tokens, {len(out.tokens)} new; time to first token {out.ttft_ms:.1f} ms{rate}"
        )


_DEVICE_HELP = "local, ssh://user@host[:port] or adb://serial."


def _device_options(fn):
    for option in reversed(
        [
            click.option("--device", "url", help=_DEVICE_HELP),
            click.option("--insecure-host-key", is_flag=True, help="Skip the SSH host key check (lab devices only)."),
            click.option(
                "--known-hosts", type=click.Path(path_type=Path), help="known_hosts file (default ~/.ssh/known_hosts)."
            ),
            click.option(
                "--identity", "identity_file", type=click.Path(path_type=Path), help="SSH private key (default: agent)."
            ),
            click.option(
                "--remote-dir", help="Where the bundle goes on the device (default ~/edgepipe/<model>/<target>)."
            ),
            click.option("--python", help="The device's Python interpreter (default python3)."),
        ]
    ):
        fn = option(fn)
    return fn


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_device_options
def deploy(bundle: Path, url: str, **options) -> None:
    """Copy BUNDLE and the on-device runner to a device, verify sha256 there and check its runtime.

    \b
    Examples:
      edgepipe deploy artifacts/minilm-student/jetson-orin-nano --device ssh://nvidia@orin.local
      edgepipe deploy artifacts/minilm-student/android-arm64 --device adb://R58M123ABC
    """
    from edgepipe.harness.remote import deploy as _deploy

    result = _deploy(bundle, url, **options)
    what = f"copied {result.files} files, {result.bytes / 1e6:.1f} MB" if result.copied else "already there, unchanged"
    console.print(f"[green]deployed[/] {bundle} -> {url}:{result.remote_dir} ({what}, {result.seconds:.1f} s)")
    runtime = f"{result.runtime} {result.runtime_version or ''}".strip()
    engine = f"; {result.engine_line}" if result.engine_line else ""  # TensorRT: the engine built or cached there
    console.print(f"runtime on the device: {runtime} ({result.python} {result.python_version}){engine}")


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@_device_options
@click.option("--runs", default=50, show_default=True, help="Timed runs.")
@click.option("--warmup", default=10, show_default=True, help="Untimed warm-up runs.")
@click.option("--batch", type=int, help="Batch size (default: check.npz's).")
@click.option("--seq", type=int, help="Sequence length (default: check.npz's).")
@click.option("--context", help="Decoders: context lengths to time decode at, e.g. 256,1024,4096.")
@click.option("--threads", type=int, help="Runtime threads on the device.")
@click.option("--profile", is_flag=True, help="Per-op times from the runtime's own profiler, after the timed runs.")
@click.option("--runner", type=click.Choice(["python", "native"]), default="python", help="native: the C++ runner.")
@click.option("--results", "results_dir", default="results", show_default=True, type=click.Path(path_type=Path))
@click.option("--devices", "devices_file", type=click.Path(path_type=Path), help="devices.toml: bench on each device.")
@json_option
def bench(bundle: Path, url: str | None, devices_file: Path | None, as_json: bool, **options) -> None:
    """Measure BUNDLE's latency on a device (deploying it first) and fetch the result JSON into results/.

    \b
    Examples:
      edgepipe bench artifacts/minilm-student/host-cpu --device local --seq 128
      edgepipe bench artifacts/minilm-student/jetson-orin-nano --device ssh://nvidia@orin.local --runs 200
      edgepipe bench artifacts/minilm-student/raspberry-pi-5 --devices devices.toml --profile
    """
    from edgepipe.errors import BuildError
    from edgepipe.harness.fleet import bench_and_print
    from edgepipe.harness.remote import bench as _bench
    from edgepipe.harness.report import compare_table, extra_tables, load_results

    if (url is None) == (devices_file is None):
        raise UsageError("bench needs exactly one of --device and --devices.", hint=f"--device takes {_DEVICE_HELP}")
    if devices_file is not None:
        sys.exit(0 if bench_and_print(bundle, devices_file, console, err_console, options) else 1)
    path = _bench(bundle, url, **options)
    result = json.loads(path.read_text())
    if not (as_json or _quiet()):
        console.print(compare_table(load_results([path])), *extra_tables(load_results([path])))
        console.print(f"Wrote {path}")
    check = result.get("check", {})
    if check.get("passed") is False:  # the result is written (it says what failed); the exit code says it failed
        click.get_current_context().meta[_PARTIAL] = {"results": str(path.resolve()), "result": result}
        raise BuildError(
            f"On {url} the outputs of {bundle} differ beyond its tolerances: {'; '.join(check.get('problems', []))}.",
            hint=f"See {path}; rebuild with --force or check the device's runtime version.",
        )
    if as_json:
        _document("bench", results=str(path.resolve()), result=result)
    elif _quiet():
        click.echo(path)


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), help="Write a latency/fidelity plot (PNG).")
@click.option(
    "--html",
    "html_path",
    type=click.Path(path_type=Path),
    help="Write an HTML page: the table, latency vs fidelity per target, latency per input shape.",
)
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="Write the table as CSV.")
@json_option
def compare(
    results: tuple[Path, ...], plot_path: Path | None, html_path: Path | None, csv_path: Path | None, as_json: bool
) -> None:
    """Compare bench results across targets, devices and precisions in one table.

    \b
    Example:
      edgepipe compare results/*.json --html compare.html --csv compare.csv
    """
    from edgepipe.harness import report

    loaded = report.load_results(list(results))
    if not as_json:  # the table is compare's result: -q prints it too
        console.print(report.compare_table(loaded), *report.extra_tables(loaded))
    written = {}
    for kind, path, writer in (
        ("csv", csv_path, report.write_csv),
        ("html", html_path, report.write_html),
        ("plot", plot_path, report.plot),
    ):
        if path is not None:
            written[kind] = str(writer(loaded, path))
            if not as_json:
                click.echo(f"Wrote {written[kind]}")
    if as_json:
        rows = [{**report.row(r), "source": r.get("_path")} for r in loaded]
        _document("compare", rows=rows, written=written)


def main() -> None:
    cli(prog_name="edgepipe")


if __name__ == "__main__":
    main()
