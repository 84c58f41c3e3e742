"""Progress for long steps: a spinner per stage, a bar for loops that know their length (rich on a terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress


class Progress:
    """Stage spinners and step bars; ``quiet`` turns everything off (library callers and tests), ``verbose`` adds
    each stage's cache directory."""

    def __init__(self, console: Console | None = None, quiet: bool = False, verbose: bool = False) -> None:
        self.console = console or Console(stderr=True)
        self.quiet, self.verbose = quiet, verbose

    @contextmanager
    def stage(self, label: str) -> Iterator[None]:
        if self.quiet:
            yield
            return
        with self.console.status(f"[bold]{label}[/]…", spinner="dots"):
            yield

    def done(self, label: str, result) -> None:
        if not self.quiet:
            how = "cached" if result.cache_hit else f"{result.seconds:.1f} s"
            where = f" {result.dir}" if self.verbose else ""
            self.console.print(f"[green]✓[/] {label} [dim]({how}){where}[/]", highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]![/] {text}")

    @contextmanager
    def steps(self, label: str, total: int) -> Iterator[StepBar]:
        """A bar for ``total`` steps; call ``bar.advance(info=...)`` each step."""
        if self.quiet:
            yield StepBar(None, None)
            return
        columns = [
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
        ]
        with RichProgress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(label, total=total, info="")
            yield StepBar(bar, task)


class StepBar:
    def __init__(self, bar: RichProgress | None, task) -> None:
        self.bar, self.task = bar, task

    def advance(self, n: int = 1, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=n, info=info)

    def set(self, completed: int, info: str = "") -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, info=info)
