"""Llama and Mamba2 checkpoint directories saved by transformers load into edgepipe's decoders with the same outputs
(transformers' Mamba2 runs its torch fallback on CPU here), save back, and fail with one-line ModelErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgepipe.errors import ModelError
from edgepipe.models.decoder import DecoderLM, generate
from edgepipe.models.hf_decoders import load_decoder, save_hf
from edgepipe.models.mamba import MambaLM

transformers = pytest.importorskip("transformers")
ATOL = 1e-4


def ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def save_llama(path: Path, **overrides) -> torch.nn.Module:
    """A tiny seeded LlamaForCausalLM (GQA: 4 query heads, 2 kv heads) saved with save_pretrained."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, **overrides,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_mamba2(path: Path, **overrides) -> torch.nn.Module:
    """A tiny seeded Mamba2ForCausalLM (8 heads of 16 in 2 groups, state 16), weights perturbed off their init."""
    torch.manual_seed(0)
    cfg = transformers.Mamba2Config(
        vocab_size=256, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16, n_groups=2,
        expand=2, chunk_size=16, **overrides,
    )  # fmt: skip
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
            },
        },
    ],
    ids=["gqa", "tied-llama3-rope"],
)  # fmt: skip
def test_llama_matches_transformers(overrides: dict, tmp_path: Path) -> None:
    hf = save_llama(tmp_path, **overrides)
    ours = load_decoder(tmp_path)
    assert isinstance(ours, DecoderLM)
    x = ids(40)  # past original_max_position_embeddings, so llama3 scaling matters
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) < ATOL
        want = hf.generate(x[:, :6], max_new_tokens=12, do_sample=False)
    assert torch.equal(generate(ours, x[:, :6], 12), want)


def test_mamba2_matches_transformers_fallback_and_its_cached_generation(tmp_path: Path) -> None:
    hf = save_mamba2(tmp_path)
    ours = load_decoder(tmp_path, chunk_size=8)
    assert isinstance(ours, MambaLM)
    x = ids(37)  # not a multiple of either chunk size
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) < ATOL
        want = hf.generate(x[:, :9], max_new_tokens=12, do_sample=False)  # transformers' own cache + recurrent step
    assert torch.equal(generate(ours, x[:, :9], 12), want)


@pytest.mark.parametrize("kind", ["llama", "mamba2"])
def test_save_hf_round_trips_through_transformers(kind: str, tmp_path: Path) -> None:
    (save_llama if kind == "llama" else save_mamba2)(tmp_path / "src", tie_word_embeddings=True)
    ours = load_decoder(tmp_path / "src")
    save_hf(ours, tmp_path / "out")
    auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids(20)
    with torch.no_grad():
        assert max_diff(auto(x).logits, ours(x)) < ATOL
        assert max_diff(load_decoder(tmp_path / "out")(x), ours(x)) == 0.0


def test_llama_loads_with_windowed_attention_equal_to_full_when_window_covers_sequence(tmp_path: Path) -> None:
    save_llama(tmp_path)
    full, windowed = load_decoder(tmp_path), load_decoder(tmp_path, attention="windowed:32")
    x = ids(32)
    with torch.no_grad():
        assert max_diff(full(x), windowed(x)) < ATOL


def expect_one_line(path: Path, match: str) -> None:
    with pytest.raises(ModelError, match=match) as err:
        load_decoder(path)
    assert "\n" not in str(err.value)


def test_missing_directory_and_config_are_model_errors(tmp_path: Path) -> None:
    expect_one_line(tmp_path / "nope", "not a directory")
    expect_one_line(tmp_path, "no config.json")


def test_missing_and_corrupt_weights_are_model_errors(tmp_path: Path) -> None:
    save_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    expect_one_line(tmp_path, "corrupt or truncated")
    weights.unlink()
    expect_one_line(tmp_path, "no model.safetensors")


def test_unknown_architecture_and_bad_config_are_model_errors(tmp_path: Path) -> None:
    save_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    expect_one_line(tmp_path, "accepted decoder model_types: llama, mamba2")
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    expect_one_line(tmp_path, "silu only")
    (tmp_path / "config.json").write_text("{not json")
    expect_one_line(tmp_path, "not valid JSON")


def test_missing_and_unexpected_tensors_are_model_errors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    save_mamba2(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if k != "backbone.layers.1.mixer.D"}, str(weights))
    expect_one_line(tmp_path, "lacks 1 tensors.*layers.1.mixer.D")
    save_file({**tensors, "backbone.layers.0.mixer.extra.weight": torch.zeros(2)}, str(weights))
    expect_one_line(tmp_path, "no place for.*mixer.extra.weight")
    save_file({**tensors, "backbone.layers.0.mixer.D": torch.zeros(3)}, str(weights))
    expect_one_line(tmp_path, "shapes do not match")
