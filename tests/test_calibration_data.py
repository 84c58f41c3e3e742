"""The shipped calibration_data/ matches its README and keeps its splits apart."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parent.parent / "edgepipe" / "calibration_data"
SPLITS = ("train", "calibration", "validation")
# (min lines, max lines) per split; every file stays under 10 MB so it can live in git.
BOUNDS = {"train": (60_000, 200_000), "calibration": (1_000, 10_000), "validation": (1_000, 10_000)}
MAX_BYTES = 10_000_000


def _readme_files() -> dict[str, tuple[int, int, str]]:
    """{file name: (lines, bytes, sha256)} from the README's Files table."""
    text = (DATA / "README.md").read_text("utf-8")
    rows = re.findall(r"^\| `([a-z]+\.txt)` \| (\d+) \| (\d+) \| `([0-9a-f]{64})` \|$", text, re.MULTILINE)
    return {name: (int(lines), int(size), digest) for name, lines, size, digest in rows}


@pytest.fixture(scope="module")
def payloads() -> dict[str, bytes]:
    return {split: (DATA / f"{split}.txt").read_bytes() for split in SPLITS}


def _key(line: str) -> str:
    # Same notion of "the same sentence" as scripts/make_calibration_data.py: case, punctuation, spacing ignored.
    return " ".join(re.sub(r"[^\w\s]", " ", line.casefold()).split())


def test_readme_hashes_and_counts_match_files(payloads: dict[str, bytes]) -> None:
    listed = _readme_files()
    assert sorted(listed) == sorted(f"{s}.txt" for s in SPLITS)
    for split, payload in payloads.items():
        lines, size, digest = listed[f"{split}.txt"]
        assert hashlib.sha256(payload).hexdigest() == digest, f"{split}.txt changed; rerun the generator"
        assert len(payload) == size
        assert payload.count(b"\n") == lines


def test_sizes_within_bounds(payloads: dict[str, bytes]) -> None:
    for split, payload in payloads.items():
        lo, hi = BOUNDS[split]
        assert 0 < len(payload) < MAX_BYTES
        assert lo <= payload.count(b"\n") <= hi, split


def test_lines_are_clean_sentences(payloads: dict[str, bytes]) -> None:
    for split, payload in payloads.items():
        text = payload.decode("utf-8")
        assert text.endswith("\n") and "\r" not in text
        for line in text.split("\n")[:-1]:
            assert line == line.strip() and 4 <= len(line.split()) <= 80, (split, line)


def test_splits_are_disjoint_and_deduplicated(payloads: dict[str, bytes]) -> None:
    keys = {split: [_key(line) for line in payload.decode("utf-8").splitlines()] for split, payload in payloads.items()}
    for split, ks in keys.items():
        assert len(set(ks)) == len(ks), f"duplicate sentences inside {split}.txt"
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            shared = set(keys[a]) & set(keys[b])
            assert not shared, f"{a} and {b} share {len(shared)} sentences, e.g. {sorted(shared)[:3]}"


def test_readme_states_sources_and_man_page_exclusion() -> None:
    text = (DATA / "README.md").read_text("utf-8")
    assert "Manual pages are excluded" in text
    for source in ("austen", "shakespeare", "sotu", "factbook", "python-docs", "foldoc", "fortunes"):
        assert re.search(rf"^\| {re.escape(source)} \|.*\| \d+ \| \d+ \| \d+ \|$", text, re.MULTILINE), source
