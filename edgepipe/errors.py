"""Errors users see: one line saying what came in, what is accepted and what to do next.

The CLI prints ``str(error)`` (plus the hint) and exits with ``error.exit_code``; the traceback only shows with
``--debug``. Library code raises these; it never calls ``sys.exit``.
"""

from __future__ import annotations


class EdgepipeError(Exception):
    """Base class: a failure the user can act on.

    Args:
        message: What came in and what is accepted, in one line.
        hint: What to do next, in one line (optional).
    """

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} {self.hint}"


class UsageError(EdgepipeError):
    """The command line or a config file asked for something edgepipe does not accept (exit 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """One or more problems in a TOML file or override, all reported together."""

    def __init__(self, problems: list[str], source: str) -> None:
        self.problems = problems
        self.source = source
        lines = "; ".join(problems)
        super().__init__(f"{source}: {lines}", hint="Fix the keys above (see `edgepipe targets` / `edgepipe models`).")


class ModelError(EdgepipeError):
    """A checkpoint or recipe could not be loaded (missing or corrupt files)."""


class BuildError(EdgepipeError):
    """A pipeline stage failed: export, lowering, validation or a fidelity budget."""


class MissingExtraError(EdgepipeError):
    """An optional runtime or tool is not installed."""

    def __init__(self, what: str, extra: str) -> None:
        super().__init__(f"{what} is not installed.", hint=f'Install it with: pip install "edgepipe[{extra}]"')
        self.extra = extra


class DeviceError(EdgepipeError):
    """A device could not be reached, verified or used."""


class BundleError(EdgepipeError):
    """A bundle is missing files, has a bad manifest or fails its sha256 check."""
