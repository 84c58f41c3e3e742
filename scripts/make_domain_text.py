"""Text from domains none of calibration_data/'s sources covers, to try `edgepipe check BUNDLE --text FILE` on.

Writes three files of up to 512 sentences each, cut and filtered by the same rules as calibration_data/ and with
every sentence of train.txt removed:

- ``licences.txt``: six licences in /usr/share/common-licenses (legal English);
- ``docstrings.txt``: first paragraphs of the docstrings of six Python packages installed beside edgepipe;
- ``readmes.txt``: the README files in /usr/share/doc (no manual pages: those are kept for independent evaluation).

    python scripts/make_domain_text.py --out /tmp/domains
    edgepipe check artifacts/minilm-student/host-cpu --text /tmp/domains/readmes.txt

What is installed differs between machines, so the files do too; the seed fixes the sample on one machine.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_calibration_data as cal  # noqa: E402  (the splitter and filters of calibration_data/)

LICENCES = ("GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-3", "GFDL-1.3", "Artistic")
PACKAGES = ("numpy", "rich", "click", "tokenizers", "safetensors", "onnx")
FILES_PER_PACKAGE = 400


def licences() -> list[str]:
    root = Path("/usr/share/common-licenses")
    return [(root / name).read_text(encoding="utf-8") for name in LICENCES if (root / name).is_file()]


def docstrings() -> list[str]:
    import importlib.util

    texts = []
    for package in PACKAGES:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in sorted(root.rglob("*.py"))[:FILES_PER_PACKAGE]:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                    doc = ast.get_docstring(node)
                    if doc:
                        texts.append(doc.split("\n\n")[0].replace("\n", " "))
    return texts


def readmes() -> list[str]:
    texts = []
    for path in sorted(Path("/usr/share/doc").glob("*/README*")):
        try:
            raw = path.read_bytes()
            texts.append((gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8"))
        except (OSError, UnicodeDecodeError, gzip.BadGzipFile):
            continue
    return texts


def sentences(texts: list[str], exclude: set[str]) -> list[str]:
    out, seen = [], set(exclude)
    for text in texts:
        for paragraph in cal.blank_line_paragraphs(text):
            for sentence in cal.split_sentences(cal.normalise(paragraph)):
                key = cal.dedup_key(sentence)
                if cal.keep(sentence) and key not in seen:
                    seen.add(key)
                    out.append(sentence)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    train = Path(__file__).resolve().parent.parent / "edgepipe" / "calibration_data" / "train.txt"
    exclude = {cal.dedup_key(line) for line in train.read_text(encoding="utf-8").splitlines()}
    args.out.mkdir(parents=True, exist_ok=True)
    for name, texts in (("licences", licences()), ("docstrings", docstrings()), ("readmes", readmes())):
        found = sentences(texts, exclude)
        random.Random(args.seed).shuffle(found)
        (args.out / f"{name}.txt").write_text("".join(s + "\n" for s in found[: args.samples]), encoding="utf-8")
        print(f"{name}.txt: {min(len(found), args.samples)} of {len(found)} sentences")
    return 0


if __name__ == "__main__":
    sys.exit(main())
