"""Pretraining from scratch: a deterministic BPE tokenizer, resume-after-interrupt equal to an uninterrupted run, and
a result that loads back through the HF Llama path."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edgepipe.config import EOS, DecoderConfig, PretrainConfig
from edgepipe.data import encode_text, read_sentences
from edgepipe.models.hf_decoders import load_decoder
from edgepipe.progress import Progress
from edgepipe.stages.pretrain import (
    batch_indices,
    lr_at,
    perplexity,
    pretrain,
    train_tokenizer,
)

TINY = DecoderConfig(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64, tie_embeddings=True, max_context=32)


def tiny_budget(steps: int = 6) -> PretrainConfig:
    return PretrainConfig(
        vocab_size=384,
        steps=steps,
        batch_size=4,
        seq_len=32,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=2,
        eval_tokens=512,
    )


@pytest.fixture(scope="module")
def train_text() -> list[str]:
    return read_sentences("train.txt", 400)


@pytest.fixture(scope="module")
def eval_text() -> list[str]:
    return read_sentences("validation.txt", 60)


def test_train_tokenizer_is_deterministic_and_round_trips(train_text):
    a, b = train_tokenizer(train_text, 512), train_tokenizer(train_text, 512)
    assert a.to_str() == b.to_str()
    assert a.get_vocab_size() == 512
    assert [a.token_to_id(t) for t in ("<|pad|>", "<|bos|>", "<|eos|>")] == [0, 1, 2]
    text = "Emma's café costs 3€ — naïve?"  # bytes outside the training text still encode (byte-level)
    assert a.decode(a.encode(text).ids) == text
    tokens = sum(len(e.ids) for e in a.encode_batch(train_text))
    assert tokens < sum(len(t.encode()) for t in train_text) / 2  # merges learned: under half a token per byte


def test_encode_text_packs_sentences_with_eos(train_text):
    tok = train_tokenizer(train_text, 384)
    stream = encode_text(tok, train_text[:3])
    eos = tok.token_to_id(EOS)
    assert int((stream == eos).sum()) == 3 and stream[-1] == eos


def test_batch_indices_cover_each_epoch_once():
    seen = np.concatenate([batch_indices(s, 20, 4, seed=0) for s in range(5)])
    assert sorted(seen.tolist()) == list(range(20))
    assert not np.array_equal(batch_indices(5, 20, 4, 0), batch_indices(0, 20, 4, 0))  # next epoch reshuffles


def test_lr_warms_up_then_decays_to_floor():
    cfg = PretrainConfig(steps=100, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))


def test_pretrain_resume_after_interrupt_equals_uninterrupted_run(tmp_path, train_text, eval_text):
    torch.set_num_threads(1)
    quiet = Progress(quiet=True)
    full = pretrain(TINY, tiny_budget(), tmp_path / "full", quiet, None, train_text, eval_text)
    stopped = pretrain(TINY, tiny_budget(), tmp_path / "cut", quiet, 3, train_text, eval_text)  # checkpoint at 2, 3
    assert stopped == {"stopped_at": 3}
    resumed = pretrain(TINY, tiny_budget(), tmp_path / "cut", quiet, None, train_text, eval_text)
    assert resumed["resumed_from"] == 3
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["held_out_perplexity"] == full["held_out_perplexity"]
    assert full["loss_every_10"][0] < np.log(384) + 0.5  # starts near uniform, did not diverge
    assert not (tmp_path / "full" / "train_state").exists()


def test_pretrain_output_loads_as_hf_llama_and_learns(tmp_path, train_text, eval_text):
    torch.set_num_threads(1)
    cfg = tiny_budget(steps=30)
    metrics = pretrain(TINY, cfg, tmp_path, Progress(quiet=True), None, train_text, eval_text)
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 30
    model = load_decoder(tmp_path)
    assert model.cfg.vocab_size == 384 and model.cfg.tie_embeddings
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ppl = perplexity(model, encode_text(tok, eval_text), cfg.seq_len, cfg.eval_tokens)
    assert ppl == pytest.approx(metrics["held_out_perplexity"], rel=1e-4)  # the saved weights are the trained ones
    assert ppl < 384 * 0.5  # 30 steps beat a uniform guess over the vocabulary by a wide margin
