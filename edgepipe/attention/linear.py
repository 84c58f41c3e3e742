"""Kernelised linear attention (Katharopoulos et al. 2020) with the ELU + 1 feature map.

``softmax(q·k)`` is replaced by ``phi(q)·phi(k)`` with ``phi(x) = elu(x) + 1 > 0``, so attention becomes

    out_i = phi(q_i) @ S_i / (phi(q_i) @ z_i),   S_i = sum_j phi(k_j)ᵀ v_j,   z_i = sum_j phi(k_j)

over the keys ``j`` query ``i`` may see: all of them (bidirectional, one ``phi(K)ᵀ V`` product, cost linear in
``seq``) or ``j <= i`` (causal). The causal form is chunked: inside a chunk of ``c`` tokens a masked ``c x c``
product, across chunks a prefix sum of the per-chunk states written as a matmul with a strictly lower
triangular matrix (``cumsum`` is not delegated by XNNPACK, docs/architecture.md).

The normaliser ``z`` is a GEMM with a column of ones (no ``sum``, which XNNPACK does not delegate). ``elu`` is
not delegated either (docs/architecture.md, "Toolchain constraints"); ``phi`` is written as
``relu(x) + exp(min(x, 0))``, exactly ``elu(x) + 1``.

Padded keys (``key_mask`` 0) get ``phi(k) = 0`` and so add nothing to ``S`` or ``z``. The causal form pads the
sequence to whole chunks inside; for ``torch.export`` that means ``seq = chunk * Dim(...)`` like the blocked
windowed form. The bidirectional form has no blocks: it exports with a free ``Dim`` and lowers to XNNPACK as one
delegated subgraph even with a dynamic sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from edgepipe.attention.windowed import known_equal  # sizes may be traced tensors (TorchScript ONNX exporter)

EPS = 1e-6  # keeps rows whose keys are all padding at 0 instead of 0 / 0


def elu_feature(x: Tensor) -> Tensor:
    """phi(x) = elu(x) + 1, written as relu(x) + exp(min(x, 0)) so XNNPACK delegates it."""
    return torch.relu(x) + torch.exp(torch.clamp(x, max=0.0))


def linear_attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False, *, chunk: int = 64
) -> Tensor:
    """Linear attention with ELU + 1 features.

    Args:
        q: (batch, heads, seq, head_dim)
        k: (batch, heads, seq, head_dim)
        v: (batch, heads, seq, head_dim_v)
        key_mask: (batch, seq) with 1 for real tokens and 0 for padding (any dtype); None keeps all.
        causal: Query i sees keys 0..i (chunked prefix-sum form); otherwise all keys.
        chunk: Chunk length of the causal form.

    Returns:
        (batch, heads, seq, head_dim_v)
    """
    b, h, n, d = q.shape
    dv = v.shape[-1]
    # contiguous() up front: a reshape that must copy is exported with symbolic sizes, which XNNPACK refuses to
    # delegate; a reshape of a contiguous tensor keeps its -1.
    qf, kf, v = elu_feature(q).contiguous(), elu_feature(k).contiguous(), v.contiguous()
    if key_mask is not None:
        mask = key_mask if key_mask.dtype == kf.dtype else key_mask.to(kf.dtype)
        kf = kf * mask.reshape(b, 1, -1, 1)
    if causal:
        num, den = _causal_chunked(qf, kf, v, chunk)
    else:
        # S = phi(K)ᵀ V and z = phi(K)ᵀ 1 as (b*h, d, dv) and (b*h, d, 1), then one product each per query.
        kt = kf.reshape(b * h, -1, d).transpose(1, 2)
        qf = qf.reshape(b * h, -1, d)
        num = torch.bmm(qf, torch.bmm(kt, v.reshape(b * h, -1, dv)))
        den = torch.bmm(qf, torch.bmm(kt, qf.new_ones(b * h, n, 1)))
    return (num / (den + EPS)).reshape(b, h, -1, dv)


def _causal_chunked(qf: Tensor, kf: Tensor, v: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """Causal numerator (b*h, n, dv) and normaliser (b*h, n, 1) from qf, kf: (b, h, n, d), v: (b, h, n, dv)."""
    b, h, n, d = qf.shape
    dv = v.shape[-1]
    chunks = (n + c - 1) // c  # not -(-n // c): the ONNX exporter turns SymInt // into truncating Div
    pad = chunks * c - n
    if not known_equal(pad, 0):
        # Padded keys sit after every real query, so the causal mask already hides them.
        qf, kf, v = (torch.cat([t, t.new_zeros(b, h, pad, t.shape[-1])], dim=2) for t in (qf, kf, v))
    qc = qf.reshape(-1, c, d)  # (b*h*chunks, c, d)
    kc = kf.reshape(-1, c, d)
    vc = v.reshape(-1, c, dv)
    ones = kc.new_ones(b * h * chunks, c, 1)

    # Inside a chunk: the masked c x c product, exactly like softmax-free causal attention.
    within = torch.bmm(qc, kc.transpose(1, 2)) * _lower_triangle(c, 0, qf.dtype, qf.device)
    num = torch.bmm(within, vc)  # (b*h*chunks, c, dv)
    den = torch.bmm(within, ones)  # (b*h*chunks, c, 1)

    # Across chunks: the state before chunk t is the sum of the states of chunks 0..t-1 (a strict prefix sum),
    # computed as a (chunks, chunks) matmul with a strictly lower triangular matrix.
    kt = kc.transpose(1, 2)
    tri = _lower_triangle(chunks, -1, qf.dtype, qf.device)
    num = num + torch.bmm(qc, _prefix(tri, torch.bmm(kt, vc), b * h))  # states (b*h*chunks, d, dv)
    den = den + torch.bmm(qc, _prefix(tri, torch.bmm(kt, ones), b * h))  # normaliser states (b*h*chunks, d, 1)
    num, den = num.reshape(b * h, -1, dv), den.reshape(b * h, -1, 1)
    if known_equal(pad, 0):
        return num, den
    return num[:, :n], den[:, :n]


def _prefix(tri: Tensor, states: Tensor, groups: int) -> Tensor:
    """Strict prefix sum over chunks: tri (chunks, chunks), states (groups*chunks, r, c) -> same shape."""
    r, c = states.shape[-2:]
    flat = states.reshape(groups, -1, r * c).permute(1, 0, 2).reshape(-1, groups * r * c)  # (chunks, g*r*c)
    flat = torch.bmm(tri.reshape(1, tri.shape[0], tri.shape[1]), flat.reshape(1, flat.shape[0], -1))  # 3-D: XNNPACK
    return flat.reshape(-1, groups, r * c).permute(1, 0, 2).reshape(-1, r, c)


def _lower_triangle(size: int, diagonal: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size, size) matrix of ones on and below ``diagonal`` (0: with the main diagonal, -1: strictly below)."""
    rows = torch.arange(size, device=device)[:, None]
    cols = torch.arange(size, device=device)[None, :]
    return (cols <= rows + diagonal).to(dtype)


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None, causal: bool = False, *, chunk: int = 64
) -> Tensor:
    """Slow, obviously correct version: for each query, sum phi(q)·phi(k) weights over the keys it may see.

    ``chunk`` is accepted for signature parity and ignored: the result does not depend on it.
    """
    b, h, n, _ = q.shape
    phi = lambda x: torch.nn.functional.elu(x) + 1.0  # noqa: E731 - the textbook definition, on purpose
    out = torch.zeros(b, h, n, v.shape[-1], dtype=q.dtype)
    for bi in range(b):
        for i in range(n):
            keep = torch.ones(n, dtype=torch.bool)
            if causal:
                keep[i + 1 :] = False
            if key_mask is not None:
                keep &= key_mask[bi].bool()
            for hi in range(h):
                weights = phi(k[bi, hi, keep]) @ phi(q[bi, hi, i])  # (kept,)
                out[bi, hi, i] = (weights @ v[bi, hi, keep]) / (weights.sum() + EPS)
    return out
