"""edgepipe: make small Transformer and Mamba models fast on edge devices.

``import edgepipe`` imports no runtime: ONNX Runtime, ExecuTorch and TensorRT load when a target needs them.
"""

__version__ = "0.1.0"
