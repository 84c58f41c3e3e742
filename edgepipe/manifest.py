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

from edgepipe.errors import BuildError, BundleError
from edgepipe.harness.runner import bundle_path_problem, name_problem, sha256_file

SCHEMA = "edgepipe.manifest/1"
MANIFEST = "manifest.json"
# What every command reads from a manifest before anything else (the rest is read with defaults).
REQUIRED = {"model": str, "kind": str, "runtime": str, "precision": str, "target": dict, "graphs": dict, "files": dict}
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
    """sha256 and bytes of every file under ``bundle`` except the manifest itself, by relative POSIX path.

    Raises:
        BuildError: A file whose name no bundle may have (``harness.runner.bundle_path_problem``): edgepipe never
            writes a bundle that a device would refuse.
    """
    records = {}
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() or p.is_symlink()):
        rel = path.relative_to(bundle).as_posix()
        if rel == MANIFEST:
            continue
        problem = bundle_path_problem(rel) or ("a symlink" if path.is_symlink() else None)
        if problem:
            raise BuildError(
                f"The bundle would hold {rel!r}, {problem}; bundles hold data files only.",
                hint="Report this: a recipe copied a file into the bundle that no device would accept.",
            )
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
        BundleError: No manifest, unreadable, not JSON, an unknown schema, a field every command needs missing, or
            a model or target name that is not one safe path segment.
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
    except OSError as exc:
        raise BundleError(f"Cannot read {path} ({exc.strerror or exc}).", hint="Check its permissions.") from None
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        got = manifest.get("schema") if isinstance(manifest, dict) else type(manifest).__name__
        raise BundleError(f"{path} has schema {got!r}; this edgepipe reads {SCHEMA}.", hint="Rebuild the bundle.")
    problems = [
        f"'{key}' ({kind.__name__})" for key, kind in REQUIRED.items() if not isinstance(manifest.get(key), kind)
    ]
    target = manifest.get("target")
    if isinstance(target, dict) and not isinstance(target.get("name"), str):
        problems.append("'target.name' (str)")
    if problems:
        raise BundleError(
            f"{path} is incomplete: it lacks {', '.join(problems)}.", hint="Rebuild the bundle with `edgepipe build`."
        )
    for what, name in (("model", manifest["model"]), ("target name", target["name"])):
        problem = name_problem(name)
        if problem:
            raise BundleError(
                f"{path}: the {what} {name!r} is {problem}.",
                hint="A bundle from elsewhere may be hostile: rebuild it with `edgepipe build`.",
            )
    return manifest
