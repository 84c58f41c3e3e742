"""Blocked sliding-window (local) attention: each block of ``w`` queries attends to ``2w`` keys around it.

The sequence is cut into blocks of ``w`` queries. Every block attends to a span of ``2w`` keys:

- causal: the previous block and its own block, with a causal mask inside its own block, so a query at
  position ``i`` sees keys ``w * (i // w - 1) ... i`` (between ``w`` and ``2w - 1`` of them);
- bidirectional: the ``2w`` keys centred on the block, ``w // 2`` before it, the block itself and
  ``w - w // 2`` after it, so every query sees at least ``w // 2`` neighbours on either side. The cost is the
  same as "own + previous block" (``2w`` keys per query); the centred span is what an encoder wants.

Cost per query is ``2w`` keys instead of ``n``: the FLOP-ratio bound against full attention is ``n / 2w`` for the
mixing alone. With ``w >= seq`` the span covers the whole sequence and the result equals full attention.

The form is written for the runtimes we lower to (docs/architecture.md, "Toolchain constraints"):
plain slices (no select/split), explicit 3-D ``bmm`` with batch, heads and blocks folded together, padding by
``torch.cat`` with zeros (a quantized ``F.pad`` breaks static PT2E), at most 5-D tensors. The padding mask rides
inside the QKᵀ GEMM as one extra feature column (queries get a 1, keys get 0 or a large negative), so there is
no separate pass over the ``(blocks, w, 2w)`` score tensor for it: in ONNX Runtime that broadcast Add cost about
as much as the QKᵀ GEMM itself. Keep the QKᵀ and attention·V GEMMs in float when quantizing (their inputs
carry the mask column; quantizing them also collapses fidelity, docs/architecture.md).

Dynamic sequence length: ONNX Runtime handles any length (the form pads inside). ``torch.export`` of a
reshape-into-blocks form only succeeds for ``seq = w * Dim("blocks")`` (a free Dim fails on guards); the host
pads inputs to a multiple of ``w`` (with ``key_mask`` zeros) for ExecuTorch. :func:`export_seq_dim` builds that
Dim; the example input needs at least 2 blocks (export specialises a size of 1). Such a dynamic export lowers to
XNNPACK in several delegated subgraphs (ExecuTorch 1.5.1's partitioner delegates no slice of a dynamically
shaped tensor); a static-shape export (one padded length) lowers as one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import statically_known_true


def windowed_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False, *, window: int = 256
) -> Tensor:
    """Blocked local attention (see the module docstring for which keys each query sees).

    Args:
        q: (batch, heads, seq, head_dim)
        k: (batch, heads, seq, head_dim)
        v: (batch, heads, seq, head_dim)
        key_mask: (batch, seq) with 1 for real tokens and 0 for padding (any dtype); None keeps all.
        causal: Causal variant (own + previous block); otherwise the centred bidirectional span.
        window: Block size ``w``; each query block attends to ``2w`` keys.

    Returns:
        (batch, heads, seq, head_dim)

    Raises:
        ValueError: window is not a positive integer.
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    b, h, n, d = q.shape
    w = window
    blocks = (n + w - 1) // w  # not -(-n // w): the ONNX exporter turns SymInt // into a truncating Div
    n_pad = blocks * w
    left = w if causal else w // 2  # keys in the span before the block's first query
    right = n_pad + w - left - n  # zeros after the last key so the padded keys fill blocks + 1 whole blocks
    neg = torch.finfo(q.dtype).min / 4  # large but finite: a few of them summed stay finite, so no NaN rows

    # Queries: a ones column (it multiplies the keys' bias column), padded to whole blocks.
    q = torch.cat([q, q.new_ones(b, h, n, 1)], dim=-1)
    q = _pad_seq(q, 0, n_pad - n)

    # Keys: padded to (blocks + 1) * w positions, plus a bias column that is 0 for real keys, `neg` otherwise.
    if key_mask is None:
        valid = q.new_ones(b, n)
    else:
        valid = key_mask if key_mask.dtype == q.dtype else key_mask.to(q.dtype)  # no no-op copy node in the graph
    valid = torch.cat([valid.new_zeros(b, left), valid, valid.new_zeros(b, right)], dim=1)  # (b, L)
    key_bias = ((1.0 - valid) * neg).reshape(b, 1, -1, 1)  # (b, 1, L, 1)
    k = _pad_seq(k, left, right)
    k = torch.cat([k, k.new_zeros(b, h, k.shape[2], 1) + key_bias], dim=-1)  # (b, h, L, d + 1)
    v = _pad_seq(v, left, right)

    # Span of block j = padded blocks j and j + 1: two slices of one (b*h, blocks + 1, w, .) view. Reshapes keep
    # the one dynamic size as -1: XNNPACK delegates a reshape only then (symbolic sizes are refused).
    kb = k.reshape(b * h, -1, w, d + 1)
    kb = torch.cat([kb[:, :-1], kb[:, 1:]], dim=2).reshape(-1, 2 * w, d + 1)
    vb = v.reshape(b * h, -1, w, d)
    vb = torch.cat([vb[:, :-1], vb[:, 1:]], dim=2).reshape(-1, 2 * w, d)
    # The scale goes on right before the GEMM: ONNX Runtime folds a Mul feeding a MatMul into the GEMM (alpha).
    # It scales the bias column too, which stays a large negative.
    qb = q.reshape(-1, w, d + 1) * (1.0 / math.sqrt(d))

    scores = torch.bmm(qb, kb.transpose(1, 2))  # (b*h*blocks, w, 2w), key mask already added by the GEMM
    if causal:
        scores = scores + _causal_block_bias(w, q.dtype, q.device)
    out = torch.bmm(torch.softmax(scores, dim=-1), vb).reshape(b, h, -1, d)  # (b, h, blocks * w, d)
    return out if known_equal(n_pad, n) else out[:, :, :n]


def known_equal(a, b) -> bool:
    """``a == b`` when known at trace time; False when unknown, e.g. traced tensor sizes under the TorchScript ONNX
    exporter (the caller then slices, which is a no-op when the sizes are equal)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    return statically_known_true(a == b)


def _pad_seq(x: Tensor, before: int, after: int) -> Tensor:
    """x: (b, h, n, c) -> (b, h, before + n + after, c) with zeros, by cat (never F.pad; see module docstring)."""
    parts = []
    if not known_equal(before, 0):
        parts.append(x.new_zeros(x.shape[0], x.shape[1], before, x.shape[3]))
    parts.append(x)
    if not known_equal(after, 0):
        parts.append(x.new_zeros(x.shape[0], x.shape[1], after, x.shape[3]))
    return torch.cat(parts, dim=2) if len(parts) > 1 else x


def _causal_block_bias(w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(w, 2w) additive bias: query i of a block sees all w keys of the previous block and keys 0..i of its own."""
    pos = torch.arange(2 * w, device=device)
    hidden = pos[None, :] > (torch.arange(w, device=device)[:, None] + w)
    return hidden.to(dtype) * (torch.finfo(dtype).min / 4)


def export_seq_dim(window: int, name: str = "blocks", max_blocks: int = 1024) -> object:
    """The dynamic sequence Dim that ``torch.export`` accepts for blocked forms: ``seq = window * Dim(name)``.

    A free ``Dim`` fails on the reshape-into-blocks guards; a multiple of the block size exports. The host pads
    inputs (and ``key_mask``) to a multiple of ``window``.
    """
    return window * torch.export.Dim(name, min=1, max=max_blocks)


def windowed_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False, *, window: int = 256
) -> Tensor:
    """Slow, obviously correct version: one query at a time, softmax over exactly the keys it may see."""
    b, h, n, d = q.shape
    w = window
    left = w if causal else w // 2
    out = torch.zeros_like(q)
    for bi in range(b):
        for i in range(n):
            start = (i // w) * w - left  # the block's 2w-key span starts `left` keys before the block
            keep = torch.zeros(n, dtype=torch.bool)
            keep[max(start, 0) : max(start + 2 * w, 0)] = True
            if causal:
                keep[i + 1 :] = False
            if key_mask is not None:
                keep &= key_mask[bi].bool()
            for hi in range(h):
                s = (k[bi, hi, keep] @ q[bi, hi, i]) / math.sqrt(d)
                out[bi, hi, i] = torch.softmax(s, dim=0) @ v[bi, hi, keep]
    return out
