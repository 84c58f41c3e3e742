"""Attention forms behind one interface: a model takes any of them by name.

Specs are strings: ``full``, ``windowed:W`` (blocked local attention: blocks of W queries, each attending to
2W keys; causal: the previous block and its own; bidirectional: the 2W keys centred on the block) and ``linear``
(kernelised, ELU+1 features). Every form is a function ``(q, k, v, key_mask, causal) -> out`` with
q, k, v: (batch, heads, seq, head_dim) and key_mask: (batch, seq) 1/0, so a model swaps forms without
changing its projections.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import Tensor

from edgepipe.config import AttentionSpec

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool], Tensor]


def get_attention(spec: AttentionSpec | str) -> AttentionFn:
    """Return the attention function for ``spec`` (imported lazily, so unused forms cost nothing)."""
    spec = AttentionSpec.parse(spec) if isinstance(spec, str) else spec
    if spec.kind == "full":
        from edgepipe.attention.full import full_attention

        return full_attention
    if spec.kind == "windowed":
        from edgepipe.attention.windowed import windowed_attention

        return partial(windowed_attention, window=spec.window)
    from edgepipe.attention.linear import linear_attention

    return linear_attention
