"""Foreign Hugging Face checkpoints through Optimum: routing, then real exports checked against transformers.

The routing and missing-extra tests run everywhere. The export tests run where their extra is installed, each in
its own environment (their transformers pins differ, see README):

    pip install -e ".[optimum,test]"            -> pytest tests/test_optimum.py   (host-cpu, TensorRT Q/DQ)
    pip install -e ".[optimum-executorch,test]" -> pytest tests/test_optimum.py   (ExecuTorch .pte)

Checkpoints are tiny, seeded and saved with transformers in the test (DistilBERT, GPT-2, ViT); inputs are real text
from calibration_data/ and crops of the photos scikit-learn ships.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

from edgepipe.build import build
from edgepipe.build.route import choose_route
from edgepipe.bundle import check_bundle
from edgepipe.config import resolve_run_config
from edgepipe.errors import BuildError, MissingExtraError, UsageError

REPO = Path(__file__).resolve().parents[2]
FAST = ("validate.samples=16", "validate.max_len=32", "quantize.samples=16")


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


HAS_ONNX_EXPORTER = _has("optimum.exporters.onnx")
HAS_ET_EXPORTER = _has("optimum.exporters.executorch")
needs_optimum = pytest.mark.skipif(
    not HAS_ONNX_EXPORTER, reason='needs the optimum extra: pip install "edgepipe[optimum]"'
)
needs_optimum_et = pytest.mark.skipif(
    not HAS_ET_EXPORTER, reason='needs the optimum-executorch extra: pip install "edgepipe[optimum-executorch]"'
)


# ------------------------------------------------------------------------------------------------ checkpoints
def _save_distilbert(path: Path, tokenizer_dir: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(
        vocab_size=30522, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=128
    )
    transformers.DistilBertForMaskedLM(cfg).eval().save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(path)
    return path


def _save_gpt2(path: Path) -> Path:
    """GPT-2 with a 512-token byte-level BPE trained on calibration_data/train.txt."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    path.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    lines = (REPO / "edgepipe" / "calibration_data" / "train.txt").read_text(encoding="utf-8").splitlines()[:2000]
    bpe.train_from_iterator(lines, vocab_size=512, min_frequency=2, special_tokens=["<|endoftext|>"])
    bpe.save(str(path / "tokenizer.json"))
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), **special)
    assert len(tok) == 512  # what the model's embedding table is sized for
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _save_vit(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        num_labels=10,
    )
    transformers.ViTForImageClassification(cfg).eval().save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def foreign(tmp_path_factory, teacher_dir) -> dict[str, Path]:
    """Tiny seeded checkpoints saved with transformers: distilbert (masked LM), gpt2 (causal LM), vit (classifier)."""
    pytest.importorskip("transformers", reason="needs transformers to save checkpoints")
    root = tmp_path_factory.mktemp("foreign")
    return {
        "distilbert": _save_distilbert(root / "distilbert", teacher_dir),
        "gpt2": _save_gpt2(root / "gpt2"),
        "vit": _save_vit(root / "vit"),
    }


def _config_only(tmp_path: Path, model_type: str, arch: str) -> Path:
    """A checkpoint directory with only config.json: enough to route, nothing to export."""
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [arch]}))
    return path


def _build(ckpt: Path, target: str, out: Path, precision: str | None = None, task: str | None = None):
    cfg = resolve_run_config(str(ckpt), target, precision, out, FAST, task=task)
    return build(cfg)


# ----------------------------------------------------------------------------------------- routing (anywhere)
def test_choose_route_keeps_bert_checkpoints_on_edgepipe(tmp_path, tiny_checkpoint):
    cfg = resolve_run_config(str(tiny_checkpoint), "host-cpu", "fp32", tmp_path)
    route = choose_route(cfg, tiny_checkpoint)
    assert route.path == "edgepipe" and "re-implemented by edgepipe" in route.why


def test_choose_route_sends_other_architectures_to_optimum(tmp_path):
    ckpt = _config_only(tmp_path, "gpt2", "GPT2LMHeadModel")
    route = choose_route(resolve_run_config(str(ckpt), "host-cpu", None, tmp_path), ckpt)
    assert (route.path, route.model_type) == ("optimum", "gpt2")
    assert "'gpt2' is not one edgepipe re-implements (bert)" in route.why


def test_choose_route_sends_bert_with_a_task_to_optimum(tmp_path, tiny_checkpoint):
    cfg = resolve_run_config(str(tiny_checkpoint), "host-cpu", None, tmp_path, task="fill-mask")
    route = choose_route(cfg, tiny_checkpoint)
    assert route.path == "optimum" and "--task fill-mask" in route.why


def test_choose_route_keeps_a_bert_task_head_through_optimum(tmp_path):
    ckpt = _config_only(tmp_path, "bert", "BertForSequenceClassification")
    route = choose_route(resolve_run_config(str(ckpt), "host-cpu", None, tmp_path), ckpt)
    assert (route.path, route.model_type) == ("optimum", "bert")
    assert "BertForSequenceClassification has a task head: Optimum exports it with the head" in route.why


def test_bert_task_head_with_sentence_similarity_says_in_one_line_it_is_dropped(tmp_path, tiny_checkpoint):
    import shutil

    from click.testing import CliRunner

    from edgepipe.cli import cli

    ckpt = shutil.copytree(tiny_checkpoint, tmp_path / "bert-cls")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "architectures": ["BertForSequenceClassification"]}))
    args = ["build", "--model", str(ckpt), "--task", "sentence-similarity", "--precision", "fp32"]
    result = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "out"), *(f"--set={o}" for o in FAST)])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("!") and "task head is dropped" in line]
    assert len(notes) == 1 and "BertForSequenceClassification's task head is dropped" in notes[0]
    manifest = json.loads((tmp_path / "out" / "bert-cls" / "host-cpu" / "manifest.json").read_text())
    assert manifest["route"]["path"] == "edgepipe" and "task head is dropped" in manifest["route"]["why"]


def test_task_with_a_recipe_is_a_usage_error(tmp_path):
    cfg = resolve_run_config("minilm-teacher", "host-cpu", None, tmp_path, task="fill-mask")
    with pytest.raises(UsageError, match="--task fill-mask applies to checkpoint directories"):
        build(cfg)


def test_bert_bundle_records_the_edgepipe_route(tmp_path, tiny_checkpoint):
    bundle = _build(tiny_checkpoint, "host-cpu", tmp_path / "out", "fp32")
    assert bundle.manifest["route"]["path"] == "edgepipe"
    assert "model_type 'bert'" in bundle.manifest["route"]["why"]


@pytest.mark.skipif(HAS_ONNX_EXPORTER, reason="optimum-onnx is installed here")
def test_build_names_the_optimum_extra_when_it_is_missing(tmp_path):
    ckpt = _config_only(tmp_path, "gpt2", "GPT2LMHeadModel")
    with pytest.raises(MissingExtraError, match="optimum-onnx") as info:
        _build(ckpt, "host-cpu", tmp_path / "out")
    assert info.value.extra == "optimum" and 'edgepipe[optimum]"' in info.value.hint


@pytest.mark.skipif(HAS_ET_EXPORTER, reason="optimum-executorch is installed here")
def test_build_names_the_executorch_extra_when_it_is_missing(tmp_path):
    ckpt = _config_only(tmp_path, "gpt2", "GPT2LMHeadModel")
    with pytest.raises(MissingExtraError, match="optimum-executorch") as info:
        _build(ckpt, "android-arm64", tmp_path / "out", "fp32")
    assert info.value.extra == "optimum-executorch"


# --------------------------------------------------------------------------------- ONNX Runtime and TensorRT
def _assert_real_inputs(bundle: Path, ckpt: Path, name: str) -> None:
    """check.npz holds real held-back text (decodes back to calibration_data/validation.txt) or real photos."""
    import transformers

    from edgepipe.data import read_sentences

    data = np.load(bundle / "check.npz")
    if name == "vit":
        pixels = data["input.pixel_values"]
        assert pixels.shape[1:] == (3, 32, 32) and pixels.std() > 0.1  # photo crops, normalised
        return
    tok = transformers.AutoTokenizer.from_pretrained(str(bundle))  # the bundle's own tokenizer files
    text = tok.decode(data["input.input_ids"][0], skip_special_tokens=True)
    first = read_sentences("validation.txt", 1)[0]
    words = [re.findall(r"[a-z]+", t.lower())[:4] for t in (first, text)]  # tokenizers re-space punctuation
    assert words[0] == words[1]
    assert (bundle / "tokenizer.json").is_file() and (ckpt / "tokenizer.json").is_file()


@needs_optimum
@pytest.mark.parametrize("name", ["distilbert", "gpt2", "vit"])
def test_foreign_checkpoint_builds_for_host_cpu_within_1e4_of_transformers(tmp_path, foreign, name):
    bundle = _build(foreign[name], "host-cpu", tmp_path / "out", "fp32")
    m = bundle.manifest
    assert m["route"]["path"] == "optimum" and m["route"]["model_type"] == name
    assert [r["stage"] for r in m["stages"]] == ["optimum_export", "lower", "validate", "latency"]
    assert m["io"]["inputs"][0]["name"] == ("pixel_values" if name == "vit" else "input_ids")
    assert m["fidelity"]["lowered_vs_pytorch"]["max_abs"] < 1e-4
    preprocessing = "preprocessor_config.json" if name == "vit" else "tokenizer.json"
    assert preprocessing in m["files"] and "model.onnx" in m["files"]
    _assert_real_inputs(bundle.path, foreign[name], name)
    report = check_bundle(bundle.path)  # the bundle's check.npz in onnxruntime vs transformers' outputs
    assert report.passed and report.result["max_abs_error"] < 1e-4


@needs_optimum
def test_bert_classifier_keeps_its_head_and_gives_transformers_logits(tmp_path, teacher_dir):
    import torch
    import transformers

    from edgepipe.data import read_sentences
    from edgepipe.runtimes import onnxruntime as ort_rt

    torch.manual_seed(0)
    ckpt = tmp_path / "bert-cls"
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3
    )
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(ckpt)
    tok = transformers.AutoTokenizer.from_pretrained(str(teacher_dir))
    tok.save_pretrained(ckpt)
    bundle = _build(ckpt, "host-cpu", tmp_path / "out", "fp32")
    m = bundle.manifest
    assert m["route"]["path"] == "optimum" and "task head" in m["route"]["why"]
    assert [o["name"] for o in m["io"]["outputs"]] == ["logits"]
    text = read_sentences("calibration.txt", 8)
    enc = tok(text, padding=True, truncation=True, max_length=32, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    names = {i["name"] for i in m["io"]["inputs"]}
    out = ort_rt.load(bundle.path / "model.onnx").run({k: v for k, v in feeds.items() if k in names})["logits"]
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    assert out.shape == (8, 3)
    np.testing.assert_allclose(out, ref, atol=1e-4)
    assert check_bundle(bundle.path).passed


@needs_optimum
def test_foreign_checkpoint_default_int8_dynamic_keeps_fidelity(tmp_path, foreign):
    bundle = _build(foreign["gpt2"], "host-cpu", tmp_path / "out")
    assert bundle.manifest["precision"] == "int8-dynamic"
    assert bundle.manifest["fidelity"]["lowered"]["mean_cosine"] > 0.99
    assert check_bundle(bundle.path).passed


@needs_optimum
@pytest.mark.parametrize("name", ["distilbert", "gpt2", "vit"])
def test_foreign_checkpoint_builds_qdq_onnx_for_tensorrt(tmp_path, foreign, name):
    import onnx

    from edgepipe.runtimes import tensorrt as trt

    bundle = _build(foreign[name], "jetson-orin-nano", tmp_path / "out")  # the target's default: int8-fp16
    m = bundle.manifest
    assert (m["runtime"], m["precision"]) == ("tensorrt", "int8-fp16")
    assert trt.check_graph(onnx.load(str(bundle.path / "model.onnx"))) == []
    assert m["lowering"]["int8_coverage"]["total"] > 0.5
    assert m["lowering"]["tensorrt_checks"]["qdq_pairs"] > 0
    plan = json.loads((bundle.path / "build_plan.json").read_text())
    assert set(plan["profiles"][0]) == {i["name"] for i in m["io"]["inputs"]}
    assert m["fidelity"]["lowered"]["mean_cosine"] > 0.99
    assert check_bundle(bundle.path).passed  # the ORT proxy of the Q/DQ graph vs transformers on check.npz


@needs_optimum
def test_unknown_task_names_the_tasks_that_work(tmp_path, foreign):
    with pytest.raises(UsageError, match="Optimum exports gpt2 for tasks .*text-generation.*'fill-mask' is not"):
        _build(foreign["gpt2"], "host-cpu", tmp_path / "out", task="fill-mask")


@needs_optimum
def test_task_with_inputs_edgepipe_cannot_make_is_one_line(tmp_path, foreign):
    with pytest.raises(BuildError, match=r"inputs \['past_key_values"):
        _build(foreign["gpt2"], "host-cpu", tmp_path / "out", "fp32", task="text-generation-with-past")


# ----------------------------------------------------------------------------------------------- ExecuTorch
def _et_target(tmp_path: Path) -> Path:
    """android-arm64 where the lead's target exists, else the same target written here."""
    shipped = REPO / "edgepipe" / "recipes" / "targets" / "android-arm64.toml"
    if shipped.is_file():
        return shipped
    path = tmp_path / "android-arm64.toml"
    path.write_text(
        'description = "Android arm64, ExecuTorch XNNPACK"\nruntime = "executorch"\nprecision = "fp32"\n'
        'precisions = ["fp32", "int8-dynamic"]\n[hardware]\narch = "aarch64"\n[executorch]\nbackend = "xnnpack"\n'
    )
    return path


@needs_optimum_et
@pytest.mark.parametrize(("name", "task"), [("distilbert", "fill-mask"), ("gpt2", "text-generation"), ("vit", None)])
def test_foreign_checkpoint_builds_a_pte_within_1e4_of_transformers(tmp_path, foreign, name, task):
    import torch
    from executorch.runtime import Runtime

    target = _et_target(tmp_path)
    bundle = _build(foreign[name], str(target), tmp_path / "out", "fp32", task=task)
    m = bundle.manifest
    assert (m["runtime"], m["route"]["path"]) == ("executorch", "optimum")
    assert m["fidelity"]["lowered_vs_pytorch"]["max_abs"] < 1e-4
    _assert_real_inputs(bundle.path, foreign[name], name)
    # Run check.npz in ExecuTorch's runtime here and compare with transformers' outputs stored beside it.
    data = np.load(bundle.path / "check.npz")
    method = Runtime.get().load_program(str(bundle.path / "model.pte")).load_method("forward")
    names = [i["name"] for i in m["io"]["inputs"]]
    got = method.execute([torch.from_numpy(data[f"input.{n}"]) for n in names])[0].numpy()
    assert np.abs(got - data["output.logits"]).max() < 1e-4


@needs_optimum_et
def test_task_optimum_executorch_lacks_is_one_line_naming_both(tmp_path, foreign):
    with pytest.raises(BuildError, match=r"distilbert \(feature-extraction\) cannot go to target .*fill-mask"):
        _build(foreign["distilbert"], str(_et_target(tmp_path)), tmp_path / "out", "fp32", task="feature-extraction")
