"""Validate: run a model (eager PyTorch or a lowered artifact in its runtime) on held-back text and measure fidelity.

Encoders: the cosine of sentence embeddings. Decoders: teacher-forced held-back perplexity and top-1 next-token
agreement, through eager PyTorch (``score_torch``) or a bundle's prefill + decode graphs (``score_graphs``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from edgepipe.data import encode_text, read_sentences, windows
from edgepipe.errors import UsageError

if TYPE_CHECKING:
    from edgepipe.runtimes import Session

EVAL_WINDOWS = 8  # decoders: held-back windows scored
EVAL_TOKENS = 256  # per window, capped by the model's context


def embed_torch(model: nn.Module, batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Sentence embeddings (n, dim) of an eager encoder over tokenized batches, on the device the model is on."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for b in batches:
            ids, mask = (torch.from_numpy(b[k]).to(device) for k in ("input_ids", "attention_mask"))
            out.append(model(ids, mask).cpu().numpy())
    return np.concatenate(out)


def embed_session(session: Session, batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Sentence embeddings (n, dim) of a lowered artifact running in its runtime."""
    return np.concatenate([session.run(b)["sentence_embedding"] for b in batches]).astype(np.float32)


def cosines(out: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity (n,) between two (n, dim) embedding sets."""
    return (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Row-wise cosine (mean, min) and max-abs difference between two (n, dim) embedding sets."""
    cos = cosines(out, ref)
    return {
        "mean_cosine": round(float(cos.mean()), 6),
        "min_cosine": round(float(cos.min()), 6),
        "max_abs": float(np.abs(out - ref).max()),
        "n": int(len(cos)),
    }


# -- decoders ---------------------------------------------------------------------------------------------
def eval_windows(tok, data: str, length: int, count: int = EVAL_WINDOWS) -> np.ndarray:
    """(count, length) int64 windows of the held-back split, sentences joined by ``<|eos|>``."""
    wins = windows(encode_text(tok, read_sentences(data)), length)[:count]
    if len(wins) == 0:
        raise UsageError(
            f"Held-back data {data} has fewer than {length} tokens.", hint="Point validate.data at more text."
        )
    return wins


def model_context(model) -> int:
    return int(getattr(getattr(model, "model", model).cfg, "max_context", EVAL_TOKENS))


def _nll_and_top1(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token negative log-likelihood of ``targets`` and argmax, from (n, vocab) logits."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return logz - logits[np.arange(len(targets)), targets], logits.argmax(-1)


@torch.no_grad()
def score_torch(model, wins: np.ndarray, skip: int) -> dict[str, np.ndarray]:
    """No-cache forward over each window: NLL and argmax of every prediction after the first ``skip`` tokens."""
    nll, top1 = [], []
    for w in wins:
        logits = model(torch.from_numpy(w[None, :-1]))[0, skip - 1 :].numpy()
        n, t = _nll_and_top1(logits, w[skip:])
        nll.append(n)
        top1.append(t)
    return {"nll": np.stack(nll), "top1": np.stack(top1)}


def score_graphs(graphs, wins: np.ndarray, skip: int) -> dict[str, np.ndarray]:
    """The same through a bundle's graphs: prefill ``skip`` tokens, then decode the rest teacher-forced."""
    nll, top1 = [], []
    for w in wins:
        w = w.reshape(1, -1)
        logits, state = graphs.feed(w[:, :skip], 0, graphs.init_state())
        rows = [logits[0]]
        for i in range(skip, w.shape[1] - 1):
            logits, state = graphs.feed(w[:, i : i + 1], i, state)
            rows.append(logits[0])
        n, t = _nll_and_top1(np.stack(rows), w[0, skip:])
        nll.append(n)
        top1.append(t)
    return {"nll": np.stack(nll), "top1": np.stack(top1)}


def summarize(scores: dict[str, np.ndarray], teacher: np.ndarray, reference: np.ndarray | None = None) -> dict:
    out = {
        "perplexity": round(float(math.exp(scores["nll"].mean())), 3),
        "top1_vs_teacher": round(float((scores["top1"] == teacher).mean()), 4),
        "tokens": int(scores["nll"].size),
    }
    if reference is not None:
        out["top1_vs_pytorch"] = round(float((scores["top1"] == reference).mean()), 4)
    return out
