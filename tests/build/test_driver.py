"""The build driver on a fake recipe: the precision fallback loop and the atomic bundle, no torch, milliseconds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.build.driver import Attempt, Build
from edgepipe.cache import StageCache
from edgepipe.config import RunConfig, load_recipe, load_target
from edgepipe.errors import BuildError
from edgepipe.manifest import read_manifest
from edgepipe.precisions import tolerance
from edgepipe.progress import Progress


def _build(tmp_path: Path, precision: str = "w8a8", budget: float = 0.01, precisions=None) -> Build:
    recipe = load_recipe("minilm-teacher", (f"quantize.fidelity_budget={budget}",))
    target = load_target("host-cpu")
    if precisions is not None:
        import dataclasses

        target = dataclasses.replace(target, precisions=tuple(precisions))
    cfg = RunConfig(recipe, target, precision, tmp_path / "out")
    return Build(cfg, StageCache(tmp_path / "cache"), Progress(quiet=True))


def _recipe(build: Build, drops: dict[str, float], tried: list[str]):
    """A recipe whose 'lowering' writes one file and whose 'validation' reports a fixed drop per precision."""

    def attempt(precision: str) -> Attempt:
        tried.append(precision)

        def lower(out: Path) -> dict:
            (out / "model.bin").write_text(precision)
            return {"files": {"model": "model.bin"}, "report": {"precision": precision}}

        lowered = build.stage("lower", {"precision": precision}, lower, f"lower {precision}")
        validated = build.stage("validate", {"artifact": lowered.key}, lambda out: {"drop": drops[precision]}, "v")
        return Attempt(precision, lowered, validated, drops[precision])

    return attempt


def test_fit_precision_follows_the_encoder_fallback_chain_until_the_budget_holds(tmp_path):
    build, tried = _build(tmp_path), []
    drops = {"w8a8": 0.05, "int8-fp16": 0.02, "fp16": 0.004, "fp32": 0.0}
    best = build.fit_precision(_recipe(build, drops, tried), build.target.precisions, "encoder", "cosine")
    assert tried == ["w8a8", "int8-fp16", "fp16"] and best.precision == "fp16" and best.drop == 0.004
    decisions = [r.get("decision") for r in build.records if r["stage"] == "validate"]
    assert decisions == [
        "w8a8 dropped 0.0500 > budget 0.01: fall back to int8-fp16",
        "int8-fp16 dropped 0.0200 > budget 0.01: fall back to fp16",
        None,
    ]


def test_fit_precision_keeps_a_plan_inside_its_budget(tmp_path):
    build, tried = _build(tmp_path, "int8-dynamic"), []
    best = build.fit_precision(_recipe(build, {"int8-dynamic": 0.009}, tried), ("int8-dynamic",), "encoder", "cos")
    assert tried == ["int8-dynamic"] and best.precision == "int8-dynamic"


def test_fit_precision_refuses_when_the_target_has_no_fallback(tmp_path):
    build, tried = _build(tmp_path, "int8-fp16", precisions=["int8-fp16", "w8a8"]), []
    with pytest.raises(BuildError, match=r"int8-fp16 loses 0\.0300 mean cosine.*no fallback plan on target host-cpu"):
        build.fit_precision(
            _recipe(build, {"int8-fp16": 0.03}, tried), build.target.precisions, "encoder", "mean cosine"
        )
    assert tried == ["int8-fp16"]  # fp16 is the chain's next plan, but this target does not take it


def test_decoder_family_falls_back_along_its_own_chain(tmp_path):
    build, tried = _build(tmp_path, "a8w16", precisions=["fp32", "a8w16"]), []
    drops = {"a8w16": 0.5, "fp32": 0.0}
    best = build.fit_precision(_recipe(build, drops, tried), ("fp32", "a8w16"), "decoder", "top-1")
    assert tried == ["a8w16", "fp32"] and best.precision == "fp32"  # decoders' a8w16 falls back to fp32, not fp16


def test_write_bundle_is_whole_or_absent(tmp_path):
    build, tried = _build(tmp_path), []
    best = build.fit_precision(_recipe(build, {"w8a8": 0.0}, tried), build.target.precisions, "encoder", "cos")
    files = {"model.bin": best.lowered.dir / "model.bin"}
    manifest = build.manifest(
        kind="encoder",
        family="encoder",
        best=best,
        latency=None,
        route={},
        source_model={},
        graphs={"model": "model.bin"},
    )
    bundle = build.write_bundle(files, manifest, lambda tmp: (tmp / "check.npz").write_bytes(b"x"))
    first = read_manifest(bundle.path)
    assert (bundle.path / "model.bin").read_text() == "w8a8" and "check.npz" in first["files"]
    assert first["validation"]["atol"] == tolerance("w8a8", "encoder")["atol"]

    def fail(tmp: Path) -> None:
        (tmp / "check.npz").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(BuildError, match=r"No space left writing bundle host-cpu in .*nothing half-written"):
        build.write_bundle(files, manifest, fail)
    assert read_manifest(bundle.path) == first  # the previous bundle is untouched
    leftovers = [p.name for p in bundle.path.parent.iterdir() if p.name != bundle.path.name]
    assert leftovers == []  # no temporary directory left behind


def test_the_driver_imports_no_torch():
    code = "import sys, edgepipe.build.driver; print(json.dumps(sorted(m for m in sys.modules if m == 'torch')))"
    out = subprocess.run([sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_fit_precision_refuses_non_finite_outputs_instead_of_shipping_them(tmp_path):
    build, tried = _build(tmp_path, "fp32"), []
    with pytest.raises(BuildError, match=r"fp32 encoder gives non-finite outputs on held-back text"):
        build.fit_precision(_recipe(build, {"fp32": float("nan")}, tried), ("fp32",), "encoder", "cos")
