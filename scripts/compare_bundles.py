"""Compare two bundles of the same build: which files are byte-identical, and for those that are not, whether the
artifacts compute the same numbers on check.npz in their runtime here.

Used to show that a refactor leaves every bundle the same (docs/architecture.md):

    python scripts/compare_bundles.py artifacts-before/minilm-student/host-cpu artifacts/minilm-student/host-cpu

Prints one line per file and a verdict; ``--json`` prints the comparison as one document. Exit 0 when every file is
identical or every differing graph matches numerically (max-abs <= --atol) and the manifests agree on everything
but times, paths and cache keys; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgepipe.bundle import open_bundle  # noqa: E402
from edgepipe.config import Target  # noqa: E402
from edgepipe.manifest import read_manifest  # noqa: E402
from edgepipe.runtimes import get_runtime  # noqa: E402

# Manifest keys that differ between two runs of the same build by design.
VOLATILE = {"created", "seconds", "cache_key", "cache_hit", "p50_ms", "p90_ms", "path", "edgepipe_version", "files"}


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in node.items() if k not in VOLATILE}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def _diff(a, b, where="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k in b else 'before'}")
            else:
                out += _diff(a[k], b[k], f"{where}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {json.dumps(a, default=str)[:80]} -> {json.dumps(b, default=str)[:80]}"]


def outputs(bundle: Path) -> dict[str, np.ndarray]:
    """The bundle's outputs on its own check.npz inputs, in its runtime here (encoders)."""
    manifest = read_manifest(bundle)
    with np.load(bundle / "check.npz") as c:
        feeds = {k[len("input.") :]: c[k] for k in c.files if k.startswith("input.")}
    target = Target.from_dict(manifest["target"])
    return get_runtime(manifest["runtime"]).load(bundle / manifest["graphs"]["model"], target).run(feeds)


def compare(before: Path, after: Path, atol: float) -> dict:
    mb, ma = read_manifest(before), read_manifest(after)
    files = {}
    for name in sorted(set(mb["files"]) | set(ma["files"])):
        fb, fa = mb["files"].get(name), ma["files"].get(name)
        files[name] = (
            "identical" if fb and fa and fb["sha256"] == fa["sha256"] else "differs" if fb and fa else "one side"
        )
    result = {"files": files, "manifest": _diff(_strip(mb), _strip(ma))}
    graphs = [g for g in (mb.get("graphs") or {}).values() if isinstance(g, str)]
    if any(files.get(g) != "identical" for g in graphs) and mb.get("kind") != "decoder":
        got, want = outputs(after), outputs(before)
        result["numerics"] = {k: float(np.abs(got[k] - want[k]).max()) for k in want}
    identical = all(v == "identical" for v in files.values())
    numerically = "numerics" in result and all(v <= atol for v in result["numerics"].values())
    ok = identical or numerically
    result["same"] = bool(ok and not [d for d in result["manifest"] if not d.startswith(".versions")])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--atol", type=float, default=1e-6)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    open_bundle(args.before), open_bundle(args.after)  # both verified against their own sha256
    result = compare(args.before, args.after, args.atol)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, state in result["files"].items():
            print(f"{state:10s} {name}")
        for line in result["manifest"]:
            print(f"manifest   {line}")
        for name, err in result.get("numerics", {}).items():
            print(f"numerics   {name}: max-abs {err:.2e}")
        print("same" if result["same"] else "DIFFERENT")
    return 0 if result["same"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
