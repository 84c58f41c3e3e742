"""OpenVINO lowering: the plain export converted to IR runs in OpenVINO's CPU plugin and matches eager PyTorch on
real text, at every plan this CPU can run; the bundle runs in the device runner; host-cpu's candidates include it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ov = pytest.importorskip("openvino", reason="the openvino extra is not installed")

from edgepipe.config import QuantizeConfig, load_target  # noqa: E402
from edgepipe.data import batches, encode, load_tokenizer, read_sentences  # noqa: E402
from edgepipe.errors import BuildError, UsageError  # noqa: E402
from edgepipe.runtimes import QuantInputs, cpu_has_bf16  # noqa: E402
from edgepipe.runtimes import openvino as ov_rt  # noqa: E402
from edgepipe.stages.validate import compare, embed_session, embed_torch  # noqa: E402
from tests.conftest import tiny_encoder  # noqa: E402

NO_BF16 = "this CPU has no native bf16 (avx512_bf16 / amx_bf16 not in /proc/cpuinfo)"


@pytest.fixture(scope="module")
def tok(teacher_dir):
    return load_tokenizer(teacher_dir / "tokenizer.json", 64)


@pytest.fixture(scope="module")
def batch(tok, sentences):
    return encode(tok, sentences[:12])


@pytest.fixture(scope="module")
def quant_inputs(tok):
    """Real calibration text (32 sentences of calibration.txt) and held-back text (64 of validation.txt) for a
    one-layer tiny encoder (6 weight GEMMs: NNCF and the per-layer plan stay quick)."""
    model = tiny_encoder(layers=1)
    held = list(batches(tok, read_sentences("validation.txt", 64), 32))
    return model, QuantInputs(
        calibration=list(batches(tok, read_sentences("calibration.txt", 32), 32)),
        held_out=held,
        reference=embed_torch(model, held),
        config=QuantizeConfig(fidelity_budget=2e-5),
    )


def _lower(tmp_path, model, batch, precision, quant=None):
    return ov_rt.lower_encoder(model, batch, load_target("intel-cpu"), precision, tmp_path, quant)


def test_lower_encoder_fp32_writes_ir_and_matches_eager(tmp_path, batch):
    model = tiny_encoder()
    lowered = _lower(tmp_path, model, batch, "fp32")
    assert {p.name for p in lowered.files.values()} == {"model.xml", "model.bin"}
    assert not list(tmp_path.glob("*.onnx"))  # the plain export is a temporary
    assert lowered.report["inference_precision"] == "f32"
    assert lowered.report["ops"].get("ScaledDotProductAttention") == 2  # OpenVINO fused the attention itself
    session = ov_rt.load(lowered.files["model"])
    assert session.inference_precision == "f32"
    out = session.run(batch)["sentence_embedding"]
    np.testing.assert_allclose(out, embed_torch(model, [batch]), atol=1e-5)
    small = session.run({k: v[:3, :5] for k, v in batch.items()})["sentence_embedding"]  # dynamic batch and seq
    assert small.shape == (3, 64)


def test_lower_encoder_w8a8_quantizes_every_weight_gemm_with_nncf(tmp_path, batch, quant_inputs):
    model, quant = quant_inputs
    lowered = _lower(tmp_path, model, batch, "w8a8", quant)
    coverage = lowered.report["int8_coverage"]
    assert coverage["total"] == 1.0 and len(coverage["layers"]) == 6  # q, k, v, out, ffn in, ffn out
    assert [lp["runs_as"] for lp in lowered.report["plan"]] == ["int8"] * 6  # the plan `edgepipe inspect` prints
    assert lowered.report["quantization"]["tool"].startswith("nncf ")
    assert lowered.report["calibration"]["samples"] == 32
    assert lowered.report["ops"].get("FakeQuantize", 0) >= 4  # on the activations (q, k, v share one)
    fp32_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if "layers." in n)
    float_bin = _lower(tmp_path / "fp32", model, batch, "fp32").files["weights"].stat().st_size
    assert float_bin - lowered.files["weights"].stat().st_size > 0.6 * fp32_bytes  # the GEMM weights are int8
    out = embed_session(ov_rt.load(lowered.files["model"]), quant.held_out)
    assert compare(out, quant.reference)["mean_cosine"] > 0.97


def test_lower_encoder_int8_fp16_moves_layers_to_fp32_until_the_budget_holds(tmp_path, batch, quant_inputs):
    model, quant = quant_inputs
    lowered = _lower(tmp_path, model, batch, "int8-fp16", quant)
    out = embed_session(ov_rt.load(lowered.files["model"]), quant.held_out)
    drop = 1 - compare(out, quant.reference)["mean_cosine"]
    budget = lowered.report["budget"]
    assert drop <= quant.config.fidelity_budget + 1e-6 and abs(drop - budget["drop"]) < 1e-5  # the IR is the plan
    plan = {lp["layer"]: lp for lp in lowered.report["plan"]}
    runs = lowered.report["int8_coverage"]["layers"]
    assert {layer: lp["runs_as"] for layer, lp in plan.items()} == runs  # what the IR runs is what was planned
    moved = [lp for lp in plan.values() if lp["precision"] == "fp32"]
    assert moved and "int8" in runs.values()  # this budget needs a mixed plan: some layers moved, some kept
    assert all("most sensitive" in lp["why"] for lp in moved) and budget["steps"][0]["int8_layers"] == 6


@pytest.mark.skipif(cpu_has_bf16(), reason="this CPU has native bf16: the refusal does not apply")
def test_bf16_is_refused_in_one_line_without_native_bf16(tmp_path, batch):
    with pytest.raises(UsageError, match=r"bf16 needs a CPU with native bf16 .* has neither") as exc:
        _lower(tmp_path, tiny_encoder(), batch, "bf16")
    assert "\n" not in str(exc.value) and not list(tmp_path.iterdir())  # nothing written


@pytest.mark.skipif(not cpu_has_bf16(), reason=NO_BF16)
def test_bf16_runs_in_bf16_and_stays_within_its_tolerance(tmp_path, batch):
    model = tiny_encoder()
    lowered = _lower(tmp_path, model, batch, "bf16")
    session = ov_rt.load(lowered.files["model"])
    assert session.inference_precision == "bf16"
    out = session.run(batch)["sentence_embedding"]
    result = compare(out, embed_torch(model, [batch]))
    assert result["max_abs"] < 2e-2 and result["min_cosine"] > 0.999
    assert result["max_abs"] > 0  # really bf16, not the f32 it falls back to silently


def test_lower_encoder_rejects_unknown_precision(tmp_path, batch):
    with pytest.raises(BuildError, match="cannot lower precision 'int8-dynamic'"):
        _lower(tmp_path, tiny_encoder(), batch, "int8-dynamic")


# -- bundles: the intel-cpu build, the device runner, the CLI ------------------------------------------------------
FAST = ("validate.samples=48", "validate.max_len=64", "quantize.samples=32")


@pytest.fixture(scope="module")
def ov_cache(tmp_path_factory):
    """One stage cache for this module's builds of the tiny checkpoint: intel-cpu's w8a8 stages are host-cpu's
    openvino:w8a8 candidate's (same model, runtime table, plan and calibration), so NNCF runs once."""
    return tmp_path_factory.mktemp("ov-cache")


@pytest.fixture(scope="module")
def ov_bundle(tmp_path_factory, tiny_checkpoint, ov_cache):
    """An intel-cpu bundle of the tiny checkpoint at the target's default plan (w8a8), built by the real pipeline."""
    from edgepipe.build import build
    from edgepipe.config import resolve_run_config

    out = tmp_path_factory.mktemp("ov-out")
    return build(resolve_run_config(str(tiny_checkpoint), "intel-cpu", None, out, FAST), cache_root=ov_cache).path


def test_intel_cpu_bundle_holds_the_int8_ir_and_passes_its_check(ov_bundle):
    from edgepipe.bundle import check_bundle, open_bundle

    manifest = open_bundle(ov_bundle)  # every sha256, model.xml and model.bin included
    assert {"model.xml", "model.bin", "check.npz", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["runtime"] == "openvino" and manifest["graphs"] == {"model": "model.xml"}
    assert manifest["precision"] == "w8a8" and manifest["lowering"]["int8_coverage"]["total"] == 1.0
    assert ov.__version__.startswith(manifest["versions"]["openvino"]) and "nncf" in manifest["versions"]
    assert manifest["lowering"]["inference_precision"] == "f32"  # the float parts, even on a bf16 CPU
    assert manifest["validation"]["held_out"]["runtime"] == "openvino"
    assert manifest["fidelity"]["lowered_vs_pytorch"]["mean_cosine"] > 0.99
    assert manifest["latency"]["p50_ms"] > 0  # timed here: intel-cpu is any x86-64 CPU
    report = check_bundle(ov_bundle)
    assert report.passed and report.result["min_cosine"] > 0.99


def test_the_python_api_encodes_text_with_an_openvino_bundle(ov_bundle, sentences):
    import edgepipe

    loaded = edgepipe.load(ov_bundle)
    out = loaded.encode(sentences[:5])
    assert out.shape == (5, 64) and "openvino" in repr(loaded)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)


def test_runner_runs_an_openvino_bundle_with_only_numpy_and_openvino(ov_bundle, tmp_path):
    import json
    import shutil
    import subprocess
    import sys

    from edgepipe.harness import runner
    from tests.harness.test_runner import BLOCKED_RUN

    alone = tmp_path / "device" / "runner.py"
    alone.parent.mkdir()
    for shipped in ("runner.py", *runner.SHIPPED):  # what deploy copies to a device
        shutil.copy(Path(runner.__file__).with_name(shipped), alone.with_name(shipped))
    out = tmp_path / "r.json"
    argv = [sys.executable, "-I", "-c", BLOCKED_RUN, str(alone), str(ov_bundle)]
    done = subprocess.run(
        [*argv, "--runs", "10", "--warmup", "2", "--threads", "1", "--seq", "24", "--profile", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    record = json.loads(out.read_text())
    assert record["check"]["passed"] and record["check"]["min_cosine"] > 0.99
    assert record["env"]["runtime"]["name"] == "openvino" and ov.__version__.startswith(
        record["env"]["runtime"]["version"]
    )
    assert record["env"]["runtime"]["inference_precision"] == "f32" and record["env"]["runtime"]["threads"] == 1
    assert record["inputs"]["input_ids"]["shape"][1] == 24 and 0 < record["latency_ms"]["p50"]
    profile = record["profile"]  # OpenVINO's per-node performance counters: where the time goes
    assert profile["source"] == "openvino performance counters" and profile["top_ops"]
    assert any(t["type"] in ("FullyConnected", "MatMul") for t in profile["types"])
    verify = subprocess.run([*argv, "--verify"], capture_output=True, text=True, timeout=300)
    assert verify.returncode == 0 and json.loads(verify.stdout)["runtime"]["importable"]


def test_cli_builds_intel_cpu_and_inspects_checks_benches_and_compares_it(tmp_path, tiny_checkpoint):
    from tests.test_cli import run

    out, results = tmp_path / "out", tmp_path / "results"
    sets = [a for kv in FAST for a in ("--set", kv)]
    built = run(
        "build",
        "--model",
        str(tiny_checkpoint),
        "--target",
        "intel-cpu",
        "--precision",
        "fp32",
        "--out",
        str(out),
        *sets,
    )
    assert built.returncode == 0, built.stderr
    bundle = out / tiny_checkpoint.name / "intel-cpu"
    inspected = run("inspect", str(bundle))
    assert inspected.returncode == 0 and "openvino / fp32" in inspected.stdout and "model.bin" in inspected.stdout
    checked = run("check", str(bundle))
    assert checked.returncode == 0 and "check passed (openvino, fp32)" in checked.stdout
    benched = run("bench", str(bundle), "--device", "local", "--runs", "5", "--warmup", "1", "--results", str(results))
    assert benched.returncode == 0, benched.stderr
    compared = run("compare", *map(str, results.glob("*.json")))
    assert compared.returncode == 0 and "intel-cpu" in compared.stdout and "fp32" in compared.stdout


def test_lower_decoder_graphs_run_in_openvino_and_match_pytorch(tmp_path, sentences):
    import torch

    from edgepipe.harness.runner import DecoderGraphs
    from edgepipe.runtimes.decoder_graphs import graph_io, prefill_tokens
    from tests.models.test_decoder import tiny_decoder

    model = tiny_decoder(max_context=128)
    lowered = ov_rt.lower_decoder(model, load_target("intel-cpu"), "fp32", tmp_path)
    assert {p.name for p in lowered.files.values()} == {"prefill.xml", "prefill.bin", "decode.xml", "decode.bin"}
    chunk = prefill_tokens(model)
    manifest = {
        "runtime": "openvino",
        "target": load_target("intel-cpu").to_dict(),
        "io": graph_io(model, chunk),
        "decoder": {"prefill_tokens": chunk},
        "graphs": {g: lowered.files[g].name for g in ("prefill", "decode")},
    }
    graphs = DecoderGraphs(str(tmp_path), manifest, threads=None)
    text = np.frombuffer(" ".join(sentences[:3]).encode(), np.uint8).astype(np.int64)[: chunk + 7]  # real bytes
    logits, _ = graphs.feed(text[None], 0, graphs.init_state())
    assert graphs.calls == {"prefill": 1, "decode": 7}  # one prefill chunk, then decode steps
    with torch.no_grad():
        want = model(torch.from_numpy(text[None]))[:, -1].numpy()
    np.testing.assert_allclose(logits, want, atol=1e-4)
    with pytest.raises(UsageError, match="'int8-dynamic' is not available on openvino"):
        ov_rt.lower_decoder(model, load_target("intel-cpu"), "int8-dynamic", tmp_path / "q")


@pytest.mark.slow  # pretrains a tiny LM (~30 s alone, minutes on a shared machine); the graphs: the test above
def test_decoder_bundle_lowers_prefill_and_decode_to_openvino_and_generates_pytorchs_tokens(tmp_path):
    import torch
    from tokenizers import Tokenizer

    from edgepipe.build import build
    from edgepipe.bundle import check_bundle, generate
    from edgepipe.config import resolve_run_config
    from edgepipe.models.decoder import generate as generate_eager
    from edgepipe.models.hf_decoders import load_decoder
    from tests.build.test_decoder_build import PROMPT, TINY_LM

    recipe = tmp_path / "tiny-lm.toml"
    recipe.write_text(TINY_LM)
    bundle = build(resolve_run_config(str(recipe), "intel-cpu", None, tmp_path / "out"))
    m = bundle.manifest
    assert m["runtime"] == "openvino" and m["precision"] == "fp32"  # decoders: fp32 unless asked
    assert {"prefill.xml", "prefill.bin", "decode.xml", "decode.bin"} <= set(m["files"])
    lowered, model = m["fidelity"]["lowered"], m["fidelity"]["model"]
    assert lowered["top1_vs_pytorch"] == 1.0  # teacher-forced through the graphs' KV cache, in OpenVINO
    assert lowered["perplexity"] == pytest.approx(model["perplexity"], rel=1e-4)
    assert check_bundle(bundle.path).passed
    out = generate(bundle.path, PROMPT, max_new_tokens=12)
    tok = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
    eager = load_decoder(m["source_model"]["path"], max_context=128)
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    want = generate_eager(eager, torch.tensor([ids]), 12)[0, len(ids) :].tolist()
    eos = m["decoder"]["eos_id"]
    assert out.tokens == (want[: want.index(eos) + 1] if eos in want else want)


# -- host-cpu: the fastest candidate on this machine ships ---------------------------------------------------------
def test_host_cpu_ships_the_fastest_candidate_measured_here(tmp_path, tiny_checkpoint, ov_bundle, ov_cache):
    from edgepipe.build import build
    from edgepipe.bundle import check_bundle
    from edgepipe.config import resolve_run_config

    cfg = resolve_run_config(str(tiny_checkpoint), "host-cpu", None, tmp_path / "out", FAST)
    assert cfg.select_runtime
    bundle = build(cfg, cache_root=ov_cache)
    lowered = [r for r in bundle.manifest["stages"] if r["stage"] == "lower"]
    assert any(r["cache_hit"] and r["config"]["precision"] == "w8a8" for r in lowered)  # intel-cpu's w8a8 stage
    sel = bundle.manifest["selection"]
    rows = {r["candidate"]: r for r in sel["candidates"]}
    assert list(rows) == list(load_target("host-cpu").candidates)
    if cpu_has_bf16():
        assert "left_out" not in rows["openvino:bf16"] or "drop" in rows["openvino:bf16"]["left_out"]
    else:  # recorded as not available on this CPU, in one line, and the build goes on
        assert "bf16 needs a CPU with native bf16" in rows["openvino:bf16"]["left_out"]
    assert "p50_ms" in rows["openvino:w8a8"] and "p50_ms" in rows["openvino:fp32"]  # measured in OpenVINO here
    inside = {c: r["p50_ms"] for c, r in rows.items() if "left_out" not in r}
    assert sel["winner"] == min(inside, key=inside.get)
    runtime, precision = sel["winner"].split(":")
    assert (bundle.manifest["runtime"], bundle.manifest["precision"]) == (runtime, precision)
    assert check_bundle(bundle.path).passed  # the bundle runs as the winner's runtime


def test_targets_lists_host_cpus_candidates(tmp_path):
    from tests.test_cli import run

    listed = run("targets")
    assert listed.returncode == 0 and "intel-cpu" in listed.stdout
    text = " ".join(listed.stdout.split())
    assert "host-cpu without --precision ships the fastest inside the budget of" in text and "openvino:w8a8" in text
    assert ("openvino:bf16 (no native bf16 on this CPU)" in text) == (not cpu_has_bf16())


# -- the real teacher ----------------------------------------------------------------------------------------------
def test_the_real_teacher_in_openvino_matches_pytorch_on_held_back_text(tmp_path, teacher_dir, tok):
    from edgepipe.models.hf import load_encoder

    teacher = load_encoder(teacher_dir)
    held = list(batches(tok, read_sentences("validation.txt", 64), 32))
    lowered = _lower(tmp_path, teacher, held[0], "fp32")
    assert lowered.report["ops"].get("ScaledDotProductAttention") == 6  # one per layer: OpenVINO fused each
    out = embed_session(ov_rt.load(lowered.files["model"]), held)
    result = compare(out, embed_torch(teacher, held))
    assert result["max_abs"] < 1e-4 and result["min_cosine"] > 0.99999


@pytest.mark.slow  # NNCF calibrates the 22M-parameter teacher on 256 sentences (minutes on 2 shared cores)
def test_the_real_teacher_at_w8a8_keeps_the_int8_tolerance(tmp_path, teacher_dir, tok):
    from edgepipe.models.hf import load_encoder

    teacher = load_encoder(teacher_dir)
    held = list(batches(tok, read_sentences("validation.txt", 128), 32))
    quant = QuantInputs(
        calibration=list(batches(tok, read_sentences("calibration.txt", 256), 32)),
        held_out=held,
        reference=embed_torch(teacher, held),
        config=QuantizeConfig(),
    )
    lowered = _lower(tmp_path, teacher, held[0], "w8a8", quant)
    assert lowered.report["int8_coverage"]["total"] == 1.0 and len(lowered.report["plan"]) == 36
    result = compare(embed_session(ov_rt.load(lowered.files["model"]), held), quant.reference)
    assert result["mean_cosine"] > 0.99 and result["min_cosine"] > 0.97
