"""Validate: run a model (eager PyTorch or a lowered artifact in its runtime) on held-back text, compare embeddings."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from edgepipe.runtimes import Session


def embed_torch(model: nn.Module, batches: Iterable[dict[str, np.ndarray]]) -> np.ndarray:
    """Sentence embeddings (n, dim) of an eager encoder over tokenized batches."""
    model.eval()
    with torch.no_grad():
        return np.concatenate(
            [model(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"])).numpy() for b in batches]
        )


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
