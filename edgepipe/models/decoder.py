"""LLaMA-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with an attention slot and static-shape
decode state.

Training, perplexity and prefill run any attention form from ``edgepipe.attention`` (``full``, ``windowed:W``,
``linear``) through the slot. Decode runs T new tokens per call (T = 1 to generate; a fixed T > 1 is a static-shape
prefill chunk) against a state of fixed shape that goes in and comes back out as plain tensors, so every graph
exports to ONNX and ExecuTorch without mutable buffers.

The bundle's graph contract (prefill and decode graphs, their state I/O) is stated once, in
``runtimes/decoder_graphs.py``. State kinds (names in ``model.state_names``):
- ``full`` and ``windowed:W``: ``k_cache``, ``v_cache`` (layers, batch, kv_heads, cache_len, head_dim), keys after
  RoPE. The cache is a rolling window: slot ``cache_len - 1`` holds the newest token; a call attends over
  [cache, new tokens] and keeps the last ``cache_len`` of them, so the graph is one concat and one slice (XNNPACK
  delegates both; a scatter would stay outside) and memory is flat. An additive mask computed from ``position``
  hides empty slots, later tokens and, for ``windowed``, keys outside the query's window blocks.
  ``full``: ``cache_len = max_context``; decoding past it keeps the newest ``max_context`` tokens (a sliding window)
  where a no-cache recompute would see all. ``windowed:W``: a query in block ``i // W`` sees the previous and its own
  block (up to 2W keys), so ``cache_len = 2W`` at any context, and decode equals prefill exactly.
- ``linear``: ``kv_state`` (layers, batch, kv_heads, head_dim, head_dim) = sum of phi(k)^T v and ``k_state``
  (layers, batch, kv_heads, head_dim, 1) = sum of phi(k): constant size, exact.

Rules for hosts: rows of a batch share one prompt length (no padding inside prefill); feed inputs by name.
- ONNX: decode graphs and the ``full`` prefill export with the TorchScript exporter (any prompt length). The
  ``windowed`` and ``linear`` prefill graphs need ``torch.export`` with ``seq = seq_multiple * Dim`` and the dynamo
  exporter (the TorchScript tracer turns their shape checks into tensors), so their prompts are multiples of
  ``seq_multiple`` (W, or 64 for linear): prefill the largest multiple, step the rest.
- ExecuTorch 1.5.1: XNNPACK delegates no reshape or slice with a symbolic size, so a dynamic-length prefill runs
  correctly but in ~20 delegate pieces. A decode graph exported with a fixed T (e.g. 32) is one delegate and serves
  as the prefill: run ``seq // T`` chunks from ``init_state()``, then the remaining prompt tokens one at a time.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepipe.attention import AttentionSpec, get_attention
from edgepipe.config import DecoderConfig
from edgepipe.errors import UsageError


class RMSNorm(nn.Module):
    """Root-mean-square norm: ``x / sqrt(mean(x^2) + eps) * weight``.

    The mean is a matmul with a ``1/dim`` column because XNNPACK delegates matmuls but not ``mean``.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("avg", torch.full((dim, 1), 1.0 / dim), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., dim) -> (..., dim)"""
        return x * torch.rsqrt(torch.matmul(x * x, self.avg) + self.eps) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> Tensor:
    """RoPE inverse frequencies (head_dim // 2,), with Hugging Face's ``linear`` and ``llama3`` scaling.

    Raises:
        UsageError: ``scaling`` names another RoPE type.
    """
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    raise UsageError(f"RoPE type '{kind}' is not supported. Accepted: default, linear, llama3.")


def rotate_half(x: Tensor) -> Tensor:
    """(..., d) -> (..., d): [-x2, x1] for the halves x1, x2 (Hugging Face's RoPE layout)."""
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def rope_tables(positions: Tensor, inv_freq: Tensor) -> tuple[Tensor, Tensor]:
    """cos, sin for float positions (...,) -> each (..., head_dim); ``inv_freq`` is (head_dim,), both halves alike."""
    angle = positions.reshape(*positions.shape, 1) * inv_freq  # reshape: XNNPACK does not delegate unsqueeze
    return torch.cos(angle), torch.sin(angle)


def _repeat_heads(x: Tensor, groups: int) -> Tensor:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), head h reading kv head h // groups.

    A broadcast multiply by ones: XNNPACK delegates it, but neither ``expand`` nor a concat of one tensor with itself.
    """
    if groups == 1:
        return x
    b, kvh, _, d = x.shape
    return (x.reshape(b, kvh, 1, -1, d) * x.new_ones(1, 1, groups, 1, 1)).reshape(b, kvh * groups, -1, d)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE; prefill through the attention slot, decode against the KV cache."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        self.groups = cfg.heads // cfg.kv_heads
        self.q_proj = nn.Linear(cfg.hidden, cfg.heads * cfg.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden, cfg.kv_heads * cfg.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.heads * cfg.head_dim, cfg.hidden, bias=cfg.attention_bias)
        self.attend = get_attention(cfg.attention)

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # -1 for the sequence: XNNPACK delegates a reshape with one inferred size but none with a symbolic one.
        b = x.shape[0]
        q = self.q_proj(x).reshape(b, -1, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).reshape(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).reshape(b, -1, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Causal attention over the whole sequence through the attention slot.

        Args:
            x: (batch, seq, hidden)
            cos, sin: (seq, head_dim) RoPE tables for positions 0..seq-1.
            key_mask: (batch, seq) 1/0, or None.

        Returns:
            out (batch, seq, hidden), and k, v (batch, kv_heads, seq, head_dim) after RoPE for the cache.
        """
        b = x.shape[0]
        q, k, v = self._project(x, cos, sin)
        ctx = self.attend(q, _repeat_heads(k, self.groups), _repeat_heads(v, self.groups), key_mask, True)
        return self.o_proj(ctx.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)), k, v

    def step(
        self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """T new tokens against the rolling cache (T = 1 to decode, more for a static-shape prefill chunk).

        Args:
            x: (batch, T, hidden)
            cos, sin: (batch, 1, T, head_dim) for the new tokens' positions.
            bias: (batch, 1, T, cache_len + T) additive mask over [cache slots, new tokens], 0 where visible.
            k_cache, v_cache: (batch, kv_heads, cache_len, head_dim)

        Returns:
            out (batch, T, hidden), new k_cache, new v_cache (the last cache_len of [cache, new tokens]).
        """
        b, t, _ = x.shape
        c, kvh, d = k_cache.shape[2], self.kv_heads, self.head_dim
        q, k, v = self._project(x, cos, sin)
        keys = torch.cat([k_cache, k], dim=2)  # (b, kvh, c + t, d)
        values = torch.cat([v_cache, v], dim=2)
        # The T queries of all heads sharing a kv head are rows of one 3-D bmm: the cache is read once, not repeated.
        qg = q.reshape(b * kvh, self.groups * t, d)
        scores = torch.bmm(qg, keys.reshape(b * kvh, c + t, d).transpose(1, 2))
        scores = scores.reshape(b, self.heads, t, c + t) * (1.0 / math.sqrt(d)) + bias
        probs = torch.softmax(scores, dim=-1).reshape(b * kvh, self.groups * t, c + t)
        ctx = torch.bmm(probs, values.reshape(b * kvh, c + t, d)).reshape(b, self.heads, t, d)
        out = self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * d))
        return out, keys[:, :, t:], values[:, :, t:]

    def step_linear(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv_state: Tensor, k_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """T new tokens of causal linear attention from its running sums (``edgepipe.attention.linear``'s maths).

        Args:
            x: (batch, T, hidden)
            cos, sin: (batch, 1, T, head_dim)
            kv_state: (batch, kv_heads, head_dim, head_dim) = sum over past tokens of phi(k)^T v.
            k_state: (batch, kv_heads, head_dim, 1) = sum over past tokens of phi(k).

        Returns:
            out (batch, T, hidden), new kv_state, new k_state.
        """
        from edgepipe.attention.linear import EPS, elu_feature

        b, t, _ = x.shape
        kvh, d, g = self.kv_heads, self.head_dim, self.groups
        q, k, v = self._project(x, cos, sin)
        qf = elu_feature(q).reshape(b * kvh, g * t, d)
        kf, v = elu_feature(k).reshape(b * kvh, t, d), v.reshape(b * kvh, t, d)
        s, z = kv_state.reshape(b * kvh, d, d), k_state.reshape(b * kvh, d, 1)
        within = (torch.bmm(qf, kf.transpose(1, 2)).reshape(b * kvh, g, t, t) * self._causal_ones(t, x)).reshape(
            b * kvh, g * t, t
        )
        num = torch.bmm(within, v) + torch.bmm(qf, s)
        den = torch.bmm(within, x.new_ones(b * kvh, t, 1)) + torch.bmm(qf, z)
        ctx = (num / (den + EPS)).reshape(b, self.heads, t, d)
        out = self.o_proj(ctx.transpose(1, 2).reshape(b, t, self.heads * d))
        kt = kf.transpose(1, 2)
        s = s + torch.bmm(kt, v)
        z = z + torch.bmm(kt, x.new_ones(b * kvh, t, 1))
        return out, s.reshape(b, kvh, d, d), z.reshape(b, kvh, d, 1)

    @staticmethod
    def _causal_ones(t: int, like: Tensor) -> Tensor:
        """(t, t) lower-triangular ones (static T, so the export sees a constant-sized side input)."""
        return torch.tril(like.new_ones(t, t))

    def linear_state(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Running sums after a prefill: k, v (batch, kv_heads, seq, head_dim) -> kv_state, k_state (step_linear)."""
        from edgepipe.attention.linear import elu_feature

        b, kvh, _, d = k.shape
        kt = elu_feature(k).reshape(b * kvh, -1, d).transpose(1, 2)
        s = torch.bmm(kt, v.reshape(b * kvh, -1, d))
        z = torch.matmul(kt, k.new_ones(k.shape[2], 1))
        return s.reshape(b, kvh, d, d), z.reshape(b, kvh, d, 1)


class SwiGLU(nn.Module):
    """LLaMA's MLP: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, hidden: int, ffn: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=bias)
        self.up_proj = nn.Linear(hidden, ffn, bias=bias)
        self.down_proj = nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm layer: x = x + attn(norm(x)); x = x + mlp(norm(x))."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mlp = SwiGLU(cfg.hidden, cfg.ffn, cfg.mlp_bias)


class DecoderLM(nn.Module):
    """Token embedding, ``cfg.layers`` decoder layers, final RMSNorm and LM head (optionally tied)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.spec = AttentionSpec.parse(cfg.attention)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("inv_freq", torch.cat([inv_freq, inv_freq]), persistent=False)  # rotate_half layout
        # Before a step, cache slot j holds position `position - cache_len + j`.
        self.register_buffer("slot_age", torch.arange(-cfg.cache_len, 0, dtype=torch.float32), persistent=False)

    @property
    def state_names(self) -> tuple[str, str]:
        return ("kv_state", "k_state") if self.spec.kind == "linear" else ("k_cache", "v_cache")

    @property
    def seq_multiple(self) -> int:
        """Prefill lengths exported to ExecuTorch must be multiples of this (the block of the blocked forms)."""
        return {"windowed": self.spec.window or 1, "linear": 64}.get(self.spec.kind, 1)

    def _layers(self, input_ids: Tensor, key_mask: Tensor | None) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        n = input_ids.shape[1]
        cos, sin = rope_tables(torch.arange(n, device=input_ids.device, dtype=torch.float32), self.inv_freq)
        x = self.embed(input_ids)
        keys, values = [], []
        for layer in self.layers:
            h, k, v = layer.attn(layer.attn_norm(x), cos, sin, key_mask)
            x = x + h
            x = x + layer.mlp(layer.mlp_norm(x))
            keys.append(k)
            values.append(v)
        return self.lm_head(self.norm(x)), keys, values

    def forward(self, input_ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """No-cache forward for training, perplexity and reference decoding.

        Args:
            input_ids: (batch, seq) int64
            key_mask: (batch, seq) 1/0 for right-padded batches, or None.

        Returns:
            logits (batch, seq, vocab)
        """
        return self._layers(input_ids, key_mask)[0]

    def init_state(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        """Empty decode state: two tensors with layers stacked on dim 0 (shapes in the module docstring)."""
        c = self.cfg
        if self.spec.kind == "linear":
            return (
                torch.zeros(c.layers, batch, c.kv_heads, c.head_dim, c.head_dim),
                torch.zeros(c.layers, batch, c.kv_heads, c.head_dim, 1),
            )
        shape = (c.layers, batch, c.kv_heads, c.cache_len, c.head_dim)
        return torch.zeros(shape), torch.zeros(shape)

    def prefill(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the prompt through the attention slot and build the decode state.

        Args:
            input_ids: (batch, seq) int64.

        Returns:
            logits (batch, seq, vocab) and the two state tensors (see ``init_state``).
        """
        b = input_ids.shape[0]
        c, kvh, d = self.cfg.cache_len, self.cfg.kv_heads, self.cfg.head_dim
        logits, keys, values = self._layers(input_ids, None)
        if self.spec.kind == "linear":
            sums = [layer.attn.linear_state(k, v) for layer, k, v in zip(self.layers, keys, values)]
            kv = stack_layers([s.reshape(1, *s.shape) for s, _ in sums])
            return logits, kv, stack_layers([z.reshape(1, *z.shape) for _, z in sums])
        empty = torch.zeros(b, kvh, c, d)

        def stack(parts: list[Tensor]) -> Tensor:
            # Newest token in the last slot: left-fill with zeros, keep the last c slots.
            return stack_layers([torch.cat([empty, p], dim=2)[:, :, -c:].reshape(1, b, kvh, c, d) for p in parts])

        return logits, stack(keys), stack(values)

    def _step_bias(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        """Additive mask (batch, 1, T, cache_len + T): key j is visible to query t if ``lo_t <= key_j <= query_t``.

        ``lo_t`` is 0 (full; it also hides the empty slots, whose positions are negative) or the start of the
        previous window block (windowed). Positions are integers held in floats; ``clamp(., 0, 1)`` turns each
        "how far outside" into 0/1 with ops XNNPACK delegates (no comparisons, no ``where``).
        """
        b, t = query_pos.shape
        qp, kp = query_pos.reshape(b, t, 1), key_pos.reshape(b, 1, -1)  # (b, T, 1), (b, 1, C + T)
        if self.spec.kind == "windowed":
            w = float(self.spec.window)
            lo = torch.clamp((torch.floor(qp / w) - 1.0) * w, min=0.0)
        else:
            lo = qp * 0.0
        hidden = torch.clamp(kp - qp, 0.0, 1.0) + torch.clamp(lo - kp, 0.0, 1.0)
        return (hidden * torch.finfo(torch.float32).min).reshape(b, 1, t, -1)

    def step_context(self, position: Tensor, tokens: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """RoPE tables and the cache mask for ``tokens`` new tokens starting at ``position``, shared by all layers.

        Args:
            position: (batch,) int64
            tokens: T, the number of new tokens.

        Returns:
            cos, sin (batch, 1, T, head_dim) and the additive mask (batch, 1, T, cache_len + T), None for linear.
        """
        b = position.shape[0]
        offsets = torch.arange(tokens, dtype=torch.float32, device=position.device)
        pos = position.to(torch.float32).reshape(b, 1)
        query_pos = pos + offsets  # (b, T)
        cos, sin = rope_tables(query_pos, self.inv_freq)
        d = cos.shape[-1]
        cos, sin = cos.reshape(b, 1, tokens, d), sin.reshape(b, 1, tokens, d)
        if self.spec.kind == "linear":
            return cos, sin, None
        # Cache slot j holds position `position - cache_len + j`; the new tokens follow.
        return cos, sin, self._step_bias(query_pos, pos + torch.cat([self.slot_age, offsets]))

    def step(self, input_ids: Tensor, position: Tensor, *state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run T new tokens from the state: T = 1 decodes; a fixed T > 1 is a static-shape prefill chunk.

        Args:
            input_ids: (batch, T) int64
            position: (batch,) int64, the position of ``input_ids[:, 0]`` in the sequence.
            *state: the two state tensors (``state_names``; ``init_state()`` before the first call).

        Returns:
            logits (batch, T, vocab) and the two new state tensors (same shapes).
        """
        first, second = state
        cos, sin, bias = self.step_context(position, input_ids.shape[1])
        x = self.embed(input_ids)
        new_first, new_second = [], []
        for i, layer in enumerate(self.layers):
            # Slices, not select: XNNPACK does not delegate select.
            a, c = first[i : i + 1].reshape(first.shape[1:]), second[i : i + 1].reshape(second.shape[1:])
            if bias is None:
                h, a, c = layer.attn.step_linear(layer.attn_norm(x), cos, sin, a, c)
            else:
                h, a, c = layer.attn.step(layer.attn_norm(x), cos, sin, bias, a, c)
            x = x + h
            x = x + layer.mlp(layer.mlp_norm(x))
            new_first.append(a.reshape(1, *a.shape))
            new_second.append(c.reshape(1, *c.shape))
        return self.lm_head(self.norm(x)), stack_layers(new_first), stack_layers(new_second)


def stack_layers(parts: list[Tensor]) -> Tensor:
    """Concat per-layer (1, ...) states along dim 0 (a one-input concat would stay outside XNNPACK)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


class CachedLM(Protocol):
    """What ``generate`` and the graph helpers need: DecoderLM and MambaLM both provide it."""

    state_names: tuple[str, ...]

    def __call__(self, input_ids: Tensor) -> Tensor: ...
    def prefill(self, input_ids: Tensor) -> tuple[Tensor, ...]: ...
    def step(self, input_ids: Tensor, position: Tensor, *state: Tensor) -> tuple[Tensor, ...]: ...
    def init_state(self, batch: int = 1) -> tuple[Tensor, ...]: ...


@torch.no_grad()
def generate(model: CachedLM, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding: one prefill, then one ``step`` per new token.

    Args:
        model: A DecoderLM or MambaLM in eval mode.
        input_ids: (batch, seq) int64 prompt.
        max_new_tokens: Tokens to append.

    Returns:
        (batch, seq + max_new_tokens) int64: the prompt followed by the generated tokens.
    """
    b, n = input_ids.shape
    logits, *state = model.prefill(input_ids)
    tokens = [input_ids]
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(nxt)
        if i + 1 < max_new_tokens:
            position = torch.full((b,), n + i, dtype=torch.long, device=input_ids.device)
            logits, *state = model.step(nxt, position, *state)
    return torch.cat(tokens, dim=1)


@torch.no_grad()
def generate_reference(model: CachedLM, input_ids: Tensor, max_new_tokens: int) -> Tensor:
    """Greedy decoding by recomputing the whole sequence for every token (no cache); the slow check for ``generate``."""
    ids = input_ids
    for _ in range(max_new_tokens):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return ids


class PrefillGraph(nn.Module):
    """``input_ids -> (logits, *state)``: the module to export as the prefill graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.prefill(input_ids))


class DecodeGraph(nn.Module):
    """``(input_ids, position, *state) -> (logits, *new_state)``: the module to export as the decode graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, position: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return tuple(self.model.step(input_ids, position, *state))
