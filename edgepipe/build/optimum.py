"""Hugging Face checkpoints edgepipe does not re-implement, exported with Hugging Face Optimum.

``build.route.choose_route`` sends a checkpoint here when edgepipe does not re-implement its architecture (or task).
``build_optimum`` runs the Optimum path over the same driver (stage cache, fallback loop, bundle contract) as the
other recipes:

- onnxruntime and tensorrt targets: Optimum's ONNX exporter (``optimum-onnx``), then the precision with
  ONNX Runtime's own tooling (``runtimes.onnxruntime.apply_precision``), or explicit Q/DQ for TensorRT
  (``runtimes.tensorrt``'s flavour of ORT's QDQ quantizer);
- executorch targets: ``optimum-executorch`` where it has the task (fill-mask, image-classification,
  text-generation).

Optimum pins transformers: optimum-onnx 0.1.0 needs transformers < 4.58 and optimum 2.1; optimum-executorch 1.1.0
needs transformers == 5.0.0rc1 and optimum 2.0. The two cannot share one environment, so they are two extras
(``optimum`` and ``optimum-executorch``); a build that needs the other one names it in one line.

Bundle I/O is whatever the export has (read back from the ONNX graph / fixed per optimum-executorch task); check.npz
holds real inputs (text from calibration_data/, or crops of the photos scikit-learn ships) and transformers' eager
outputs for them.
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np

from edgepipe.build.driver import Attempt, Build, Bundle, time_session
from edgepipe.build.route import Route
from edgepipe.cache import StageCache, StageResult, checkpoint_hash
from edgepipe.config import RunConfig
from edgepipe.data import read_sentences
from edgepipe.errors import BuildError, MissingExtraError, ModelError, UsageError
from edgepipe.models.hf import read_config
from edgepipe.precisions import STATIC, tolerance
from edgepipe.progress import Progress
from edgepipe.runtimes import QuantInputs, get_runtime

ONNX_RUNTIMES = ("onnxruntime", "tensorrt")
OPSET = 17  # TensorRT 8.6 (JetPack 6.0) parses up to opset 17; optimum-onnx warns that it recommends 18
# optimum-executorch tasks whose .pte has one forward method edgepipe can feed from real text or images.
ET_TASKS = {
    "fill-mask": ("input_ids", "attention_mask"),
    "image-classification": ("pixel_values",),
    "text-generation": ("input_ids", "cache_position"),
}
ET_QLINEAR = {"int8-dynamic": "8da8w"}  # torchao: int8 dynamic activations, int8 weights (text tasks only)
ET_RECIPES = {"xnnpack": "xnnpack", "portable": "portable"}
# Files a bundle needs to turn raw text or images into the graph's inputs, copied from the checkpoint.
PREPROCESSING_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "preprocessor_config.json",
    "config.json",
    "generation_config.json",
)
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
HELD_OUT_CAP = 64  # held-back samples for foreign models: LM logits are (seq, vocab) per sample
QUANT_HELD_OUT = 16  # held-back samples the TensorRT int8-fp16 planner runs per candidate
BATCH = 8
CHECK_SAMPLES = 4
IMAGE_SIZE = 224  # what an image model sees when its config names no size (resized by its processor anyway)


# ---------------------------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def optimum_versions() -> dict[str, str]:
    """Versions of the packages that shape an Optimum export (absent ones left out)."""
    names = ("optimum", "optimum-onnx", "optimum-executorch", "transformers", "executorch", "torchao")
    return {n: v for n in names if (v := _version(n))}


def require_exporter(runtime: str) -> None:
    """Fail in one line when the Optimum exporter for ``runtime`` is not installed, naming the extra.

    Raises:
        MissingExtraError: optimum-onnx (extra ``optimum``) or optimum-executorch (extra ``optimum-executorch``).
    """
    if runtime == "executorch":
        module, extra, what = "optimum.exporters.executorch", "optimum-executorch", "optimum-executorch"
        clash = "optimum-onnx"
    else:
        module, extra, what = "optimum.exporters.onnx", "optimum", "Optimum's ONNX exporter (optimum-onnx)"
        clash = "optimum-executorch"
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise MissingExtraError(
            f"{what} (needed for non-BERT checkpoints on {runtime} targets; give it an environment of its own: "
            f"its transformers pin clashes with {clash}'s)",
            extra,
        )


# Architecture-name suffix -> task, as Optimum's TasksManager maps them; used where TasksManager cannot be imported
# (optimum 2.0's tasks module fails on transformers 5.0.0rc1, the pin of optimum-executorch 1.1.0).
ARCH_SUFFIX_TASKS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForMaskedLM", "fill-mask"),
    ("ForImageClassification", "image-classification"),
    ("ForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
    ("ForMaskedImageModeling", "masked-im"),
    ("ForConditionalGeneration", "text2text-generation"),
    ("Model", "feature-extraction"),
)
TASK_AUTO_CLASSES = {
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
    "text-generation": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "masked-im": "AutoModelForMaskedImageModeling",
}


def _tasks_manager():
    """Optimum's TasksManager, or None where it cannot be imported (see ARCH_SUFFIX_TASKS)."""
    try:
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return None
    return TasksManager


def infer_task(checkpoint: Path, hf: dict) -> str:
    """Optimum's task for the checkpoint's architecture (``architectures[0]`` in config.json).

    Raises:
        UsageError: config.json names no architecture transformers knows; ``--task`` is then needed.
    """
    import transformers

    arch = (hf.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    manager = _tasks_manager()
    if cls is not None and manager is not None:
        return manager.infer_task_from_model(cls)
    task = next((t for suffix, t in ARCH_SUFFIX_TASKS if cls is not None and arch.endswith(suffix)), None)
    if task is None:
        raise UsageError(
            f"{checkpoint}/config.json names no transformers architecture ({arch!r}), so the task cannot be inferred.",
            hint="Pass --task, e.g. --task feature-extraction, text-generation or image-classification.",
        )
    return task


def onnx_tasks(model_type: str) -> list[str]:
    """The tasks Optimum's ONNX exporter has for ``model_type`` (empty: not supported)."""
    import optimum.exporters.onnx.model_configs  # noqa: F401  (fills TasksManager's ONNX registry)
    from optimum.exporters.tasks import TasksManager

    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(
            model_type, exporter="onnx", library_name="transformers"
        )
    except (KeyError, ValueError):
        return []
    return sorted(tasks)


# -------------------------------------------------------------------------------------------- real inputs
def _sample_images(n: int, offset: int) -> list[np.ndarray]:
    """``n`` deterministic crops (uint8 HxWx3) of the two photos scikit-learn ships (china.jpg, flower.jpg)."""
    from sklearn.datasets import load_sample_image

    photos = [load_sample_image("china.jpg"), load_sample_image("flower.jpg")]  # 427 x 640, CC-BY (see sklearn)
    crops = []
    for i in range(offset, offset + n):
        img = photos[i % 2]
        h, w = img.shape[:2]
        side = 160 + 37 * ((i // 2) % 7)
        y, x = (29 * i) % (h - side), (53 * i) % (w - side)
        crops.append(np.ascontiguousarray(img[y : y + side, x : x + side]))
    return crops


class Inputs:
    """Makes a model's inputs from real data: calibration_data/ text for text models, real photos for vision."""

    def __init__(self, checkpoint: Path, names: list[str], max_len: int) -> None:
        self.checkpoint, self.names, self.max_len = checkpoint, list(names), max_len
        self.vision = "pixel_values" in self.names
        unknown = [n for n in self.names if n not in (*TEXT_INPUTS, "pixel_values", "cache_position")]
        if unknown:
            raise BuildError(
                f"The export takes inputs {unknown} that edgepipe cannot make from real text or images.",
                hint="Pass --task with a single-graph task: feature-extraction, fill-mask, text-classification, "
                "token-classification, text-generation or image-classification.",
            )
        if self.vision:
            from transformers import AutoImageProcessor

            with _quiet():
                self.processor = AutoImageProcessor.from_pretrained(str(checkpoint))
        else:
            from transformers import AutoTokenizer

            with _quiet():
                self.tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
            if self.tokenizer.pad_token is None:  # GPT-2 and friends: pad with EOS, the mask hides it
                self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    def make(self, split: str, n: int, offset: int = 0, pad: str = "max_length") -> dict[str, np.ndarray]:
        """``n`` samples of ``split`` ("calibration" or "validation"), as the graph's inputs."""
        if self.vision:
            images = _sample_images(n, offset + (10_000 if split == "calibration" else 0))
            pixels = self.processor(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
            return {"pixel_values": pixels}
        sentences = read_sentences(f"{split}.txt", offset + n)[offset:]
        enc = self.tokenizer(sentences, padding=pad, truncation=True, max_length=self.max_len, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        mask = enc["attention_mask"].astype(np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.names:
            feeds["token_type_ids"] = enc.get("token_type_ids", np.zeros_like(ids)).astype(np.int64)
        if "position_ids" in self.names:  # what transformers' generate() uses: count real tokens only
            feeds["position_ids"] = np.where(mask == 1, np.cumsum(mask, axis=1) - 1, 1).astype(np.int64)
        return {k: v for k, v in feeds.items() if k in self.names}

    def batches(self, split: str, n: int) -> list[dict[str, np.ndarray]]:
        return [self.make(split, min(BATCH, n - i), offset=i) for i in range(0, n, BATCH)]


def load_torch_model(checkpoint: Path, task: str):
    """The transformers model Optimum exports for ``task`` (eval, fp32, CPU)."""
    import transformers

    manager = _tasks_manager()
    if manager is not None:  # the very loader Optimum's ONNX exporter uses
        model = manager.get_model_from_task(task, str(checkpoint), framework="pt", device="cpu")
    elif task in TASK_AUTO_CLASSES:
        model = getattr(transformers, TASK_AUTO_CLASSES[task]).from_pretrained(str(checkpoint))
    else:
        raise BuildError(f"No transformers loader for task '{task}' here; accepted: {', '.join(TASK_AUTO_CLASSES)}.")
    return model.float().eval()


def torch_outputs(model, feeds: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """Run the eager model on ``feeds`` and pick the outputs the export names, as float32 numpy."""
    import torch

    kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if k != "cache_position"}
    if "use_cache" in inspect.signature(model.forward).parameters:
        kwargs["use_cache"] = False
    with torch.no_grad():
        out = model(**kwargs)
    missing = [n for n in names if n not in out]
    if missing:
        raise BuildError(f"transformers' {type(model).__name__} returns no {missing}; it returns {list(out.keys())}.")
    return {n: out[n].float().numpy() for n in names}


def compare_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, dict]:
    """Per output: max-abs error and per-sample cosine (each sample's output flattened)."""
    from edgepipe.stages.validate import cosines

    stats = {}
    for name, ref in want.items():
        out = np.asarray(got[name], dtype=np.float64).reshape(len(ref), -1)
        ref = np.asarray(ref, dtype=np.float64).reshape(len(ref), -1)
        stats[name] = {"max_abs": float(np.abs(out - ref).max()), "cosines": cosines(out, ref)}
    return stats


def summarize(parts: list[dict[str, dict]]) -> dict:
    """Fold per-batch ``compare_outputs`` into the manifest's figures, first output first."""
    merged: dict[str, dict] = {}
    for part in parts:
        for name, s in part.items():
            m = merged.setdefault(name, {"max_abs": 0.0, "cosines": []})
            m["max_abs"] = max(m["max_abs"], s["max_abs"])
            m["cosines"].extend(np.atleast_1d(s["cosines"]).tolist())
    outputs = {
        name: {
            "mean_cosine": round(float(np.mean(m["cosines"])), 6),
            "min_cosine": round(float(np.min(m["cosines"])), 6),
            "max_abs": m["max_abs"],
            "n": len(m["cosines"]),
        }
        for name, m in merged.items()
    }
    first = next(iter(outputs.values()))
    return {**first, "outputs": outputs}


def graph_io(path: Path) -> dict:
    """The ONNX graph's inputs and outputs as the manifest records them: name, dtype, shape (dim names or sizes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def rec(v) -> dict:
        t = v.type.tensor_type
        dims = [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    inits = {i.name for i in graph.initializer}
    return {"inputs": [rec(v) for v in graph.input if v.name not in inits], "outputs": [rec(v) for v in graph.output]}


def _quiet():
    """Optimum and transformers log advice (opset, slow processors) at WARNING; a build shows its own progress."""
    import logging
    import warnings
    from contextlib import ExitStack

    stack = ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    for logger in (logging.getLogger(), logging.getLogger("optimum")):
        stack.callback(logger.setLevel, logger.level)
        logger.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        stack.callback(hf_logging.set_verbosity, verbosity)
    except ImportError:
        pass
    return stack


def _flat_first_output(src: Path, dst: Path) -> str:
    """Write ``src`` with one extra first output: its first output flattened per sample, (batch, everything).

    edgepipe's int8 planner ranks layers by the per-row cosine of a graph's first output, (n, dim) for sentence
    encoders; LM logits (n, seq, vocab) or hidden states need one row per sample for that measure to mean the same.
    """
    import onnx

    model = onnx.load(str(src))
    first = model.graph.output[0].name
    flat = "edgepipe_flat_" + first
    model.graph.node.append(onnx.helper.make_node("Flatten", [first], [flat], axis=1, name="edgepipe_flatten"))
    out = onnx.helper.make_tensor_value_info(flat, onnx.TensorProto.FLOAT, ["batch", "flat"])
    outputs = [out, *model.graph.output]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    onnx.save(model, str(dst))
    return flat


def _token_free(batches: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    """Image batches with empty ``input_ids``/``attention_mask`` beside ``pixel_values``.

    edgepipe's calibration records count sentences and tokens from those two arrays; only the graph's own inputs
    are fed, so for an image model they count images and zero tokens.
    """
    return [
        {
            **b,
            "input_ids": np.zeros((len(b["pixel_values"]), 0), np.int64),
            "attention_mask": np.zeros((len(b["pixel_values"]), 0), np.int64),
        }
        for b in batches
    ]


def _drop_output(path: Path, name: str) -> None:
    import onnx

    model = onnx.load(str(path))
    keep = [o for o in model.graph.output if o.name != name]
    del model.graph.output[:]
    model.graph.output.extend(keep)
    nodes = [n for n in model.graph.node if name not in n.output]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, str(path))


class OptimumBuild:
    """One Optimum build: export, lower at a precision, validate against transformers, write the bundle."""

    def __init__(self, cfg: RunConfig, route: Route, checkpoint: Path, cache: StageCache, progress: Progress) -> None:
        self.build = Build(cfg, cache, progress, versions={**cache.versions, **optimum_versions()})
        self.cfg, self.route, self.checkpoint, self.progress = cfg, route, checkpoint, progress
        self.target, self.recipe = cfg.target, cfg.recipe
        self.hf = read_config(checkpoint)
        self.model_type = self.hf.get("model_type")
        require_exporter(self.target.runtime)
        self.task = route.task or infer_task(checkpoint, self.hf)
        self.ckpt_hash = checkpoint_hash(checkpoint, PREPROCESSING_FILES, weights=True)
        self.held_out_n = min(self.recipe.validate.samples, HELD_OUT_CAP)
        self._model = None

    # -- helpers ------------------------------------------------------------------------------------------------
    def torch_model(self):
        if self._model is None:
            with _quiet():
                self._model = load_torch_model(self.checkpoint, self.task)
        return self._model

    def stage(self, name: str, payload: dict, fn, label: str, config: dict | None = None) -> StageResult:
        return self.build.stage(name, {**payload, "optimum": optimum_versions()}, fn, label, config)

    def unsupported(self, works: str) -> BuildError:
        t = self.target
        return BuildError(
            f"{self.model_type} ({self.task}) cannot go to target {t.name} ({t.runtime}) through Optimum; {works}.",
            hint="Pick another --target (see `edgepipe targets`) or another --task.",
        )

    def check_vocab(self, batches: list[dict[str, np.ndarray]]) -> None:
        """Token ids must fit the model's embedding table (a mismatched tokenizer fails here, in one line)."""
        vocab = self.hf.get("vocab_size")
        top = max((int(b["input_ids"].max()) for b in batches if "input_ids" in b), default=-1)
        if vocab and top >= vocab:
            raise ModelError(
                f"{self.checkpoint}: the tokenizer produces id {top}, beyond config.json's vocab_size {vocab}.",
                hint="Save the tokenizer the model was trained with beside it (tokenizer.json).",
            )

    # -- the build ----------------------------------------------------------------------------------------------
    def run(self):
        if self.target.runtime == "executorch":
            return self.run_executorch()
        return self.run_onnx()

    def run_onnx(self):
        tasks = onnx_tasks(self.model_type)
        if not tasks:
            raise BuildError(
                f"model_type '{self.model_type}' is neither re-implemented by edgepipe nor exported by Optimum's ONNX "
                f"exporter, so it cannot go to target {self.target.name} ({self.target.runtime}).",
                hint="Convert the checkpoint to a supported architecture (Optimum's docs list them).",
            )
        if self.task not in tasks:
            raise UsageError(
                f"Optimum exports {self.model_type} for tasks {', '.join(tasks)}; '{self.task}' is not one of them.",
                hint="Pass one of them with --task.",
            )
        export = self.export_onnx()
        io = export.meta["io"]
        inputs = Inputs(self.checkpoint, [i["name"] for i in io["inputs"]], self.recipe.validate.max_len)
        names = [o["name"] for o in io["outputs"]]
        held = inputs.batches("validation", self.held_out_n)
        self.check_vocab(held)

        def attempt(precision: str) -> Attempt:
            lowered = self.lower_onnx(export, precision, inputs, names, held)
            validated = self.validate(lowered, precision, held, names)
            return Attempt(precision, lowered, validated, 1.0 - validated.meta["vs_pytorch"]["mean_cosine"])

        best = self.build.fit_precision(
            attempt, self.target.precisions, "encoder", "mean cosine vs transformers on held-back inputs"
        )
        latency = self.latency(best.lowered, inputs)
        check = inputs.make("validation", CHECK_SAMPLES, pad="longest")
        return self.write_bundle(best, latency, io, check, names, export.dir)

    def export_onnx(self) -> StageResult:
        payload = {"checkpoint": self.ckpt_hash, "task": self.task, "opset": OPSET}

        def run(out: Path) -> dict:
            from optimum.exporters.onnx import main_export

            try:
                with _quiet():
                    main_export(
                        str(self.checkpoint), out, task=self.task, opset=OPSET, device="cpu", do_validation=False
                    )
            except Exception as exc:  # Optimum raises many types; the first line says what failed
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BuildError(f"Optimum's ONNX export of {self.model_type} ({self.task}) failed: {first}") from exc
            graphs = sorted(p.name for p in out.glob("*.onnx"))
            if graphs != ["model.onnx"]:
                raise self.unsupported(f"Optimum wrote graphs {graphs}; edgepipe bundles single-graph tasks")
            return {
                "task": self.task,
                "exporter": f"optimum-onnx {_version('optimum-onnx')} main_export, opset {OPSET}",
                "io": graph_io(out / "model.onnx"),
            }

        return self.stage("optimum_export", payload, run, f"export {self.model_type} ({self.task}) with Optimum")

    def lower_onnx(self, export: StageResult, precision: str, inputs: Inputs, names, held) -> StageResult:
        target, q = self.target, self.recipe.quantize
        runtime = get_runtime(target.runtime)
        static = precision in STATIC
        ort_plans = ("fp32", "fp16", "int8-dynamic")
        if target.runtime == "onnxruntime" and precision not in ort_plans:
            raise self.unsupported(
                f"on onnxruntime it takes {', '.join(ort_plans)} (per-layer plans need edgepipe's own models)"
            )
        if precision not in runtime.precisions():
            raise self.unsupported(f"runtime {target.runtime} lowers {', '.join(runtime.precisions())}")
        payload = {
            "export": export.key,
            "runtime": target.runtime,
            "options": target.options,
            "cpu_features": target.cpu_features,  # int8 choices follow them (runtimes.onnxruntime)
            "precision": precision,
            "quantize": q.__dict__ if static else None,
        }

        def run(out: Path) -> dict:
            src = export.dir / "model.onnx"
            if target.runtime == "onnxruntime":
                from edgepipe.runtimes import onnxruntime as ort_rt

                report = {
                    "exporter": export.meta["exporter"],
                    **ort_rt.apply_precision(src, out / "model.onnx", precision, target=target),
                }
                files = {"model": "model.onnx"}
            else:
                report, files = self.lower_tensorrt(src, out, precision, inputs, names, held)
            return {"files": files, "report": report, "bytes": sum((out / f).stat().st_size for f in files.values())}

        return self.stage("lower", payload, run, f"lower to {target.runtime} ({precision})")

    def lower_tensorrt(self, src: Path, out: Path, precision: str, inputs: Inputs, names, held) -> tuple[dict, dict]:
        """Explicit Q/DQ (or plain fp32 for fp32/fp16 builder flags) ONNX, checked by TensorRT's rules, + plan."""

        from edgepipe.runtimes import onnxruntime as ort_rt
        from edgepipe.runtimes import tensorrt as trt

        target, q = self.target, self.recipe.quantize
        path = out / "model.onnx"
        report: dict = {"exporter": f"optimum-onnx {_version('optimum-onnx')} main_export, opset {OPSET}"}
        if precision in STATIC:
            quant_held = held[: max(1, QUANT_HELD_OUT // BATCH)]
            first = names[0]
            reference = np.concatenate(
                [
                    torch_outputs(self.torch_model(), b, [first])[first].reshape(len(b[next(iter(b))]), -1)
                    for b in quant_held
                ]
            )
            calibration = inputs.batches("calibration", min(q.samples, HELD_OUT_CAP))
            if inputs.vision:
                calibration, quant_held = _token_free(calibration), _token_free(quant_held)
            flat_src = out / "model.flat.onnx"
            flat = _flat_first_output(src, flat_src)
            quant = QuantInputs(calibration=calibration, held_out=quant_held, reference=reference, config=q)
            with _quiet():
                report.update(ort_rt.quantize_static_plan(flat_src, path, precision, quant, trt.trt_qdq_flavor()))
            _drop_output(path, flat)
            flat_src.unlink()
            report["planner_measure"] = f"per-sample cosine of '{first}' flattened, {len(reference)} held-back samples"
        else:
            shutil.copy2(src, path)
            report["precision"] = precision
            if precision == "fp16":
                report["note"] = "fp16 is TensorRT's FP16 builder flag; model.onnx stays fp32 (the proxy runs fp32)"
        max_positions = int(self.hf.get("max_position_embeddings") or self.hf.get("n_positions") or 512)

        def make_plan(checked: dict) -> dict:
            plan = trt.build_plan(target, precision, max_positions, checked)
            return {**plan, "profiles": [self._trt_profile(graph_io(path), max_positions)]}

        files = trt.check_and_plan(
            target,
            {"model": path},
            out,
            report,
            make_plan,
            lint="skipped: edgepipe's lint call feeds sentence-encoder inputs only",
        )
        return report, {"model": "model.onnx", **{role: p.name for role, p in files.items()}}

    def _trt_profile(self, io: dict, max_positions: int) -> dict:
        """One optimisation profile over the export's own inputs: batch and seq from the target, the rest fixed."""
        opts = self.target.runtime_options
        batch = opts.batch
        seq = [min(s, max_positions) for s in opts.seq or [1, 128, max_positions]]
        profile = {}
        for rec in io["inputs"]:
            shapes = {}
            for i, key in enumerate(("min", "opt", "max")):
                dims = []
                for axis, d in enumerate(rec["shape"]):
                    if isinstance(d, int) and d > 0:
                        dims.append(d)
                    elif axis == 0:
                        dims.append(batch[i])
                    elif rec["name"] == "pixel_values":
                        dims.append(3 if axis == 1 else int(self.hf.get("image_size", IMAGE_SIZE)))
                    else:
                        dims.append(seq[i])
                shapes[key] = dims
            profile[rec["name"]] = shapes
        return profile

    def validate(self, lowered: StageResult, precision: str, held, names) -> StageResult:
        runtime = get_runtime(self.target.runtime)
        runnable, where = runtime.can_run_here(self.target)
        artifact = lowered.dir / lowered.meta["files"]["model"]
        payload = {"artifact": lowered.key, "held_out": self.held_out_n, "max_len": self.recipe.validate.max_len}

        def run(out: Path) -> dict:
            if not runnable:
                raise BuildError(f"Target {self.target.name}: {where}; the bundle cannot be validated here.")
            session = runtime.load(artifact, self.target)
            parts = [compare_outputs(session.run(b), torch_outputs(self.torch_model(), b, names)) for b in held]
            summary = summarize(parts)
            return {"runtime": self.target.runtime, "where": where, "vs_pytorch": summary, "vs_teacher": summary}

        result = self.stage(
            "validate", payload, run, f"validate in {self.target.runtime}", config={**payload, "precision": precision}
        )
        self.build.records[-1]["tolerance"] = tolerance(precision, "encoder")
        return result

    def latency(self, lowered: StageResult, inputs: Inputs) -> StageResult | None:
        def run(out: Path) -> dict:
            session = get_runtime(self.target.runtime).load(lowered.dir / lowered.meta["files"]["model"], self.target)
            feeds = inputs.make("validation", 1)
            shape = list(next(iter(feeds.values())).shape)
            return {"shape": shape if inputs.vision else shape[:2], **time_session(session, feeds)}

        return self.build.latency({"artifact": lowered.key}, run)

    # -- ExecuTorch through optimum-executorch ------------------------------------------------------------------
    def run_executorch(self):
        from optimum.exporters.executorch.task_registry import discover_tasks, task_registry

        discover_tasks()
        works = sorted(t for t in ET_TASKS if t in task_registry)
        if self.task not in works:
            raise self.unsupported(
                f"optimum-executorch exports tasks {', '.join(works)} (use --task) or build for host-cpu"
            )
        backend = self.target.runtime_options.backend
        if backend not in ET_RECIPES:
            raise self.unsupported(f"optimum-executorch recipes here: {', '.join(ET_RECIPES)}")
        plans = ["fp32"] if self.task == "image-classification" else ["fp32", *ET_QLINEAR]
        precision = self.cfg.precision
        if precision not in plans:
            if precision != self.target.precision:  # asked for explicitly
                raise self.unsupported(
                    f"optimum-executorch lowers {self.task} at {', '.join(plans)}; asked {precision}"
                )
            # The target's default plan is edgepipe's own per-layer planner; take the best Optimum offers instead.
            self.progress.note(f"optimum-executorch has no {precision} plan for {self.task}; building {plans[-1]}")
            precision = plans[-1]
        names = list(ET_TASKS[self.task])
        inputs = Inputs(
            self.checkpoint,
            ["pixel_values"] if self.task == "image-classification" else list(TEXT_INPUTS[:2]),
            self.recipe.validate.max_len,
        )
        max_positions = int(self.hf.get("max_position_embeddings") or self.hf.get("n_positions") or 2048)
        payload = {"checkpoint": self.ckpt_hash, "task": self.task, "recipe": backend, "precision": precision}

        def export(out: Path) -> dict:
            from optimum.exporters.executorch import main_export

            kwargs = {"qlinear": ET_QLINEAR[precision]} if precision in ET_QLINEAR else {}
            if self.task == "text-generation":
                kwargs["max_seq_len"] = min(max_positions, 2048)
            try:
                with _quiet():
                    main_export(
                        str(self.checkpoint), task=self.task, recipe=ET_RECIPES[backend], output_dir=out, **kwargs
                    )
            except Exception as exc:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise BuildError(
                    f"optimum-executorch export of {self.model_type} ({self.task}) failed: {first}"
                ) from exc
            return {
                "files": {"model": "model.pte"},
                "report": {
                    "exporter": f"optimum-executorch {_version('optimum-executorch')} main_export, recipe {backend}",
                    "precision": precision,
                    **({"qlinear": kwargs["qlinear"]} if "qlinear" in kwargs else {}),
                },
                "bytes": (out / "model.pte").stat().st_size,
            }

        lowered = self.stage(
            "lower", payload, export, f"export {self.model_type} ({self.task}) with optimum-executorch"
        )
        if precision != self.cfg.precision:
            self.build.records[-1]["decision"] = (
                f"optimum-executorch has no {self.cfg.precision} plan: built {precision}"
            )
        samples = [self._et_feeds(inputs, i) for i in range(self.held_out_n)]
        self.check_vocab(samples)  # an out-of-range id aborts ExecuTorch's runtime, and the process with it

        def validate(out: Path) -> dict:
            method = _et_method(lowered.dir / "model.pte")
            parts = []
            for feeds in samples:
                got = {"logits": _et_run(method, feeds, names)}
                parts.append(compare_outputs(got, torch_outputs(self.torch_model(), feeds, ["logits"])))
            summary = summarize(parts)
            return {
                "runtime": "executorch",
                "where": "executorch runtime on this CPU",
                "vs_pytorch": summary,
                "vs_teacher": summary,
            }

        validated = self.stage(
            "validate", {"artifact": lowered.key, "held_out": len(samples)}, validate, "validate in executorch"
        )
        text = self.task != "image-classification"
        seq = {"input_ids": [1, "seq"], "attention_mask": [1, "seq"], "cache_position": ["seq"]}
        io = {
            "inputs": [
                {"name": n, "dtype": str(v.dtype), "shape": seq[n] if text else list(v.shape)}
                for n, v in samples[0].items()
                if n in names
            ],
            "outputs": [
                {"name": "logits", "dtype": "float32", "shape": [1, "seq", "vocab"] if text else [1, "labels"]}
            ],
            "note": "batch 1"
            + (
                "; the KV cache lives inside the program, cache_position = token positions"
                if "cache_position" in names
                else ""
            ),
        }
        check = self._et_feeds(inputs, 0)
        best = Attempt(precision, lowered, validated, 0.0)
        return self.write_bundle(best, None, io, check, ["logits"], self.checkpoint)

    def _et_feeds(self, inputs: Inputs, i: int) -> dict[str, np.ndarray]:
        """One real sample, batch 1, unpadded, in the task's input order."""
        feeds = inputs.make("validation", 1, offset=i, pad="longest")
        if self.task == "text-generation":
            feeds = {"input_ids": feeds["input_ids"], "cache_position": np.arange(feeds["input_ids"].shape[1])}
        return feeds

    # -- bundle -------------------------------------------------------------------------------------------------
    def write_bundle(self, best: Attempt, latency, io, check, names, preprocessing_dir: Path) -> Bundle:
        files = {name: best.lowered.dir / name for name in best.lowered.meta["files"].values()}
        shipped = []
        for name in PREPROCESSING_FILES:
            src = next((d / name for d in (preprocessing_dir, self.checkpoint) if (d / name).is_file()), None)
            if src is not None:
                files[name] = src
                shipped.append(name)

        def write_check(tmp: Path) -> None:
            expected = torch_outputs(self.torch_model(), check, names)
            np.savez(
                tmp / "check.npz",
                **{f"input.{k}": v for k, v in check.items()},
                **{f"output.{k}": v for k, v in expected.items()},
            )

        return self.build.write_bundle(files, self.manifest(best, latency, io, shipped), write_check)

    def manifest(self, best: Attempt, latency, io, shipped: list[str]) -> dict:
        vs = best.validated.meta["vs_pytorch"]
        fid = {k: vs[k] for k in ("mean_cosine", "min_cosine", "max_abs", "n")}
        return self.build.manifest(
            kind="decoder" if self.task.startswith("text-generation") else "encoder",
            family="encoder",
            best=best,
            latency=latency,
            route={
                **self.route.to_dict(),
                "task": self.task,
                "task_from": "--task" if self.route.task else "config.json architectures (Optimum's TasksManager)",
            },
            source_model={"path": str(self.checkpoint), "hash": self.ckpt_hash, "model_type": self.model_type},
            graphs={"model": best.lowered.meta["files"]["model"]},
            io=io,
            preprocessing=shipped,
            # The checkpoint itself is the teacher: fidelity is the artifact vs transformers in PyTorch.
            fidelity={"teacher": {"mean_cosine": 1.0, "min_cosine": 1.0}, "lowered": fid, "lowered_vs_pytorch": fid},
        )


def _et_method(path: Path):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(str(path)).load_method("forward")


def _et_run(method, feeds: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    import torch

    return method.execute([torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names])[0].numpy()


def build_optimum(cfg: RunConfig, route: Route, checkpoint: Path, cache: StageCache, progress: Progress) -> Bundle:
    """Build ``cfg`` for a checkpoint edgepipe does not re-implement, through Optimum.

    Raises:
        MissingExtraError: The Optimum exporter for the target's runtime is not installed (names the extra).
        BuildError: An unsupported architecture/target pair (one line naming both and what works), an export
            failure, or a fidelity budget no fallback plan meets.
    """
    return OptimumBuild(cfg, route, checkpoint, cache, progress).run()
