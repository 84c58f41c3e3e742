#!/usr/bin/env python3
"""Build a TensorRT engine for an edgepipe bundle, on the device, and check it on the bundle's check.npz.

Copied into every TensorRT bundle beside model.onnx and build_plan.json. Engines are tied to the GPU, the
TensorRT version and the OS, so they are built where they run:

    python3 build_engine.py                 # in the bundle: writes model.plan, runs check.npz, prints JSON
    python3 build_engine.py BUNDLE --force  # rebuild an existing model.plan
    python3 build_engine.py --check-only    # run check.npz on an existing model.plan

Decoder bundles list two static-shape engines under "engines" (prefill.plan, decode.plan); they are checked by the
runner (greedy tokens vs check.npz: `edgepipe bench` or `python3 runner.py BUNDLE`), not here.

Needs numpy, TensorRT >= 8.6 (JetPack 6 ships it) and cuda-python or pycuda for the check; it never imports
edgepipe or torch. Exit codes: 0 built and checked, 1 build failed, 2 usage, 3 engine built but the check
failed, 5 TensorRT or a CUDA binding missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

EXIT_BUILD, EXIT_USAGE, EXIT_CHECK, EXIT_MISSING = 1, 2, 3, 5
PLAN_SCHEMA = "edgepipe.trt_build_plan/1"


class BuildFailure(Exception):
    def __init__(self, message: str, code: int = EXIT_BUILD) -> None:
        super().__init__(message)
        self.code = code


def load_plan(bundle: Path) -> dict:
    """Read and check ``build_plan.json`` in ``bundle``."""
    path = bundle / "build_plan.json"
    try:
        plan = json.loads(path.read_text())
    except OSError:
        raise BuildFailure(f"{path} not found: run this script in an edgepipe TensorRT bundle", EXIT_USAGE) from None
    except ValueError as exc:
        raise BuildFailure(f"{path} is not JSON ({exc}): copy the bundle again", EXIT_USAGE) from None
    if plan.get("schema") != PLAN_SCHEMA:
        raise BuildFailure(f"{path}: schema {plan.get('schema')!r}, this script reads {PLAN_SCHEMA}", EXIT_USAGE)
    graphs = ("engines",) if "engines" in plan else ("onnx", "engine")
    missing = [k for k in (*graphs, "flags", "profiles", "workspace_mb") if k not in plan]
    if missing:
        raise BuildFailure(f"{path} lacks {missing}: rebuild the bundle with edgepipe", EXIT_USAGE)
    return plan


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise BuildFailure(
            "TensorRT's Python package is not importable: on Jetson install JetPack (python3-libnvinfer), "
            "elsewhere `pip install tensorrt`",
            EXIT_MISSING,
        ) from None
    return trt


def build(bundle: Path, plan: dict, verbose: bool = False) -> dict:
    """Parse ``plan["onnx"]``, build with the plan's flags and profile, write ``plan["engine"]``; return a record."""
    trt = _tensorrt()
    logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # required by 8.x, a no-op in 10.x
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle / plan["onnx"]
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailure(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {'; '.join(errors[:3])}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(plan["workspace_mb"]) << 20)
    for name, on in plan["flags"].items():
        flag = getattr(trt.BuilderFlag, name.upper(), None)
        if flag is None:
            continue  # e.g. INT8 once a TensorRT release drops the weakly-typed flag
        config.set_flag(flag) if on else config.clear_flag(flag)
    if "builder_optimization_level" in plan and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(plan["builder_optimization_level"])
    for shapes in plan["profiles"]:
        profile = builder.create_optimization_profile()
        for name, dims in shapes.items():
            profile.set_shape(name, dims["min"], dims["opt"], dims["max"])
        config.add_optimization_profile(profile)
    start = time.time()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildFailure(f"TensorRT {trt.__version__} failed to build {onnx_path.name}; rerun with --verbose")
    engine = bundle / plan["engine"]
    engine.write_bytes(bytes(serialized))
    return {
        "engine": engine.name,
        "bytes": engine.stat().st_size,
        "build_seconds": round(time.time() - start, 1),
        "tensorrt": trt.__version__,
        "flags": {k: bool(v) for k, v in plan["flags"].items()},
    }


# ---------------------------------------------------------------------------------------------- running it
def cuda_problem() -> str | None:
    """Why engines cannot run here (no CUDA binding, no GPU), or None."""
    try:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            from cuda import cudart
        err, count = cudart.cudaGetDeviceCount()
        return None if int(err) == 0 and count > 0 else "no CUDA GPU visible"
    except ImportError:
        pass
    try:
        import pycuda.driver as drv

        drv.init()
        return None if drv.Device.count() > 0 else "no CUDA GPU visible"
    except ImportError:
        return "neither cuda-python nor pycuda is installed (pip install cuda-python)"
    except Exception as exc:  # pycuda raises its own error types when no driver is present
        return f"CUDA unavailable ({exc})"


class _Cuda:
    """cudaMalloc/memcpy/stream through cuda-python, else pycuda."""

    def __init__(self) -> None:
        try:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                from cuda import cudart
            self.rt, self.drv = cudart, None
        except ImportError:
            try:
                import pycuda.autoinit  # noqa: F401  (creates the context)
                import pycuda.driver as drv
            except ImportError:
                msg = "the check needs cuda-python or pycuda: pip install cuda-python"
                raise BuildFailure(msg, EXIT_MISSING) from None
            self.rt, self.drv = None, drv
        self._keep: list = []
        self.stream = self._ok(self.rt.cudaStreamCreate()) if self.rt else self.drv.Stream()

    def _ok(self, result):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise BuildFailure(f"CUDA call failed: {err}")
        return rest[0] if rest else None

    @property
    def handle(self) -> int:
        return int(self.stream) if self.rt else self.stream.handle

    def malloc(self, nbytes: int) -> int:
        if self.rt:
            ptr = int(self._ok(self.rt.cudaMalloc(max(nbytes, 1))))
            self._keep.append(ptr)
            return ptr
        self._keep.append(self.drv.mem_alloc(max(nbytes, 1)))
        return int(self._keep[-1])

    def htod(self, dev: int, host) -> None:
        if self.rt:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
            self._ok(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes, kind, self.stream))
        else:
            self.drv.memcpy_htod_async(dev, host, self.stream)

    def dtoh(self, host, dev: int) -> None:
        if self.rt:
            kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
            self._ok(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes, kind, self.stream))
        else:
            self.drv.memcpy_dtoh_async(host, dev, self.stream)

    def sync(self) -> None:
        self._ok(self.rt.cudaStreamSynchronize(self.stream)) if self.rt else self.stream.synchronize()

    def free(self) -> None:
        if self.rt:
            for ptr in self._keep:
                self.rt.cudaFree(ptr)
        self._keep.clear()


class EngineRunner:
    """A deserialized engine behind edgepipe's Session interface: ``run(feeds) -> {name: array}`` (TensorRT >= 8.5)."""

    def __init__(self, engine_path: Path) -> None:
        trt = _tensorrt()
        self.trt = trt
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise BuildFailure(
                f"TensorRT {trt.__version__} cannot deserialize {engine_path}: it was built for another GPU, "
                "TensorRT version or OS; rebuild it here with --force"
            )
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_in = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_in[n]]
        self.output_names = [n for n in names if not is_in[n]]

    def run(self, feeds: dict) -> dict:
        import numpy as np

        cuda, ctx, engine = _Cuda(), self.context, self.engine
        try:
            for name in self.input_names:
                host = np.ascontiguousarray(feeds[name], dtype=self.trt.nptype(engine.get_tensor_dtype(name)))
                ctx.set_input_shape(name, host.shape)
                dev = cuda.malloc(host.nbytes)
                ctx.set_tensor_address(name, dev)
                cuda.htod(dev, host)
            outputs = {}
            for name in self.output_names:
                host = np.empty(tuple(ctx.get_tensor_shape(name)), self.trt.nptype(engine.get_tensor_dtype(name)))
                dev = cuda.malloc(host.nbytes)
                ctx.set_tensor_address(name, dev)
                outputs[name] = (host, dev)
            if not ctx.execute_async_v3(cuda.handle):
                raise BuildFailure("TensorRT execute_async_v3 failed")
            for host, dev in outputs.values():
                cuda.dtoh(host, dev)
            cuda.sync()
        finally:
            cuda.free()
        return {name: host.astype("float32") for name, (host, _) in outputs.items()}


def compare(out, ref) -> dict:
    """Row-wise cosine (mean, min) and max-abs difference of two (n, dim) arrays."""
    import numpy as np

    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    cos = (out * ref).sum(1) / (np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1) + 1e-12)
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()), "max_abs": float(np.abs(out - ref).max())}


def tolerance(bundle: Path, plan: dict) -> dict:
    """The build's own tolerance (manifest.json "validation"), else the plan's default for its precision."""
    try:
        validation = json.loads((bundle / "manifest.json").read_text()).get("validation", {})
        if "atol" in validation and "min_cosine" in validation:
            return {"atol": validation["atol"], "min_cosine": validation["min_cosine"]}
    except (OSError, ValueError):
        pass
    return dict(plan.get("check", {}).get("tolerance", {"atol": 0.25, "min_cosine": 0.97}))


def check(bundle: Path, plan: dict, session=None) -> dict:
    """Run check.npz through the engine (or ``session``) and compare with its expected outputs."""
    import numpy as np

    path = bundle / plan.get("check", {}).get("file", "check.npz")
    try:
        with np.load(path) as data:
            inputs = {k[len("input.") :]: data[k] for k in data.files if k.startswith("input.")}
            expected = {k[len("output.") :]: data[k] for k in data.files if k.startswith("output.")}
    except OSError:
        raise BuildFailure(f"{path} not found: the bundle is incomplete", EXIT_USAGE) from None
    session = session or EngineRunner(bundle / plan["engine"])
    outputs = session.run(inputs)
    tol = tolerance(bundle, plan)
    metrics = {name: compare(outputs[name], ref) for name, ref in expected.items()}
    passed = all(m["min_cosine"] >= tol["min_cosine"] and m["max_abs"] <= tol["atol"] for m in metrics.values())
    return {"passed": passed, "tolerance": tol, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", nargs="?", default=str(Path(__file__).resolve().parent), help="bundle directory")
    parser.add_argument("--force", action="store_true", help="rebuild model.plan even if it exists")
    parser.add_argument("--check-only", action="store_true", help="only run check.npz on an existing engine")
    parser.add_argument("--no-check", action="store_true", help="build without running check.npz")
    parser.add_argument("--verbose", action="store_true", help="TensorRT's verbose builder log")
    args = parser.parse_args(argv)
    bundle = Path(args.bundle)
    result: dict = {"bundle": str(bundle)}
    try:
        plan = load_plan(bundle)
        if "engines" in plan:  # a decoder: one engine per graph; the runner checks them
            if args.check_only:
                raise BuildFailure("decoder engines are checked by runner.py (edgepipe bench), not here", EXIT_USAGE)
            result["build"] = [
                build(bundle, {**plan, "onnx": e["onnx"], "engine": e["engine"]}, args.verbose)
                for e in plan["engines"]
                if args.force or not (bundle / e["engine"]).is_file()
            ]
            print(json.dumps(result, indent=2))
            return 0
        engine = bundle / plan["engine"]
        if args.check_only and not engine.is_file():
            raise BuildFailure(f"{engine} does not exist: build it first (drop --check-only)", EXIT_USAGE)
        if not args.check_only and (args.force or not engine.is_file()):
            result["build"] = build(bundle, plan, args.verbose)
        if not args.no_check:
            result["check"] = check(bundle, plan)
    except BuildFailure as exc:
        result["error"] = str(exc)
        print(json.dumps(result, indent=2))
        print(f"build_engine: {exc}", file=sys.stderr)
        return exc.code
    print(json.dumps(result, indent=2))
    return 0 if result.get("check", {}).get("passed", True) else EXIT_CHECK


if __name__ == "__main__":
    sys.exit(main())
