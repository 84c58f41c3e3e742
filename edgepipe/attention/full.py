"""Full (global) scaled dot-product attention: every query sees every unmasked key."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def full_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Scaled dot-product attention over the whole sequence.

    Written as explicit 3-D ``bmm`` + additive mask + softmax + ``bmm`` with batch and heads folded together:
    a 4-D ``matmul`` exports with an ``expand`` that XNNPACK does not delegate, which splits the block into
    several delegated subgraphs; this form lowers as one.

    Args:
        q: (batch, heads, seq_q, head_dim)
        k: (batch, heads, seq_k, head_dim)
        v: (batch, heads, seq_k, head_dim)
        key_mask: (batch, seq_k) with 1 for real tokens and 0 for padding, any float or int dtype; None keeps all.
        causal: Queries see only keys at the same or earlier positions (seq_q == seq_k).

    Returns:
        (batch, heads, seq_q, head_dim)
    """
    b, h, n, d = q.shape
    n_k = k.shape[-2]
    q = q * (1.0 / math.sqrt(d))
    scores = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, n_k, d).transpose(1, 2))  # (b*h, seq_q, seq_k)
    if key_mask is not None:
        scores = (scores.reshape(b, h, n, n_k) + padding_bias(key_mask, scores.dtype)).reshape(b * h, n, n_k)
    if causal:
        scores = scores + causal_bias(n, scores.dtype, scores.device)
    out = torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * h, n_k, v.shape[-1]))
    return out.reshape(b, h, n, v.shape[-1])


def padding_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (batch, seq) 1/0 key mask as an additive (batch, 1, 1, seq) bias: 0 to keep, a large negative to drop."""
    mask = key_mask if key_mask.dtype == dtype else key_mask.to(dtype)  # no no-op copy node in exported graphs
    return ((1.0 - mask) * torch.finfo(dtype).min).reshape(key_mask.shape[0], 1, 1, -1)


def causal_bias(n: int, dtype: torch.dtype, device: torch.device | None = None) -> Tensor:
    """(n, n) additive bias that hides keys after each query."""
    return torch.triu(torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=device), diagonal=1)


def full_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False
) -> Tensor:
    """Slow, obviously correct version: one query at a time, softmax over the keys it may see."""
    b, h, n, _ = q.shape
    out = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            for i in range(n):
                keep = torch.ones(k.shape[-2], dtype=torch.bool)
                if key_mask is not None:
                    keep &= key_mask[bi].bool()
                if causal:
                    keep[i + 1 :] = False
                s = (k[bi, hi, keep] @ q[bi, hi, i]) / math.sqrt(q.shape[-1])
                out[bi, hi, i] = torch.softmax(s, dim=0) @ v[bi, hi, keep]
    return out
