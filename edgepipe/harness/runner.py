#!/usr/bin/env python3
# ruff: noqa: UP017  (datetime.UTC is Python 3.11+; this file runs on the device's Python, 3.8+)
"""edgepipe on-device runner: verify a bundle, check its outputs, time it, write one JSON.

This file is copied alone to the device and runs there with the standard library, numpy and the bundle's
runtime (onnxruntime, executorch or tensorrt). It never imports edgepipe or torch (ExecuTorch's Python
binding imports torch itself). Keep it compatible with Python 3.8 (JetPack 5).

    python3 runner.py BUNDLE_DIR --runs 50 --warmup 10 [--batch 1 --seq 128] [--threads 4] --json out.json
    python3 runner.py BUNDLE_DIR --verify          # sha256 + bytes of every file, runtime importable; JSON on stdout

A bundle is untrusted input: the runner is started from a directory that holds no bundle file (``python3 -P`` where
the interpreter has it), and it refuses a bundle whose files are not exactly the ones its manifest lists with their
sha256 and size, or whose names could be code (``bundle_path_problem``; docs/architecture.md, "The bundle").

The output schema (edgepipe.bench/1) is documented in edgepipe/harness/SCHEMA.md. Exit status: 0 ok,
1 runtime failure, 2 usage, 3 JSON written but the output check failed, 4 bundle files missing or corrupt,
5 numpy or the runtime missing.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import threading
import time

SCHEMA = "edgepipe.bench/1"
VERIFY_SCHEMA = "edgepipe.verify/1"
RUNNER_VERSION = "1.0"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CHECK_FAILED, EXIT_BAD_FILES, EXIT_MISSING_RUNTIME = 0, 1, 2, 3, 4, 5

# Modules each runtime needs on the device, and the pip name that provides each module.
RUNTIME_MODULES = {
    "onnxruntime": ["numpy", "onnxruntime"],
    "executorch": ["numpy", "torch", "executorch"],  # ExecuTorch's pip binding loads libtorch and takes torch tensors
    "tensorrt": ["numpy", "tensorrt"],
    "openvino": ["numpy", "openvino"],
}
PIP_NAMES = {"cuda": "cuda-python"}  # where the pip name differs from the module name
PACKAGES = ["numpy", "onnxruntime", "executorch", "torch", "tensorrt", "cuda-python", "pycuda"]
PROFILE_ITERATIONS = 50  # trtexec --iterations for TensorRT's --profile
# Modules that travel with runner.py and sit beside it on the device (runner.sibling imports them).
SHIPPED = ["profiles.py", "engines.py"]

# What a bundle may hold (docs/architecture.md, "The bundle"). Names are plain relative paths of safe segments; nothing
# that Python could import or load as code, except edgepipe's own build_engine.py (checked by sha256: the file in
# edgepipe/runtimes; tests/harness/test_runner.py keeps this constant true).
MANIFEST = "manifest.json"
DEPLOY_MARKER = ".edgepipe-deployment"  # written by `edgepipe deploy`: the only directories deploy replaces
RUNNER_DIR = ".edgepipe-runner"  # beside the deployments: the runner runs from there, never from a bundle
BUILD_ENGINE = "build_engine.py"
BUILD_ENGINE_SHA256 = "0971f7cad17433ae16b29cf9402fd52838d9fb2f81e1ee6513e2eae41b0cd2ed"
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyw", ".pyd", ".pyz", ".pth", ".so", ".dylib", ".dll", ".egg", ".whl")
SAFE_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
SESSION_CONFIG_KEYS = ("session.disable_quant_qdq",)  # the ORT session entries a manifest may set


class RunnerError(Exception):
    """One-line failure; `code` is the process exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------------------------- bundle files


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _beside(name: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), name)


def _sha256_or_none(path: str) -> str | None:
    return sha256_file(path) if os.path.isfile(path) else None


def name_problem(name) -> str | None:
    """Why ``name`` is not one safe path segment (a model or target name, a bundle file's part), or None."""
    if not isinstance(name, str) or not SAFE_SEGMENT.match(name):
        return "not one segment of A-Z a-z 0-9 . _ - (at most 128, not starting with a dot or dash)"
    return None


def bundle_path_problem(rel) -> str | None:
    """Why ``rel`` may not name a file in a bundle, or None: a relative POSIX path of safe segments, no ``..``,
    nothing Python could import or load (.py, .so, .pth, __init__, ...) but edgepipe's build_engine.py."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        return "not a relative POSIX path"
    if rel.startswith("/") or os.path.isabs(rel):
        return "absolute path"
    parts = rel.split("/")
    if ".." in parts:
        return "path leaves the bundle"
    if rel == MANIFEST:
        return "the manifest does not list itself"
    for part in parts:
        problem = name_problem(part)
        if problem:
            return "{!r} is {}".format(part, problem)
        low = part.lower()
        if low.startswith("__init__") or low in ("__pycache__", "__main__"):
            return "a Python package file"
        if rel != BUILD_ENGINE and (low.endswith(CODE_SUFFIXES) or ".so." in low):
            return "a code file (.py, .so, .pth, ...)"
    return None


def _symlink_in(bundle: str, rel: str) -> bool:
    path = bundle
    for part in rel.split("/"):
        path = os.path.join(path, part)
        if os.path.islink(path):
            return True
    return False


def graph_files(manifest: dict) -> list:
    """Every file name under manifest["graphs"] (nested tables too: a TensorRT decoder's "proxy")."""
    out, todo = [], [manifest.get("graphs") or {}]
    while todo:
        node = todo.pop()
        for value in node.values() if isinstance(node, dict) else [node]:
            if isinstance(value, dict):
                todo.append(value)
            else:
                out.append(value)
    return out


def _device_built(manifest: dict, rel) -> bool:
    """A TensorRT engine's name: built on the device from the listed ONNX by build_engine.py; no manifest lists it."""
    return (
        manifest.get("runtime") == "tensorrt"
        and isinstance(rel, str)
        and "/" not in rel
        and rel.endswith(".plan")
        and bundle_path_problem(rel) is None
    )


def load_manifest(bundle: str) -> dict:
    path = os.path.join(bundle, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise RunnerError(f"{bundle} has no manifest.json; is it an edgepipe bundle?", EXIT_BAD_FILES) from None
    except ValueError as e:
        raise RunnerError(f"{path} is not valid JSON ({e})", EXIT_BAD_FILES) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise RunnerError(f"{path} has no 'files' table; is it an edgepipe manifest?", EXIT_BAD_FILES)
    return manifest


def verify_files(bundle: str, manifest: dict) -> dict:
    """Check that the bundle holds exactly the files its manifest lists, each with its sha256 and size, under names
    a bundle may have (``bundle_path_problem``), every graph it loads among them, and no symlink.

    Returns:
        {"checked": n, "bytes": total, "problems": [{"path", "problem"}]}; no problems means the bundle is intact.
    """
    problems, total = [], 0
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return {"checked": 0, "bytes": 0, "problems": [{"path": MANIFEST, "problem": "lists no files"}]}
    for rel, meta in sorted(files.items()):
        why = bundle_path_problem(rel)
        if why is None and not (isinstance(meta, dict) and SHA256.match(str(meta.get("sha256", "")))):
            why = "no sha256 in the manifest"
        if why is None and _symlink_in(bundle, rel):
            why = "a symlink"
        if why is not None:
            problems.append({"path": str(rel), "problem": why})
            continue
        path = os.path.join(bundle, rel)
        if not os.path.isfile(path):
            problems.append({"path": rel, "problem": "missing"})
            continue
        size = os.path.getsize(path)
        total += size
        sha = None if meta.get("bytes") is not None and size != meta["bytes"] else sha256_file(path)
        if sha is None:
            problems.append({"path": rel, "problem": "size {} != {} in manifest".format(size, meta["bytes"])})
        elif sha != meta["sha256"]:
            problems.append({"path": rel, "problem": "sha256 mismatch"})
        elif rel == BUILD_ENGINE and sha != BUILD_ENGINE_SHA256:
            problems.append({"path": rel, "problem": "not edgepipe's build_engine.py (sha256 differs)"})
    for rel in graph_files(manifest):
        if rel not in files and not _device_built(manifest, rel):
            problems.append({"path": str(rel), "problem": "a graph the manifest's files do not list"})
    problems += _unlisted(bundle, manifest)
    return {"checked": len(files), "bytes": total, "problems": problems}


def _unlisted(bundle: str, manifest: dict) -> list:
    """Files and symlinks in ``bundle`` that its manifest does not list (the manifest, the deployment marker and, in
    a deployment, the TensorRT engines built there aside): nothing unverified sits where a runtime could load it.
    Deploy copies listed files only, so an engine in a deployment was built on the device; one in a bundle
    directory came with it and is refused like any other unlisted file."""
    problems, files = [], manifest["files"]
    deployed = os.path.isfile(os.path.join(bundle, DEPLOY_MARKER)) and not _symlink_in(bundle, DEPLOY_MARKER)
    for root, dirs, names in os.walk(bundle):
        for name in sorted(dirs + names):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, bundle).replace(os.sep, "/")
            if os.path.islink(path):
                if rel not in files:  # a listed one is reported above
                    problems.append({"path": rel, "problem": "a symlink"})
            elif name in names and rel not in files and rel not in (MANIFEST, DEPLOY_MARKER):
                if not (deployed and _device_built(manifest, rel)):
                    problems.append({"path": rel, "problem": "not listed in the manifest"})
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]
    return problems


def runtime_status(runtime: str) -> dict:
    """Try the imports `runtime` needs here; report versions and exactly which modules are missing."""
    if runtime not in RUNTIME_MODULES:
        return {
            "name": runtime,
            "importable": False,
            "version": None,
            "missing": [],
            "error": "unknown runtime {!r}; known: {}".format(runtime, ", ".join(sorted(RUNTIME_MODULES))),
        }
    missing, error = [], None
    for module in RUNTIME_MODULES[runtime]:
        try:
            executorch_runtime() if module == "executorch" else __import__(module)
        except ImportError as e:
            missing.append(PIP_NAMES.get(module, module))
            error = error or f"{module}: {e}"
        except Exception as e:  # a broken install (ABI mismatch, missing .so) is as fatal as a missing one
            missing.append(PIP_NAMES.get(module, module))
            error = error or f"{module}: {type(e).__name__}: {e}"
    if runtime == "tensorrt" and not missing and _cuda_binding_name() is None:
        missing.append("cuda-python")
        error = "tensorrt needs cuda-python (or pycuda) to move tensors to the GPU"
    return {
        "name": runtime,
        "importable": not missing,
        "version": _package_version(runtime),
        "missing": missing,
        "error": error,
    }


def verify(bundle: str) -> dict:
    """The --verify report: file integrity, runtime importability, interpreter (schema edgepipe.verify/1)."""
    manifest = load_manifest(bundle)
    files = verify_files(bundle, manifest)
    runtime = runtime_status(str(manifest.get("runtime")))
    return {
        "schema": VERIFY_SCHEMA,
        "ok": not files["problems"] and runtime["importable"],
        "runner_version": RUNNER_VERSION,
        "runner_sha256": sha256_file(os.path.abspath(__file__)),
        "shipped_sha256": {name: _sha256_or_none(_beside(name)) for name in SHIPPED},
        "manifest_sha256": sha256_file(os.path.join(bundle, "manifest.json")),
        "deployment": os.path.isfile(os.path.join(bundle, DEPLOY_MARKER)) and not _symlink_in(bundle, DEPLOY_MARKER),
        "files": files,
        "runtime": runtime,
        "python": {"executable": sys.executable, "version": platform.python_version()},
        "numpy": _package_version("numpy"),
    }


# ----------------------------------------------------------------------------------------------- runtimes
# A session exposes input_names, output_names, info (dict for the JSON), prepare(feeds) -> a zero-argument
# callable that runs the graph once, and to_numpy(outputs) -> list of arrays in output_names order.
# prepare() does every conversion up front so the timed loop measures the runtime, not the runner.


# A TensorRT bundle's Q/DQ graphs in onnxruntime as its proxy: with ORT's Q/DQ fusion off every DequantizeLinear runs
# as written, i.e. the exact fake-quant arithmetic an int8 engine computes (ORT's fused s8s8 kernels are wrong on
# x86 CPUs without VNNI).
TENSORRT_PROXY_SESSION = {"session.disable_quant_qdq": "1"}


class OrtSession:
    def __init__(self, path: str, manifest: dict, threads: int | None, profile: str | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        if profile:  # --profile: ORT's own profiler writes <profile>_<time>.json
            options.enable_profiling = True
            options.profile_file_prefix = profile
        if threads:
            options.intra_op_num_threads = threads
        for key, value in (manifest.get("session_config") or {}).items():
            if key not in SESSION_CONFIG_KEYS or not isinstance(value, str):
                raise RunnerError(
                    "manifest.json sets onnxruntime session entry {!r}; a bundle may set only {}".format(
                        key, ", ".join(SESSION_CONFIG_KEYS)
                    ),
                    EXIT_BAD_FILES,
                )
            options.add_session_config_entry(key, value)
        target = manifest.get("target") or {}
        wanted = [
            *((target.get("runtime_options") or {}).get("providers") or []),
            *((target.get("onnxruntime") or {}).get("providers") or target.get("providers") or []),
        ]
        available = ort.get_available_providers()
        providers = [p for p in wanted if p in available] or ["CPUExecutionProvider"]
        if wanted and providers == ["CPUExecutionProvider"] and "CPUExecutionProvider" not in wanted:
            raise RunnerError(
                f"onnxruntime {ort.__version__} here has providers {available}; the bundle asks for {wanted}: "
                "install the onnxruntime build that has them (e.g. onnxruntime-gpu)",
                EXIT_MISSING_RUNTIME,
            )
        self.session = ort.InferenceSession(path, sess_options=options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._types = {i.name: i.type for i in self.session.get_inputs()}
        self.info = {
            "providers": self.session.get_providers(),
            "providers_requested": wanted or None,
            "threads": threads,
            "needs_torch": False,
        }

    def prepare(self, feeds: dict):
        import numpy as np

        dtypes = {
            "tensor(int64)": np.int64,
            "tensor(int32)": np.int32,
            "tensor(float)": np.float32,
            "tensor(float16)": np.float16,
            "tensor(bool)": np.bool_,
            "tensor(double)": np.float64,
        }
        ready = {
            n: np.ascontiguousarray(feeds[n], dtype=dtypes.get(self._types[n], feeds[n].dtype))
            for n in self.input_names
        }
        run, names = self.session.run, self.output_names
        return lambda: run(names, ready)

    def to_numpy(self, outputs: list) -> list:
        return list(outputs)

    def profile_summary(self, skip_runs: int) -> dict:
        return sibling("profiles").onnxruntime_summary(self.session.end_profiling(), skip_runs)


class ExecuTorchSession:
    def __init__(self, path: str, manifest: dict, threads: int | None, profile: str | None = None) -> None:
        import torch  # noqa: F401  (the pip binding needs libtorch loaded and torch tensors as inputs)

        runtime = executorch_runtime().get()
        if threads:
            import executorch.extension.pybindings.portable_lib as binding

            binding._unsafe_reset_threadpool(threads)
        self.profile = profile  # --profile: an ETDump of every execution (the pip binding has the event tracer)
        self.program = runtime.load_program(path, enable_etdump=bool(profile))
        self.method = self.program.load_method("forward")
        meta = self.method.metadata
        self.input_shapes = [list(meta.input_tensor_meta(i).sizes()) for i in range(meta.num_inputs())]
        io = manifest.get("io") or {}
        self.input_names = [i["name"] for i in io.get("inputs", [])]
        self.output_names = [o["name"] for o in io.get("outputs", [])]
        self.info = {
            "providers": None,
            "providers_requested": None,
            "threads": threads,
            "needs_torch": True,
            "backends": list(runtime.backend_registry.registered_backend_names),
        }

    def prepare(self, feeds: dict):
        import torch

        tensors = [torch.from_numpy(feeds[n].copy()) for n in self.input_names]
        execute = self.method.execute
        return lambda: execute(tensors)

    def to_numpy(self, outputs: list) -> list:
        return [o.detach().cpu().numpy() if hasattr(o, "numpy") else o for o in outputs]

    def profile_summary(self, skip_runs: int) -> dict:
        etdump = self.profile + ".etdp"
        self.program.write_etdump_result_to_file(etdump, self.profile + ".debug.bin")
        try:
            return sibling("profiles").executorch_summary(etdump, skip_runs)
        except ImportError as e:
            raise RunnerError(
                f"--profile on ExecuTorch reads the ETDump with executorch.devtools.Inspector, which cannot be "
                f"imported here ({e}); pip install executorch pandas, or run without --profile",
                EXIT_MISSING_RUNTIME,
            ) from None


def executorch_runtime():
    """executorch.runtime.Runtime without importing executorch.exir, the whole exporter (~15 s here); the host's
    ExecuTorch sessions (runtimes.executorch) use it too, so host and device load programs the same way.

    TODO(executorch>1.5.1): the pip binding (extension/pybindings/portable_lib.py) imports executorch.exir._warnings
    for one warning class, and that runs executorch/exir/__init__.py. Load _warnings.py alone under a stand-in
    package, then drop the stand-in so a later real `import executorch.exir` still works.
    """
    import importlib.util
    import types

    stub = None
    if "executorch.exir" not in sys.modules:
        spec = importlib.util.find_spec("executorch")
        exir_dir = os.path.join(list(spec.submodule_search_locations)[0], "exir") if spec else ""
        warnings_py = os.path.join(exir_dir, "_warnings.py")
        if os.path.isfile(warnings_py):
            stub = types.ModuleType("executorch.exir")
            stub.__path__ = [exir_dir]
            sys.modules["executorch.exir"] = stub
            try:
                spec = importlib.util.spec_from_file_location("executorch.exir._warnings", warnings_py)
                module = importlib.util.module_from_spec(spec)
                sys.modules["executorch.exir._warnings"] = module
                spec.loader.exec_module(module)
            except Exception:  # fall back to the slow, ordinary import
                sys.modules.pop("executorch.exir._warnings", None)
                sys.modules.pop("executorch.exir", None)
                stub = None
    try:
        from executorch.runtime import Runtime
    finally:
        if stub is not None and sys.modules.get("executorch.exir") is stub:
            del sys.modules["executorch.exir"]
    return Runtime


class TensorRTSession:
    """Deserialize model.plan and run it with explicit host<->device copies (TensorRT 10 tensor API).

    Untested in edgepipe's CI (no TensorRT there). Timed runs include H2D copies, execution, D2H copies and a
    stream sync, so they compare with onnxruntime's end-to-end session.run.
    """

    def __init__(self, path: str, manifest: dict, threads: int | None, profile: str | None = None) -> None:
        import tensorrt as trt

        self.trt, self.cuda, self.path, self.profile = trt, _CudaBinding(), path, profile
        with open(path, "rb") as f:
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise RunnerError(
                f"TensorRT {trt.__version__} could not deserialize {path}: engines are tied to the GPU, "
                "TensorRT version and OS they were built with; rebuild it on this device"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = [self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names]
        self.input_names = [n for n, i in zip(names, is_input) if i]
        self.output_names = [n for n, i in zip(names, is_input) if not i]
        self.info = {
            "providers": None,
            "providers_requested": None,
            "threads": threads,
            "needs_torch": False,
            "cuda_binding": self.cuda.name,
        }

    def prepare(self, feeds: dict):
        import numpy as np

        cuda, ctx, engine, stream = self.cuda, self.context, self.engine, self.cuda.stream()
        handle = getattr(stream, "handle", stream)  # pycuda wraps the handle; cuda-python's cudaStream_t is it
        inputs, outputs = [], []
        for name in self.input_names:
            host = np.ascontiguousarray(feeds[name], dtype=self.trt.nptype(engine.get_tensor_dtype(name)))
            ctx.set_input_shape(name, host.shape)
            inputs.append((host, cuda.malloc(host.nbytes)))
            ctx.set_tensor_address(name, inputs[-1][1])
        for name in self.output_names:
            host = np.empty(tuple(ctx.get_tensor_shape(name)), dtype=self.trt.nptype(engine.get_tensor_dtype(name)))
            outputs.append((host, cuda.malloc(max(host.nbytes, 1))))
            ctx.set_tensor_address(name, outputs[-1][1])

        def run() -> list:
            for host, dev in inputs:
                cuda.htod(dev, host, stream)
            if not ctx.execute_async_v3(handle):
                raise RunnerError("TensorRT execute_async_v3 failed")
            for host, dev in outputs:
                cuda.dtoh(host, dev, stream)
            cuda.sync(stream)
            return [host for host, _ in outputs]

        return run

    def to_numpy(self, outputs: list) -> list:
        return [o.copy() for o in outputs]

    def memory_stats(self) -> dict:
        size = getattr(self.engine, "device_memory_size_v2", None) or getattr(self.engine, "device_memory_size", None)
        return {"runtime_activations_mb": size / 2**20 if size else None, "runtime_memory_source": "tensorrt engine"}

    def profile_summary(self, skip_runs: int) -> dict:
        """TensorRT's per-layer times come from trtexec on the same engine (its --dumpProfile), not from this
        session's runs. Untested in edgepipe's CI (no TensorRT there)."""
        trtexec = shutil.which("trtexec") or next(
            (p for p in ("/usr/src/tensorrt/bin/trtexec", "/usr/local/tensorrt/bin/trtexec") if os.path.isfile(p)),
            None,
        )
        if trtexec is None:
            raise RunnerError("--profile on TensorRT runs trtexec, which is not on this device", EXIT_MISSING_RUNTIME)
        argv = [trtexec, "--loadEngine=" + self.path, "--dumpProfile", "--separateProfileRun", "--duration=0"]
        argv += ["--warmUp=0", "--iterations=" + str(PROFILE_ITERATIONS), "--exportProfile=" + self.profile + ".json"]
        argv += ["--exportLayerInfo=" + self.profile + ".layers.json"]
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if done.returncode != 0:
            tail = (done.stdout.strip().splitlines() or ["no output"])[-1]
            raise RunnerError(f"trtexec --dumpProfile failed (exit {done.returncode}): {tail}")
        layers = self.profile + ".layers.json"
        return sibling("profiles").trtexec_summary(self.profile + ".json", layers if os.path.isfile(layers) else None)


class _CudaBinding:
    """The four CUDA calls TensorRTSession needs, from cuda-python or else pycuda."""

    def __init__(self) -> None:
        self.name = _cuda_binding_name()
        if self.name is None:
            raise RunnerError(
                "tensorrt needs cuda-python or pycuda here: pip install cuda-python", EXIT_MISSING_RUNTIME
            )
        if self.name == "cuda-python":
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            self._rt = cudart
        else:
            import pycuda.autoinit  # noqa: F401  (creates the context)
            import pycuda.driver as drv

            self._drv = drv

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RunnerError(f"CUDA call failed: {err}")
        return rest[0] if rest else None

    def stream(self):
        return self._ok(self._rt.cudaStreamCreate()) if self.name == "cuda-python" else self._drv.Stream()

    def malloc(self, nbytes: int) -> int:
        if self.name == "cuda-python":
            return int(self._ok(self._rt.cudaMalloc(nbytes)))
        self._keep = getattr(self, "_keep", []) + [self._drv.mem_alloc(nbytes)]
        return int(self._keep[-1])

    def htod(self, dev: int, host, stream) -> None:
        if self.name == "cuda-python":
            kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self._rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, kind, stream))
        else:
            self._drv.memcpy_htod_async(dev, host, stream)

    def dtoh(self, host, dev: int, stream) -> None:
        if self.name == "cuda-python":
            kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self._rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, kind, stream))
        else:
            self._drv.memcpy_dtoh_async(host, dev, stream)

    def sync(self, stream) -> None:
        self._ok(self._rt.cudaStreamSynchronize(stream)) if self.name == "cuda-python" else stream.synchronize()


class OpenVinoSession:
    """An OpenVINO IR (model.xml + model.bin) compiled for the target's [openvino] device, in the inference
    precision the IR records (rt_info runtime_options/INFERENCE_PRECISION_HINT), threads from --threads or the
    target's num_threads. info says what the plugin really computes in (bf16 asked on a CPU without it reads f32).
    --profile compiles with PERF_COUNT and keeps each run's per-node performance counters."""

    def __init__(self, path: str, manifest: dict, threads: int | None, profile: str | None = None) -> None:
        import openvino as ov

        options = (manifest.get("target") or {}).get("runtime_options") or {}
        core = ov.Core()
        model = core.read_model(path)
        key = ["runtime_options", "INFERENCE_PRECISION_HINT"]
        hint = model.get_rt_info(key).astype(str) if model.has_rt_info(key) else "f32"
        config = {"PERFORMANCE_HINT": options.get("performance_hint") or "LATENCY", "INFERENCE_PRECISION_HINT": hint}
        if threads or options.get("num_threads"):
            config["INFERENCE_NUM_THREADS"] = int(threads or options["num_threads"])
        if profile:
            config["PERF_COUNT"] = True
        self.profiled = [] if profile else None  # one list of counters per run
        device = options.get("device") or "CPU"
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.output_names = [o.get_any_name() for o in self.compiled.outputs]
        self.info = {
            "providers": [device],
            "providers_requested": [device],
            "threads": threads,
            "needs_torch": False,
            "inference_precision_requested": hint,
            "inference_precision": self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string(),
        }

    def prepare(self, feeds: dict):
        import numpy as np

        ready = {n: np.ascontiguousarray(feeds[n]) for n in self.input_names}
        request, outputs, profiled = self.request, list(self.compiled.outputs), self.profiled

        def run() -> list:
            result = request.infer(ready)  # views of the request's output tensors: to_numpy copies them
            if profiled is not None:
                profiled.append(request.profiling_info)
            return [result[o] for o in outputs]

        return run

    def profile_summary(self, skip_runs: int) -> dict:
        return sibling("profiles").openvino_summary(self.profiled[skip_runs:])

    def to_numpy(self, outputs: list) -> list:
        import numpy as np

        return [np.array(o) for o in outputs]


SESSIONS = {
    "onnxruntime": OrtSession,
    "executorch": ExecuTorchSession,
    "tensorrt": TensorRTSession,
    "openvino": OpenVinoSession,
}


def graph_path(bundle: str, manifest: dict, graph: str = "model") -> str:
    """The file a runtime loads for `graph` ("model"; decoders: "prefill" / "decode")."""
    graphs = manifest.get("graphs") or {}
    tensorrt = manifest.get("runtime") == "tensorrt"
    rel = (
        graphs.get("engine") or graphs.get("plan") or "model.plan"
        if tensorrt and graph == "model"
        else graphs.get(graph)
    )
    if rel is None:
        raise RunnerError(f"manifest.json has no graphs.{graph} (graphs: {sorted(graphs)})", EXIT_BAD_FILES)
    problem = bundle_path_problem(rel)
    if problem:
        raise RunnerError("manifest.json names graph {!r}: {}".format(rel, problem), EXIT_BAD_FILES)
    if tensorrt and not os.path.isfile(os.path.join(bundle, rel)):
        cached = cached_engine(bundle, manifest, rel)  # built on this device earlier, kept beside the bundle
        if cached:
            return cached
        how = (
            "trtexec --onnx={} --saveEngine={}".format(graphs.get("model", "model.onnx"), rel)
            if graph == "model"
            else "python3 build_engine.py"
        )
        raise RunnerError(
            f"{bundle} has no TensorRT engine {rel}; engines are built on the device: {how}", EXIT_BAD_FILES
        )
    return os.path.join(bundle, rel)


# ----------------------------------------------------------------------------------------------- check


def load_check(bundle: str) -> tuple:
    """check.npz -> ({input name: array}, {output name: array}) in the file's order."""
    import numpy as np

    path = os.path.join(bundle, "check.npz")
    if not os.path.isfile(path):
        raise RunnerError(f"{bundle} has no check.npz", EXIT_BAD_FILES)
    with np.load(path, allow_pickle=False) as data:
        inputs = {k[len("input.") :]: data[k] for k in data.files if k.startswith("input.")}
        outputs = {k[len("output.") :]: data[k] for k in data.files if k.startswith("output.")}
    if not inputs or not outputs:
        raise RunnerError(f"{path} needs arrays input.<name> and output.<name>; it has {data.files}", EXIT_BAD_FILES)
    return inputs, outputs


def compare_outputs(actual: dict, expected: dict, validation: dict) -> dict:
    """Max-abs error and per-row cosine of each output against check.npz, judged by manifest validation.

    Args:
        actual: {name: array (batch, ...)} from the runtime.
        expected: {name: array (batch, ...)} from check.npz.
        validation: manifest["validation"]; "atol" bounds max-abs, "min_cosine" bounds the smallest row cosine.
    """
    import numpy as np

    per_output, problems, cosines, max_abs = {}, [], [], 0.0
    for name, want in expected.items():
        got = actual.get(name)
        if got is None:
            problems.append(f"output {name!r} missing (runtime outputs: {sorted(actual)})")
            continue
        got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
        if got.shape != want.shape:
            problems.append(f"output {name!r} has shape {list(got.shape)}, check.npz {list(want.shape)}")
            continue
        if not np.all(np.isfinite(got)):
            problems.append(f"output {name!r} has NaN or Inf")
            continue
        rows = got.shape[0] if got.ndim > 1 else 1
        rows_got, rows_want = got.reshape(rows, -1), want.reshape(rows, -1)
        norms = np.linalg.norm(rows_got, axis=1) * np.linalg.norm(rows_want, axis=1)
        cos = np.where(norms > 0, np.sum(rows_got * rows_want, axis=1) / np.maximum(norms, 1e-300), 1.0)
        err = float(np.max(np.abs(got - want))) if got.size else 0.0
        per_output[name] = {"max_abs_error": err, "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}
        cosines.extend(cos.tolist())
        max_abs = max(max_abs, err)
    atol, min_cos = validation.get("atol"), validation.get("min_cosine")
    summary = {
        "max_abs_error": max_abs if per_output else None,
        "min_cosine": min(cosines) if cosines else None,
        "mean_cosine": sum(cosines) / len(cosines) if cosines else None,
    }
    if atol is not None and summary["max_abs_error"] is not None and summary["max_abs_error"] > atol:
        problems.append("max-abs error {:.3g} > atol {:.3g}".format(summary["max_abs_error"], atol))
    if min_cos is not None and summary["min_cosine"] is not None and summary["min_cosine"] < min_cos:
        problems.append("min cosine {:.6f} < {:.6f}".format(summary["min_cosine"], min_cos))
    return dict(
        summary, passed=not problems, problems=problems, atol=atol, min_cosine_required=min_cos, outputs=per_output
    )


def bench_inputs(check_inputs: dict, batch: int | None, seq: int | None) -> dict:
    """Inputs of shape (batch, seq) built from check.npz's real inputs.

    Token ids keep each row's real (unmasked) tokens, tiled or cropped to `seq`; rows repeat to fill `batch`.
    attention_mask becomes ones, token_type_ids zeros, position_ids arange(seq).
    """
    import numpy as np

    if batch is None and seq is None:
        return check_inputs
    first = next(iter(check_inputs.values()))
    b = batch or first.shape[0]
    s = seq or (first.shape[1] if first.ndim > 1 else 1)
    mask = check_inputs.get("attention_mask")
    out = {}
    for name, arr in check_inputs.items():
        if arr.ndim < 2:
            raise RunnerError(
                f"cannot build input {name!r} of shape {list(arr.shape)} at batch x seq; run without --batch/--seq",
                EXIT_USAGE,
            )
        if name == "attention_mask":
            out[name] = np.ones((b, s), dtype=arr.dtype)
        elif name == "token_type_ids":
            out[name] = np.zeros((b, s), dtype=arr.dtype)
        elif name == "position_ids":
            out[name] = np.broadcast_to(np.arange(s, dtype=arr.dtype), (b, s)).copy()
        elif np.issubdtype(arr.dtype, np.integer) and arr.ndim == 2:
            rows = []
            for i in range(arr.shape[0]):
                real = arr[i][mask[i] != 0] if mask is not None and mask.shape == arr.shape else arr[i]
                rows.append(real if real.size else arr[i])
            out[name] = np.stack([np.resize(rows[i % len(rows)], s) for i in range(b)]).astype(arr.dtype)
        else:  # float features (batch, seq, ...): repeat rows and positions
            out[name] = np.ascontiguousarray(arr[np.arange(b) % arr.shape[0]][:, np.arange(s) % arr.shape[1]])
    return out


# ----------------------------------------------------------------------------------------------- sensors


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().strip().replace("\x00", "")
    except OSError:
        return None


def _read_float(path: str) -> float | None:
    text = _read(path)
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _power_sources(root: str = "/") -> list:
    """Readable power sensors under `root` (a sysfs tree): (label, kind, read() -> watts or joules, is_total)."""
    sources, sys_ = [], os.path.join(root, "sys")
    # Jetson INA3221, JetPack 4: iio in_powerN_input in mW, rail_name_N labels.
    for path in sorted(glob.glob(sys_ + "/bus/i2c/drivers/ina3221*/*/iio:device*/in_power*_input")):
        idx = path.rsplit("in_power", 1)[1].split("_")[0]
        label = _read(os.path.join(os.path.dirname(path), "rail_name_" + idx)) or "ina3221." + idx
        sources.append((label, "watts", lambda p=path: _milli(_read_float(p)), "VDD_IN" in label.upper()))
    # Jetson INA3221, JetPack 5/6: hwmon inN_input (mV) x currN_input (mA), inN_label.
    for path in sorted(glob.glob(sys_ + "/bus/i2c/drivers/ina3221*/*/hwmon/hwmon*/in*_input")):
        base, idx = os.path.dirname(path), os.path.basename(path)[2:].split("_")[0]
        curr = os.path.join(base, f"curr{idx}_input")
        label = _read(os.path.join(base, f"in{idx}_label"))
        if label and os.path.exists(curr) and "sum of" not in label.lower():
            sources.append((label, "watts", lambda v=path, c=curr: _product_mw(v, c), "VDD_IN" in label.upper()))
    # Generic hwmon power sensors (microwatts), e.g. SoC PMICs and some boards.
    for path in sorted(glob.glob(sys_ + "/class/hwmon/hwmon*/power*_input")):
        name = _read(os.path.join(os.path.dirname(path), "name")) or "hwmon"
        label = _read(path.replace("_input", "_label")) or os.path.basename(path).split("_")[0]
        sources.append((f"{name}/{label}", "watts", lambda p=path: _micro(_read_float(p)), False))
    # Intel RAPL package domains: cumulative microjoules (often root-only since CVE-2020-8694).
    for base in sorted(glob.glob(sys_ + "/class/powercap/intel-rapl:*")):
        if os.path.basename(base).count(":") == 1:  # packages, not their core/uncore sub-domains
            label = "rapl/" + (_read(os.path.join(base, "name")) or os.path.basename(base))
            energy = os.path.join(base, "energy_uj")
            sources.append((label, "joules", lambda p=energy: _micro(_read_float(p)), True))
    readable = [s for s in sources if s[2]() is not None]
    if len(readable) == 1:
        readable = [(readable[0][0], readable[0][1], readable[0][2], True)]
    return readable


def _milli(x: float | None) -> float | None:
    return None if x is None else x / 1e3


def _micro(x: float | None) -> float | None:
    return None if x is None else x / 1e6


def _product_mw(volt_path: str, curr_path: str) -> float | None:
    v, c = _read_float(volt_path), _read_float(curr_path)
    return None if v is None or c is None else v * c / 1e6


def _thermal_zones(root: str = "/") -> dict:
    zones = {}
    paths = glob.glob(os.path.join(root, "sys/class/thermal/thermal_zone*"))
    for base in sorted(paths, key=lambda p: int(p.rsplit("zone", 1)[1])):
        if _read_float(os.path.join(base, "temp")) is not None:
            name = _read(os.path.join(base, "type")) or os.path.basename(base)
            zones[name if name not in zones else f"{name}.{len(zones)}"] = os.path.join(base, "temp")
    return zones


class Sampler:
    """Samples power rails and temperatures in a background thread while the timed runs go.

    No thread starts when nothing is readable, so machines without sensors time exactly as without a sampler.
    nvidia-smi is polled by its own -lms loop (one child process) for GPU runtimes.
    """

    def __init__(self, interval_s: float, gpu: bool, root: str = "/") -> None:
        self.interval_s = interval_s
        self.power = _power_sources(root)
        self.zones = _thermal_zones(root)
        self.samples = {label: [] for label, _, _, _ in self.power}
        self.temps = {name: [] for name in self.zones}
        self.smi = shutil.which("nvidia-smi") if gpu else None
        self._stop, self._thread, self._proc, self._t = threading.Event(), None, None, [0.0, 0.0]

    def _sample(self) -> None:
        now = time.perf_counter()
        for label, _, read, _ in self.power:
            value = read()
            if value is not None:
                self.samples[label].append((now, value))
        for name, path in self.zones.items():
            value = _read_float(path)
            if value is not None:
                self.temps[name].append(value / 1e3)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def start(self) -> None:
        self._t[0] = time.perf_counter()
        if self.power or self.zones:
            self._sample()
            self._thread = threading.Thread(target=self._loop, name="edgepipe-sampler", daemon=True)
            self._thread.start()
        if self.smi:
            self._proc = subprocess.Popen(
                [
                    self.smi,
                    "--query-gpu=power.draw,temperature.gpu",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    str(max(int(self.interval_s * 1000), 50)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )

    def stop(self, items: int) -> tuple:
        """Stop sampling; returns (power, thermal) dicts for the JSON (see SCHEMA.md)."""
        self._t[1] = time.perf_counter()
        if self._thread:
            self._stop.set()
            self._thread.join()
            self._sample()
        rails = {}
        for label, kind, _, total in self.power:
            points = self.samples[label]
            if kind == "joules" and len(points) >= 2 and points[-1][0] > points[0][0] and points[-1][1] >= points[0][1]:
                mean = (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])
                rails[label] = {"mean_w": mean, "max_w": None, "samples": len(points), "total": total}
            elif kind == "watts" and points:
                values = [v for _, v in points]
                rails[label] = {
                    "mean_w": sum(values) / len(values),
                    "max_w": max(values),
                    "samples": len(values),
                    "total": total,
                }
        if self._proc:
            self._proc.terminate()
            out, _ = self._proc.communicate()
            watts, temps = [], []
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                try:
                    watts.append(float(parts[0]))
                    temps.append(float(parts[1]))
                except (ValueError, IndexError):
                    pass
            if watts:
                rails["nvidia-smi/gpu"] = {
                    "mean_w": sum(watts) / len(watts),
                    "max_w": max(watts),
                    "samples": len(watts),
                    "total": True,
                }
            if temps:
                self.temps["nvidia-smi/gpu"] = temps
        totals = [r for r in rails.values() if r["total"]]
        mean_w = sum(r["mean_w"] for r in totals) if totals else None
        peaks = [r["max_w"] for r in totals if r["max_w"] is not None]
        seconds = self._t[1] - self._t[0]
        power = {
            "source": ", ".join(sorted(rails)) or None,
            "mean_w": mean_w,
            "max_w": sum(peaks) if peaks and len(peaks) == len(totals) else None,
            "energy_per_item_j": mean_w * seconds / items if mean_w is not None and items else None,
            "interval_ms": self.interval_s * 1e3,
            "rails": rails or None,
        }
        zones = {n: {"start_c": t[0], "max_c": max(t), "end_c": t[-1]} for n, t in self.temps.items() if t}
        thermal = {"max_c": max([z["max_c"] for z in zones.values()]) if zones else None, "zones": zones or None}
        return power, thermal


# ----------------------------------------------------------------------------------------------- environment


def _package_version(name: str) -> str | None:
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8
        return None
    for candidate in (name, {"onnxruntime": "onnxruntime-gpu", "tensorrt": "tensorrt-cu12"}.get(name)):
        if candidate:
            try:
                return metadata.version(candidate)
            except Exception:
                pass
    return None


def _cuda_binding_name() -> str | None:
    import importlib.util

    try:
        if importlib.util.find_spec("cuda") is not None:
            return "cuda-python"
        if importlib.util.find_spec("pycuda") is not None:
            return "pycuda"
    except (ImportError, ValueError):
        pass
    return None


def _command(argv: list, timeout: float = 5.0) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu() -> dict:
    info, flags = {}, set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("model name", "hardware", "cpu part") and key not in info:
            info[key] = value
        if key in ("flags", "features"):
            flags.update(value.split())
    model = None
    for line in (_command(["lscpu"]) or "").splitlines():
        if line.lower().startswith("model name:"):
            model = line.split(":", 1)[1].strip()
            break
    model = model or info.get("model name") or info.get("hardware") or platform.processor() or None
    if model and info.get("cpu part") and "model name" not in info:
        model = "{} (cpu part {})".format(model, info["cpu part"])
    governors = sorted(
        {g for g in (_read(p) for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_governor")) if g}
    )
    cur = [_read_float(p) for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")]
    top = [_read_float(p) for p in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq")]
    cur, top = [c / 1e3 for c in cur if c], [t / 1e3 for t in top if t]
    return {
        "model": model,
        "cores_logical": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        # int8 speed depends on these (docs/architecture.md, "Toolchain constraints"): VNNI on x86, dot-product and
        # i8mm on Arm.
        "int8_flags": sorted(
            flags & {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm", "sve", "sve2"}
        ),
        "governor": ",".join(governors) or None,
        "freq_mhz": {"min_cur": min(cur), "max_cur": max(cur), "max": max(top) if top else None} if cur else None,
    }


def _jetson() -> dict | None:
    l4t = _read("/etc/nv_tegra_release")
    query = _command(["nvpmodel", "-q"])
    conf = _read("/etc/nvpmodel.conf")
    if not (l4t or query or conf):
        return None
    mode = None
    if query:
        mode = next((ln.split(":", 1)[1].strip() for ln in query.splitlines() if "power mode" in ln.lower()), None)
    if mode is None and conf:
        status = (_read("/var/lib/nvpmodel/status") or "").replace("pmode:", "").strip()
        for line in conf.splitlines():
            if "POWER_MODEL" in line and "ID={}".format(int(status) if status.isdigit() else "?") in line:
                mode = line.split("NAME=", 1)[-1].strip(" >") if "NAME=" in line else status
    return {"l4t": l4t.splitlines()[0] if l4t else None, "power_mode": mode}


def _gpus() -> list | None:
    out = _command(
        [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
            "--format=csv,noheader,nounits",
        ]
    )
    if not out:
        return None
    gpus = []
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")] + [None] * 5
        gpus.append(
            {
                "name": parts[0],
                "driver": parts[1],
                "memory_mb": _num(parts[2]),
                "max_sm_clock_mhz": _num(parts[3]),
                "power_limit_w": _num(parts[4]),
            }
        )
    return gpus


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def _os_name() -> str | None:
    for line in (_read("/etc/os-release") or "").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    android = _command(["getprop", "ro.build.version.release"])
    return "Android " + android if android else platform.platform()


def environment(session_info: dict, runtime: str) -> dict:
    """Where the numbers came from: device, OS, CPU, clocks, GPU, power mode, package versions."""
    meminfo = _read("/proc/meminfo") or ""
    mem_kb = next((float(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemTotal:")), None)
    return {
        "hostname": socket.gethostname(),
        "device_model": _read("/proc/device-tree/model") or _command(["getprop", "ro.product.model"]),
        "os": _os_name(),
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu": _cpu(),
        "memory_total_mb": mem_kb / 1024 if mem_kb else None,
        "gpu": _gpus(),
        "jetson": _jetson(),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "packages": {name: _package_version(name) for name in PACKAGES},
        "runtime": dict({"name": runtime, "version": _package_version(runtime)}, **session_info),
        "thread_env": {
            k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ
        }
        or None,
    }


def _rss_mb(field: str) -> float | None:
    """VmRSS / VmHWM from /proc/self/status in MiB; getrusage's peak where /proc is absent (macOS, bytes)."""
    for line in (_read("/proc/self/status") or "").splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1]) / 1024
    if field == "VmHWM":
        try:
            import resource

            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
        except (ImportError, OSError):
            return None
    return None


# ----------------------------------------------------------------------------------------------- TensorRT engines


def device_id() -> str:
    """What a TensorRT engine is tied to besides its TensorRT version: the board and its L4T release on a Jetson,
    else the GPUs and their driver (nvidia-smi), else the CPU (no GPU: nothing to build for)."""
    jetson = _read("/proc/device-tree/model")
    if jetson:
        l4t = (_read("/etc/nv_tegra_release") or "").splitlines()
        return "{} | {}".format(jetson, l4t[0] if l4t else "L4T unknown")
    gpus = _gpus()
    if gpus:
        return "; ".join("{} (driver {})".format(g["name"], g["driver"]) for g in gpus)
    return "cpu: {}".format(_cpu()["model"])


def engine_state(bundle: str, manifest: dict, build: bool) -> dict:
    """Where the bundle's TensorRT engines are on this device (engines.status), building them first when asked.

    Adds `built` (built now), `skipped` (why not built: TensorRT or a GPU missing, or build=False) and `error` (the
    build failed). Nothing is built when the cache already holds the engines for this key.
    """
    engines = sibling("engines")
    plan = os.path.join(bundle, "build_plan.json")
    if not os.path.isfile(plan):
        raise RunnerError(f"{bundle} has no build_plan.json; is it an edgepipe TensorRT bundle?", EXIT_BAD_FILES)
    state = engines.status(bundle, manifest, sha256_file(plan), _package_version("tensorrt"), device_id())
    state.update(built=False, skipped=None, error=None)
    if state["cached"]:
        return state
    if not build:
        state["skipped"] = "not asked to build"
        return state
    problem = runtime_status("tensorrt")
    if not problem["importable"]:
        state["skipped"] = "TensorRT cannot run on this device: missing {} ({})".format(
            ", ".join(problem["missing"]), problem["error"]
        )
        return state
    try:
        state["record"] = engines.build(bundle, state)
    except Exception as e:  # build_engine.BuildFailure, or TensorRT's own errors: one line
        state["error"] = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return state
    state.update(built=True, cached=True)
    return state


def cached_engine(bundle: str, manifest: dict, rel: str) -> str | None:
    """The cached engine for the bundle's engine file `rel` on this device, or None."""
    if not os.path.isfile(os.path.join(bundle, "build_plan.json")):
        return None
    state = engine_state(bundle, manifest, build=False)
    return state["engines"].get(rel) if state["cached"] else None


# ----------------------------------------------------------------------------------------------- profile, memory


def sibling(name: str):
    """A module shipped beside runner.py (SHIPPED): edgepipe.harness.<name> on the host, <name>.py on a device."""
    import importlib

    if __package__:
        return importlib.import_module(__package__ + "." + name)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise RunnerError(
            f"runner.py needs {name}.py beside it in {here} ({e}); `edgepipe deploy` ships {', '.join(SHIPPED)}",
            EXIT_BAD_FILES,
        ) from None


def profile_graph(path: str, manifest: dict, args: argparse.Namespace, feeds: dict, next_feeds=None) -> dict:
    """--profile: a second session of the graph with the runtime's own profiler on, after the timed runs.

    Runs min(warmup, 10) warm-up and min(runs, PROFILE_RUNS_MAX) profiled calls on `feeds` (decoders:
    `next_feeds(feeds, outputs)` feeds the state back) and returns profiles.summarise's dict. The profiler's own
    overhead stays out of latency_ms; the raw profile lives in a temporary directory and is removed.
    """
    import tempfile

    runtime = manifest["runtime"]
    cls = SESSIONS[runtime]
    if not hasattr(cls, "profile_summary"):
        raise RunnerError(f"--profile: runner.py has no profiler for {runtime}; run without --profile", EXIT_USAGE)
    warmup, runs = min(args.warmup, 10), min(args.runs, sibling("profiles").PROFILE_RUNS_MAX)
    tmp = tempfile.mkdtemp(prefix="edgepipe-profile-")
    try:
        session = cls(path, manifest, args.threads, profile=os.path.join(tmp, "profile"))
        run = session.prepare(feeds)
        for _ in range(warmup + runs):
            outputs = run()
            if next_feeds is not None:
                feeds = next_feeds(feeds, session.to_numpy(outputs))
                run = session.prepare(feeds)
        return session.profile_summary(skip_runs=warmup)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class PeakMemory:
    """The model's own peak: resident set above an idle baseline taken after the runtime is imported.

    Linux resets VmHWM when "5" is written to /proc/self/clear_refs; after that VmHWM - baseline is the peak of
    load + check + warm-up + timed runs ("VmHWM since baseline"). Where the reset fails the peak is the largest
    VmRSS of the points sample() was called at ("VmRSS samples"), which can miss a short spike.
    """

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset = _rss_mb("VmHWM") is not None
        except OSError:
            self.reset = False
        self.baseline = _rss_mb("VmRSS")
        self.samples = [self.baseline or 0.0]

    def sample(self) -> None:
        self.samples.append(_rss_mb("VmRSS") or 0.0)

    def record(self, rss_loaded: float | None, runtime: dict | None = None) -> dict:
        """The memory block of the result (SCHEMA.md); `runtime` adds the runtime's own allocator numbers."""
        self.sample()
        peak = _rss_mb("VmHWM") if self.reset else max(self.samples)
        memory = {
            "rss_before_load_mb": self.baseline,
            "rss_after_load_mb": rss_loaded,
            "peak_rss_mb": _rss_mb("VmHWM"),
            "baseline_rss_mb": self.baseline,
            "model_peak_mb": peak - self.baseline if peak is not None and self.baseline is not None else None,
            "model_peak_source": "VmHWM since baseline" if self.reset else "VmRSS samples",
            "runtime_activations_mb": None,
            "runtime_memory_source": None,
        }
        memory.update(runtime or {})
        return memory


def _runtime_memory(session, profile: dict | None) -> dict:
    """The runtime's own allocator numbers: a session's memory_stats(), else ORT's arena from its profile."""
    if hasattr(session, "memory_stats"):
        return session.memory_stats()
    allocator = (profile or {}).get("allocator") or {}
    if allocator.get("in_use_peak_mb") is not None:
        return {"runtime_activations_mb": allocator["in_use_peak_mb"], "runtime_memory_source": "onnxruntime arena"}
    return {}


# ----------------------------------------------------------------------------------------------- benchmark


def _stats(times_ms: list) -> dict:
    import numpy as np

    t = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99]).tolist()
    return {
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "mean": float(t.mean()),
        "std": float(t.std()),
        "min": float(t.min()),
        "max": float(t.max()),
    }


def time_runs(run, runs: int) -> list:
    """Seconds taken by each of `runs` calls of run(); the loop scripts/bench_runner_overhead.py measures."""
    times, clock = [0.0] * runs, time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside the loop is the runner's noise, not the model's
    try:
        for i in range(runs):
            t0 = clock()
            run()
            times[i] = clock() - t0
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _run_once(run, session, runtime: str, feeds: dict, what: str) -> list:
    """One call that turns a runtime exception into one line naming the shapes (static-shape graphs fail here)."""
    try:
        return run()
    except RunnerError:
        raise
    except Exception as e:
        shapes = {n: list(a.shape) for n, a in feeds.items()}
        expected = getattr(session, "input_shapes", None)
        hint = (
            f"; the graph takes {expected}: run without --batch/--seq or with those sizes"
            if expected and expected != [shapes.get(n) for n in session.input_names]
            else ""
        )
        message = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise RunnerError(f"{runtime} failed on the {what} inputs {shapes}: {message}{hint}") from None


def bench_encoder(bundle: str, manifest: dict, args: argparse.Namespace) -> dict:
    """Load, check against check.npz, warm up and time an encoder bundle (graph "model")."""
    check_in, check_out = load_check(bundle)
    peak = PeakMemory()
    t0 = time.perf_counter()
    session = SESSIONS[manifest["runtime"]](graph_path(bundle, manifest), manifest, args.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded = _rss_mb("VmRSS")
    if not session.input_names:  # ExecuTorch without manifest io: fall back to check.npz order
        session.input_names = list(check_in)
    if not session.output_names:
        session.output_names = list(check_out)
    missing = [n for n in session.input_names if n not in check_in]
    if missing:
        raise RunnerError(
            f"check.npz lacks inputs {missing} the graph needs (it has {sorted(check_in)})", EXIT_BAD_FILES
        )

    run = session.prepare(check_in)
    t0 = time.perf_counter()
    outputs = _run_once(run, session, manifest["runtime"], check_in, "check.npz")
    first_ms = (time.perf_counter() - t0) * 1e3
    actual = dict(zip(session.output_names, session.to_numpy(outputs)))
    check = compare_outputs(actual, check_out, manifest.get("validation") or {})

    feeds = bench_inputs({n: check_in[n] for n in session.input_names}, args.batch, args.seq)
    run = session.prepare(feeds)
    shape = list(feeds[session.input_names[0]].shape)
    t0 = time.perf_counter()
    _run_once(run, session, manifest["runtime"], feeds, "benchmark")
    for _ in range(args.warmup - 1):
        run()
    warmup_ms = (time.perf_counter() - t0) * 1e3

    gpu = manifest["runtime"] == "tensorrt" or any(
        "CUDA" in p or "Tensorrt" in p for p in session.info.get("providers") or []
    )
    sampler = Sampler(args.sample_ms / 1e3, gpu=gpu)
    items = shape[0] * args.runs
    sampler.start()
    try:
        times = time_runs(run, args.runs)
    finally:
        power, thermal = sampler.stop(items)
    times_ms = [t * 1e3 for t in times]
    total_s = sum(times)
    tokens = shape[0] * shape[1] if len(shape) > 1 else None
    memory = peak.record(rss_loaded)  # before --profile loads a second session
    profile = profile_graph(graph_path(bundle, manifest), manifest, args, feeds) if args.profile else None
    memory.update(_runtime_memory(session, profile))
    return {
        "inputs": {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in feeds.items()},
        "check": check,
        "latency_ms": dict(_stats(times_ms), load=load_ms, first_run=first_ms, warmup_total=warmup_ms),
        "throughput": {
            "items_per_s": items / total_s if total_s else None,
            "tokens_per_s": tokens * args.runs / total_s if tokens and total_s else None,
        },
        "memory": memory,
        "power": power,
        "thermal": thermal,
        "samples_ms": [round(t, 6) for t in times_ms],
        "session_info": session.info,
        "decoder": None,
        "profile": profile,
    }


# ----------------------------------------------------------------------------------------------- decoders


class DecoderGraphs:
    """A decoder bundle's "prefill" and "decode" graphs run as one model over an explicit state.

    Both graphs take (input_ids, position, *state) and return (logits, *state): prefill takes
    manifest["decoder"]["prefill_tokens"] tokens per call, decode one. A prompt runs through prefill in whole chunks
    and the remainder through decode, which is exact: no padding token ever enters the cache.
    """

    def __init__(self, bundle: str, manifest: dict, threads: int | None) -> None:
        io = manifest.get("io") or {}
        if "decode" not in io or "prefill" not in io or "decoder" not in manifest:
            raise RunnerError("manifest.json of a decoder needs io.prefill, io.decode and decoder", EXIT_BAD_FILES)
        try:
            self.chunk = int(manifest["decoder"]["prefill_tokens"])
            self.state_spec = [i for i in io["decode"]["inputs"] if i["name"] not in ("input_ids", "position")]
            shapes = [(s["shape"], s["dtype"]) for s in self.state_spec]
            if not all(isinstance(d, str) and all(isinstance(n, int) and n >= 0 for n in sh) for sh, d in shapes):
                raise ValueError("a state input without an int shape and a dtype name")
        except (KeyError, TypeError, ValueError) as e:
            raise RunnerError(
                "manifest.json's decoder.prefill_tokens or io.decode.inputs is malformed ({}: {})".format(
                    type(e).__name__, e
                ),
                EXIT_BAD_FILES,
            ) from None
        self.sessions = {}
        for graph in ("prefill", "decode"):
            graph_manifest = dict(manifest, io=io[graph])
            self.sessions[graph] = SESSIONS[manifest["runtime"]](
                graph_path(bundle, manifest, graph), graph_manifest, threads
            )
        self.info = self.sessions["decode"].info
        self.calls = {"prefill": 0, "decode": 0}

    def init_state(self) -> list:
        import numpy as np

        return [np.full(s["shape"], s.get("fill", 0.0), dtype=s["dtype"]) for s in self.state_spec]

    def state_bytes(self) -> int:
        return sum(a.nbytes for a in self.init_state())

    def _call(self, graph: str, ids, position: int, state: list) -> tuple:
        import numpy as np

        session = self.sessions[graph]
        feeds = {"input_ids": ids, "position": np.full((ids.shape[0],), position, dtype=np.int64)}
        feeds.update((s["name"], a) for s, a in zip(self.state_spec, state))
        try:
            outputs = session.to_numpy(session.prepare(feeds)())
        except RunnerError:
            raise
        except Exception as e:
            message = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise RunnerError(f"the {graph} graph failed at position {position}: {message}") from None
        self.calls[graph] += 1
        return outputs[0], list(outputs[1:])

    def feed(self, ids, position: int, state: list) -> tuple:
        """Run ids (1, n) from `position`; returns (logits of the last token (1, vocab), new state)."""
        n, i, logits = ids.shape[1], 0, None
        while n - i >= self.chunk:
            logits, state = self._call("prefill", ids[:, i : i + self.chunk], position + i, state)
            i += self.chunk
        while i < n:
            logits, state = self._call("decode", ids[:, i : i + 1], position + i, state)
            i += 1
        return logits[:, -1], state


def greedy(graphs: DecoderGraphs, prompt, max_new_tokens: int, eos_id: int | None = None, on_token=None) -> dict:
    """Greedy generation: token ids, the first token's logits, time to first token and per-token decode times.

    `on_token(tokens)` is called with the tokens so far after each new one (streaming output); it is not timed.
    """
    import numpy as np

    clock = time.perf_counter
    t0 = clock()
    logits, state = graphs.feed(np.ascontiguousarray(prompt, dtype=np.int64), 0, graphs.init_state())
    first_logits = np.asarray(logits, dtype=np.float32)
    tokens = [int(np.argmax(logits[0]))]
    ttft = clock() - t0
    step_s = []
    n = prompt.shape[1]
    while True:
        if on_token is not None:
            on_token(tokens)
        if len(tokens) >= max_new_tokens or tokens[-1] == eos_id:
            break
        t = clock()
        logits, state = graphs.feed(np.array([[tokens[-1]]], dtype=np.int64), n + len(tokens) - 1, state)
        tokens.append(int(np.argmax(logits[0])))
        step_s.append(clock() - t)
    return {"tokens": tokens, "first_logits": first_logits, "ttft_s": ttft, "step_s": step_s}


def teacher_forced_top1(graphs: DecoderGraphs, prompt, tokens) -> list:
    """The graphs' next token after the prompt and after each of ``tokens`` fed in turn (PyTorch's own prefix, so
    one early difference does not carry into every later position)."""
    import numpy as np

    logits, state = graphs.feed(np.ascontiguousarray(prompt, dtype=np.int64), 0, graphs.init_state())
    top1, n = [int(np.argmax(logits[0]))], prompt.shape[1]
    for i, token in enumerate(tokens[:-1]):
        logits, state = graphs.feed(np.array([[int(token)]], dtype=np.int64), n + i, state)
        top1.append(int(np.argmax(logits[0])))
    return top1


def check_decoder(graphs: DecoderGraphs, check_in: dict, check_out: dict, validation: dict) -> dict:
    """check.npz's prompt and PyTorch's greedy tokens (`output.tokens`): the graphs' next token at each position fed
    PyTorch's prefix (`token_agreement`, the bar `min_token_agreement` judges), their own greedy run
    (`greedy_agreement`, `tokens`), and the first logits within tolerance."""
    import numpy as np

    want_tokens = np.asarray(check_out["tokens"]).reshape(-1)
    run = greedy(graphs, check_in["input_ids"], len(want_tokens))
    got = np.asarray(run["tokens"][: len(want_tokens)])
    greedy_agreement = float(np.mean(got == want_tokens[: len(got)])) if len(got) else 0.0
    forced = np.asarray(teacher_forced_top1(graphs, np.asarray(check_in["input_ids"]), want_tokens))
    agreement = float(np.mean(forced == want_tokens)) if len(want_tokens) else 0.0
    differ = [int(i) for i in np.flatnonzero(forced != want_tokens)]
    result = compare_outputs({"logits": run["first_logits"]}, {"logits": check_out["logits"]}, validation)
    need = validation.get("min_token_agreement", 1.0)
    if agreement < need:
        result["problems"].append(
            "next tokens agree {:.3f} with PyTorch's on its own prefix (differ at positions {}), needs {:.3f}".format(
                agreement, differ, need
            )
        )
    result.update(
        passed=not result["problems"],
        token_agreement=agreement,
        greedy_agreement=greedy_agreement,
        tokens=run["tokens"],
    )
    return result


def bench_decoder(bundle: str, manifest: dict, args: argparse.Namespace) -> dict:
    """Check a decoder bundle on check.npz, then time prefill (time to first token) and decode at each context."""
    import numpy as np

    check_in, check_out = load_check(bundle)
    peak = PeakMemory()
    t0 = time.perf_counter()
    graphs = DecoderGraphs(bundle, manifest, args.threads)
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded = _rss_mb("VmRSS")
    t0 = time.perf_counter()
    check = check_decoder(graphs, check_in, check_out, manifest.get("validation") or {})
    first_ms = (time.perf_counter() - t0) * 1e3

    prompt = check_in["input_ids"].reshape(1, -1)
    contexts = args.context or [args.seq or prompt.shape[1]]
    cache_len = manifest["decoder"].get("cache_len")
    sampler = Sampler(args.sample_ms / 1e3, gpu=False)
    rows, all_ms = [], []
    sampler.start()
    try:
        for context in contexts:
            ids = np.resize(prompt, (1, context)).astype(np.int64)
            t = time.perf_counter()
            logits, state = graphs.feed(ids, 0, graphs.init_state())
            prefill_ms = (time.perf_counter() - t) * 1e3
            position = context

            def step() -> None:  # greedy: feed back the argmax, as generation does
                nonlocal logits, state, position
                token = np.array([[int(np.argmax(logits[0]))]], dtype=np.int64)
                logits, state = graphs.feed(token, position, state)
                position += 1

            for _ in range(args.warmup):
                step()
            times_ms = [s * 1e3 for s in time_runs(step, args.runs)]
            all_ms.extend(times_ms)
            rows.append(
                {
                    "context": context,
                    "prefill_ms": prefill_ms,
                    "decode_ms": _stats(times_ms),
                    "tokens_per_s": 1e3 * len(times_ms) / sum(times_ms),
                    "beyond_cache": bool(cache_len and context > cache_len),
                }
            )
    finally:
        power, thermal = sampler.stop(len(all_ms))
    memory = peak.record(rss_loaded)
    profile = profile_decode(bundle, manifest, args, graphs) if args.profile else None
    memory.update(_runtime_memory(graphs.sessions["decode"], profile))
    return {
        "inputs": {"input_ids": {"shape": list(prompt.shape), "dtype": str(prompt.dtype)}},
        "check": check,
        "latency_ms": dict(rows[0]["decode_ms"], load=load_ms, first_run=first_ms),
        "throughput": {"items_per_s": None, "tokens_per_s": rows[0]["tokens_per_s"]},
        "memory": memory,
        "profile": profile,
        "power": power,
        "thermal": thermal,
        "samples_ms": [round(t, 6) for t in all_ms[: args.runs]],
        "session_info": graphs.info,
        "decoder": {
            "prompt_tokens": int(prompt.shape[1]),
            "prefill_tokens": graphs.chunk,
            "cache_len": cache_len,
            "state_bytes": graphs.state_bytes(),
            "ttft_ms": rows[0]["prefill_ms"],
            "contexts": rows,
        },
    }


def profile_decode(bundle: str, manifest: dict, args: argparse.Namespace, graphs: DecoderGraphs) -> dict:
    """--profile of a decoder: its decode graph, greedy steps from position 0 with the state fed back."""
    import numpy as np

    spec = graphs.state_spec
    feeds = {"input_ids": np.ones((1, 1), dtype=np.int64), "position": np.zeros((1,), dtype=np.int64)}
    feeds.update((s["name"], a) for s, a in zip(spec, graphs.init_state()))

    def next_feeds(feeds: dict, outputs: list) -> dict:
        token = np.array([[int(np.argmax(outputs[0][0, -1]))]], dtype=np.int64)
        step = {"input_ids": token, "position": feeds["position"] + 1}
        step.update((s["name"], a) for s, a in zip(spec, outputs[1:]))
        return step

    decode = dict(manifest, io=(manifest.get("io") or {})["decode"])
    return profile_graph(graph_path(bundle, manifest, "decode"), decode, args, feeds, next_feeds)


BENCHES = {"encoder": bench_encoder, "decoder": bench_decoder}


def bench_kind(manifest: dict) -> str:
    """How a bundle runs: "decoder" for edgepipe's prefill + decode graphs, else "encoder": one graph fed
    check.npz's inputs, which is also how Optimum's exports of any task (text generation included) run."""
    return "decoder" if "decode" in (manifest.get("graphs") or {}) else "encoder"


def bench(bundle: str, args: argparse.Namespace) -> dict:
    """Verify the bundle, run its benchmark, and assemble the edgepipe.bench/1 record."""
    started = datetime.datetime.now(datetime.timezone.utc)
    manifest = load_manifest(bundle)
    files = verify_files(bundle, manifest)
    if files["problems"]:
        raise RunnerError(
            "bundle {} is corrupt: {}".format(
                bundle, "; ".join("{} ({})".format(p["path"], p["problem"]) for p in files["problems"])
            ),
            EXIT_BAD_FILES,
        )
    runtime = str(manifest.get("runtime"))
    status = runtime_status(runtime)
    if not status["importable"]:
        raise RunnerError(
            "{} cannot run here: missing {} ({}); pip install {}".format(
                runtime, ", ".join(status["missing"]) or "?", status["error"], " ".join(status["missing"])
            ),
            EXIT_MISSING_RUNTIME,
        )
    kind = bench_kind(manifest)
    engine = None
    if runtime == "tensorrt" and os.path.isfile(os.path.join(bundle, "build_plan.json")):
        engine = engine_state(bundle, manifest, build=True)  # once per device + TensorRT version, then cached
        if engine["error"]:
            raise RunnerError("building the TensorRT engine failed: " + engine["error"])
    # The host passes the tolerance from edgepipe's own table (precisions.py); the manifest's is the bundle's word.
    tolerance = getattr(args, "tolerance", None)
    result = BENCHES[kind](bundle, dict(manifest, validation=tolerance) if tolerance else manifest, args)
    result["check"]["tolerance_source"] = "edgepipe" if tolerance else "manifest"
    target = manifest.get("target") or {}
    graph = graph_path(bundle, manifest) if kind == "encoder" else None
    record = {
        "schema": SCHEMA,
        "runner_version": RUNNER_VERSION,
        "runner": "python",
        "created_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": {"url": None, "name": None},
        "bundle": {
            "path": os.path.abspath(bundle),
            "model": manifest.get("model"),
            "kind": kind,
            "target": target.get("name") if isinstance(target, dict) else target,
            "runtime": runtime,
            "precision": manifest.get("precision"),
            "edgepipe_version": manifest.get("edgepipe_version"),
            "manifest_sha256": sha256_file(os.path.join(bundle, "manifest.json")),
            "files_bytes": files["bytes"],
            "graph_file": os.path.relpath(graph, bundle) if graph else None,
            "graph_bytes": os.path.getsize(graph) if graph else None,
            "validation": manifest.get("validation"),
            "fidelity": manifest.get("fidelity"),
        },
        "config": {
            "runs": args.runs,
            "warmup": args.warmup,
            "batch": args.batch,
            "seq": args.seq,
            "context": getattr(args, "context", None),
            "threads": args.threads,
            "sample_ms": args.sample_ms,
        },
        "verify": {"files_checked": files["checked"], "ok": True},
        "engine": engine and {k: engine[k] for k in ("key", "dir", "built", "tensorrt", "device")},
    }
    session_info = result.pop("session_info")
    record.update(result)
    record["env"] = environment(session_info, runtime)
    record["device"]["name"] = (
        record["env"]["device_model"] or record["env"]["cpu"]["model"] or record["env"]["hostname"]
    )
    return record


def _write_json(record: dict, out: str) -> None:
    text = json.dumps(record, indent=1, sort_keys=False, allow_nan=False)
    if out == "-":
        sys.stdout.write(text + "\n")
        return
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    os.replace(tmp, out)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _contexts(text: str) -> list:
    return [_positive(x) for x in text.split(",") if x.strip()]


def _tolerance(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    keys = ("atol", "min_cosine", "min_token_agreement")
    if (
        not isinstance(value, dict)
        or not value
        or any(k not in keys or not isinstance(v, (int, float)) for k, v in value.items())
    ):
        raise argparse.ArgumentTypeError("expected a JSON object of numbers with keys from {}".format(", ".join(keys)))
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="runner.py", description="Verify, check and time an edgepipe bundle here.")
    p.add_argument("bundle", help="bundle directory (manifest.json, model file, check.npz)")
    p.add_argument("--verify", action="store_true", help="only check files and runtime; print JSON and exit")
    p.add_argument(
        "--engine",
        action="store_true",
        help="TensorRT bundles: build the engine into <bundle>.engines unless cached; print JSON (edgepipe.engine/1)",
    )
    p.add_argument("--runs", type=_positive, default=50, help="timed runs (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up runs (default 10)")
    p.add_argument("--batch", type=_positive, default=None, help="batch size of the timed inputs")
    p.add_argument("--seq", type=_positive, default=None, help="sequence length of the timed inputs")
    p.add_argument("--threads", type=_positive, default=None, help="intra-op threads (default: runtime's)")
    p.add_argument("--sample-ms", type=float, default=100.0, help="power/temperature sampling period")
    p.add_argument(
        "--context",
        type=_contexts,
        default=None,
        help="decoders: comma-separated context lengths to time decode at (default: the check prompt's length)",
    )
    p.add_argument(
        "--profile", action="store_true", help="after the timed runs, per-op times from the runtime's own profiler"
    )
    p.add_argument(
        "--tolerance",
        type=_tolerance,
        default=None,
        help='check tolerance instead of the manifest\'s, e.g. {"atol": 1e-4, "min_cosine": 0.9999}; edgepipe '
        "passes its own table's",
    )
    p.add_argument("--json", default="-", help="where to write the result ('-' = stdout)")
    return p


def engine_command(bundle: str, out: str) -> int:
    """--engine: verify the files, then build or find the engine; 0 cached or built, 5 skipped, 1 build failed."""
    manifest = load_manifest(bundle)
    problems = verify_files(bundle, manifest)["problems"]
    if problems:
        raise RunnerError(
            "bundle {} is corrupt: {}".format(
                bundle, "; ".join(p["path"] + " (" + p["problem"] + ")" for p in problems)
            ),
            EXIT_BAD_FILES,
        )
    state = engine_state(bundle, manifest, build=True)
    _write_json(state, out)
    if state["error"]:
        sys.stderr.write("error: building the TensorRT engine failed: {}\n".format(state["error"]))
        return EXIT_FAILURE
    return EXIT_OK if state["cached"] else EXIT_MISSING_RUNTIME


def main(argv: list | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verify:
            report = verify(args.bundle)
            _write_json(report, args.json)
            if report["files"]["problems"]:
                return EXIT_BAD_FILES
            return EXIT_OK if report["runtime"]["importable"] else EXIT_MISSING_RUNTIME
        if args.engine:
            return engine_command(args.bundle, args.json)
        record = bench(args.bundle, args)
        _write_json(record, args.json)
        lat, check = record["latency_ms"], record["check"]
        sys.stderr.write(
            "{} {}: p50 {:.3f} ms, p90 {:.3f} ms; check {}\n".format(
                record["bundle"]["model"],
                record["bundle"]["target"],
                lat["p50"],
                lat["p90"],
                "passed" if check["passed"] else "FAILED: " + "; ".join(check["problems"]),
            )
        )
        return EXIT_OK if check["passed"] else EXIT_CHECK_FAILED
    except RunnerError as e:
        sys.stderr.write(f"error: {e}\n")
        return e.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
