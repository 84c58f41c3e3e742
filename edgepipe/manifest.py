"""The bundle manifest: what was built, from what, how, and the sha256 of every file.

Verifying a bundle against it lives in ``edgepipe.bundle`` (with the on-device runner's rules).

``manifest.json`` sits in each bundle directory. Every other file in the bundle is listed under ``files`` with its
sha256 and size, so a device (or ``edgepipe inspect``) can verify a copy without edgepipe's help.
"""

from __future__ import annotations

import json
import platform
from importlib import metadata
from pathlib import Path

from edgepipe.errors import BundleError
from edgepipe.harness.runner import sha256_file

SCHEMA = "edgepipe.manifest/1"
MANIFEST = "manifest.json"
TRACKED_PACKAGES = (
    "edgepipe",
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "executorch",
    "torchao",
    "tensorrt",
    "tokenizers",
    "openvino",
    "nncf",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a build (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def file_records(bundle: Path) -> dict[str, dict]:
    """sha256 and bytes of every file under ``bundle`` except the manifest itself, by relative POSIX path."""
    records = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file()):
        rel = path.relative_to(bundle).as_posix()
        if rel != MANIFEST:
            records[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return records


def write_manifest(bundle: Path, manifest: dict) -> Path:
    """Add the file records and schema to ``manifest`` and write it into ``bundle``."""
    manifest = {"schema": SCHEMA, **manifest, "files": file_records(bundle)}
    path = bundle / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return path


def read_manifest(bundle: Path) -> dict:
    """Read and sanity-check a bundle's manifest.

    Raises:
        BundleError: No manifest, not JSON, or an unknown schema.
    """
    path = Path(bundle) / MANIFEST
    if not Path(bundle).is_dir():
        raise BundleError(
            f"Bundle '{bundle}' is not a directory.", hint="Pass a directory written by `edgepipe build`."
        )
    if not path.is_file():
        raise BundleError(f"'{bundle}' has no manifest.json.", hint="Pass a directory written by `edgepipe build`.")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{path} is not valid JSON ({exc}).", hint="Rebuild the bundle with `edgepipe build`."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} has schema {got!r}; this edgepipe reads {SCHEMA}.", hint="Rebuild the bundle.")
    return manifest
