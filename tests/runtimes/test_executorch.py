"""ExecuTorch lowering: .pte files run in ExecuTorch's runtime (XNNPACK) and match eager PyTorch; per-layer int8 plans
hold their budget; Ethos-U lowers through TOSA + Vela and runs on the TOSA reference model; every shipped ExecuTorch
target builds a bundle from a tiny checkpoint.

Lowering is slow here (XNNPACK lowering costs ~3 s per delegated subgraph, ~11 subgraphs per encoder layer, on 2 shared
cores), so the tests lower 1-layer models, the default run holds one lowering per plan, and Ethos-U (3-8 min each) and
the other targets' bundles are ``slow``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="ExecuTorch is not installed (pip install 'edgepipe[executorch]')")

from edgepipe.build import build  # noqa: E402
from edgepipe.config import QuantizeConfig, Target, load_target, resolve_run_config  # noqa: E402
from edgepipe.data import batches, encode, load_tokenizer, read_sentences  # noqa: E402
from edgepipe.errors import BuildError  # noqa: E402
from edgepipe.runtimes import QuantInputs  # noqa: E402
from edgepipe.runtimes import executorch as et  # noqa: E402
from edgepipe.stages.validate import compare, embed_session, embed_torch  # noqa: E402
from tests.conftest import tiny_encoder  # noqa: E402

ETHOS_MISSING = et.ethos_tools_missing()
needs_ethos = pytest.mark.skipif(
    ETHOS_MISSING is not None, reason=f"Ethos-U toolchain absent ({ETHOS_MISSING}); pip install 'edgepipe[ethos-u]'"
)


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return load_tokenizer(teacher_dir / "tokenizer.json", 64)


@pytest.fixture(scope="module")
def batch(tok, sentences):
    return encode(tok, sentences[:12])


def _quant(tok, model, budget=0.01, n=32, method="minmax") -> QuantInputs:
    """Real calibration text and real held-back text, as the pipeline hands them over."""
    held = list(batches(tok, read_sentences("validation.txt", n), 16))
    return QuantInputs(
        calibration=list(batches(tok, read_sentences("calibration.txt", n), 16)),
        held_out=held,
        reference=embed_torch(model, held),
        config=QuantizeConfig(fidelity_budget=budget, method=method),
    )


@pytest.fixture(scope="module")
def fp32_pte(tmp_path_factory, batch):
    model = tiny_encoder(layers=1)
    out = tmp_path_factory.mktemp("et-fp32")
    return model, et.lower_encoder(model, batch, load_target("android-arm64"), "fp32", out)


def test_lower_encoder_fp32_matches_eager_in_the_executorch_runtime(fp32_pte, batch):
    model, lowered = fp32_pte
    assert lowered.files["model"].name == "model.pte"
    out = et.load(lowered.files["model"], load_target("android-arm64")).run(batch)["sentence_embedding"]
    np.testing.assert_allclose(out, embed_torch(model, [batch]), atol=1e-4)
    report = lowered.report
    assert set(report["delegation"]["backends"]) == {"XnnpackBackend"} and report["delegation"]["delegate_calls"] >= 1
    assert all(lp["delegated"] and lp["runs_as"] == "fp32" for lp in report["plan"])
    # attention's matmuls and softmax went into the delegate; LayerNorm and the embedding lookup did not (FACTS.md)
    outside = report["delegation"]["ops_outside"]
    assert not any("softmax" in op or "bmm" in op or "linear" in op for op in outside)
    assert any("layer_norm" in op for op in outside)
    assert report["seq_multiple_of"] == 1 and report["int8_coverage"]["total"] == 0.0


def test_session_takes_any_batch_and_sequence_length(fp32_pte, tok, sentences):
    model, lowered = fp32_pte
    session = et.load(lowered.files["model"])
    small = encode(tok, sentences[:3])
    small = {k: v[:, :5] for k, v in small.items()}
    np.testing.assert_allclose(session.run(small)["sentence_embedding"], embed_torch(model, [small]), atol=1e-4)
    big = encode(tok, (sentences * 2)[: et.MAX_BATCH + 6])  # over the exported batch bound: split by the session
    big = {k: v[:, :8] for k, v in big.items()}
    out = session.run(big)["sentence_embedding"]
    assert out.shape == (et.MAX_BATCH + 6, 64)
    np.testing.assert_allclose(out, embed_torch(model, [big]), atol=1e-4)


def test_lower_encoder_int8_dynamic_stays_close_on_real_text(tmp_path, tok, batch):
    model = tiny_encoder(layers=1)
    quant = _quant(tok, model)
    lowered = et.lower_encoder(model, batch, load_target("android-arm64"), "int8-dynamic", tmp_path, quant)
    out = embed_session(et.load(lowered.files["model"]), quant.held_out)
    assert compare(out, quant.reference)["min_cosine"] >= 0.97
    assert {lp["runs_as"] for lp in lowered.report["plan"]} == {"int8-dynamic"}
    assert lowered.report["int8_coverage"]["total"] == 1.0


def test_int8_fp16_moves_the_most_sensitive_layer_out_and_holds_the_budget(tmp_path, tok, batch):
    """An outlier channel in layer 0's attention output makes its out-projection the layer int8 hurts most."""
    model = tiny_encoder(layers=1)
    with torch.no_grad():
        model.layers[0].mixer.value.bias[3] = 40.0
    budget = 2e-5  # the tiny model shrugs off int8; a tight budget makes the search do real work
    quant = _quant(tok, model, budget=budget)
    lowered = et.lower_encoder(model, batch, load_target("android-arm64"), "int8-fp16", tmp_path, quant)
    report = lowered.report
    plan = {lp["layer"]: lp for lp in report["plan"]}
    assert report["budget"]["steps"][0]["drop"] > budget * et.SEARCH_MARGIN  # every Linear in int8 breaks it
    assert plan["layers.0.mixer.out"]["precision"] == "fp16" and plan["layers.0.mixer.out"]["runs_as"] == "fp16"
    assert "moved to hold the budget" in plan["layers.0.mixer.out"]["why"]
    assert plan["layers.0.ffn_in"]["runs_as"] == "int8" and plan["layers.0.ffn_in"]["delegated"]
    assert 0.5 < report["int8_coverage"]["total"] < 1.0  # 5 of 6 Linears, by FLOPs
    # the budget holds in the ExecuTorch runtime on real held-back text, not only in the PyTorch search
    out = embed_session(et.load(lowered.files["model"]), quant.held_out)
    assert 1.0 - compare(out, quant.reference)["mean_cosine"] <= budget
    assert report["budget"]["runtime_drop"] <= budget and report["float_dtype"] == "float16"


@pytest.mark.slow
@pytest.mark.parametrize("precision, min_cos", [("fp16", 0.999), ("w8a8", 0.97)])
def test_lower_encoder_fp16_and_w8a8_stay_close(tmp_path, tok, batch, precision, min_cos):
    model = tiny_encoder(layers=1)
    quant = _quant(tok, model)
    lowered = et.lower_encoder(model, batch, load_target("raspberry-pi-5"), precision, tmp_path, quant)
    out = embed_session(et.load(lowered.files["model"]), quant.held_out)
    assert compare(out, quant.reference)["min_cosine"] >= min_cos
    want = "fp16" if precision == "fp16" else "int8"
    assert all(lp["runs_as"] == want and lp["delegated"] for lp in lowered.report["plan"])


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-4), ("fp16", 2e-3)])
def test_narrow_student_with_its_projection_lowers_and_matches_eager(tmp_path, tok, batch, precision, atol):
    """A student narrower than its teacher: 40-wide stream, 64-wide attention, pooled state projected to 64."""
    from edgepipe.models.transformer import Encoder, EncoderConfig

    torch.manual_seed(0)
    model = Encoder(EncoderConfig(hidden=40, inner=64, output=64, layers=1, heads=4, ffn=128)).eval()
    lowered = et.lower_encoder(model, batch, load_target("android-arm64"), precision, tmp_path)
    out = et.load(lowered.files["model"]).run(batch)["sentence_embedding"]
    assert out.shape == (len(batch["input_ids"]), 64)
    np.testing.assert_allclose(out, embed_torch(model, [batch]), atol=atol)
    assert all(lp["delegated"] for lp in lowered.report["plan"])


def test_sentence_transformers_head_lowers_to_xnnpack_and_matches_eager(tmp_path, tok, batch):
    """max + CLS pooling concatenated, then a Dense layer (models.sbert's head), in the fp16 graph."""
    from edgepipe.models.transformer import DenseSpec, Encoder, EncoderConfig

    torch.manual_seed(0)
    dense = (DenseSpec(128, 48, True, "tanh"),)
    model = Encoder(EncoderConfig(hidden=64, layers=1, heads=4, ffn=128, pooling=("max", "cls"), dense=dense)).eval()
    lowered = et.lower_encoder(model, batch, load_target("android-arm64"), "fp16", tmp_path)
    out = et.load(lowered.files["model"]).run(batch)["sentence_embedding"]
    assert out.shape == (len(batch["input_ids"]), 48)
    assert compare(out, embed_torch(model, [batch]))["min_cosine"] > 0.999


def test_lower_encoder_rejects_a_precision_the_backend_cannot_lower(tmp_path, batch):
    with pytest.raises(BuildError, match="ethos-u55-128 .*cannot lower precision 'fp32'"):
        et.lower_encoder(tiny_encoder(layers=1), batch, load_target("ethos-u55-128"), "fp32", tmp_path)
    with pytest.raises(BuildError, match="needs calibration data"):
        et.lower_encoder(tiny_encoder(layers=1), batch, load_target("android-arm64"), "w8a8", tmp_path)


def test_check_delegation_names_op_layer_and_target_when_a_mixer_op_stays_on_the_cpu():
    delegation = {"outside_at": [("aten.embedding.default", "word_embeddings"), ("aten.bmm.default", "layers.1.mixer")]}
    target = load_target("ethos-u85-256")
    with pytest.raises(BuildError, match=r"aten\.bmm\.default in layers\.1\.mixer .*ethos-u85-256.*full delegation"):
        et.check_delegation(delegation, target, "ethos-u")
    relaxed = dataclasses.replace(
        target, runtime_options=dataclasses.replace(target.runtime_options, full_delegation=False)
    )
    et.check_delegation(delegation, relaxed, "ethos-u")  # CPU fallback accepted: no error


def test_where_each_backend_runs():
    assert et.can_run_here(load_target("android-arm64"))[0]
    assert not et.can_run_here(load_target("apple-coreml"))[0]
    assert not et.can_run_here(load_target("ethos-u55-128"))[0]
    assert not et.same_machine(load_target("ethos-u85-256"))
    pi = et.can_run_here(load_target("raspberry-pi-5"))[1]
    if et.host_arch() == "x86_64":  # this x86 machine validates Arm .pte files as a numeric proxy, times none
        assert "numeric proxy for aarch64" in pi and not et.same_machine(load_target("android-arm64"))
    elif et.host_arch() == "aarch64":
        assert "numeric proxy" not in pi and et.same_machine(load_target("android-arm64"))


def test_masked_softmax_attention_equals_full_attention():
    from edgepipe.attention.full import full_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    mask = torch.ones(2, 9)
    mask[1, 6:] = 0
    for causal in (False, True):
        torch.testing.assert_close(
            et.masked_softmax_attention(q, k, v, mask, causal), full_attention(q, k, v, mask, causal), atol=1e-5, rtol=0
        )


def test_masked_softmax_attention_takes_its_max_over_real_keys_only():
    """Padded keys that outscore every real key must not shift the exp (the default student's layer 0, at 128 tokens).

    With the max over all keys, exp(real - padded max) underflows here (scores 120 apart) and the row is 0/0; quantized,
    a far smaller gap already collapsed the normaliser and the Arm backend's int16 division (TOSA_UNPREDICTABLE).
    """
    from edgepipe.attention.full import full_attention

    torch.manual_seed(0)
    q, v = torch.ones(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    k = 0.1 * torch.randn(1, 2, 9, 16)
    k[..., 6:, :] = 30.0  # padded keys score 16 * 30 / 4 = 120 against ~0 for the real ones
    mask = torch.tensor([[1.0] * 6 + [0.0] * 3])
    got = et.masked_softmax_attention(q, k, v, mask)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, full_attention(q, k, v, mask), atol=1e-5, rtol=0)


def test_seq_multiple_follows_blocked_attention():
    assert et.seq_multiple(tiny_encoder(layers=1)) == 1
    assert et.seq_multiple(tiny_encoder("windowed:16", layers=1)) == 16
    assert et.seq_multiple(tiny_encoder("linear", layers=1)) == 1


@pytest.mark.slow
def test_windowed_attention_lowers_with_seq_a_multiple_of_the_window(tmp_path, tok, sentences):
    model = tiny_encoder("windowed:8", layers=1)
    example = encode(tok, sentences[:4])
    lowered = et.lower_encoder(model, example, load_target("android-arm64"), "fp32", tmp_path)
    assert lowered.report["seq_multiple_of"] == 8
    session = et.load(lowered.files["model"])
    ragged = {k: v[:, :13] for k, v in encode(tok, sentences[4:9]).items()}  # 13 tokens: the session pads to 16
    np.testing.assert_allclose(session.run(ragged)["sentence_embedding"], embed_torch(model, [ragged]), atol=1e-4)


# -- Ethos-U (the ethos-u extra) --------------------------------------------------------------------------------------
def _short(name: str, seq: int = 32, **options):
    target = load_target(name)
    return dataclasses.replace(
        target, runtime_options=dataclasses.replace(target.runtime_options, seq_len=seq, **options)
    )


@pytest.fixture(scope="module")
def tok32(teacher_dir):
    return load_tokenizer(teacher_dir / "tokenizer.json", 32)


@needs_ethos
@pytest.mark.slow
def test_ethos_u85_lowers_fully_delegated_and_runs_on_the_tosa_reference_model(tmp_path, tok32):
    model = tiny_encoder(layers=1)
    quant = _quant(tok32, model, n=16)
    lowered = et.lower_encoder(model, quant.calibration[0], _short("ethos-u85-256"), "int8-fp16", tmp_path, quant)
    report = lowered.report
    assert report["delegation"]["backends"].get("EthosUBackend", 0) >= 1
    assert not any("bmm" in op or "softmax" in op for op in report["delegation"]["ops_outside"])
    assert report["proxy"]["runtime"] == "TOSA reference model" and report["proxy"]["samples"] == 16
    assert report["proxy"]["vs_pytorch"]["mean_cosine"] >= 0.99
    outputs = np.load(tmp_path / report["proxy"]["outputs"])
    assert compare(outputs, quant.reference)["mean_cosine"] == report["proxy"]["vs_pytorch"]["mean_cosine"]
    vela = report["vela"]
    assert vela["npu_cycles"] > 0 and vela["npu_inference_ms"] > 0 and vela["peak_sram_kib"] > 0
    assert vela["accelerator"] == "Ethos_U85_256"


@needs_ethos
@pytest.mark.slow
def test_ethos_u55_keeps_int16_attention_matmuls_on_the_cpu_and_fails_when_full_delegation_is_required(tmp_path, tok32):
    """U55 has no int16 activation x activation matmul: int8-fp16's a16w8 attention falls back to the Cortex-M."""
    model = tiny_encoder(layers=1)
    quant = _quant(tok32, model, n=16)
    target = _short("ethos-u55-128", full_delegation=True)
    with pytest.raises(BuildError, match=r"aten\.bmm.* in layers\.0\.mixer .*ethos-u55-128"):
        et.lower_encoder(model, quant.calibration[0], target, "int8-fp16", tmp_path, quant)


# -- bundles ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_layer_checkpoint(tmp_path_factory, teacher_dir):
    """Like conftest's one_layer_checkpoint with one layer: every bundle here lowers it once or twice."""
    from edgepipe.models.hf import save_encoder

    return save_encoder(tiny_encoder(layers=1), tmp_path_factory.mktemp("tiny-bert-1"), teacher_dir / "tokenizer.json")


FAST = ("validate.samples=32", "validate.max_len=32", "quantize.samples=32", "quantize.max_len=32")


def _bundle(ckpt, out, target, precision=None):
    cfg = resolve_run_config(str(ckpt), target, precision, out, FAST)
    return build(cfg)


def _check_xnnpack_bundle(bundle):
    from edgepipe.bundle import check_bundle

    m = bundle.manifest
    assert m["runtime"] == "executorch" and m["graphs"] == {"model": "model.pte"}
    assert {p.name for p in bundle.path.iterdir()} == {"model.pte", "manifest.json", "tokenizer.json", "check.npz"}
    assert m["validation"]["held_out"]["runtime"] == "executorch"
    # the recorded fidelity is what the .pte does: run it again here on the same held-back text, against PyTorch
    from edgepipe.models.hf import load_encoder

    v = m["recipe"]["validate"]
    held = list(
        batches(load_tokenizer(bundle.path / "tokenizer.json", v["max_len"]), read_sentences(v["data"], 32), 32)
    )
    session = et.load(bundle.path / "model.pte", Target.from_dict(m["target"]))
    again = compare(embed_session(session, held), embed_torch(load_encoder(m["source_model"]["path"]), held))
    assert again["mean_cosine"] == pytest.approx(m["fidelity"]["lowered_vs_pytorch"]["mean_cosine"], abs=1e-5)
    assert m["precision"] == m["requested_precision"]  # the plan itself held the budget: no fallback
    assert 1.0 - again["mean_cosine"] <= m["recipe"]["quantize"]["fidelity_budget"]
    assert m["lowering"]["delegation"]["delegate_calls"] > 0
    report = check_bundle(bundle.path)  # check.npz run again from the bundle, in ExecuTorch's runtime
    assert report.passed


def test_build_android_arm64_bundle_validated_in_executorch(tmp_path, one_layer_checkpoint):
    bundle = _bundle(one_layer_checkpoint, tmp_path / "out", "android-arm64", "int8-dynamic")
    _check_xnnpack_bundle(bundle)
    assert bundle.manifest["lowering"]["int8_coverage"]["total"] == 1.0


@pytest.mark.slow
def test_build_raspberry_pi_5_bundle_at_its_default_plan(tmp_path, one_layer_checkpoint):
    bundle = _bundle(one_layer_checkpoint, tmp_path / "out", "raspberry-pi-5")
    assert bundle.manifest["precision"] == "int8-fp16"
    _check_xnnpack_bundle(bundle)
    assert bundle.manifest["lowering"]["budget"]["runtime_drop"] <= 0.01


@pytest.mark.slow
def test_build_apple_coreml_bundle_is_lowered_but_not_validated_here(tmp_path, one_layer_checkpoint):
    pytest.importorskip("coremltools", reason="coremltools is not installed (Core ML lowering needs it)")
    bundle = _bundle(one_layer_checkpoint, tmp_path / "out", "apple-coreml")
    m = bundle.manifest
    assert m["lowering"]["delegation"]["backends"].get("CoreMLBackend", 0) >= 1
    assert m["validation"]["held_out"]["runtime"] == "not run here"
    assert "Apple hardware" in m["validation"]["held_out"]["why"]
    # the fp16 .pte never ran: no cosine is claimed for it (not the PyTorch model's fp32 one either)
    assert m["fidelity"]["lowered"]["not_validated"].startswith("not validated here: Core ML runs only on Apple")
    assert m["validation"]["held_out"]["vs_teacher"] is None and m["fidelity"]["lowered_vs_pytorch"] is None


@needs_ethos
@pytest.mark.slow
@pytest.mark.parametrize("target", ["ethos-u55-128", "ethos-u85-256"])
def test_build_ethos_u_bundle_validated_on_the_tosa_reference_model(tmp_path, one_layer_checkpoint, target):
    bundle = _bundle(one_layer_checkpoint, tmp_path / "out", target)
    m = bundle.manifest
    assert {p.name for p in bundle.path.iterdir()} == {"model.pte", "manifest.json", "tokenizer.json", "check.npz"}
    assert m["validation"]["held_out"]["runtime"] == "TOSA reference model"
    assert m["fidelity"]["lowered_vs_pytorch"]["mean_cosine"] >= 0.99
    assert m["lowering"]["vela"]["npu_cycles"] > 0
