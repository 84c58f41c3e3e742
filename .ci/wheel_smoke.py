"""CI: the installed wheel used as a user would, outside the checkout: the bundle `edgepipe build --json` wrote,
opened with `edgepipe.load`, encodes held-back sentences in its runtime as the teacher does in PyTorch.

Usage: python wheel_smoke.py BUILD_JSON   (run by .ci/run from a temporary directory, with the wheel's venv)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import edgepipe
from edgepipe.data import batches, load_tokenizer, read_sentences
from edgepipe.models.hf import load_encoder
from edgepipe.stages.validate import cosines, embed_torch


def main(build_json: str) -> None:
    doc = json.loads(Path(build_json).read_text())
    assert doc["schema"] == 1 and doc["command"] == "build" and doc["ok"], doc
    assert "site-packages" in edgepipe.__file__, f"edgepipe comes from {edgepipe.__file__}, not the installed wheel"
    assert doc["fidelity"]["meets_bar"], doc["fidelity"]

    bundle = edgepipe.load(doc["bundle"])
    texts = read_sentences("validation.txt", 64)  # the package's own calibration_data/
    out = bundle.encode(texts)
    teacher = Path(bundle.manifest["source_model"]["path"])
    max_len = bundle.manifest["recipe"]["validate"]["max_len"]
    ref = embed_torch(load_encoder(teacher), batches(load_tokenizer(teacher / "tokenizer.json", max_len), texts, 32))
    cos = cosines(out, ref)
    assert out.shape == ref.shape == (64, 384), out.shape
    assert cos.min() > 0.9999, f"min cosine vs the PyTorch teacher {cos.min():.6f}"
    print(
        f"wheel smoke: edgepipe {edgepipe.__version__} from {Path(edgepipe.__file__).parent}; {doc['model']} -> "
        f"{doc['target']} ({doc['runtime']}, {doc['precision']}): encode {out.shape}, min cosine vs the PyTorch "
        f"teacher {cos.min():.6f}"
    )


if __name__ == "__main__":
    main(sys.argv[1])
