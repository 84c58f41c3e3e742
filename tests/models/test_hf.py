"""Loading HF BERT checkpoints into edgepipe's own encoder: parity with transformers and clear errors."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from edgepipe.data import encode, load_tokenizer
from edgepipe.errors import ModelError
from edgepipe.models.hf import load_encoder, save_encoder
from tests.conftest import tiny_encoder


def test_load_encoder_matches_transformers_on_minilm(teacher_dir, sentences):
    transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers) for parity")
    tok = load_tokenizer(teacher_dir / "tokenizer.json", 128)
    batch = encode(tok, sentences[:16])
    ids, mask = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"])
    with torch.no_grad():
        ours = load_encoder(teacher_dir)(ids, mask)
        hf = transformers.BertModel.from_pretrained(str(teacher_dir)).eval()
        hidden = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    assert (ours - ref).abs().max().item() < 1e-5


def test_save_encoder_round_trips(tmp_path, teacher_dir):
    model = tiny_encoder()
    save_encoder(model, tmp_path / "ckpt", teacher_dir / "tokenizer.json")
    back = load_encoder(tmp_path / "ckpt")
    ids = torch.randint(1000, 2000, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(back(ids, mask).numpy(), model(ids, mask).numpy(), atol=1e-6)


def test_load_encoder_raises_when_weights_missing(tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no model.safetensors"):
        load_encoder(ckpt)


def test_load_encoder_raises_when_weights_truncated(tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt or truncated"):
        load_encoder(ckpt)


def test_load_encoder_raises_when_config_is_not_json(tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_encoder(ckpt)


def test_load_encoder_raises_for_foreign_architecture(tmp_path, tiny_checkpoint):
    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    cfg = (ckpt / "config.json").read_text().replace('"model_type": "bert"', '"model_type": "gpt2"')
    (ckpt / "config.json").write_text(cfg)
    with pytest.raises(ModelError, match="model_type 'gpt2'"):
        load_encoder(ckpt)
