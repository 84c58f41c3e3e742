"""Attention forms behind one interface: a model takes any of them by name.

Specs are strings: ``full``, ``windowed:W`` (blocked local attention: blocks of W queries, each attending to
2W keys; causal: the previous block and its own; bidirectional: the 2W keys centred on the block) and ``linear``
(kernelised, ELU+1 features). Every form is a function ``(q, k, v, key_mask, causal) -> out`` with
q, k, v: (batch, heads, seq, head_dim) and key_mask: (batch, seq) 1/0, so a model swaps forms without
changing its projections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from torch import Tensor

from edgepipe.errors import UsageError

AttentionFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", bool], Tensor]

FORMS = ("full", "windowed", "linear")


@dataclass(frozen=True)
class AttentionSpec:
    """A parsed attention spec: ``kind`` plus the window for ``windowed``."""

    kind: str = "full"
    window: int | None = None

    @classmethod
    def parse(cls, text: str) -> AttentionSpec:
        """Parse ``full``, ``windowed:W`` or ``linear``.

        Raises:
            UsageError: The spec names an unknown form or a bad window.
        """
        kind, _, arg = text.strip().partition(":")
        if kind not in FORMS:
            raise UsageError(f"Unknown attention '{text}'. Accepted: full, windowed:W (e.g. windowed:256), linear.")
        if kind == "windowed":
            if not arg.isdigit() or int(arg) < 1:
                raise UsageError(f"Attention '{text}' needs a positive window, e.g. windowed:256.")
            return cls(kind, int(arg))
        if arg:
            raise UsageError(f"Attention '{text}' takes no argument; write '{kind}'.")
        return cls(kind)

    def __str__(self) -> str:
        return f"windowed:{self.window}" if self.kind == "windowed" else self.kind


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
