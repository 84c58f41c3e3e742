"""Hugging Face decoder checkpoints (Llama and Mamba2 configs) in and out of edgepipe's DecoderLM and MambaLM.

A checkpoint directory holds ``config.json`` and ``model.safetensors`` (``pytorch_model.bin`` is read weights-only).
Tensor names are mapped by explicit tables, both ways; a missing, unexpected or misshapen tensor is a one-line
``ModelError`` rather than a silent random init. ``save_hf`` writes a directory ``transformers`` loads as
``LlamaForCausalLM`` / ``Mamba2ForCausalLM``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from edgepipe.config import DECODER_MODEL_TYPES  # one list: config routes checkpoint directories by it
from edgepipe.errors import ModelError
from edgepipe.models.decoder import DecoderConfig, DecoderLM
from edgepipe.models.hf import read_config, read_weights
from edgepipe.models.mamba import MambaConfig, MambaLM

# HF name (after the "model." / "backbone." prefix) -> edgepipe name, per layer and global.
_LLAMA_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}
_LLAMA_GLOBAL = {"model.embed_tokens": "embed", "model.norm": "norm", "lm_head": "lm_head"}
_MAMBA_LAYER = {
    "norm": "norm",
    "mixer.in_proj": "mixer.in_proj",
    "mixer.conv1d": "mixer.conv1d",
    "mixer.dt_bias": "mixer.dt_bias",
    "mixer.A_log": "mixer.A_log",
    "mixer.D": "mixer.D",
    "mixer.norm": "mixer.norm",
    "mixer.out_proj": "mixer.out_proj",
}
_MAMBA_GLOBAL = {
    "backbone.embeddings": "embed",
    "backbone.embedding": "embed",
    "backbone.norm_f": "norm",
    "lm_head": "lm_head",
}
_LAYER_PREFIX = {"llama": "model.layers", "mamba2": "backbone.layers"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")  # old Llama checkpoints saved this buffer; it is recomputed


def _need(hf: dict, key: str, source: Path):
    try:
        return hf[key]
    except KeyError:
        raise ModelError(
            f"{source}/config.json lacks {key!r}.", hint="Re-save the checkpoint with save_pretrained()."
        ) from None


def _float(value) -> float:
    """JSON floats as transformers writes them: numbers, ``{"__float__": "Infinity"}`` or strings."""
    if isinstance(value, dict):
        value = value.get("__float__")
    return float(value)


def llama_config_from_hf(
    hf: dict, source: Path, *, attention: str | None = None, max_context: int | None = None
) -> DecoderConfig:
    """``DecoderConfig`` from a Llama ``config.json``; ``attention`` None takes the form ``save_hf`` recorded.

    Raises:
        ModelError: A key is missing or names something edgepipe's decoder does not implement.
    """
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{source}: hidden_act={hf['hidden_act']!r}; edgepipe's Llama decoder implements silu only.")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope.setdefault("rope_type", rope.pop("type", "default"))
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        raise ModelError(
            f"{source}: RoPE type {rope['rope_type']!r} is not supported. Accepted: default, linear, llama3."
        )
    heads = _need(hf, "num_attention_heads", source)
    return DecoderConfig(
        vocab_size=_need(hf, "vocab_size", source),
        hidden=_need(hf, "hidden_size", source),
        layers=_need(hf, "num_hidden_layers", source),
        heads=heads,
        kv_heads=hf.get("num_key_value_heads") or heads,
        ffn=_need(hf, "intermediate_size", source),
        head_dim_override=hf.get("head_dim"),
        eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=None if rope["rope_type"] == "default" else rope,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)),
        attention=attention or (hf.get("edgepipe") or {}).get("attention", "full"),
        max_context=max_context or min(int(hf.get("max_position_embeddings", 2048)), 2048),
    )


def mamba_config_from_hf(
    hf: dict, source: Path, *, chunk_size: int | None = None, max_context: int = 16384
) -> MambaConfig:
    """``MambaConfig`` from a Mamba2 ``config.json``; ``chunk_size`` overrides the checkpoint's (results do not depend
    on it; exported prefill lengths must be multiples of it).

    Raises:
        ModelError: A key is missing or inconsistent.
    """
    if hf.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{source}: hidden_act={hf['hidden_act']!r}; edgepipe's Mamba-2 implements silu only.")
    limit = hf.get("time_step_limit", (0.0, math.inf))
    cfg = MambaConfig(
        vocab_size=_need(hf, "vocab_size", source),
        hidden=_need(hf, "hidden_size", source),
        layers=_need(hf, "num_hidden_layers", source),
        state_size=_need(hf, "state_size", source),
        head_dim=_need(hf, "head_dim", source),
        expand=hf.get("expand", 2),
        n_groups=hf.get("n_groups", 1),
        conv_kernel=hf.get("conv_kernel", 4),
        chunk_size=chunk_size or min(int(hf.get("chunk_size", 64)), 64),
        eps=hf.get("layer_norm_epsilon", 1e-5),
        use_bias=bool(hf.get("use_bias", False)),
        use_conv_bias=bool(hf.get("use_conv_bias", True)),
        dt_min=_float(limit[0]),
        dt_max=_float(limit[1]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_context=max_context,
    )
    if "num_heads" in hf and hf["num_heads"] != cfg.heads:
        raise ModelError(
            f"{source}: num_heads={hf['num_heads']} but expand*hidden_size/head_dim={cfg.heads}; inconsistent config."
        )
    return cfg


def _map_key(key: str, kind: str) -> str | None:
    table, glob = (_LLAMA_LAYER, _LLAMA_GLOBAL) if kind == "llama" else (_MAMBA_LAYER, _MAMBA_GLOBAL)
    m = re.match(re.escape(_LAYER_PREFIX[kind]) + r"\.(\d+)\.(.+)\.(weight|bias|A_log|D|dt_bias)$", key)
    if m:
        name = m.group(2) if m.group(3) in ("weight", "bias") else f"{m.group(2)}.{m.group(3)}"
        suffix = "." + m.group(3) if m.group(3) in ("weight", "bias") else ""
        return f"layers.{m.group(1)}.{table[name]}{suffix}" if name in table else None
    m = re.match(r"(.+)\.(weight|bias)$", key)
    if m and m.group(1) in glob:
        return f"{glob[m.group(1)]}.{m.group(2)}"
    return None


def _load_state(model: nn.Module, tensors: dict[str, Tensor], kind: str, path: Path) -> None:
    state, unknown = {}, []
    for key, tensor in tensors.items():
        mapped = _map_key(key, kind)
        if mapped is None:
            if not _IGNORED.search(key):
                unknown.append(key)
            continue
        state[mapped] = tensor.to(torch.float32)
    if unknown:
        raise ModelError(
            f"{path}: {len(unknown)} tensors edgepipe's {kind} model has no place for, e.g. {unknown[0]}.",
            hint="Is this a plain Llama / Mamba2 checkpoint? Variants with extra weights are not supported.",
        )
    if getattr(model.cfg, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("embed.weight")
    expected = set(model.state_dict())
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise ModelError(
            f"{path}: checkpoint lacks {len(missing)} tensors the config needs, e.g. {missing[0]}.",
            hint="Save the checkpoint with save_pretrained(); check tie_word_embeddings in config.json.",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1].strip()
        raise ModelError(f"{path}: tensor shapes do not match config.json ({first}).") from None


def load_decoder(
    path: Path | str,
    *,
    attention: str | None = None,
    max_context: int | None = None,
    chunk_size: int | None = None,
) -> DecoderLM | MambaLM:
    """Load a Llama or Mamba2 checkpoint directory into edgepipe's model (eval mode, fp32).

    Args:
        path: Directory with config.json and model.safetensors.
        attention: Attention form for a Llama model (``full``, ``windowed:W``, ``linear``); the weights are the same.
            None: the form edgepipe recorded in config.json (``save_hf``), else full.
        max_context: KV-cache length (Llama, full attention; default min(max_position_embeddings, 2048)) or the
            longest prefill (Mamba2; default 16384).
        chunk_size: Mamba-2 scan chunk (default min(checkpoint's, 64)).

    Raises:
        ModelError: Missing/corrupt files, an unsupported architecture, or tensors that do not fit.
    """
    path = Path(path).expanduser()
    hf = read_config(path)
    kind = hf.get("model_type")
    if kind == "llama":
        model: DecoderLM | MambaLM = DecoderLM(
            llama_config_from_hf(hf, path, attention=attention, max_context=max_context)
        )
    elif kind == "mamba2":
        model = MambaLM(mamba_config_from_hf(hf, path, chunk_size=chunk_size, max_context=max_context or 16384))
    else:
        raise ModelError(
            f"'{path}' holds a {kind!r} model; accepted decoder model_types: {', '.join(DECODER_MODEL_TYPES)}.",
            hint="Convert it to a Llama or Mamba2 checkpoint, or use a recipe in models/.",
        )
    _load_state(model, read_weights(path), kind, path)
    return model.eval()


def save_hf(model: DecoderLM | MambaLM, path: Path | str) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    RoPE scaling, windowed attention and the cache length are edgepipe settings with no place in a Llama config;
    they are recorded under ``"edgepipe"`` in config.json (transformers ignores unknown keys).
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    c = model.cfg
    if isinstance(model, DecoderLM):
        kind, inverse = "llama", {v: k for k, v in _LLAMA_LAYER.items()}
        glob = {v: k for k, v in _LLAMA_GLOBAL.items()}
        hf = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden,
            "num_hidden_layers": c.layers,
            "num_attention_heads": c.heads,
            "num_key_value_heads": c.kv_heads,
            "intermediate_size": c.ffn,
            "head_dim": c.head_dim,
            "rms_norm_eps": c.eps,
            "hidden_act": "silu",
            "max_position_embeddings": c.max_context,
            "rope_parameters": {"rope_theta": c.rope_theta, **(c.rope_scaling or {"rope_type": "default"})},
            "tie_word_embeddings": c.tie_embeddings,
            "attention_bias": c.attention_bias,
            "mlp_bias": c.mlp_bias,
            "edgepipe": {"attention": c.attention},
        }
    else:
        kind, inverse = "mamba2", {v: k for k, v in _MAMBA_LAYER.items()}
        glob = {"embed": "backbone.embeddings", "norm": "backbone.norm_f", "lm_head": "lm_head"}
        hf = {
            "architectures": ["Mamba2ForCausalLM"],
            "model_type": "mamba2",
            "vocab_size": c.vocab_size,
            "hidden_size": c.hidden,
            "num_hidden_layers": c.layers,
            "state_size": c.state_size,
            "head_dim": c.head_dim,
            "num_heads": c.heads,
            "expand": c.expand,
            "n_groups": c.n_groups,
            "conv_kernel": c.conv_kernel,
            "chunk_size": c.chunk_size,
            "layer_norm_epsilon": c.eps,
            "use_bias": c.use_bias,
            "use_conv_bias": c.use_conv_bias,
            "hidden_act": "silu",
            "time_step_limit": [c.dt_min, c.dt_max if math.isfinite(c.dt_max) else {"__float__": "Infinity"}],
            "tie_word_embeddings": c.tie_embeddings,
            "residual_in_fp32": True,
        }
    tensors = {}
    for name, tensor in model.state_dict().items():
        if c.tie_embeddings and name == "lm_head.weight":
            continue
        m = re.match(r"layers\.(\d+)\.(.+?)(?:\.(weight|bias))?$", name)
        if m:
            leaf = m.group(2)
            if m.group(3) is None:  # bare parameters (A_log, D, dt_bias) keep their name inside the mapped module
                leaf, tail = leaf.rsplit(".", 1)
                hf_name = f"{_LAYER_PREFIX[kind]}.{m.group(1)}.{inverse[leaf + '.' + tail]}"
            else:
                hf_name = f"{_LAYER_PREFIX[kind]}.{m.group(1)}.{inverse[leaf]}.{m.group(3)}"
        else:
            mod, leaf = name.rsplit(".", 1)
            hf_name = f"{glob[mod]}.{leaf}"
        tensors[hf_name] = tensor.detach().contiguous()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return path
