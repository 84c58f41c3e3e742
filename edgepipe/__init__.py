"""edgepipe: make small Transformer and Mamba models fast on edge devices.

``import edgepipe`` imports no runtime: ONNX Runtime, ExecuTorch and TensorRT load when a target needs them.

The Python API::

    bundle = edgepipe.build(model="minilm-teacher", target="host-cpu")   # -> Bundle: path, manifest, fidelity
    vectors = edgepipe.load(bundle.path).encode(["a sentence", "another"])   # (2, 384) in the bundle's runtime
"""

import importlib

__version__ = "0.1.0"
__all__ = ["__version__", "build", "load"]


def __getattr__(name: str):
    """``build`` and ``load`` on first use (PEP 562): importing them here would load torch with ``import edgepipe``.

    ``edgepipe.build`` is the build package, which is callable (``edgepipe.build.build_bundle``); ``edgepipe.load``
    is ``edgepipe.bundle.load``. importlib, not an import statement: the layers run upward from here only lazily.
    """
    if name == "build":
        return importlib.import_module("edgepipe.build")
    if name == "load":
        return importlib.import_module("edgepipe.bundle").load
    raise AttributeError(f"module 'edgepipe' has no attribute {name!r}")
