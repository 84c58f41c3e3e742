"""Tiered INT8 KV cache for ``DecoderLM``'s decode path: the newest ``active`` tokens in fp16 (or fp32), older
tokens archived as INT8 with calibrated scales and dequantized on read.

``TieredDecoder`` wraps a full-attention ``DecoderLM`` and keeps its static-shape state contract (see
``edgepipe.models.decoder``): the state is a tuple of plain tensors that goes in and comes back out, so the decode
step is one concat and one slice per tensor and exports like the float cache. With ``A = cache_len - active``::

    k_archive  int8    (layers, batch, kv_heads, A, head_dim)      oldest slot first, keys after RoPE
    v_archive  int8    (layers, batch, kv_heads, A, head_dim)
    v_scale    float16 (layers, batch, kv_heads, A, 1)             per-token V scales (v_scales="token" only)
    k_active   float16 (layers, batch, kv_heads, active, head_dim) newest slot last
    v_active   float16 (layers, batch, kv_heads, active, head_dim)

Scales:

- K: static, per (layer, kv head, channel), calibrated on real text (``calibrate``). Keys have outlier channels, so
  one scale per head wastes most of the INT8 range on the ordinary channels. RoPE rotates channel pairs
  (i, i + head_dim/2) by a position-dependent angle, so a channel's range depends on how far the calibration text
  reached; the scale of both channels of a pair is the pair's largest norm sqrt(k_i^2 + k_{i+d/2}^2), which no
  rotation exceeds, so keys at positions longer than the calibration prefill never clip.
- V: ``"token"`` (default): one scale per token and kv head, computed when the token is archived (its absmax / 127)
  and kept as fp16 state; ``"head"``: one static calibrated scale per (layer, kv head). Values have no outlier
  channels but their per-token magnitude varies; ``scripts/measure_kv_cache.py`` compares both on real text.

A token is quantized once, when it leaves the active region; archived tokens keep their INT8 codes (no re-rounding).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from edgepipe.config import KVCacheConfig
from edgepipe.data import encode_text, read_sentences, windows
from edgepipe.errors import UsageError
from edgepipe.models.decoder import DecoderLM, stack_layers

QMAX = 127.0


@dataclass(frozen=True)
class KVScales:
    """Calibrated ranges: ``k_absmax`` (layers, kv_heads, head_dim), RoPE-pair-aware; ``v_absmax`` (layers, heads);
    ``act_absmax`` (layers + 1, hidden): the residual stream entering each layer and the final norm."""

    k_absmax: Tensor
    v_absmax: Tensor
    act_absmax: Tensor | None = None


def _pair_norm(k: Tensor) -> Tensor:
    """(..., d) -> (..., d): sqrt(k_i^2 + k_{i+d/2}^2) at both channels of each RoPE pair (rotation-invariant)."""
    d = k.shape[-1] // 2
    norm = torch.sqrt(k[..., :d] ** 2 + k[..., d:] ** 2)
    return torch.cat([norm, norm], dim=-1)


@torch.no_grad()
def calibrate(model: DecoderLM, batches: list[Tensor]) -> KVScales:
    """K and V ranges from prefills of real text.

    Args:
        model: The decoder (eval mode).
        batches: Token windows, each (batch, seq) int64, e.g. ``windows(encode_text(tok, calibration), 256)``.

    Returns:
        ``KVScales`` with the largest RoPE-pair norm per K channel, the largest |v| per head and the largest
        |x| per channel of the residual stream at each layer boundary.
    """
    k_max = v_max = a_max = None
    boundaries: list[Tensor] = []  # the residual stream entering each layer's norm and the final norm
    norms = [layer.attn_norm for layer in model.layers] + [model.norm]
    hooks = [
        n.register_forward_pre_hook(lambda _, args: boundaries.append(args[0].abs().amax(dim=(0, 1)))) for n in norms
    ]
    try:
        for ids in batches:
            boundaries.clear()
            _, keys, values = model._layers(ids, None)
            k = torch.stack([_pair_norm(x).amax(dim=(0, 2)) for x in keys])  # (layers, kv_heads, head_dim)
            v = torch.stack([x.abs().amax(dim=(0, 2, 3)) for x in values])  # (layers, kv_heads)
            a = torch.stack(boundaries)  # (layers + 1, hidden)
            k_max = k if k_max is None else torch.maximum(k_max, k)
            v_max = v if v_max is None else torch.maximum(v_max, v)
            a_max = a if a_max is None else torch.maximum(a_max, a)
    finally:
        for h in hooks:
            h.remove()
    if k_max is None:
        raise UsageError("calibrate() got no batches; pass at least one window of calibration tokens.")
    return KVScales(k_absmax=k_max, v_absmax=v_max, act_absmax=a_max)


def calibrate_on_text(
    model: DecoderLM, tok, sentences: list[str], seq_len: int = 256, max_windows: int = 32, batch: int = 8
) -> KVScales:
    """``calibrate`` on real text: sentences joined with ``<|eos|>`` (``stages.pretrain.encode_text``), cut into
    ``max_windows`` windows of ``seq_len`` tokens, prefilled ``batch`` windows at a time.

    Raises:
        UsageError: The text gives no full window.
    """
    wins = windows(encode_text(tok, sentences), seq_len)[:max_windows]
    return calibrate(model, [torch.from_numpy(wins[i : i + batch]) for i in range(0, len(wins), batch)])


def quantize(x: Tensor, scale: Tensor) -> Tensor:
    """Symmetric INT8: round(x / scale) clamped to [-127, 127]; ``scale`` broadcasts against x."""
    return torch.clamp(torch.round(x / scale), -QMAX, QMAX).to(torch.int8)


def token_scale(v: Tensor) -> Tensor:
    """Per-token, per-head scale: (..., n, d) -> (..., n, 1) = absmax / 127 (a tiny floor keeps zeros finite)."""
    return torch.clamp(v.abs().amax(dim=-1, keepdim=True), min=1e-6) / QMAX


class TieredDecoder(nn.Module):
    """``DecoderLM`` decoding against the tiered cache; same ``prefill``/``step``/``init_state`` interface.

    Args:
        model: A ``full``-attention DecoderLM; its ``cache_len`` (max_context) is the total cache length.
        scales: From ``calibrate``.
        active: Tokens kept in full precision (the newest); ``active >= cache_len`` means no archive.
        active_dtype: torch.float16 (default) or torch.float32.
        v_scales: ``"token"`` (per-token dynamic, stored in the state) or ``"head"`` (static, calibrated).
        boundaries: Also round the residual stream to INT8 where it enters each layer and the final norm, with the
            calibrated per-channel scales (``scales.act_absmax``): the a8w16 plan's activations at layer
            boundaries, exactly as a runtime that stores them in INT8 would see them.
    """

    def __init__(
        self,
        model: DecoderLM,
        scales: KVScales,
        active: int = 128,
        active_dtype: torch.dtype = torch.float16,
        v_scales: Literal["token", "head"] = "token",
        boundaries: bool = False,
    ) -> None:
        super().__init__()
        if model.spec.kind != "full":
            raise UsageError(
                f"The tiered KV cache needs full attention; the model uses {model.cfg.attention!r}.",
                hint="Windowed caches are already 2W slots; linear attention has no KV cache.",
            )
        if v_scales not in ("token", "head"):
            raise UsageError(f"v_scales={v_scales!r}; accepted: 'token', 'head'.")
        self.model, self.v_mode, self.active_dtype = model, v_scales, active_dtype
        self.cache_len = model.cfg.cache_len
        self.active = min(active, self.cache_len)
        self.archived = self.cache_len - self.active
        # Static scales as buffers shaped to broadcast over (batch, kv_heads, slots, head_dim) per layer.
        layers, kvh, d = scales.k_absmax.shape
        k_scale = torch.clamp(scales.k_absmax, min=1e-6) / QMAX
        self.register_buffer("k_scale", k_scale.reshape(layers, 1, kvh, 1, d), persistent=False)
        v_scale = torch.clamp(scales.v_absmax, min=1e-6) / QMAX
        self.register_buffer("v_head_scale", v_scale.reshape(layers, 1, kvh, 1, 1), persistent=False)
        self.boundaries = boundaries
        if boundaries:
            if scales.act_absmax is None:
                raise UsageError("boundaries=True needs scales from calibrate() with act_absmax.")
            act = torch.clamp(scales.act_absmax, min=1e-6) / QMAX  # (layers + 1, hidden)
            self.register_buffer("act_scale", act.reshape(act.shape[0], 1, 1, act.shape[1]), persistent=False)

    def _boundary(self, i: int, x: Tensor) -> Tensor:
        """The residual stream as INT8 at boundary i would hold it (identity without ``boundaries``)."""
        if not self.boundaries:
            return x
        s = self.act_scale[i]
        return torch.clamp(torch.round(x / s), -QMAX, QMAX) * s

    @property
    def state_names(self) -> tuple[str, ...]:
        names = ("k_archive", "v_archive", "v_scale", "k_active", "v_active")
        return names if self.v_mode == "token" else tuple(n for n in names if n != "v_scale")

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)

    def init_state(self, batch: int = 1) -> tuple[Tensor, ...]:
        """Empty state (shapes in the module docstring); empty slots are masked by position."""
        c = self.model.cfg
        arch = (c.layers, batch, c.kv_heads, self.archived, c.head_dim)
        act = (c.layers, batch, c.kv_heads, self.active, c.head_dim)
        state = [torch.zeros(arch, dtype=torch.int8), torch.zeros(arch, dtype=torch.int8)]
        if self.v_mode == "token":
            state.append(torch.ones(*arch[:-1], 1, dtype=torch.float16))
        return (*state, torch.zeros(act, dtype=self.active_dtype), torch.zeros(act, dtype=self.active_dtype))

    def _split(self, state: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor]:
        if self.v_mode == "token":
            return state  # type: ignore[return-value]
        k_arch, v_arch, k_act, v_act = state
        return k_arch, v_arch, None, k_act, v_act

    def _pack(self, k_arch, v_arch, v_scale, k_act, v_act) -> tuple[Tensor, ...]:
        return (k_arch, v_arch, v_scale, k_act, v_act) if self.v_mode == "token" else (k_arch, v_arch, k_act, v_act)

    def _archive_layer(self, i: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Quantize float k, v (batch, kv_heads, n, head_dim) of layer i -> int8 codes (+ per-token V scales)."""
        kq = quantize(k, self.k_scale[i])
        if self.v_mode == "token":
            vs = token_scale(v).to(torch.float16)
            return kq, quantize(v, vs.float()), vs
        return kq, quantize(v, self.v_head_scale[i]), None

    @torch.no_grad()
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        """Prompt -> (logits (batch, seq, vocab), *state): the float cache split into archive and active.

        With ``boundaries`` the prompt runs through ``step`` in chunks of ``active`` tokens, so the INT8 boundaries
        apply to every token.
        """
        if self.boundaries:
            b, n = input_ids.shape
            state, parts = self.init_state(b), []
            for i in range(0, n, self.active):
                position = torch.full((b,), i, dtype=torch.long)
                logits, *state = self.step(input_ids[:, i : i + self.active], position, *state)
                parts.append(logits)
            return (torch.cat(parts, dim=1), *state)
        logits, k_full, v_full = self.model.prefill(input_ids)
        a = self.archived
        k_arch, v_arch, v_scales = [], [], []
        for i in range(k_full.shape[0]):
            kq, vq, vs = self._archive_layer(i, k_full[i, :, :, :a], v_full[i, :, :, :a])
            k_arch.append(kq.reshape(1, *kq.shape))
            v_arch.append(vq.reshape(1, *vq.shape))
            if vs is not None:
                v_scales.append(vs.reshape(1, *vs.shape))
        state = self._pack(
            stack_layers(k_arch),
            stack_layers(v_arch),
            stack_layers(v_scales) if v_scales else None,
            k_full[:, :, :, a:].to(self.active_dtype),
            v_full[:, :, :, a:].to(self.active_dtype),
        )
        return (logits, *state)

    def _dequant(self, i: int, k_arch: Tensor, v_arch: Tensor, v_scale: Tensor | None) -> tuple[Tensor, Tensor]:
        k = k_arch[i].to(torch.float32) * self.k_scale[i]
        vs = self.v_head_scale[i] if v_scale is None else v_scale[i].to(torch.float32)
        return k, v_arch[i].to(torch.float32) * vs

    def step(self, input_ids: Tensor, position: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        """T new tokens (T <= active) against the tiered cache; the T oldest active tokens move to the archive.

        Args:
            input_ids: (batch, T) int64
            position: (batch,) int64, position of ``input_ids[:, 0]``.
            *state: ``state_names`` tensors from ``prefill``, ``init_state`` or the previous step.

        Returns:
            logits (batch, T, vocab) and the new state (same shapes and dtypes).
        """
        t = input_ids.shape[1]
        if t > self.active:
            raise UsageError(f"step() got {t} tokens; the tiered cache takes at most active={self.active} per call.")
        k_arch, v_arch, v_scale, k_act, v_act = self._split(state)
        m = self.model
        cos, sin, bias = m.step_context(position, t)
        x = m.embed(input_ids)
        new = {name: [] for name in ("k_arch", "v_arch", "v_scale", "k_act", "v_act")}
        a = self.archived
        for i, layer in enumerate(m.layers):
            x = self._boundary(i, x)
            k_old, v_old = self._dequant(i, k_arch, v_arch, v_scale)
            k_cache = torch.cat([k_old, k_act[i].to(torch.float32)], dim=2)
            v_cache = torch.cat([v_old, v_act[i].to(torch.float32)], dim=2)
            h, keys, values = layer.attn.step(layer.attn_norm(x), cos, sin, bias, k_cache, v_cache)
            x = x + h
            x = x + layer.mlp(layer.mlp_norm(x))
            # keys = last cache_len of [archive, active, new]: its last `active` slots are the new active region,
            # the t slots before them left the active region and are quantized; older archive codes are kept.
            new["k_act"].append(keys[:, :, a:].to(self.active_dtype).reshape(1, *k_act.shape[1:]))
            new["v_act"].append(values[:, :, a:].to(self.active_dtype).reshape(1, *v_act.shape[1:]))
            if a == 0:
                continue
            lo = max(0, a - t)  # with t > a, the oldest leaving tokens fall out of the cache altogether
            kq, vq, vs = self._archive_layer(i, keys[:, :, lo:a], values[:, :, lo:a])
            drop = a - lo  # oldest archive slots pushed out by the newly archived tokens
            new["k_arch"].append(torch.cat([k_arch[i], kq], dim=2)[:, :, drop:].reshape(1, *k_arch.shape[1:]))
            new["v_arch"].append(torch.cat([v_arch[i], vq], dim=2)[:, :, drop:].reshape(1, *v_arch.shape[1:]))
            if vs is not None:
                new["v_scale"].append(torch.cat([v_scale[i], vs], dim=2)[:, :, drop:].reshape(1, *v_scale.shape[1:]))
        logits = m.lm_head(m.norm(self._boundary(len(m.layers), x)))
        if a == 0:
            state = self._pack(k_arch, v_arch, v_scale, stack_layers(new["k_act"]), stack_layers(new["v_act"]))
        else:
            state = self._pack(*(stack_layers(new[n]) if new[n] else None for n in new))
        return (logits, *state)


def cache_bytes(
    model: DecoderLM | TieredDecoder, context: int, batch: int = 1, dtype: torch.dtype = torch.float16
) -> dict[str, int]:
    """Bytes the decode cache holds at ``context`` tokens (static per-channel K scales counted as constants).

    Args:
        model: A DecoderLM (a float cache of ``dtype``) or a TieredDecoder (its active dtype, INT8 archive).
        context: Tokens in the cache (at most the model's cache length are kept).
        batch: Sequences decoded together.
        dtype: Element type of a plain DecoderLM's cache.

    Returns:
        ``{"active": ..., "archive": ..., "scales": ..., "total": ...}`` in bytes.
    """
    tiered = isinstance(model, TieredDecoder)
    c = (model.model if tiered else model).cfg
    per_token = c.layers * batch * c.kv_heads * c.head_dim  # elements of K (or V) per token
    n = min(context, c.cache_len)
    if not tiered:
        active = 2 * n * per_token * torch.empty(0, dtype=dtype).element_size()
        return {"active": active, "archive": 0, "scales": 0, "total": active}
    n_act = min(n, model.active)
    n_arch = n - n_act
    active = 2 * n_act * per_token * torch.empty(0, dtype=model.active_dtype).element_size()
    archive = 2 * n_arch * per_token  # one byte per INT8 element
    scales = model.k_scale.numel() * 4 + model.v_head_scale.numel() * 4
    if model.v_mode == "token":
        scales += n_arch * c.layers * batch * c.kv_heads * 2  # fp16 per token and kv head
    return {"active": active, "archive": archive, "scales": scales, "total": active + archive + scales}


def decode_memory(
    model: DecoderLM | TieredDecoder,
    context: int,
    batch: int = 1,
    weight_bytes: float = 2.0,
    cache_dtype: torch.dtype = torch.float16,
) -> dict[str, int]:
    """Resident bytes of one decode step: weights + KV cache + the step's largest transient tensors.

    Args:
        model: A DecoderLM (float cache of ``cache_dtype``) or a TieredDecoder.
        context: Tokens in the cache.
        batch: Sequences decoded together.
        weight_bytes: Bytes per weight element (4 fp32, 2 fp16, 1 int8); a tied LM head is counted once.
        cache_dtype: Element type of a plain DecoderLM's cache.

    Returns:
        ``{"weights", "cache", "transient", "total"}`` in bytes. Transient: the fp32 logits, one layer's attention
        scores and the dequantized fp32 K and V of one layer (tiered cache only: dequantization is per layer).
    """
    tiered = isinstance(model, TieredDecoder)
    lm = model.model if tiered else model
    c = lm.cfg
    weights = int(math.ceil(sum(p.numel() for p in lm.parameters()) * weight_bytes))  # parameters() dedups ties
    cache = cache_bytes(model, context, batch, cache_dtype)["total"]
    n = min(context, c.cache_len) + 1
    transient = 4 * batch * (c.vocab_size + c.heads * n + c.hidden * 4)
    if tiered:
        transient += 4 * 2 * batch * c.kv_heads * n * c.head_dim
    return {"weights": weights, "cache": cache, "transient": transient, "total": weights + cache + transient}


def tiered_decoder(model, tok, kv: KVCacheConfig, name: str = "the model") -> tuple[TieredDecoder, dict]:
    """``model`` over the tiered INT8 KV cache, K scales calibrated on real text; returns (module, manifest facts).

    Args:
        model: A full-attention DecoderLM.
        tok: Its tokenizer (``tokenizers.Tokenizer``).
        kv: The recipe's ``[kv_cache]`` table.
        name: For the error message.
    """
    if getattr(getattr(model, "spec", None), "kind", None) != "full":
        raise UsageError(
            f"Precision a8w16 stores the KV cache of full attention in INT8; {name} is "
            f"{getattr(model.cfg, 'attention', 'mamba2')}.",
            hint="Use --precision fp32: windowed caches stay 2W slots, Mamba-2 keeps a fixed state.",
        )
    sentences = read_sentences(kv.calibration)
    seq = min(256, model.cfg.cache_len)
    scales = calibrate_on_text(model, tok, sentences, seq, kv.calibration_windows)
    dtype = torch.float16 if kv.active_dtype == "float16" else torch.float32
    tiered = TieredDecoder(model, scales, kv.active, dtype, kv.v_scales, kv.boundaries)
    return tiered, {"kv_cache": {**asdict(kv), "bytes_at_cache_len": cache_bytes(tiered, model.cfg.cache_len)}}
