"""The edgepipe command line: flags -> config -> one library call -> a summary table.

Every command turns an ``EdgepipeError`` into one line (plus a hint) and a non-zero exit: 2 for usage errors,
1 for failures. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from edgepipe.errors import EdgepipeError

console = Console()
err_console = Console(stderr=True)


class _Group(click.Group):
    """Turns EdgepipeError into one line and an exit code; ``--debug`` re-raises."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgepipeError as exc:
            if ctx.params.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                err_console.print(f"[dim]hint:[/] {exc.hint}", highlight=False)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            err_console.print("interrupted: nothing was written to the bundle directory.")
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edgepipe")
def cli(debug: bool) -> None:
    """Distill, swap attention, quantize and lower small Transformer and Mamba models for edge devices.

    \b
    Example:
      edgepipe build                              # default student -> ONNX Runtime bundle for this CPU
      edgepipe build --target android-arm64       # the same model as an ExecuTorch .pte
      edgepipe check artifacts/minilm-student/host-cpu
    """


@cli.command()
@click.option(
    "--model", "model", default=None, help="Recipe name (see `edgepipe models`), a recipe TOML, or a checkpoint dir."
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
@click.option("--force", is_flag=True, help="Recompute every stage instead of using the cache.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and stop.")
def build(
    model: str | None, target: str, precision: str | None, out_dir: Path, overrides, force: bool, dry_run: bool
) -> None:
    """Build a validated bundle for TARGET from MODEL: distill, swap attention, quantize, lower, validate.

    \b
    Examples:
      edgepipe build
      edgepipe build --target jetson-orin-nano
      edgepipe build --model models/minilm-windowed.toml --target android-arm64 --precision int8-fp16
      edgepipe build --model ~/ckpt/my-bert --set validate.samples=256
    """
    from edgepipe import pipeline
    from edgepipe.config import resolve_run_config
    from edgepipe.progress import Progress

    cfg = resolve_run_config(model, target, precision, out_dir, tuple(overrides))
    if dry_run:
        console.print_json(cfg.to_json())
        return
    bundle = pipeline.build(cfg, force=force, progress=Progress(err_console))
    _print_build_summary(bundle)


def _fmt_cos(rec: dict | None) -> str:
    if not rec:
        return "-"
    return f"{rec['mean_cosine']:.4f} / {rec['min_cosine']:.4f}"


def _print_build_summary(bundle) -> None:
    m = bundle.manifest
    stages = Table(
        title=f"{m['model']} -> {m['target']['name']} ({m['runtime']}, {m['precision']})", title_justify="left"
    )
    for col in ("stage", "seconds", "cache", "key metrics"):
        stages.add_column(col, justify="right" if col == "seconds" else "left")
    for rec in m["stages"]:
        stages.add_row(rec["stage"], f"{rec['seconds']:.1f}", "hit" if rec["cache_hit"] else "ran", _key_metrics(rec))
    console.print(stages)
    size = sum(f["bytes"] for f in m["files"].values())
    lat = m.get("latency", {})
    fid = m.get("fidelity", {})
    table = Table(show_header=False, box=None)
    table.add_row("bundle", str(bundle.path))
    table.add_row("size", f"{size / 1e6:.1f} MB")
    if "p50_ms" in lat:
        table.add_row(
            "latency here",
            f"p50 {lat['p50_ms']:.1f} ms, p90 {lat['p90_ms']:.1f} ms at {lat['shape'][0]}x{lat['shape'][1]}",
        )
    else:
        table.add_row("latency", lat.get("where", "-"))
    table.add_row("fidelity vs teacher", f"{_fmt_cos(fid.get('lowered'))} (mean / min cosine, held-back text)")
    if m.get("precision") != m.get("requested_precision"):
        table.add_row(
            "precision", f"{m['precision']} (asked {m['requested_precision']}; see the validate stage's decision)"
        )
    console.print(table)


def _key_metrics(rec: dict) -> str:
    met = rec.get("metrics", {})
    if rec["stage"] == "validate":
        return f"vs teacher {_fmt_cos(met.get('vs_teacher'))}, vs pytorch {_fmt_cos(met.get('vs_pytorch'))}"
    if rec["stage"] == "lower":
        fused = met.get("report", {}).get("fused_ops")
        return f"{met.get('bytes', 0) / 1e6:.1f} MB" + (f", fused {fused}" if fused else "")
    if rec["stage"] == "distill":
        return f"held-back {_fmt_cos(met.get('held_out'))}, {met.get('steps', '?')} steps"
    if rec["stage"] == "latency":
        return f"p50 {met.get('p50_ms', 0):.1f} ms"
    return ""


@cli.command()
def targets() -> None:
    """List the targets edgepipe can build for, one line each.

    \b
    Example:
      edgepipe targets
    """
    from edgepipe.config import load_target, target_names
    from edgepipe.runtimes import get_runtime

    table = Table("target", "runtime", "precision", "validated here", "description")
    for name in target_names():
        t = load_target(name)
        try:
            ok, why = get_runtime(t.runtime).can_run_here(t)
            here = "yes" if ok else f"no ({why})"
        except EdgepipeError as exc:
            here = f"no ({exc.message})"
        table.add_row(name, t.runtime, t.precision, here, t.description)
    console.print(table)


@cli.command()
def models() -> None:
    """List the shipped model recipes.

    \b
    Example:
      edgepipe models
    """
    from edgepipe.config import DEFAULT_MODEL, load_recipe, model_names

    table = Table("model", "kind", "teacher", "student", "description")
    for name in model_names():
        r = load_recipe(name)
        student = f"layers {list(r.student.layers)}, {r.student.attention}" if r.student else "-"
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), r.kind, r.teacher, student, r.description)
    console.print(table)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def inspect(bundle: Path) -> None:
    """Summarise a bundle's manifest and verify the sha256 of every file.

    \b
    Example:
      edgepipe inspect artifacts/minilm-student/host-cpu
    """
    from edgepipe.bundle import open_bundle

    m = open_bundle(bundle)
    head = Table(show_header=False, box=None)
    head.add_row("model", f"{m['model']} ({m['kind']})")
    head.add_row("target", f"{m['target']['name']}: {m['target']['description']}")
    head.add_row("runtime / precision", f"{m['runtime']} / {m['precision']}")
    head.add_row("built", f"{m['created']} with edgepipe {m['edgepipe_version']}")
    head.add_row("versions", ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
    console.print(head)
    fid = Table(
        "stage", "mean cosine", "min cosine", title="fidelity vs the teacher (held-back text)", title_justify="left"
    )
    for stage, rec in m.get("fidelity", {}).items():
        if rec:
            fid.add_row(stage, f"{rec['mean_cosine']:.4f}", f"{rec['min_cosine']:.4f}")
    console.print(fid)
    stages = Table("stage", "seconds", "cache", "metrics", title="stages", title_justify="left")
    for rec in m["stages"]:
        stages.add_row(rec["stage"], f"{rec['seconds']:.1f}", "hit" if rec["cache_hit"] else "ran", _key_metrics(rec))
    console.print(stages)
    files = Table("file", "bytes", "sha256", title="files (sha256 verified)", title_justify="left")
    for rel, rec in m["files"].items():
        files.add_row(rel, f"{rec['bytes']:,}", rec["sha256"][:16] + "…")
    console.print(files)


@cli.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def check(bundle: Path) -> None:
    """Run the bundle's check.npz in its runtime here and report the error against its tolerances.

    \b
    Example:
      edgepipe check artifacts/minilm-student/host-cpu
    """
    from edgepipe.bundle import check_bundle
    from edgepipe.errors import BuildError

    report = check_bundle(bundle)
    tol = report.manifest["validation"]
    table = Table("output", "mean cosine", "min cosine", "max abs", "tolerance")
    for name, m in report.metrics.items():
        table.add_row(
            name,
            f"{m['mean_cosine']:.6f}",
            f"{m['min_cosine']:.6f}",
            f"{m['max_abs']:.2e}",
            f"cos ≥ {tol['min_cosine']}, abs ≤ {tol['atol']}",
        )
    console.print(table)
    if not report.passed:
        raise BuildError(
            f"Bundle {bundle} fails its check: outputs differ beyond the tolerances above.",
            hint="Rebuild it with --force.",
        )
    console.print(f"[green]check passed[/] ({report.manifest['runtime']}, {report.manifest['precision']})")


def main() -> None:
    cli(prog_name="edgepipe")


if __name__ == "__main__":
    main()
