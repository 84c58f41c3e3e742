"""Real text in, tokens out: reading calibration_data/ splits, batches for encoders, packed streams for decoders."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from edgepipe.config import EOS, resolve_data_file
from edgepipe.errors import ModelError, UsageError


def read_sentences(name: str, limit: int | None = None) -> list[str]:
    """Non-empty lines of a data file (a name in calibration_data/ or a path), first ``limit`` of them.

    Raises:
        UsageError: The file is missing, unreadable, not UTF-8, or has no non-empty line (training on it would
            never finish an epoch).
    """
    path = resolve_data_file(name)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"Data file {path} is not UTF-8 text (byte {exc.start}: {exc.reason}).",
            hint="Pass a UTF-8 text file, one sentence per line.",
        ) from None
    except OSError as exc:
        raise UsageError(f"Cannot read data file {path} ({exc.strerror or exc}).") from None
    lines = [line for line in (raw.strip() for raw in text.splitlines()) if line]
    if not lines:
        raise UsageError(f"Data file {path} has no non-empty lines.", hint="Pass a text file, one sentence per line.")
    return lines[:limit] if limit else lines


def load_tokenizer(path: Path, max_len: int | None = None) -> Tokenizer:
    """A fast tokenizer from ``tokenizer.json``; for encoders (``max_len``) it truncates to ``max_len`` and pads each
    batch to its longest row, for decoders (None) it is the file's own (token streams, no padding).

    Raises:
        ModelError: The file is missing or not a tokenizers JSON.
    """
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for bad JSON
        raise ModelError(
            f"Cannot read tokenizer {path}: {exc}.", hint="Ship a fast tokenizer's tokenizer.json."
        ) from None
    if max_len is None:
        return tok
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")
    return tok


def encode(tok: Tokenizer, sentences: list[str]) -> dict[str, np.ndarray]:
    """Tokenize one batch: ``input_ids`` and ``attention_mask``, int64 (batch, longest)."""
    enc = tok.encode_batch(sentences)
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }


def batches(tok: Tokenizer, sentences: list[str], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Tokenized batches in order; sentences of similar length are not regrouped, so outputs keep input order."""
    for i in range(0, len(sentences), batch_size):
        yield encode(tok, sentences[i : i + batch_size])


def encode_text(tok: Tokenizer, sentences: list[str]) -> np.ndarray:
    """One packed token stream: every sentence's ids followed by ``<|eos|>``; int64 (tokens,)."""
    eos = tok.token_to_id(EOS)
    parts = [np.array([*e.ids, eos], dtype=np.int64) for e in tok.encode_batch(sentences, add_special_tokens=False)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def windows(stream: np.ndarray, length: int) -> np.ndarray:
    """Non-overlapping windows of ``length`` tokens, (n, length); the tail that does not fill one is dropped."""
    n = len(stream) // length
    return stream[: n * length].reshape(n, length)
