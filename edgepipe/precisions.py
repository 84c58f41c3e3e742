"""The precision plans: one table, read by the config checks, every runtime, the build driver and the device check.

A plan names how a model's GEMMs and activations are stored and computed (docs/architecture.md, "Precisions").
Two families use the table: sentence encoders (one graph, judged by the cosine of their embeddings) and decoders
(prefill + decode graphs, judged by greedy tokens and first-token logits). Each family has its own check tolerance
and its own fallback, because each measures fidelity its own way:

- int8 encoder atol 0.08: the largest element error of the teacher's int8 embeddings on 128 held-back sentences
  was 0.044 (ONNX Runtime int8-dynamic, 7-bit weights), 0.033 (w8a8, int8-fp16) and 0.014 (ExecuTorch
  int8-dynamic), 0.025 on check.npz's 8; an atol of sqrt(2 - 2 x 0.97) = 0.25 would only repeat min_cosine.
- fp32 atol: an encoder's embeddings are unit length and ONNX Runtime/XNNPACK reproduce PyTorch to 1e-5, so 1e-4;
  a decoder's logits run to ~20 over an 8k vocabulary, where summation order alone moves them by ~1e-4, so 1e-3.
- bf16 (OpenVINO): bf16 keeps fp32's 8-bit exponent but 8 bits of mantissa, so an embedding moves by ~1e-2 at
  most and its cosine stays above 0.999 (the fp16 tolerance); it falls back to fp32.
- decoder token agreement: at each of check.npz's 16 positions the graphs, fed PyTorch's own prefix, must predict
  PyTorch's greedy token (teacher-forced, so one early flip does not carry into every later position). Quantized
  decoders lose 1-2% of held-back top-1 agreement (tiny test LM: int8-dynamic 0.986, int8-fp16 0.981; tinylm-teacher:
  int8-fp16 0.989, a8w16 0.990; fp16 1.0), and the tiny LM keeps all 16 check tokens in every plan. The INT8
  plans may miss two positions of 16 (three or more come by chance in under 1% of bundles at a 2% rate per
  position), fp16 one; more is a broken artifact, not quantization noise.
- a8w16 fallback: an encoder's a8w16 keeps fp16 weights, so fp16 is the next plan down; a decoder's a8w16 keeps fp32
  weights on CPU runtimes (their fp16 GEMMs are emulated on x86) and executorch has no fp16 decoder plan, so fp32.

Nothing here imports torch or a runtime: ``import edgepipe.precisions`` is cheap and safe on a device.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("encoder", "decoder")


@dataclass(frozen=True)
class Tolerance:
    """How close an artifact must stay to eager PyTorch on check.npz, here and on the device."""

    atol: float
    min_cosine: float
    min_token_agreement: float | None = None  # decoders: greedy tokens vs PyTorch

    def to_dict(self) -> dict:
        out = {"atol": self.atol, "min_cosine": self.min_cosine}
        if self.min_token_agreement is not None:
            out["min_token_agreement"] = self.min_token_agreement
        return out


@dataclass(frozen=True)
class Plan:
    name: str
    summary: str
    static: bool  # Q/DQ pairs with activation scales calibrated on real text: needs QuantInputs
    fallback: dict[str, str | None]  # per family: the plan tried when this one breaks the fidelity budget
    check: dict[str, Tolerance]  # per family
    weight_bytes: float | None = None  # decoders' decode-memory estimate: bytes per weight (None: per layer)


_INT8 = Tolerance(0.08, 0.97)
PLANS: dict[str, Plan] = {
    p.name: p
    for p in (
        Plan(
            "fp32",
            "the reference: weights and compute in fp32",
            static=False,
            fallback={"encoder": None, "decoder": None},
            check={"encoder": Tolerance(1e-4, 0.9999), "decoder": Tolerance(1e-3, 0.9999, 1.0)},
            weight_bytes=4.0,
        ),
        Plan(
            "fp16",
            "weights and compute in fp16 where the runtime has fp16 kernels",
            static=False,
            fallback={"encoder": "fp32", "decoder": "fp32"},
            check={"encoder": Tolerance(2e-2, 0.999), "decoder": Tolerance(0.25, 0.999, 15 / 16)},
            weight_bytes=2.0,
        ),
        Plan(
            "bf16",
            "weights and compute in bf16 where the CPU has native bf16 (AVX512-BF16, AMX): OpenVINO's inference "
            "precision hint; refused on other CPUs, where OpenVINO would silently run fp32",
            static=False,
            fallback={"encoder": "fp32", "decoder": "fp32"},
            check={"encoder": Tolerance(2e-2, 0.999), "decoder": Tolerance(0.25, 0.999, 15 / 16)},  # fp16's
            weight_bytes=2.0,
        ),
        Plan(
            "int8-dynamic",
            "INT8 weights, activations quantized at run time (no calibration)",
            static=False,
            fallback={"encoder": "fp32", "decoder": "fp32"},
            check={"encoder": _INT8, "decoder": Tolerance(2.0, 0.98, 14 / 16)},
            weight_bytes=1.0,
        ),
        Plan(
            "w8a8",
            "every GEMM INT8: INT8 weights and activations, activation scales calibrated on real text",
            static=True,
            fallback={"encoder": "int8-fp16", "decoder": None},
            check={"encoder": _INT8},  # no decoder plan: see DECODER_PLANS
        ),
        Plan(
            "int8-fp16",
            "INT8 GEMMs where they keep the fidelity budget, FP16 weights and compute for the rest",
            static=True,
            fallback={"encoder": "fp16", "decoder": "fp16"},
            check={"encoder": _INT8, "decoder": Tolerance(2.0, 0.98, 14 / 16)},
        ),
        Plan(
            "a8w16",
            "INT8 activations at layer boundaries and an INT8 KV cache, weights and compute in FP16 (fp32 on CPUs)",
            static=False,  # decoders calibrate their K scales themselves (models.kv_cache); no Q/DQ graph
            fallback={"encoder": "fp16", "decoder": "fp32"},
            check={"encoder": _INT8, "decoder": Tolerance(0.1, 0.999, 14 / 16)},
            weight_bytes=4.0,
        ),
    )
}
NAMES = tuple(PLANS)
STATIC = tuple(name for name, p in PLANS.items() if p.static)
# Decoder bundles per runtime. TensorRT: fp32 graphs (fp16 is the builder flag) or explicit Q/DQ graphs.
DECODER_PLANS = {
    "onnxruntime": ("fp32", "fp16", "int8-dynamic", "a8w16"),
    "executorch": ("fp32", "a8w16"),
    "tensorrt": ("fp32", "fp16", "int8-fp16"),
    "openvino": ("fp32",),
}


def tolerance(name: str, family: str) -> dict:
    """The check.npz tolerance of plan ``name`` for ``family`` (encoder | decoder), as the manifest records it."""
    return PLANS[name].check[family].to_dict()


def fallback(name: str, family: str) -> str | None:
    """The plan a build tries when ``name`` breaks the fidelity budget (None: nothing below it)."""
    return PLANS[name].fallback.get(family)
