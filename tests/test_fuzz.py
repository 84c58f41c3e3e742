"""Fuzzing what a user types: recipe and target TOML (types, ranges, nan and inf, unknown keys, unicode, bytes that
are not TOML or not UTF-8) and the CLI's options. Every input either resolves (``build --dry-run``: the config a build
would run) or gets the one-line error and exit 1 or 2; no traceback ever escapes.

In-process through click's runner, on the config-parsing paths only, so the default run stays in seconds.
"""

from __future__ import annotations

import json
import math
import os
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgepipe.cli import cli
from edgepipe.config import MODELS_DIR, TARGETS_DIR

# EDGEPIPE_FUZZ_EXAMPLES=2000 for a longer hunt; the default keeps the whole file near 20 s on 2 cores
EXAMPLES = int(os.environ.get("EDGEPIPE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
RECIPES = sorted(MODELS_DIR.glob("*.toml"))
TARGETS = sorted(TARGETS_DIR.glob("*.toml"))

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # no lone surrogates: files are UTF-8
arg = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=12)  # argv has no NUL
scalars = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 0.5, 1e9, -0.0, math.nan, math.inf, -math.inf]),
    text,
    st.booleans(),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=5
)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are TOML basic-string escapes
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(data: dict) -> str:
    lines = [f"{json.dumps(k)} = {toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, table in data.items():
        if isinstance(table, dict):
            lines.append(f"[{json.dumps(k)}]")
            lines += [f"{json.dumps(key)} = {toml_value(v)}" for key, v in table.items()]
    return "\n".join(lines) + "\n"


def known_keys(base: dict) -> list[tuple[str, ...]]:
    return [(k,) for k in base] + [(k, sub) for k, v in base.items() if isinstance(v, dict) for sub in v]


@st.composite
def mutated(draw, files: list[Path]) -> dict:
    """A shipped file's TOML with some keys set to anything, some removed and some made up."""
    data = tomllib.loads(draw(st.sampled_from(files)).read_text(encoding="utf-8"))
    keys = known_keys(data)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(keys) | st.tuples(text) | st.tuples(st.sampled_from(list(data)), text))
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {}) if isinstance(node.get(part, {}), dict) else {}
        if draw(st.booleans()) and path[-1] in node:
            del node[path[-1]]
        else:
            node[path[-1]] = draw(values)
    return data


def invoke(*args: str):
    result = CliRunner().invoke(cli, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert result.exit_code in (0, 1, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code:
        errors = [ln for ln in result.output.splitlines() if ln.startswith(("error:", "Error:"))]
        assert len(errors) == 1, (args, result.output)  # one line says what is wrong (click's usage errors too)
    return result


@FUZZ
@given(data=mutated(RECIPES))
def test_any_recipe_resolves_or_gets_one_line(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    path = tmp_path_factory.mktemp("recipe") / "fuzzed.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    result = invoke("build", "--model", str(path), "--dry-run")
    if result.exit_code == 0:
        resolved = json.loads(result.output)
        assert all(math.isfinite(v) for v in _numbers(resolved["recipe"]) if isinstance(v, float)), resolved


@FUZZ
@given(data=mutated(TARGETS))
def test_any_target_resolves_or_gets_one_line(tmp_path_factory: pytest.TempPathFactory, data: dict) -> None:
    path = tmp_path_factory.mktemp("target") / "fuzzed.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    invoke("build", "--target", str(path), "--dry-run")


@FUZZ
@given(
    raw=st.binary(max_size=64) | text.map(lambda t: t.encode("utf-8")), which=st.sampled_from(["--model", "--target"])
)
def test_bytes_that_are_not_toml_or_not_utf8_get_one_line(
    tmp_path_factory: pytest.TempPathFactory, raw: bytes, which: str
) -> None:
    path = tmp_path_factory.mktemp("raw") / "fuzzed.toml"
    path.write_bytes(raw)
    invoke("build", which, str(path), "--dry-run")


options = st.lists(
    st.tuples(st.sampled_from(["--precision", "--target", "--set", "--task", "--model", "--out"]), arg)
    | st.tuples(st.just("--set"), st.builds(lambda k, v: f"{k}={v}", arg, arg))
    | st.tuples(
        st.just("--set"),
        st.builds(
            lambda k, v: f"{k}={toml_value(v)}",
            st.sampled_from(
                [
                    "distill.steps",
                    "distill.lr",
                    "quantize.fidelity_budget",
                    "validate.samples",
                    "student.layers",
                    "x.y.z",
                ]
            ),
            values,
        ),
    ),
    max_size=4,
)


@FUZZ
@given(opts=options)
def test_any_build_options_resolve_or_get_one_line(opts: list[tuple[str, str]]) -> None:
    invoke("build", *(x for pair in opts for x in pair), "--dry-run")


@FUZZ
@given(
    command=st.sampled_from(["deploy", "bench"]),
    url=arg | st.builds(lambda h, p: f"ssh://{h}:{p}", arg, st.integers(-5, 70000)),
    bundle=arg,
)
def test_any_device_url_and_bundle_path_get_one_line(command: str, url: str, bundle: str) -> None:
    invoke(command, f"/nonexistent/{bundle}", "--device", url)


@FUZZ
@given(command=st.sampled_from(["inspect", "check"]), bundle=arg)
def test_any_bundle_path_gets_one_line(command: str, bundle: str) -> None:
    invoke(command, f"/nonexistent/{bundle}")


def _numbers(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from _numbers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _numbers(v)
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield node
