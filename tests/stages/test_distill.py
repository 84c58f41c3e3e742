"""Distillation: students cut from the teacher, trained on real text, resumable, and data-parallel under torchrun."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from edgepipe.config import DistillConfig, StudentConfig
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError
from edgepipe.models.hf import load_encoder
from edgepipe.progress import Progress
from edgepipe.stages.distill import (
    MixerTransfer,
    attention_transfer,
    distill,
    length_grouped_batches,
    load_student,
    make_student,
    residual_basis,
    teacher_targets,
    token_lengths,
    training_precision,
)
from edgepipe.stages.validate import compare, embed_torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tiny_teacher(tiny_checkpoint):
    return load_encoder(tiny_checkpoint)


@pytest.fixture(scope="module")
def held_out(teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 64)
    return list(batches(tok, read_sentences("validation.txt", 64), 32))


def test_make_student_with_all_layers_reproduces_the_teacher(tiny_teacher, held_out):
    student, _ = make_student(tiny_teacher, StudentConfig(layers=(0, 1, 2, 3)))
    np.testing.assert_allclose(embed_torch(student, held_out), embed_torch(tiny_teacher, held_out), atol=1e-6)


def test_make_student_prunes_ffn_and_keeps_chosen_layers(tiny_teacher):
    student, layer_map = make_student(tiny_teacher, StudentConfig(layers=(1, 3), ffn=64))
    assert layer_map == [1, 3] and len(student.layers) == 2
    assert student.layers[0].ffn_in.weight.shape == (64, 64)
    torch.testing.assert_close(student.layers[1].mixer.query.weight, tiny_teacher.layers[3].mixer.query.weight)


@pytest.mark.parametrize("attention", ["windowed:8", "linear", "mamba2"])
def test_make_student_swaps_the_mixer(tiny_teacher, held_out, attention):
    student, _ = make_student(tiny_teacher, StudentConfig(layers=(0, 2), attention=attention))
    emb = embed_torch(student, held_out)
    assert emb.shape == (64, 64) and np.isfinite(emb).all()


@pytest.mark.parametrize("attention", ["linear", "mamba2"])
def test_attention_transfer_trains_only_the_swapped_mixers_toward_the_teachers_attention(
    tiny_teacher, held_out, teacher_dir, attention
):
    """Each student mixer, fed its teacher layer's input, must come closer to that layer's attention output on
    held-back text (not just on the batches it trained on), and nothing but the mixers may change."""
    teacher = copy.deepcopy(tiny_teacher)
    with torch.no_grad():
        for layer in teacher.layers:  # peaked softmax, as in a trained model (the random init's is almost uniform)
            layer.mixer.query.weight.mul_(8.0)
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 48)
    student, layer_map = make_student(teacher, StudentConfig(layers=(0, 1, 2, 3), attention=attention))
    probe = MixerTransfer(teacher, student, layer_map)
    unseen = [(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"]).float()) for b in held_out]
    with torch.no_grad():
        before = [probe(ids, mask).item() for ids, mask in unseen]
    kept = {k: v.clone() for k, v in student.state_dict().items() if ".mixer." not in k}
    cfg = DistillConfig(batch_size=16, transfer_steps=25, transfer_lr=1e-3)
    sentences = read_sentences("train.txt", 400)
    metrics = attention_transfer(teacher, student.train(), layer_map, tok, sentences, cfg, Progress(quiet=True))
    assert metrics["relative_error_last"] < metrics["relative_error_first"], metrics
    with torch.no_grad():
        after = [probe(ids, mask).item() for ids, mask in unseen]
    assert np.mean(after) < 0.9 * np.mean(before), (before, after)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in kept.items())  # embeddings, norms, FFNs untouched


def test_distill_runs_attention_transfer_first_and_says_so_in_its_estimate(tmp_path, tiny_teacher, teacher_dir):
    from rich.console import Console

    console = Console(record=True, width=200)
    cfg = DistillConfig(steps=4, batch_size=8, warmup_steps=1, max_len=32, transfer_steps=3)
    tok_path = teacher_dir / "tokenizer.json"
    metrics = distill(
        tiny_teacher, StudentConfig((0, 2), "linear"), cfg, tmp_path, Progress(console), tokenizer_path=tok_path
    )
    assert metrics["attention_transfer"]["steps"] == 3 and np.isfinite(
        metrics["attention_transfer"]["relative_error_last"]
    )
    assert "attention transfer: 3 steps" in console.export_text()


def test_narrow_student_keeps_the_teachers_strongest_channels_and_projects_back_to_its_size(
    tiny_teacher, held_out, teacher_dir
):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 48)
    basis = residual_basis(tiny_teacher, tok, read_sentences("train.txt", 64), 32)
    kept = basis.argmax(0)
    assert basis.shape == (64, 32) and (basis.sum(0) == 1).all() and (kept.diff() > 0).all()  # a channel subset
    student, _ = make_student(tiny_teacher, StudentConfig(layers=(0, 1, 2, 3), hidden=32), basis)
    assert student.cfg.hidden == 32 and student.cfg.attention_width == 64 and student.cfg.output == 64
    assert student.layers[0].mixer.query.weight.shape == (64, 32)
    assert student.layers[0].ffn_out.weight.shape == (32, 128)
    torch.testing.assert_close(student.word_embeddings.weight, tiny_teacher.word_embeddings.weight[:, kept])
    torch.testing.assert_close(student.layers[2].ffn_norm.bias, tiny_teacher.layers[2].ffn_norm.bias[kept])
    teacher_emb = embed_torch(tiny_teacher, held_out)
    strong = compare(embed_torch(student, held_out), teacher_emb)
    assert teacher_emb.shape == embed_torch(student, held_out).shape  # the projection restores the teacher's size
    # the stronger half of the channels starts the student closer to the teacher than the weaker half
    weak = torch.eye(64)[:, torch.ones(64).index_fill(0, kept, 0).nonzero().flatten()]  # the other half
    student_weak, _ = make_student(tiny_teacher, StudentConfig(layers=(0, 1, 2, 3), hidden=32), weak)
    assert strong["mean_cosine"] > compare(embed_torch(student_weak, held_out), teacher_emb)["mean_cosine"] + 0.05


def test_a_narrow_teachers_student_projects_through_the_teachers_projection(tiny_teacher, held_out, teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 48)
    text = read_sentences("train.txt", 64)
    narrow, _ = make_student(
        tiny_teacher, StudentConfig(layers=(0, 1, 2, 3), hidden=32), residual_basis(tiny_teacher, tok, text, 32)
    )
    basis = residual_basis(narrow, tok, text, 24)
    student, _ = make_student(narrow.eval(), StudentConfig(layers=(0, 1, 2, 3), hidden=24), basis)
    assert student.cfg.inner == 64 and student.cfg.output == 64  # the original teacher's widths, not the stream's
    torch.testing.assert_close(student.project.weight, narrow.project.weight[:, basis.argmax(0)])
    assert embed_torch(student, held_out).shape == embed_torch(tiny_teacher, held_out).shape


def test_distill_trains_a_narrow_student_toward_the_teacher(tmp_path, tiny_teacher, held_out, teacher_dir):
    teacher_emb = embed_torch(tiny_teacher, held_out)
    cfg = DistillConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=3, max_len=48, token_weight=1.0)
    kwargs = dict(held_out=held_out, held_out_teacher=teacher_emb, tokenizer_path=teacher_dir / "tokenizer.json")
    narrow = StudentConfig(layers=(0, 3), hidden=40)
    out = distill(tiny_teacher, narrow, cfg, tmp_path / "s", Progress(quiet=True), **kwargs)
    assert out["held_out"]["mean_cosine"] > out["held_out_before"]["mean_cosine"] + 0.01
    student = load_student(tmp_path / "s")
    assert student.cfg.hidden == 40 and student.project is not None
    assert compare(embed_torch(student, held_out), teacher_emb)["mean_cosine"] == pytest.approx(
        out["held_out"]["mean_cosine"], abs=1e-5
    )


@pytest.mark.parametrize(
    ("student", "transfer", "message"),
    [
        (StudentConfig(layers=(0, 1), hidden=96), 0, "width is 1 to 64, its teacher's at most"),
        (StudentConfig(layers=(0, 1), hidden=32, attention="mamba2"), 0, "keeps that width"),
        (StudentConfig(layers=(0, 1), hidden=32, attention="linear"), 5, "transfer_steps with student.hidden = 32"),
    ],
)
def test_narrow_students_the_init_cannot_make_are_refused(
    tmp_path, tiny_teacher, teacher_dir, student, transfer, message
):
    cfg = DistillConfig(steps=2, batch_size=4, max_len=32, transfer_steps=transfer)
    tokenizer = teacher_dir / "tokenizer.json"
    with pytest.raises(BuildError, match=message):
        distill(tiny_teacher, student, cfg, tmp_path, Progress(quiet=True), tokenizer_path=tokenizer)


def test_make_student_rejects_layers_the_teacher_lacks(tiny_teacher):
    with pytest.raises(BuildError, match="names layers the teacher lacks"):
        make_student(tiny_teacher, StudentConfig(layers=(0, 9)))


def test_distill_improves_held_out_fidelity_and_is_deterministic(
    tmp_path, tiny_teacher, held_out, teacher_dir, monkeypatch
):
    import edgepipe.stages.distill as d

    teacher_emb = embed_torch(tiny_teacher, held_out)
    cfg = DistillConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=3, max_len=48, token_weight=1.0)
    monkeypatch.setattr(d, "EVAL_EVERY", 10)  # run a: held-back cosines mid-run; run b: none
    kwargs = dict(held_out=held_out, held_out_teacher=teacher_emb, tokenizer_path=teacher_dir / "tokenizer.json")
    a = distill(tiny_teacher, StudentConfig(layers=(0, 3)), cfg, tmp_path / "a", Progress(quiet=True), **kwargs)
    assert a["held_out"]["mean_cosine"] > a["held_out_before"]["mean_cosine"] + 0.01
    student = load_student(tmp_path / "a")
    assert compare(embed_torch(student, held_out), teacher_emb)["mean_cosine"] == pytest.approx(
        a["held_out"]["mean_cosine"], abs=1e-5
    )
    monkeypatch.setattr(d, "EVAL_EVERY", 10**6)
    b = distill(tiny_teacher, StudentConfig(layers=(0, 3)), cfg, tmp_path / "b", Progress(quiet=True), **kwargs)
    assert b["final_loss"] == a["final_loss"]  # seeded, and evaluating mid-run does not touch training


def test_bf16_training_reaches_the_fidelity_of_fp32(tmp_path, tiny_teacher, held_out, teacher_dir):
    teacher_emb = embed_torch(tiny_teacher, held_out)
    kwargs = dict(held_out=held_out, held_out_teacher=teacher_emb, tokenizer_path=teacher_dir / "tokenizer.json")
    runs = {}
    for precision in ("fp32", "bf16"):
        cfg = DistillConfig(steps=30, batch_size=16, lr=1e-3, warmup_steps=3, max_len=48, precision=precision)
        runs[precision] = distill(
            tiny_teacher, StudentConfig(layers=(0, 3)), cfg, tmp_path / precision, Progress(quiet=True), **kwargs
        )
    assert runs["bf16"]["precision"] == "bf16" and runs["fp32"]["precision"] == "fp32"
    gained = runs["fp32"]["held_out"]["mean_cosine"] - runs["fp32"]["held_out_before"]["mean_cosine"]
    assert gained > 0.01
    assert runs["bf16"]["held_out"]["mean_cosine"] == pytest.approx(
        runs["fp32"]["held_out"]["mean_cosine"], abs=0.1 * gained
    )
    # The student is saved in fp32 whatever it trained in: bf16 autocast keeps fp32 master weights.
    assert all(v.dtype == torch.float32 for v in load_student(tmp_path / "bf16").state_dict().values())


@pytest.mark.parametrize(
    ("attention", "expected"), [("full", "bf16"), ("windowed:32", "bf16"), ("linear", "fp32"), ("mamba2", "fp32")]
)
def test_auto_precision_takes_bf16_only_for_softmax_attention_on_native_bf16_cpus(attention, expected):
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    cpu = torch.device("cpu")  # the CPU rule; a GPU (parallel.native_bf16) has its own
    assert training_precision(DistillConfig(), attention, cpu) == (expected if native else "fp32")
    assert training_precision(DistillConfig(precision="fp32"), attention) == "fp32"


def test_distill_resumes_from_its_last_checkpoint(tmp_path, tiny_teacher, teacher_dir, monkeypatch):
    import edgepipe.stages.distill as d

    monkeypatch.setattr(d, "CHECKPOINT_EVERY", 5)
    cfg = DistillConfig(steps=12, batch_size=8, warmup_steps=2, max_len=32)
    student_cfg = StudentConfig(layers=(0, 2))
    tok_path = teacher_dir / "tokenizer.json"
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def crash_after_seven(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 7:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_seven)
    with pytest.raises(KeyboardInterrupt):
        distill(tiny_teacher, student_cfg, cfg, tmp_path, Progress(quiet=True), tokenizer_path=tok_path)
    assert (tmp_path / "resume.json").is_file() and (tmp_path / "checkpoint-5.safetensors").is_file()
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = distill(tiny_teacher, student_cfg, cfg, tmp_path, Progress(quiet=True), tokenizer_path=tok_path)
    assert resumed["resumed_from"] == 5
    distill(tiny_teacher, student_cfg, cfg, tmp_path / "fresh", Progress(quiet=True), tokenizer_path=tok_path)
    a, b = load_student(tmp_path).state_dict(), load_student(tmp_path / "fresh").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_distill_runs_data_parallel_under_torchrun(tmp_path, tiny_checkpoint):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        f'teacher = "{tiny_checkpoint}"\n[student]\nlayers = [0, 2]\n'
        # fp32: bf16 rounding depends on the batch's shape, and this test compares half batches with whole ones
        '[distill]\nsteps = 4\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\nprecision = "fp32"\n'
        "[validate]\nsamples = 32\n"
    )
    distill_cmd = ["-m", "edgepipe.cli", "distill", "--model", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "EDGEPIPE_CACHE": str(tmp_path / "two")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *distill_cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (two,) = (tmp_path / "two" / "distill").glob("*/meta.json")
    metrics = json.loads(two.read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 4 and np.isfinite(metrics["final_loss"])
    # Every loss term is a mean over rows, so two ranks on half batches with averaged gradients take the same steps
    # as one process on whole batches: the weights agree only if DDP really synchronised the gradients.
    env["EDGEPIPE_CACHE"] = str(tmp_path / "one")
    proc = subprocess.run(
        [sys.executable, *distill_cmd], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (one,) = (tmp_path / "one" / "distill").glob("*/meta.json")
    assert one.parent.name == two.parent.name  # one cache entry, whichever way it was trained
    a, b = load_student(two.parent).state_dict(), load_student(one.parent).state_dict()
    moved = (
        a["layers.0.ffn_in.weight"]
        - make_student(load_encoder(tiny_checkpoint), StudentConfig(layers=(0, 2)))[0].state_dict()[
            "layers.0.ffn_in.weight"
        ]
    )
    assert moved.abs().max() > 1e-4  # training moved the weights
    assert all(torch.allclose(a[k], b[k], atol=2e-5) for k in a), max((a[k] - b[k]).abs().max() for k in a)


def test_length_grouped_batches_see_every_sentence_once_per_epoch_and_pad_little(teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 128)
    lengths = token_lengths(tok, read_sentences("train.txt", 2048))
    plan = length_grouped_batches(lengths, 32, 2 * 2048 // 32, seed=0)
    epoch1, epoch2 = np.concatenate(plan[:64]), np.concatenate(plan[64:])
    assert sorted(epoch1) == sorted(epoch2) == list(range(2048))
    assert [b.tolist() for b in plan] == [b.tolist() for b in length_grouped_batches(lengths, 32, 128, seed=0)]
    grouped = np.mean([lengths[b].max() for b in plan])
    random_batches = np.mean([lengths[b].max() for b in np.random.default_rng(0).permutation(2048).reshape(-1, 32)])
    assert grouped < 0.6 * random_batches, (grouped, random_batches)


def test_teacher_token_targets_hold_each_sentences_own_states(tiny_teacher, teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 64)
    sentences = read_sentences("validation.txt", 9)
    targets = teacher_targets(tiny_teacher, tok, sentences, Progress(quiet=True), tokens=True)
    offsets = targets["offsets"]
    for i in (0, 4, 8):  # each sentence alone: no padding anywhere
        b = encode(tok, [sentences[i]])
        with torch.no_grad():
            last = tiny_teacher.hidden_states(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"]))
        got = targets["tokens"][offsets[i] : offsets[i + 1]].astype(np.float32)
        np.testing.assert_allclose(got, last[-1][0].numpy(), atol=2e-2, rtol=1e-2)


def test_bf16_teacher_targets_stay_close_to_fp32(tiny_teacher, teacher_dir):
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 64)
    sentences = read_sentences("validation.txt", 96)
    fp32, bf16 = (
        teacher_targets(tiny_teacher, tok, sentences, Progress(quiet=True), tokens=True, precision=p)
        for p in ("fp32", "bf16")
    )
    close = compare(bf16["embedding"].astype(np.float32), fp32["embedding"].astype(np.float32))
    assert close["min_cosine"] > 0.9999, close
    assert not np.array_equal(fp32["tokens"], bf16["tokens"])  # bf16 did run
    rel = np.abs(fp32["tokens"] - bf16["tokens"]).astype(np.float32).mean() / np.abs(fp32["tokens"]).mean()
    assert rel < 0.01, rel
    np.testing.assert_array_equal(fp32["offsets"], bf16["offsets"])
