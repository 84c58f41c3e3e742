"""edgepipe's BERT-style sentence encoder with an attention slot.

The encoder is written to export cleanly: plain Linear layers, matmul + softmax attention (or any form from
``edgepipe.attention``), LayerNorm and erf-GELU in the order BERT uses them, so ONNX Runtime's transformer optimizer
recognises and fuses the patterns. The sentence head runs inside ``forward``, so an exported graph maps
``(input_ids, attention_mask)`` straight to ``sentence_embedding``: pooling over the mask (mean by default; the
modes of sentence-transformers' ``Pooling``), an optional projection, sentence-transformers' ``Dense`` layers, and
L2 normalisation (``Normalize``). ``models.sbert`` reads those modules from a sentence-transformers directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepipe.attention import AttentionSpec, get_attention

# sentence-transformers' Pooling modes
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
ACTIVATIONS = {"identity": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}


@dataclass(frozen=True)
class DenseSpec:
    """One sentence-transformers ``Dense`` layer: ``activation(linear(x))`` (+ x, or a bias-free map of x, with
    ``residual``)."""

    in_features: int
    out_features: int
    bias: bool = True
    activation: str = "tanh"  # a key of ACTIVATIONS
    residual: bool = False


@dataclass(frozen=True)
class EncoderConfig:
    """Shape of a BERT-style encoder.

    ``attention`` is an attention spec (``full``, ``windowed:W``, ``linear``) or ``mamba2`` for a bidirectional
    Mamba-2 token mixer in place of self-attention. A student narrower than its teacher keeps the teacher's
    attention width (``inner``: heads x head dim, default ``hidden``) and maps its pooled state back to the
    teacher's embedding size (``output``, default none) with a bias-free projection.

    The head: ``pooling`` (sentence-transformers' modes, concatenated in order), then per mode the projection, then
    ``dense`` in order, then L2 normalisation where ``normalize``.
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
    pooling: tuple[str, ...] = ("mean",)
    dense: tuple[DenseSpec, ...] = ()
    normalize: bool = True

    def __post_init__(self) -> None:
        # JSON round trips (a student's config.json) give lists and dicts back
        object.__setattr__(self, "pooling", tuple(self.pooling))
        dense = tuple(d if isinstance(d, DenseSpec) else DenseSpec(**d) for d in self.dense)
        object.__setattr__(self, "dense", dense)
        bad = [m for m in self.pooling if m not in POOLING_MODES] + [
            d.activation for d in dense if d.activation not in ACTIVATIONS
        ]
        if bad or not self.pooling:
            raise ValueError(f"unknown pooling mode or activation {bad} (pooling {POOLING_MODES}, {list(ACTIVATIONS)})")

    @property
    def embedding_dim(self) -> int:
        """Width of ``sentence_embedding``."""
        if self.dense:
            return self.dense[-1].out_features
        return (self.output or self.hidden) * len(self.pooling)

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


class Dense(nn.Module):
    """sentence-transformers' ``Dense``: x: (batch, in_features) -> (batch, out_features)."""

    def __init__(self, spec: DenseSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(spec.in_features, spec.out_features, bias=spec.bias)
        self.activation = ACTIVATIONS[spec.activation]()
        self.use_residual = spec.residual
        if spec.residual and spec.in_features != spec.out_features:
            self.residual = nn.Linear(spec.in_features, spec.out_features, bias=False)
        else:
            self.residual = None

    def forward(self, x: Tensor) -> Tensor:
        out = self.activation(self.linear(x))
        if self.use_residual:
            out = out + (x if self.residual is None else self.residual(x))
        return out


class Encoder(nn.Module):
    """Sentence encoder: embeddings, ``cfg.layers`` encoder layers and the sentence head (``sentence_head``)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.embedding_norm = nn.LayerNorm(cfg.hidden, eps=cfg.eps)
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.project = nn.Linear(cfg.hidden, cfg.output, bias=False) if cfg.output else None
        self.dense = nn.ModuleList(Dense(spec) for spec in cfg.dense)

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
        """input_ids, attention_mask: (batch, seq) int64 -> sentence_embedding: (batch, cfg.embedding_dim), unit
        length where ``cfg.normalize``."""
        mask = attention_mask.to(torch.float32)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x, mask)

    def head(self, x: Tensor, mask: Tensor) -> Tensor:
        """The last layer's states x: (batch, seq, hidden), mask: (batch, seq) float -> sentence_embedding."""
        return sentence_head(x, mask, self.cfg, self.project, self.dense)


def sentence_head(
    x: Tensor, mask: Tensor, cfg: EncoderConfig, project: nn.Module | None = None, dense: nn.ModuleList | None = None
) -> Tensor:
    """Pool ``x`` with each of ``cfg.pooling``'s modes, project each, concatenate, apply ``dense``, L2-normalise.

    Inputs are right-padded (edgepipe's tokenizers pad right), so the first token is CLS and the last real token
    sits at ``sum(mask) - 1``; every mode computes what sentence-transformers' ``Pooling`` does on such a batch.

    Args:
        x: (batch, seq, hidden)
        mask: (batch, seq) float 1/0

    Returns:
        (batch, cfg.embedding_dim)
    """
    pooled = [pool(x, mask, mode) for mode in cfg.pooling]
    if project is not None:  # a linear map: after a mean it equals the mean of the projected states
        pooled = [project(p) for p in pooled]
    out = pooled[0] if len(pooled) == 1 else torch.cat(pooled, dim=-1)
    for layer in dense or ():
        out = layer(out)
    if cfg.normalize:
        out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    return out


def pool(x: Tensor, mask: Tensor, mode: str) -> Tensor:
    """One pooling mode of sentence-transformers over right-padded x: (batch, seq, hidden) -> (batch, hidden).

    Sums over the sequence are matmuls with the mask (they export to one MatMul and delegate to XNNPACK).
    """
    if mode == "cls":
        return x[:, 0]
    if mode == "max":  # masked over (batch, hidden, seq): a (batch, seq, 1) mask does not lower to XNNPACK
        keep = mask.unsqueeze(1) != 0
        return x.transpose(1, 2).masked_fill(~keep, float("-inf")).amax(dim=-1)
    if mode == "lasttoken":
        last = mask.sum(dim=1, keepdim=True) - 1  # (batch, 1)
        positions = torch.arange(x.shape[1], device=x.device, dtype=mask.dtype)
        pick = (positions.unsqueeze(0) == last).to(x.dtype)  # one-hot (batch, seq)
        return torch.matmul(pick.unsqueeze(1), x).squeeze(1)
    weights = mask
    if mode == "weightedmean":  # position weights 1..seq (right padding: they start at the first token)
        weights = mask * torch.arange(1, x.shape[1] + 1, device=x.device, dtype=mask.dtype).unsqueeze(0)
    summed = torch.matmul(weights.unsqueeze(1).to(x.dtype), x).squeeze(1)
    counts = weights.sum(dim=1, keepdim=True).clamp(min=1e-9)
    if mode == "mean_sqrt_len_tokens":
        counts = counts.sqrt()
    return summed / counts.to(summed.dtype)
