"""Decoder students: initialised from the teacher as documented, trained by next-token KL on real text,
deterministic, resumable, and saved as checkpoints that reload with their attention form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgepipe.config import DecoderDistillConfig, PretrainConfig, load_recipe
from edgepipe.data import encode_text, read_sentences, windows
from edgepipe.models.decoder import DecoderConfig, DecoderLM
from edgepipe.models.hf_decoders import load_decoder
from edgepipe.models.mamba import MambaLM
from edgepipe.progress import Progress
from edgepipe.stages.distill_decoder import distill_decoder, evaluate, init_student
from edgepipe.stages.pretrain import pretrain

TRAIN = read_sentences("train.txt", 1500)
HELD = read_sentences("validation.txt", 60)
BUDGET = DecoderDistillConfig(steps=4, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_tokens=512)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-layer decoder (hidden 64, 4 heads over 2 kv heads) pretrained 40 steps on real text; its directory."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("tiny-teacher")
    arch = DecoderConfig(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, tie_embeddings=True, max_context=64)
    budget = PretrainConfig(vocab_size=512, steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=4)
    pretrain(arch, budget, out, Progress(quiet=True), None, TRAIN, HELD)
    return out


def _distill(teacher_dir, form, out, stop_after=None):
    teacher = load_decoder(teacher_dir)
    student = init_student(teacher, form)
    tok = teacher_dir / "tokenizer.json"
    metrics = distill_decoder(teacher, student, tok, BUDGET, out, Progress(quiet=True), stop_after, TRAIN, HELD)
    return metrics, student


def test_windowed_student_starts_as_the_teacher_within_its_window(teacher):
    t = load_decoder(teacher)
    student = init_student(t, "windowed:16")
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(student(ids), t(ids), atol=1e-5)  # one block: every key is visible to both
        long = torch.randint(0, 512, (1, 60), generator=torch.Generator().manual_seed(1))
        assert not torch.allclose(student(long), t(long), atol=1e-3)  # past 2 blocks it no longer sees everything


def test_mamba_student_takes_the_attention_weights(teacher):
    t = load_decoder(teacher)
    s = init_student(t, "mamba2")
    assert isinstance(s, MambaLM) and s.cfg.n_groups == t.cfg.heads and s.cfg.intermediate == t.cfg.hidden
    mix, attn, c = s.layers[0].mixer, t.layers[0].attn, s.cfg
    inner, gn = c.intermediate, c.n_groups * c.state_size
    rows = mix.in_proj.weight
    assert torch.equal(rows[2 * inner + gn : 2 * inner + 2 * gn], attn.q_proj.weight)  # C <- W_q
    assert torch.equal(rows[2 * inner : 2 * inner + 16], attn.k_proj.weight[:16])  # B <- W_k, head 0
    assert torch.equal(rows[2 * inner + 16 : 2 * inner + 32], attn.k_proj.weight[:16])  # repeated for head 1
    assert torch.equal(mix.out_proj.weight, attn.o_proj.weight) and torch.equal(s.embed.weight, t.embed.weight)
    assert torch.equal(mix.conv1d.weight[:, 0, :-1], torch.zeros_like(mix.conv1d.weight[:, 0, :-1]))


@pytest.mark.parametrize("form", ["windowed:4", "mamba2"])
def test_distillation_trains_the_student_toward_the_teacher_on_held_back_text(teacher, tmp_path, form):
    metrics, _ = _distill(teacher, form, tmp_path / "s")
    before, after = metrics["before"], metrics["held_out"]
    assert after["tokens"] == before["tokens"] > 0
    if form == "mamba2":  # starts far from the teacher (fresh gates and dt): KL, the quantity trained, falls
        assert after["kl_to_teacher"] < 0.8 * before["kl_to_teacher"]
    else:  # starts as the teacher minus the far context, which this tiny teacher barely uses: it stays there
        assert before["kl_to_teacher"] < 0.01 and after["kl_to_teacher"] < 0.01
        assert after["top1_vs_teacher"] > 0.95 and after["perplexity"] < 1.1 * after["teacher_perplexity"]
    assert metrics["loss_every_10"][0] > 0 and not (tmp_path / "s" / "train_state").exists()
    reloaded = load_decoder(tmp_path / "s")
    assert type(reloaded).__name__ == ("MambaLM" if form == "mamba2" else "DecoderLM")
    if form != "mamba2":
        assert reloaded.cfg.attention == form  # the form travels in config.json


def test_same_seed_same_student_and_resume_equals_uninterrupted(teacher, tmp_path):
    _, a = _distill(teacher, "windowed:8", tmp_path / "a")
    _, b = _distill(teacher, "windowed:8", tmp_path / "b")
    stopped, _ = _distill(teacher, "windowed:8", tmp_path / "c", stop_after=2)
    assert stopped == {"stopped_at": 2} and (tmp_path / "c" / "train_state").is_dir()
    _, c = _distill(teacher, "windowed:8", tmp_path / "c")
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
        assert torch.allclose(x, z, atol=1e-6), name


def _score_reference(student, teacher, wins) -> dict:
    """evaluate's figures the slow way: one window at a time, log-softmax and KL in float64 numpy."""
    nll_s = nll_t = agree = kl = 0.0
    for win in wins:
        ids = torch.from_numpy(win[None, :-1])
        with torch.no_grad():
            s, t = (m(ids)[0].double().numpy() for m in (student, teacher))
        for logits_s, logits_t, target in zip(s, t, win[1:]):
            log_s = logits_s - np.logaddexp.reduce(logits_s)
            log_t = logits_t - np.logaddexp.reduce(logits_t)
            nll_s, nll_t = nll_s - log_s[target], nll_t - log_t[target]
            agree += int(np.argmax(logits_s) == np.argmax(logits_t))
            kl += float(np.sum(np.exp(log_t) * (log_t - log_s)))
    n = wins[:, 1:].size
    return {"perplexity": np.exp(nll_s / n), "teacher_perplexity": np.exp(nll_t / n), "top1": agree / n, "kl": kl / n}


def test_evaluate_matches_a_window_by_window_reference(teacher):
    """A student that differs from the teacher (windows of 4 on 32-token windows), scored by evaluate and by a slow
    independent computation: the two agree, and neither is the trivial teacher-vs-itself answer."""
    from tokenizers import Tokenizer

    t = load_decoder(teacher)
    student = init_student(t, "windowed:4")
    stream = encode_text(Tokenizer.from_file(str(teacher / "tokenizer.json")), HELD)
    with torch.no_grad():
        got = evaluate(student, t, stream, 32, 512)
    want = _score_reference(student, t, windows(stream[: 512 + 512 // 32 + 1], 33))
    assert got["tokens"] == 512
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert got["teacher_perplexity"] == pytest.approx(want["teacher_perplexity"], rel=1e-4)
    assert want["teacher_perplexity"] < 512  # 40 steps of pretraining beat a uniform guess
    assert got["top1_vs_teacher"] == pytest.approx(want["top1"], abs=1e-4) and want["top1"] < 1.0
    assert got["kl_to_teacher"] == pytest.approx(want["kl"], abs=1e-4) and want["kl"] > 0


def test_student_recipes_parse():
    windowed, mamba = load_recipe("tinylm-windowed"), load_recipe("tinylm-mamba")
    assert windowed.kind == mamba.kind == "decoder" and windowed.teacher == "tinylm-teacher.toml"
    assert windowed.student.attention == "windowed:64" and mamba.student.attention == "mamba2"
    assert isinstance(windowed.decoder.distill, DecoderDistillConfig) and windowed.decoder.distill.lr == 5e-5
    assert windowed.distill is None  # a decoder's [distill] table is decoder.distill, not the encoders'
    assert mamba.decoder.mamba == {"chunk_size": 64}


def test_unknown_distill_key_is_reported(tmp_path):
    from edgepipe.errors import ConfigError

    bad = tmp_path / "bad.toml"
    bad.write_text('kind = "decoder"\nteacher = "pretrain"\n[distill]\nstepz = 3\n')
    with pytest.raises(ConfigError, match="stepz"):
        load_recipe(str(bad))


def test_student_form_must_be_known(teacher):
    from edgepipe.errors import UsageError

    with pytest.raises(UsageError):
        init_student(load_decoder(teacher), "mamba2", {"n_groups": 1})
    assert isinstance(init_student(load_decoder(teacher), "linear"), DecoderLM)
