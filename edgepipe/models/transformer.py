"""edgepipe's BERT-style sentence encoder with an attention slot.

The encoder is written to export cleanly: plain Linear layers, matmul + softmax attention (or any form from
``edgepipe.attention``), LayerNorm and erf-GELU in the order BERT uses them, so ONNX Runtime's transformer optimizer
recognises and fuses the patterns. Mean pooling over the mask and L2 normalisation happen inside ``forward``, so an
exported graph maps ``(input_ids, attention_mask)`` straight to ``sentence_embedding``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepipe.attention import AttentionSpec, get_attention


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT-style encoder.

    ``attention`` is an attention spec (``full``, ``windowed:W``, ``linear``) or ``mamba2`` for a bidirectional
    Mamba-2 token mixer in place of self-attention. A student narrower than its teacher keeps the teacher's
    attention width (``inner``: heads x head dim, default ``hidden``) and maps its pooled state back to the
    teacher's embedding size (``output``, default none) with a bias-free projection.
    """

    vocab_size: int = 30522
    hidden: int = 384
    layers: int = 6
    heads: int = 12
    ffn: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    eps: float = 1e-12
    attention: str = "full"
    pad_token_id: int = 0
    inner: int | None = None
    output: int | None = None

    @property
    def attention_width(self) -> int:
        return self.inner or self.hidden

    @property
    def head_dim(self) -> int:
        return self.attention_width // self.heads

    def to_dict(self) -> dict:
        return asdict(self)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate Q/K/V projections (BERT's layout) and a swappable mixing form."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.heads, cfg.head_dim
        width = cfg.attention_width
        self.query = nn.Linear(cfg.hidden, width)
        self.key = nn.Linear(cfg.hidden, width)
        self.value = nn.Linear(cfg.hidden, width)
        self.out = nn.Linear(width, cfg.hidden)
        self.spec = AttentionSpec.parse(cfg.attention)
        self.attend = get_attention(self.spec)

    def _split(self, x: Tensor) -> Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """x: (batch, seq, hidden), mask: (batch, seq) float 1/0 -> (batch, seq, hidden)."""
        b, n, _ = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        ctx = self.attend(q, k, v, mask, False)
        return self.out(ctx.transpose(1, 2).reshape(b, n, self.heads * self.head_dim))


class EncoderLayer(nn.Module):
    """Post-norm BERT layer: x = LN(x + mix(x)); x = LN(x + FFN(x))."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.attention == "mamba2":
            from edgepipe.models.mamba import BidirectionalMamba2

            # Shaped like the attention it replaces (x/B/C per head = V/K/Q per head), so it can start from its weights.
            self.mixer: nn.Module = BidirectionalMamba2(
                cfg.hidden,
                expand=1,
                head_dim=cfg.head_dim,
                n_groups=cfg.heads,
                state_size=cfg.head_dim,
                max_context=cfg.max_positions,
            )
        else:
            self.mixer = SelfAttention(cfg)
        self.mixer_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.ffn_in = nn.Linear(cfg.hidden, cfg.ffn)
        self.ffn_out = nn.Linear(cfg.ffn, cfg.hidden)
        self.ffn_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = self.mixer_norm(x + self.mixer(x, mask))
        return self.ffn_norm(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class Encoder(nn.Module):
    """Sentence encoder: embeddings, ``cfg.layers`` encoder layers, masked mean pooling (then ``cfg.output``'s
    projection, if any) and L2 normalisation."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.embedding_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.project = nn.Linear(cfg.hidden, cfg.output, bias=False) if cfg.output else None

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids: (batch, seq) -> (batch, seq, hidden), token type 0 everywhere (single-segment input)."""
        n = input_ids.shape[1]
        positions = torch.arange(n, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.embedding_norm(x)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
        """All hidden states: the embeddings' output, then each layer's, each (batch, seq, hidden)."""
        mask = attention_mask.to(torch.float32)
        states = [self.embed(input_ids)]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return states

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids, attention_mask: (batch, seq) int64 -> sentence_embedding: (batch, output or hidden), unit
        length."""
        mask = attention_mask.to(torch.float32)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return mean_pool_normalize(x, mask, self.project)


def mean_pool_normalize(x: Tensor, mask: Tensor, project: nn.Module | None = None) -> Tensor:
    """Masked mean over the sequence, then ``project`` (a linear map, so it may follow the mean), then L2
    normalisation.

    Args:
        x: (batch, seq, hidden)
        mask: (batch, seq) float 1/0

    Returns:
        (batch, hidden), or (batch, project's output) with a projection, with unit L2 norm.
    """
    summed = torch.matmul(mask.unsqueeze(1), x).squeeze(1)
    counts = mask.sum(dim=1, keepdim=True).clamp(min=1e-9)
    pooled = summed / counts
    if project is not None:
        pooled = project(pooled)
    return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-12)
