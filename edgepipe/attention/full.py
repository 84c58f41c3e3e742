"""Full (global) scaled dot-product attention: every query sees every unmasked key."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def full_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """Scaled dot-product attention over the whole sequence.

    Written as 4-D matmul + additive mask + softmax + matmul, the pattern ONNX Runtime's transformer optimizer
    fuses into its Attention kernel (unfused graphs are 1.7-2x slower at seq 512 here). XNNPACK delegates it in
    a few subgraphs rather than one (the 4-D matmul exports with an ``expand``); ORT is the default target.

    Args:
        q: (batch, heads, seq_q, head_dim)
        k: (batch, heads, seq_k, head_dim)
        v: (batch, heads, seq_k, head_dim)
        key_mask: (batch, seq_k) with 1 for real tokens and 0 for padding, any float or int dtype; None keeps all.
        causal: Queries see only keys at the same or earlier positions (seq_q == seq_k).

    Returns:
        (batch, heads, seq_q, head_dim)
    """
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores + padding_bias(key_mask, scores.dtype)
    if causal:
        scores = scores + causal_bias(q.shape[-2], scores.dtype, scores.device)
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def padding_bias(key_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A (batch, seq) 1/0 key mask as an additive (batch, 1, 1, seq) bias: 0 to keep, a large negative to drop."""
    return (1.0 - key_mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


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
