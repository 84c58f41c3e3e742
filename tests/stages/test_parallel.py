"""Distillation as N processes: a killed rank resumed, a launch by environment alone (what accelerate launch and
torchrun hand each process), accelerate launch itself, the GPU path, and `edgepipe build` reusing what they trained.

Every run here trains the same tiny recipe; N processes on half batches must end where one process on whole
batches ends (every loss term is a mean over rows, so averaged gradients take the same steps).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from edgepipe.cli import cli
from edgepipe.config import resolve_run_config
from edgepipe.errors import UsageError
from edgepipe.progress import Progress
from edgepipe.stages import parallel
from edgepipe.stages.distill import load_student

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
# The killed run: checkpoints every 3 steps, and rank KILL_RANK dies by SIGKILL inside its optimizer step 8, after
# step 7's gradients were averaged. Rank 0 cannot pass step 8's all-reduce alone, so its last commit is step 6.
KILLER = """
import os, signal, sys
import torch
import edgepipe.stages.distill as distill
from edgepipe.cli import main

distill.CHECKPOINT_EVERY = 3
if os.environ["RANK"] == os.environ["KILL_RANK"]:
    step, calls = torch.optim.AdamW.step, []

    def dying_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = dying_step
sys.argv = ["edgepipe", *sys.argv[1:]]
main()
"""


@pytest.fixture(scope="module")
def recipe(tiny_checkpoint, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n'
        # fp32: bf16 rounding depends on the batch's shape; token_weight: the ragged token targets are sharded too
        f'[distill]\nsteps = {STEPS}\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\nprecision = "fp32"\n'
        "token_weight = 1.0\n[validate]\nsamples = 32\n"
    )
    return path


@pytest.fixture(scope="module")
def one_process(recipe, tmp_path_factory) -> dict[str, torch.Tensor]:
    """The student one process trains on the CPU (here, in this process), as a state dict."""
    from edgepipe.build import distill

    cfg = resolve_run_config(str(recipe), "host-cpu", None, tmp_path_factory.mktemp("art"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path on a GPU machine too
        result = distill(cfg, cache_root=tmp_path_factory.mktemp("one"), progress=Progress(quiet=True))
    assert result.meta["world_size"] == 1 and result.meta["steps"] == STEPS
    return load_student(result.dir).state_dict()


def distill_args(recipe: Path) -> list[str]:
    return ["-m", "edgepipe.cli", "distill", "--model", str(recipe)]


def run(cmd: list[str], cache: Path, **env) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDGEPIPE_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": "", **env}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]


def entry(cache: Path) -> Path:
    """The one complete distill entry in ``cache``."""
    (meta,) = (cache / "distill").glob("*/meta.json")
    return meta.parent


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a), max((a[k] - b[k]).abs().max() for k in a)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_resumes_to_the_uninterrupted_weights_and_build_reuses_them(recipe, one_process, tmp_path):
    from edgepipe.build import build

    cache = tmp_path / "cache"
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    killed = run(torchrun(str(killer), "distill", "--model", str(recipe)), cache, KILL_RANK="1")
    assert killed.returncode != 0, killed.stderr[-2000:]
    (work,) = (cache / "distill").glob(".*.partial")
    assert not list((cache / "distill").glob("*/meta.json"))  # no entry a later build would trust
    assert json.loads((work / "resume.json").read_text())["step"] == 6
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint-6.safetensors", "resume.json", "state-6.pt"]

    resumed = run(torchrun(*distill_args(recipe)), cache)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    meta = json.loads((entry(cache) / "meta.json").read_text())
    assert meta["resumed_from"] == 6 and meta["world_size"] == 2 and meta["steps"] == STEPS
    assert not list(entry(cache).glob("checkpoint*"))
    assert_same_weights(load_student(entry(cache)).state_dict(), one_process)

    cfg = resolve_run_config(str(recipe), "host-cpu", "fp32", tmp_path / "artifacts")
    bundle = build(cfg, cache_root=cache)
    (record,) = [r for r in bundle.manifest["stages"] if r["stage"] == "distill"]
    assert record["cache_hit"] and record["cache_key"] == entry(cache).name
    assert bundle.manifest["fidelity"]["lowered"]["mean_cosine"] > 0.9

    # Elsewhere (another machine, other package versions): a copy of the entry, checked by its recipe hash.
    copied = tmp_path / "copied-student"
    shutil.copytree(entry(cache), copied)
    elsewhere = build(cfg, cache_root=tmp_path / "elsewhere", student=copied)
    (record,) = [r for r in elsewhere.manifest["stages"] if r["stage"] == "distill"]
    assert record["config"]["from"] == str(copied) and record["metrics"]["resumed_from"] == 6
    other = ["--model", str(recipe), "--precision", "fp32", "--out", str(tmp_path / "x"), "--student", str(copied)]
    mismatch = CliRunner().invoke(cli, ["build", *other, "--set", "distill.steps=13"])
    assert mismatch.exit_code == 2 and "was distilled for recipe hash" in mismatch.output, mismatch.output
    assert "Traceback" not in mismatch.output


def test_a_launch_by_environment_alone_trains_as_two_ranks(recipe, one_process, tmp_path):
    """What accelerate launch (and torchrun) hand each process: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT."""
    cache = tmp_path / "cache"
    port = str(free_port())
    ranks = [
        subprocess.Popen(
            [sys.executable, *distill_args(recipe)],
            cwd=REPO,
            env={
                **os.environ,
                "OMP_NUM_THREADS": "1",
                "CUDA_VISIBLE_DEVICES": "",  # gloo on the CPU, GPU machine or not
                "EDGEPIPE_CACHE": str(cache),
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=300) for p in ranks]
    assert [p.returncode for p in ranks] == [0, 0], [err[-2000:] for _, err in outs]
    assert "held-back vs teacher" in outs[0][0] and outs[1][0] == ""  # rank 0 alone reports
    assert json.loads((entry(cache) / "meta.json").read_text())["world_size"] == 2
    assert_same_weights(load_student(entry(cache)).state_dict(), one_process)


def test_accelerate_launch_trains_as_two_ranks(recipe, one_process, tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (the environment launch above covers it)")
    # --multi_gpu is accelerate's torchrun launcher; on a machine without CUDA its processes join over gloo.
    args = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *args, "--dynamo_backend", "no", *distill_args(recipe)]
    proc = run(cmd, tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((entry(tmp_path / "cache") / "meta.json").read_text())["world_size"] == 2
    assert_same_weights(load_student(entry(tmp_path / "cache")).state_dict(), one_process)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: the GPU path (the rank's GPU, bf16 autocast) needs one"
)
def test_distill_trains_on_the_gpu_with_bf16_where_it_has_it(recipe, one_process, tmp_path):
    from edgepipe.build import distill

    cfg = resolve_run_config(str(recipe), "host-cpu", None, tmp_path / "art")
    fp32 = distill(cfg, cache_root=tmp_path / "fp32")
    assert fp32.meta["device"] == "cuda" and fp32.meta["precision"] == "fp32"
    gpu = load_student(fp32.dir).state_dict()
    assert all(torch.allclose(gpu[k], one_process[k], atol=1e-3) for k in gpu)  # same steps as the CPU's
    auto = resolve_run_config(str(recipe), "host-cpu", None, tmp_path / "art", ("distill.precision=auto",))
    bf16 = distill(auto, cache_root=tmp_path / "auto")
    assert bf16.meta["precision"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert bf16.meta["held_out"]["mean_cosine"] == pytest.approx(fp32.meta["held_out"]["mean_cosine"], abs=0.01)


def test_build_launched_as_several_processes_says_to_distill_instead(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(cli, ["build", "--model", "minilm-student"])
    assert result.exit_code == 2
    assert "edgepipe build runs as one process" in result.output and "Traceback" not in result.output


def test_distill_refuses_a_recipe_without_a_student_in_one_line():
    result = CliRunner().invoke(cli, ["distill", "--model", "minilm-teacher"])
    assert result.exit_code == 2, result.output
    assert "trains encoder students; minilm-teacher is a recipe without a [student] table" in result.output


def test_a_partial_launcher_environment_is_one_line(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(UsageError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR"):
        parallel.init()


def test_a_batch_that_does_not_split_over_the_ranks_is_one_line(tiny_checkpoint, tmp_path, teacher_dir):
    from edgepipe.config import DistillConfig, StudentConfig
    from edgepipe.models.hf import load_encoder
    from edgepipe.stages.distill import distill

    with pytest.raises(UsageError, match="batch_size = 8 does not split evenly over 3 processes"):
        distill(
            load_encoder(tiny_checkpoint),
            StudentConfig(layers=(0, 2)),
            DistillConfig(batch_size=8),
            tmp_path,
            Progress(quiet=True),
            tokenizer_path=teacher_dir / "tokenizer.json",
            ranks=parallel.Ranks(world=3),
        )
