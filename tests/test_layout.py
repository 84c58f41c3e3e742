"""The package's shape (docs/architecture.md, "Layers"): no import circle between units, no private name used across
files, no comment pointing outside the project, modules of a readable size."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgepipe"
# The layers, bottom up: a unit imports only units of its own layer or below (exceptions below, each with a reason).
LAYERS = [
    {"__init__", "errors", "precisions", "progress"},
    {"harness"},  # runs on devices: numpy + one runtime; the host judges bundles with the same code
    {"config", "manifest"},
    {"data", "cache", "attention"},
    {"models"},
    {"stages"},
    {"runtimes"},
    {"bundle"},
    {"build"},
    {"cli"},
]
# (importer, imported): why a lower unit reaches up. None today; a new entry needs its reason here.
UPWARD: dict[tuple[str, str], str] = {}
MAX_LINES = 500
LONG = {  # module: why it stays over MAX_LINES
    "harness/runner.py": "shipped to the device as one file (Python 3.8, numpy + one runtime): host and device judge "
    "a bundle with the same code",
    "runtimes/executorch.py": "three backends (XNNPACK, Ethos-U, Core ML) over one export path; the split per backend "
    "is the next layout step (docs/architecture.md)",
    "build/optimum.py": "two Optimum exporters (ONNX, ExecuTorch) with their input makers; one recipe",
    "stages/distill.py": "the distillation stage: student init, targets cache, resume, data-parallel steps",
    "runtimes/onnxruntime.py": "export, fusion, the precision plans and the session of one runtime",
    "runtimes/tensorrt.py": "the rule checker, the build plan and the decoder Q/DQ fit of one runtime",
    "harness/remote.py": "ssh, adb and local transports behind one deploy/bench contract",
    "config.py": "every recipe and target table's dataclass, by design: one place owns the vocabulary",
    "cli.py": "every command's flags, its tables and its --json document (docs/cli-json.md); the tables moving to "
    "their own module is the next layout step",
}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _unit(name: str) -> str:
    """``edgepipe.runtimes.onnxruntime`` -> ``runtimes``; ``edgepipe.config`` -> ``config``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _type_only(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (annotations only: no import at run time)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return skip


def _imports(tree: ast.Module, path: str) -> set[str]:
    here = "edgepipe." + path[:-3].replace("/", ".").removesuffix(".__init__")
    skip, out = _type_only(tree), set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgepipe"):
            if node.module == "edgepipe":  # from edgepipe import __version__ / a submodule
                for a in node.names:
                    sub = PACKAGE / a.name
                    out.add(f"edgepipe.{a.name}" if sub.is_dir() or sub.with_suffix(".py").is_file() else "edgepipe")
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("edgepipe"))
    out.discard(here)
    return out


def _unit_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for path, tree in _modules().items():
        src = _unit("edgepipe." + path[:-3].replace("/", "."))
        for name in _imports(tree, path):
            if _unit(name) == src:
                continue
            graph[src].add(_unit(name))
    return graph


def test_no_import_circle_between_units():
    graph = _unit_graph()
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt in stack:
                circles.append(" -> ".join(stack[stack.index(nxt) :] + [nxt]))
            elif len(stack) < 12:
                visit(nxt, stack + [nxt])

    for unit in sorted(graph):
        visit(unit, [unit])
    assert circles == []


def test_imports_run_down_the_layers():
    layer = {u: i for i, units in enumerate(LAYERS) for u in units}
    graph = _unit_graph()
    assert set(graph) <= set(layer), f"a unit outside LAYERS: {set(graph) - set(layer)}"
    upward = {(a, b) for a, deps in graph.items() for b in deps if layer[b] > layer[a]}
    assert upward <= set(UPWARD), f"imports from a lower layer up: {sorted(upward - set(UPWARD))}"


def test_no_private_name_crosses_a_file():
    crossing = []
    for path, tree in _modules().items():
        modules = set()  # names bound to an edgepipe module here: `from edgepipe.runtimes import onnxruntime as ort_rt`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgepipe"):
                crossing += [f"{path}: {node.module}.{a.name}" for a in node.names if a.name[:1] == "_" != a.name[1:2]]
                base = PACKAGE.joinpath(*node.module.split(".")[1:])
                modules.update(a.asname or a.name for a in node.names if (base / f"{a.name}.py").is_file())
            elif isinstance(node, ast.Import):
                modules.update(a.asname or a.name for a in node.names if a.name.startswith("edgepipe"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules:
                if node.attr.startswith("_") and not node.attr.startswith("__"):
                    crossing.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    assert crossing == []


@pytest.mark.parametrize("path", sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")))
def test_module_size_and_references(path):
    text = (PACKAGE / path).read_text()
    lines = text.count("\n")
    assert lines <= MAX_LINES or path in LONG, f"{path}: {lines} lines; split it or say why in LONG"
    for outside in ("FACTS.md", "DESIGN.md", "REDESIGN.md"):
        assert outside not in text, f"{path} points at {outside}, which is not in the project"


def test_every_long_module_exemption_is_still_needed():
    stale = [p for p in LONG if (PACKAGE / p).read_text().count("\n") <= MAX_LINES]
    assert stale == [], f"{stale} fit in {MAX_LINES} lines now: drop them from LONG"
