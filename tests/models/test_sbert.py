"""sentence-transformers directories: the exported graph computes what ``SentenceTransformer.encode`` computes.

Each tiny model is a seeded BERT saved by transformers and wrapped in sentence-transformers' own modules, saved by
sentence-transformers; the references are ``SentenceTransformer(dir).encode`` on real held-back sentences, the
outputs the ONNX graph edgepipe lowers, run in onnxruntime.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from tokenizers import Tokenizer

import edgepipe
from edgepipe.build import build
from edgepipe.build.encoder import cached_student
from edgepipe.cli import cli
from edgepipe.config import load_target, resolve_run_config
from edgepipe.data import encode, load_tokenizer, read_sentences
from edgepipe.errors import ModelError
from edgepipe.models.hf import load_encoder, save_encoder
from edgepipe.models.sbert import read_modules
from edgepipe.runtimes import onnxruntime as ort_rt

st = pytest.importorskip("sentence_transformers", reason="needs sentence-transformers (the test extra)")
transformers = pytest.importorskip("transformers", reason="needs transformers to save checkpoints")
HIDDEN = 32
FAST = ("validate.samples=24", "validate.max_len=64", "quantize.samples=16")


def _modules():
    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    except ImportError:
        from sentence_transformers.models import Dense, Normalize, Pooling, Transformer
    return Transformer, Pooling, Dense, Normalize


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, teacher_dir) -> Path:
    """A seeded 2-layer BERT (hidden 32) on MiniLM's vocabulary and tokenizer, saved by transformers."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bert")
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(str(teacher_dir)).save_pretrained(path)
    return path


def _st_dir(out: Path, bert: Path, pooling, dense: str | None, normalize: bool, max_seq_length: int = 128) -> Path:
    """A sentence-transformers directory saved by sentence-transformers itself: Transformer, Pooling, [Dense],
    [Normalize]."""
    Transformer, Pooling, Dense, Normalize = _modules()
    torch.manual_seed(1)
    modes = (pooling,) if isinstance(pooling, str) else pooling
    modules = [Transformer(str(bert), max_seq_length=max_seq_length), Pooling(HIDDEN, pooling_mode=pooling)]
    if dense:
        activation = {"tanh": torch.nn.Tanh(), "identity": torch.nn.Identity(), "gelu": torch.nn.GELU()}[dense]
        modules.append(Dense(HIDDEN * len(modes), 24, activation_function=activation))
    if normalize:
        modules.append(Normalize())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        st.SentenceTransformer(modules=modules, device="cpu").save(str(out))
    return out


def _encode(path: Path, sentences: list[str]) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = st.SentenceTransformer(str(path), device="cpu")
        return model.encode(sentences, batch_size=16, convert_to_numpy=True)


@pytest.mark.parametrize(
    "pooling, dense, normalize",
    [
        ("cls", "tanh", True),
        ("max", None, True),
        ("mean", None, False),
        ("mean_sqrt_len_tokens", "identity", False),
        ("weightedmean", None, True),
        ("lasttoken", "gelu", True),
        (("cls", "mean"), "tanh", True),
    ],
)
def test_lowered_graph_matches_sentence_transformers_encode(tmp_path, tiny_bert, sentences, pooling, dense, normalize):
    path = _st_dir(tmp_path / "st", tiny_bert, pooling, dense, normalize)
    model = load_encoder(path)
    assert model.cfg.pooling == ((pooling,) if isinstance(pooling, str) else pooling)
    assert (len(model.cfg.dense), model.cfg.normalize) == (1 if dense else 0, normalize)
    batch = encode(load_tokenizer(path / "tokenizer.json", 128), sentences[:24])
    lowered = ort_rt.lower_encoder(model, batch, load_target("host-cpu"), "fp32", tmp_path / "onnx")
    out = ort_rt.load(lowered.files["model"]).run(batch)["sentence_embedding"]
    ref = _encode(path, sentences[:24])
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=2e-5)


def test_build_of_a_sentence_transformers_dir_matches_encode_through_its_own_tokenizer(tmp_path, tiny_bert):
    """A CLS + Dense model without Normalize, cut at 16 tokens: the bundle's tokenizer.json and graph give encode()'s
    output on real sentences longer than that."""
    path = _st_dir(tmp_path / "cls-dense", tiny_bert, "cls", "tanh", False, max_seq_length=16)
    bundle = build(resolve_run_config(str(path), "host-cpu", "fp32", tmp_path / "out", FAST))
    m = bundle.manifest
    assert m["route"]["path"] == "edgepipe" and "sentence-transformers modules" in m["route"]["why"]
    head = m["sentence_transformers"]
    assert (head["pooling"], head["normalize"], head["max_seq_length"]) == (["cls"], False, 16)
    assert m["io"]["max_seq_length"] == 16
    text = read_sentences("calibration.txt", 40)[20:]
    tok = Tokenizer.from_file(str(bundle.path / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(text)
    assert max(len(e.ids) for e in enc) == 16 and any(sum(e.attention_mask) == 16 for e in enc)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
    }
    out = ort_rt.load(bundle.path / "model.onnx").run(feeds)["sentence_embedding"]
    ref = _encode(path, text)
    np.testing.assert_allclose(out, ref, atol=2e-5)
    assert np.linalg.norm(out, axis=1).std() > 1e-3  # not normalised, as the model says
    np.testing.assert_allclose(edgepipe.load(bundle.path).encode(text), ref, atol=2e-5)  # the Python API too


def test_student_of_a_sentence_transformers_teacher_keeps_its_head(tmp_path, tiny_bert):
    path = _st_dir(tmp_path / "teacher", tiny_bert, "cls", "tanh", True)
    recipe = tmp_path / "student.toml"
    recipe.write_text(
        f'teacher = "{path}"\n[student]\nlayers = [1]\n'
        "[distill]\nsteps = 2\nbatch_size = 8\nwarmup_steps = 1\nmax_len = 32\nsentences = 64\n"
    )
    cfg = resolve_run_config(str(recipe), "host-cpu", "fp32", tmp_path / "out", FAST)
    bundle = build(cfg)
    student = cached_student(cfg)
    assert student.cfg.pooling == ("cls",) and len(student.cfg.dense) == 1 and student.cfg.normalize
    assert 0 < bundle.manifest["fidelity"]["student"]["mean_cosine"] <= 1


def test_save_encoder_writes_a_head_sentence_transformers_loads(tmp_path, tiny_bert, sentences):
    path = _st_dir(tmp_path / "st", tiny_bert, "weightedmean", "tanh", False)
    save_encoder(load_encoder(path), tmp_path / "again", path / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        if (path / name).is_file():
            shutil.copy2(path / name, tmp_path / "again" / name)
    np.testing.assert_allclose(_encode(tmp_path / "again", sentences[:8]), _encode(path, sentences[:8]), atol=1e-5)


def test_shipped_teacher_modules_are_read_and_its_graph_matches_encode(tmp_path, teacher_dir):
    modules = read_modules(teacher_dir)
    assert [m for m in modules.modules] == ["Transformer", "Pooling", "Normalize"]
    assert (modules.pooling, modules.normalize, modules.max_seq_length) == (("mean",), True, 256)
    text = read_sentences("calibration.txt", 16)
    model = load_encoder(teacher_dir)
    batch = encode(load_tokenizer(teacher_dir / "tokenizer.json", 256), text)
    lowered = ort_rt.lower_encoder(model, batch, load_target("host-cpu"), "fp32", tmp_path / "onnx")
    out = ort_rt.load(lowered.files["model"]).run(batch)["sentence_embedding"]
    np.testing.assert_allclose(out, _encode(teacher_dir, text), atol=5e-5)


# ------------------------------------------------------------------------------------------ what is not lowered
def _edit_modules(path: Path, edit) -> None:
    listed = json.loads((path / "modules.json").read_text())
    (path / "modules.json").write_text(json.dumps(edit(listed)))


def test_module_edgepipe_cannot_lower_is_one_cli_line_naming_it(tmp_path, tiny_bert):
    path = _st_dir(tmp_path / "st", tiny_bert, "mean", None, True)
    norm = {"idx": 3, "name": "3", "path": "3_LayerNorm", "type": "sentence_transformers.models.LayerNorm"}
    _edit_modules(path, lambda m: m + [norm])
    result = CliRunner().invoke(cli, ["build", "--model", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "3_LayerNorm (sentence_transformers.models.LayerNorm)" in errors[0]
    assert "Traceback" not in result.output and not (tmp_path / "out" / "st").exists()


def _activation(d: Path) -> None:
    _set(d / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Softmax")


def _prompt_excluded(d: Path) -> None:
    _set(d / "1_Pooling" / "config.json", include_prompt=False)
    _set(d / "config_sentence_transformers.json", default_prompt_name="query", prompts={"query": "query: "})


@pytest.mark.parametrize(
    "edit, message",
    [
        (_activation, "Dense activation 'torch.nn.modules.activation.Softmax' is not lowered"),
        (lambda d: _set(d / "1_Pooling" / "config.json", pooling_mode="attention"), "pooling mode 'attention'"),
        (lambda d: _edit_modules(d, lambda m: [m[0], m[1], m[3], m[2]]), "Dense module 2_Dense after Normalize"),
        (lambda d: _edit_modules(d, lambda m: [m[0]]), "has no Pooling module"),
        (_prompt_excluded, "cannot tell prompt tokens apart"),
    ],
)
def test_heads_edgepipe_does_not_compute_are_refused(tmp_path, tiny_bert, edit, message):
    path = _st_dir(tmp_path / "st", tiny_bert, "mean", "tanh", True)
    edit(path)
    with pytest.raises(ModelError, match=re.escape(message)):
        load_encoder(path)


def _set(file: Path, **values) -> None:
    data = json.loads(file.read_text())
    data.update(values)
    file.write_text(json.dumps(data))
