# ruff: noqa: UP006, UP035  (runs on the device's Python, 3.8+, beside runner.py)
"""TensorRT engines built on the device from a bundle's build plan, cached outside the bundle.

Shipped beside runner.py (standard library only; the build itself imports TensorRT through the bundle's own
build_engine.py). An engine is tied to the GPU, the TensorRT version and the graph it was built from, so the cache
key is the sha256 of exactly those: every graph file the plan builds from (their sha256 in manifest.json, which the
runner has verified), build_plan.json, the TensorRT version and the device's identity. The cache lives beside the
bundle directory, in ``<bundle>.engines`` (or ``$EDGEPIPE_ENGINE_CACHE``), not in it: a redeploy replaces the
bundle directory whole and keeps the cache, and a rebuilt bundle with other graphs gets a new key.

    <bundle>.engines/<key>/model.plan     (decoders: prefill.plan, decode.plan)
    <bundle>.engines/<key>/engine.json    what was built, from what, when, in how long
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

ENGINE_SCHEMA = "edgepipe.engine/1"


def cache_root(bundle: str) -> str:
    return os.environ.get("EDGEPIPE_ENGINE_CACHE") or os.path.abspath(bundle).rstrip("/") + ".engines"


def load_plan(bundle: str) -> dict | None:
    """build_plan.json of a TensorRT bundle, or None when there is none."""
    path = os.path.join(bundle, "build_plan.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def plan_engines(plan: dict) -> list:
    """[(onnx file, engine file)] the plan builds: one for encoders, one per graph for decoders."""
    if "engines" in plan:
        return [(e["onnx"], e["engine"]) for e in plan["engines"]]
    return [(plan["onnx"], plan["engine"])]


def engine_key(manifest: dict, plan_sha256: str, tensorrt_version: str | None, device_id: str) -> str:
    """The cache key: sha256 over the graphs' and the plan's sha256, the TensorRT version and the device.

    The graphs are every file the manifest lists that is not an engine, the check or a text file, so an ONNX
    graph's external weights (decoders' weights.bin) count too.
    """
    files = manifest.get("files") or {}
    graphs = {
        rel: meta.get("sha256")
        for rel, meta in sorted(files.items())
        if rel.endswith((".onnx", ".bin", ".data")) and isinstance(meta, dict)
    }
    text = json.dumps(
        {"graphs": graphs, "plan": plan_sha256, "tensorrt": tensorrt_version, "device": device_id}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def status(bundle: str, manifest: dict, plan_sha256: str, tensorrt_version: str | None, device_id: str) -> dict:
    """Where this bundle's engines are (or would be) on this device, without building anything.

    Returns:
        {schema, key, dir, engines: {engine file: path}, cached, tensorrt, device, record (engine.json or None)}.
    """
    plan = load_plan(bundle) or {}
    key = engine_key(manifest, plan_sha256, tensorrt_version, device_id)
    where = os.path.join(cache_root(bundle), key)
    engines = (
        {engine: os.path.join(where, os.path.basename(engine)) for _, engine in plan_engines(plan)} if plan else {}
    )
    record = None
    if os.path.isfile(os.path.join(where, "engine.json")):
        with open(os.path.join(where, "engine.json"), encoding="utf-8") as f:
            record = json.load(f)
    return {
        "schema": ENGINE_SCHEMA,
        "key": key,
        "dir": where,
        "engines": engines,
        "cached": bool(engines) and all(os.path.isfile(p) for p in engines.values()) and record is not None,
        "tensorrt": tensorrt_version,
        "device": device_id,
        "record": record,
    }


def build(bundle: str, state: dict) -> dict:
    """Build the plan's engines into the cache with the bundle's own build_engine.py; returns engine.json's record.

    Builds into a temporary directory beside the cache entry and renames it into place, so an interrupted build
    leaves no half-written engine behind. Raises whatever build_engine.build raises (its BuildFailure).
    """
    spec = importlib.util.spec_from_file_location(
        "edgepipe_bundle_build_engine", os.path.join(bundle, "build_engine.py")
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    plan = builder.load_plan(Path(bundle))
    os.makedirs(cache_root(bundle), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=state["key"] + ".partial-", dir=cache_root(bundle))
    try:
        built = []
        for onnx, engine in plan_engines(plan):
            target = os.path.join(staging, os.path.basename(engine))  # absolute: build_engine joins it to the bundle
            built.append(builder.build(Path(bundle), dict(plan, onnx=onnx, engine=target)))
        record = {
            "schema": ENGINE_SCHEMA,
            "key": state["key"],
            "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),  # noqa: UP017
            "tensorrt": state["tensorrt"],
            "device": state["device"],
            "bundle": os.path.abspath(bundle),
            "builds": built,
        }
        with open(os.path.join(staging, "engine.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
        shutil.rmtree(state["dir"], ignore_errors=True)
        os.replace(staging, state["dir"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record
