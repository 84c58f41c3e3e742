"""Hugging Face checkpoint directories in and out, for the BERT-family encoder.

A checkpoint directory holds ``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``, read with
``weights_only=True``) and ``tokenizer.json``. Weights are mapped onto edgepipe's own ``Encoder`` by an explicit
key table, so a missing or unexpected tensor is a one-line error rather than a silent random init. A
sentence-transformers directory (``modules.json``) adds the head its modules compute (``models.sbert``): pooling,
Dense layers, Normalize; its transformer may sit in a sub-folder (``0_Transformer/``), which ``transformer_dir``
finds. A plain checkpoint is mean-pooled and L2-normalised. Task heads (``BertFor*``'s classifier, ``cls.*``) are
not part of edgepipe's encoder; ``task_head`` names them so the route can keep them (Optimum) or say they are
dropped.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

from edgepipe.cache import checkpoint_hash, digest
from edgepipe.errors import ModelError
from edgepipe.models.sbert import TORCH_ACTIVATIONS, SentenceModules, read_modules
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


def transformer_dir(path: Path) -> Path:
    """The Hugging Face checkpoint inside ``path``: ``path`` itself, or a sentence-transformers directory's
    Transformer folder (``modules.json``'s first module)."""
    path = Path(path)
    try:
        first = json.loads((path / "modules.json").read_text(encoding="utf-8"))[0]
        return path / first.get("path", "") if first.get("path") else path
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return path  # no modules.json, or one read_modules reports


def task_head(hf: dict) -> str | None:
    """The task-head architecture ``config.json`` names (``BertForSequenceClassification``, ...), None for the bare
    encoder (``BertModel``) or none named."""
    arch = (hf.get("architectures") or [None])[0]
    return arch if isinstance(arch, str) and arch not in ("BertModel", "RobertaModel", "XLMRobertaModel") else None


def checkpoint_key(path: Path) -> str:
    """Content hash of what defines the model in ``path``: the checkpoint's files and, where a sentence-transformers
    head differs from a plain checkpoint's (mean, normalised) or tokenizes differently, that head and its Dense
    weights (so a plain checkpoint and all-MiniLM-L6-v2's directory keep the key they always had)."""
    key = checkpoint_hash(transformer_dir(path))
    modules = read_modules(path)
    if modules is None or (modules.default_head and not modules.do_lower_case and not modules.transformer):
        return key
    dense = [checkpoint_hash(Path(path) / p, weights=True) for p in modules.dense_paths]
    return digest([key, modules.to_dict(), dense])


def read_config(path: Path) -> dict:
    """Read ``config.json`` from a checkpoint directory (a sentence-transformers directory's Transformer folder).

    Raises:
        ModelError: The directory or its config is missing or not valid JSON.
    """
    if path.is_dir():
        path = transformer_dir(path)
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
    """Load a BERT-family checkpoint directory into edgepipe's ``Encoder`` (eval mode, fp32), with the head of its
    sentence-transformers modules where it has them.

    Raises:
        ModelError: Missing/corrupt files, an unsupported architecture or module, or tensors that do not fit.
    """
    path = Path(path).expanduser()
    modules = read_modules(path)
    hf_dir = transformer_dir(path)
    cfg = encoder_config_from_hf(read_config(hf_dir), hf_dir)
    if modules is not None:
        cfg = _with_head(cfg, modules, path)
    model = Encoder(cfg)
    state = {}
    for key, tensor in read_weights(hf_dir).items():
        mapped = _map_key(key)
        if mapped is not None:
            state[mapped] = tensor.to(torch.float32)
    for i, folder in enumerate(modules.dense_paths if modules else ()):
        for key, tensor in read_weights(path / folder).items():  # Dense: linear.weight/bias, residual.weight
            state[f"dense.{i}.{key}"] = tensor.to(torch.float32)
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


def _with_head(cfg: EncoderConfig, modules: SentenceModules, path: Path) -> EncoderConfig:
    """``cfg`` with the head of ``modules``; a Dense layer whose width does not follow is a one-line error."""
    width = cfg.hidden * len(modules.pooling)
    for folder, spec in zip(modules.dense_paths, modules.dense):
        if spec.in_features != width:
            raise ModelError(
                f"{path}: Dense module {folder} takes {spec.in_features} features; the layer before gives {width}."
            )
        width = spec.out_features
    return replace(cfg, pooling=modules.pooling, dense=modules.dense, normalize=modules.normalize)


def tokenizer_file(path: Path) -> Path:
    """The checkpoint's ``tokenizer.json`` (a sentence-transformers directory's, or its Transformer folder's).

    Raises:
        ModelError: The directory has none.
    """
    tok = Path(path) / "tokenizer.json"
    if not tok.is_file():
        tok = transformer_dir(path) / "tokenizer.json"
    if not tok.is_file():
        raise ModelError(
            f"'{path}' has no tokenizer.json.",
            hint="Save the tokenizer with a fast tokenizer: AutoTokenizer.from_pretrained(...).save_pretrained(dir).",
        )
    return tok


def save_encoder(model: Encoder, path: Path | str, tokenizer: Path | None = None) -> Path:
    """Write ``model`` as a Hugging Face BERT checkpoint directory (config.json + model.safetensors [+ tokenizer.json]).

    The result loads with ``load_encoder`` and with transformers' ``BertModel.from_pretrained``. A head other than
    a plain checkpoint's (mean pooling, normalised) is written as sentence-transformers modules (``write_modules``).
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
        if key.startswith("dense."):
            continue  # sentence-transformers' Dense modules, written by write_modules
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
    if cfg.pooling != ("mean",) or cfg.dense or not cfg.normalize:
        write_modules(model, path)
    if tokenizer is not None:
        (path / "tokenizer.json").write_bytes(Path(tokenizer).read_bytes())
    return path


def write_modules(model: Encoder, path: Path) -> None:
    """Write ``model``'s head as sentence-transformers modules beside its checkpoint: ``modules.json``,
    ``1_Pooling/config.json``, ``<i>_Dense/`` (config + safetensors), ``<i>_Normalize/``."""
    from safetensors.torch import save_file

    cfg = model.cfg
    activations = {v: k for k, v in TORCH_ACTIVATIONS.items()}
    base = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "", "type": base + "Transformer"}]
    pooling = {"embedding_dimension": cfg.hidden, "pooling_mode": list(cfg.pooling), "include_prompt": True}
    folders = [("1_Pooling", "Pooling", pooling, None)]
    for i, (spec, layer) in enumerate(zip(cfg.dense, model.dense)):
        config = {
            "in_features": spec.in_features,
            "out_features": spec.out_features,
            "bias": spec.bias,
            "activation_function": activations[spec.activation],
            **({"use_residual": True} if spec.residual else {}),
        }
        folders.append((f"{i + 2}_Dense", "Dense", config, layer))
    if cfg.normalize:
        folders.append((f"{len(folders) + 1}_Normalize", "Normalize", {}, None))
    for idx, (folder, kind, config, layer) in enumerate(folders, start=1):
        (path / folder).mkdir(exist_ok=True)
        (path / folder / "config.json").write_text(json.dumps(config, indent=2))
        if layer is not None:
            weights = {k: v.contiguous() for k, v in layer.state_dict().items()}
            save_file(weights, str(path / folder / "model.safetensors"))
        modules.append({"idx": idx, "name": str(idx), "path": folder, "type": base + kind})
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
