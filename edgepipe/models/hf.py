"""Hugging Face checkpoint directories in and out, for the BERT-family encoder.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``) and ``tokenizer.json``. Weights are mapped onto edgepipe's own ``Encoder`` by an explicit
key table, so a missing or unexpected tensor is a one-line error rather than a silent random init.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from edgepipe.errors import ModelError
from edgepipe.models.transformer import Encoder, EncoderConfig

BERT_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")  # same layer layout; roberta differs only in positions

_LAYER_KEYS = {
    "attention.self.query": "mixer.query",
    "attention.self.key": "mixer.key",
    "attention.self.value": "mixer.value",
    "attention.output.dense": "mixer.out",
    "attention.output.LayerNorm": "mixer_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_EMBEDDING_KEYS = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embedding_norm",
}


def read_config(path: Path) -> dict:
    """Read ``config.json`` from a checkpoint directory.

    Raises:
        ModelError: The directory or its config is missing or not valid JSON.
    """
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise ModelError(
            f"Model path '{path}' is not a directory.", hint="Point --model at a checkpoint directory or a recipe TOML."
        )
    if not cfg_file.is_file():
        raise ModelError(
            f"'{path}' has no config.json.",
            hint="A Hugging Face checkpoint directory holds config.json, model.safetensors and tokenizer.json.",
        )
    try:
        return json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(
            f"{cfg_file} is not valid JSON ({exc}).", hint="Re-save the checkpoint with save_pretrained()."
        ) from None


def encoder_config_from_hf(hf: dict, source: Path) -> EncoderConfig:
    """Translate a BERT-family ``config.json`` into an ``EncoderConfig``."""
    model_type = hf.get("model_type")
    if model_type != "bert":
        raise ModelError(
            f"{source}: model_type '{model_type}' is not a BERT encoder edgepipe re-implements (accepted: bert).",
            hint='Other architectures go through Optimum: pip install "edgepipe[hf]".',
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ModelError(f"{source}: hidden_act '{act}' is not supported (accepted: gelu).")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ModelError(f"{source}: position_embedding_type must be 'absolute'.")
    try:
        return EncoderConfig(
            vocab_size=hf["vocab_size"],
            hidden=hf["hidden_size"],
            layers=hf["num_hidden_layers"],
            heads=hf["num_attention_heads"],
            ffn=hf["intermediate_size"],
            max_positions=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            eps=hf.get("layer_norm_eps", 1e-12),
            pad_token_id=hf.get("pad_token_id", 0) or 0,
        )
    except KeyError as exc:
        raise ModelError(
            f"{source}/config.json lacks {exc.args[0]!r}.", hint="Re-save the checkpoint with save_pretrained()."
        ) from None


def read_weights(path: Path) -> dict[str, Tensor]:
    """Read a checkpoint's tensors from safetensors (preferred) or a weights-only torch pickle.

    Raises:
        ModelError: No weights file, or the file is truncated/corrupt.
    """
    st, pt = path / "model.safetensors", path / "pytorch_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # safetensors and torch raise several types for truncated files
        raise ModelError(
            f"Could not read weights from {st if st.is_file() else pt}: {exc}.",
            hint="The file is corrupt or truncated; copy the checkpoint again.",
        ) from None
    raise ModelError(
        f"'{path}' has no model.safetensors (or pytorch_model.bin).", hint="Save the checkpoint with save_pretrained()."
    )


def _map_key(key: str) -> str | None:
    key = re.sub(r"^(bert|model)\.", "", key)
    for src, dst in _EMBEDDING_KEYS.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m and m.group(2) in _LAYER_KEYS:
        return f"layers.{m.group(1)}.{_LAYER_KEYS[m.group(2)]}.{m.group(3)}"
    return None


def load_encoder(path: Path | str) -> Encoder:
    """Load a BERT-family checkpoint directory into edgepipe's ``Encoder`` (eval mode, fp32).

    Raises:
        ModelError: Missing/corrupt files, an unsupported architecture, or tensors that do not fit.
    """
    path = Path(path).expanduser()
    cfg = encoder_config_from_hf(read_config(path), path)
    model = Encoder(cfg)
    state = {}
    for key, tensor in read_weights(path).items():
        mapped = _map_key(key)
        if mapped is not None:
            state[mapped] = tensor.to(torch.float32)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ModelError(
            f"{path}: checkpoint lacks {len(missing)} tensors edgepipe needs, e.g. {missing[0]}.",
            hint="Is this a BERT encoder checkpoint saved with save_pretrained()?",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(f"{path}: tensor shapes do not match config.json ({first}).") from None
    return model.eval()


def tokenizer_file(path: Path) -> Path:
    """The checkpoint's ``tokenizer.json``.

    Raises:
        ModelError: The directory has none.
    """
    tok = Path(path) / "tokenizer.json"
    if not tok.is_file():
        raise ModelError(
            f"'{path}' has no tokenizer.json.",
            hint="Save the tokenizer with a fast tokenizer: AutoTokenizer.from_pretrained(...).save_pretrained(dir).",
        )
    return tok


def save_encoder(model: Encoder, path: Path | str, tokenizer: Path | None = None) -> Path:
    """Write ``model`` as a Hugging Face BERT checkpoint directory (config.json + model.safetensors [+ tokenizer.json]).

    The result loads with ``load_encoder`` and with transformers' ``BertModel.from_pretrained``.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if cfg.attention != "full":
        raise ModelError(f"Only full-attention encoders are BERT checkpoints; this one uses '{cfg.attention}'.")
    if cfg.inner or cfg.output:
        raise ModelError(
            f"Only BERT-shaped encoders are BERT checkpoints; this one has a {cfg.hidden}-wide stream and a projection."
        )
    inverse_layer = {v: k for k, v in _LAYER_KEYS.items()}
    inverse_emb = {v: k for k, v in _EMBEDDING_KEYS.items()}
    tensors = {}
    for key, value in model.state_dict().items():
        head, _, leaf = key.rpartition(".")
        if key.startswith("layers."):
            _, idx, rest = head.split(".", 2)
            name = f"encoder.layer.{idx}.{inverse_layer[rest]}.{leaf}"
        else:
            name = f"{inverse_emb[head]}.{leaf}"
        tensors[name] = value.contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "intermediate_size": cfg.ffn,
        "max_position_embeddings": cfg.max_positions,
        "type_vocab_size": cfg.type_vocab_size,
        "layer_norm_eps": cfg.eps,
        "hidden_act": "gelu",
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        (path / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return path
