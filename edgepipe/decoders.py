"""build(cfg) for decoder recipes: teacher -> (student) -> prefill + decode graphs -> validate -> latency -> bundle.

The teacher is pretrained from the recipe (``teacher = "pretrain"``: ``stages.pretrain`` on the shipped text), taken
from another decoder recipe (``teacher = "tinylm-teacher.toml"``), or read from a Hugging Face Llama / Mamba2
checkpoint directory. Every stage goes through the same cache as encoder builds (``pipeline.run_stage``).

Fidelity is measured on held-back text, teacher-forced, in the target runtime: ``EVAL_WINDOWS`` windows of the
validation split, each prefilled for one chunk and then decoded token by token through the bundle's own graphs
(``harness.runner.DecoderGraphs``), so the numbers cover the KV cache path a device runs, tiered INT8 archive
included. Per window the first chunk is context only; every later token is scored: held-back perplexity, and
top-1 next-token agreement with the fp32 teacher and with the unquantized model in PyTorch.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from edgepipe import __version__
from edgepipe.cache import StageCache, StageResult
from edgepipe.config import RunConfig, load_recipe, resolve_data_file
from edgepipe.data import read_sentences
from edgepipe.errors import BuildError, ModelError, UsageError
from edgepipe.manifest import read_manifest, sha256_file, write_manifest
from edgepipe.pipeline import Bundle, checkpoint_hash, run_stage, staged_bundle
from edgepipe.precisions import PLANS, STATIC, fallback, tolerance
from edgepipe.progress import Progress
from edgepipe.runtimes.lm_graphs import calibration_feeds, graph_io, lower_decoder, prefill_tokens

GRAPHS_FORMAT = 2  # bump when the lowered graphs change for the same inputs (2: a8w16 INT8 layer boundaries)
EVAL_WINDOWS = 8
EVAL_TOKENS = 256  # per window, capped by the model's context
CHECK_PROMPT_TOKENS = 24
CHECK_NEW_TOKENS = 16
PREFILL_SKIP = 32  # context tokens before the first scored prediction (one prefill chunk)
SENSITIVITY_WINDOWS = 2  # held-back windows that rank each GEMM for a static INT8 plan (the fit uses all)
LATENCY_PROMPT = 128
LATENCY_STEPS = 32
TOLERANCES = {n: tolerance(n, "decoder") for n in ("fp32", "fp16", "int8-dynamic", "a8w16", "int8-fp16")}
FALLBACK = {n: fallback(n, "decoder") for n in ("a8w16", "int8-dynamic", "fp16", "int8-fp16")}
CALIBRATION_WINDOWS = 16  # static INT8 (TensorRT int8-fp16): windows of calibration text fed through both graphs
CALIBRATION_DECODE_STEPS = 8


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path))


def eval_windows(tok, data: str, length: int, count: int = EVAL_WINDOWS) -> np.ndarray:
    """(count, length) int64 windows of the held-back split, sentences joined by ``<|eos|>``."""
    from edgepipe.stages.pretrain import encode_text, windows

    wins = windows(encode_text(tok, read_sentences(data)), length)[:count]
    if len(wins) == 0:
        raise UsageError(
            f"Held-back data {data} has fewer than {length} tokens.", hint="Point validate.data at more text."
        )
    return wins


def model_context(model) -> int:
    return int(getattr(getattr(model, "model", model).cfg, "max_context", EVAL_TOKENS))


def _nll_and_top1(logits: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token negative log-likelihood of ``targets`` and argmax, from (n, vocab) logits."""
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    logz = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
    return logz - logits[np.arange(len(targets)), targets], logits.argmax(-1)


@torch.no_grad()
def score_torch(model, wins: np.ndarray, skip: int) -> dict[str, np.ndarray]:
    """No-cache forward over each window: NLL and argmax of every prediction after the first ``skip`` tokens."""
    nll, top1 = [], []
    for w in wins:
        logits = model(torch.from_numpy(w[None, :-1]))[0, skip - 1 :].numpy()
        n, t = _nll_and_top1(logits, w[skip:])
        nll.append(n)
        top1.append(t)
    return {"nll": np.stack(nll), "top1": np.stack(top1)}


def score_graphs(graphs, wins: np.ndarray, skip: int) -> dict[str, np.ndarray]:
    """The same through a bundle's graphs: prefill ``skip`` tokens, then decode the rest teacher-forced."""
    nll, top1 = [], []
    for w in wins:
        w = w.reshape(1, -1)
        logits, state = graphs.feed(w[:, :skip], 0, graphs.init_state())
        rows = [logits[0]]
        for i in range(skip, w.shape[1] - 1):
            logits, state = graphs.feed(w[:, i : i + 1], i, state)
            rows.append(logits[0])
        n, t = _nll_and_top1(np.stack(rows), w[0, skip:])
        nll.append(n)
        top1.append(t)
    return {"nll": np.stack(nll), "top1": np.stack(top1)}


def summarize(scores: dict[str, np.ndarray], teacher: np.ndarray, reference: np.ndarray | None = None) -> dict:
    out = {
        "perplexity": round(float(math.exp(scores["nll"].mean())), 3),
        "top1_vs_teacher": round(float((scores["top1"] == teacher).mean()), 4),
        "tokens": int(scores["nll"].size),
    }
    if reference is not None:
        out["top1_vs_pytorch"] = round(float((scores["top1"] == reference).mean()), 4)
    return out


def tiered_decoder(model, tok, kv: dict, name: str = "the model"):
    """``model`` over the tiered INT8 KV cache, K scales calibrated on real text; returns (module, manifest facts).

    Args:
        model: A full-attention DecoderLM.
        tok: Its tokenizer (``tokenizers.Tokenizer``).
        kv: The recipe's ``[kv_cache]`` table (active, active_dtype, v_scales, calibration, calibration_windows).
        name: For the error message.
    """
    from edgepipe.models.kv_cache import TieredDecoder, cache_bytes, calibrate_on_text

    if getattr(getattr(model, "spec", None), "kind", None) != "full":
        raise UsageError(
            f"Precision a8w16 stores the KV cache of full attention in INT8; {name} is "
            f"{getattr(model.cfg, 'attention', 'mamba2')}.",
            hint="Use --precision fp32: windowed caches stay 2W slots, Mamba-2 keeps a fixed state.",
        )
    sentences = read_sentences(kv.get("calibration", "calibration.txt"))
    seq = min(256, model.cfg.cache_len)
    scales = calibrate_on_text(model, tok, sentences, seq, kv.get("calibration_windows", 32))
    dtype = torch.float16 if kv.get("active_dtype", "float16") == "float16" else torch.float32
    boundaries = kv.get("boundaries", True)
    tiered = TieredDecoder(model, scales, kv.get("active", 128), dtype, kv.get("v_scales", "token"), boundaries)
    return tiered, {"kv_cache": {**kv, "bytes_at_cache_len": cache_bytes(tiered, model.cfg.cache_len)}}


def weight_bytes(model, precision: str) -> float:
    """Bytes per parameter of ``model``'s weights at ``precision`` (parameters() counts a tied LM head once)."""
    if PLANS[precision].weight_bytes is not None:
        return PLANS[precision].weight_bytes
    # TensorRT int8-fp16: int8 weight GEMMs; the LM head (tied to the embedding), norms and the rest fp16
    params = sum(p.numel() for p in model.parameters())
    int8 = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    return (int8 + 2 * (params - int8)) / params


def decoder_facts(model, module, prefill_tokens: int, precision: str) -> dict:
    """The manifest's ``decoder`` block: form, chunking, cache and state sizes, and decode memory."""
    from edgepipe.models.decoder import DecoderLM

    state = int(sum(t.numel() * t.element_size() for t in module.init_state(1)))
    per_param = weight_bytes(model, precision)
    weights = int(sum(p.numel() for p in model.parameters()) * per_param)  # parameters() dedups ties
    facts = {
        "form": model.cfg.attention if isinstance(model, DecoderLM) else "mamba2",
        "prefill_tokens": prefill_tokens,
        "cache_len": getattr(model.cfg, "cache_len", None),
        "max_context": model_context(model),
        "vocab_size": model.lm_head.out_features,
        "state_bytes": state,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "decode_memory_bytes": {"weights": weights, "cache": state, "total": weights + state},
    }
    if isinstance(model, DecoderLM):
        from edgepipe.models.kv_cache import decode_memory

        # the graphs' state is the cache: fp32 for plain caches, INT8 + fp16 for the tiered one
        facts["decode_memory_bytes"] = decode_memory(
            module, model.cfg.cache_len, weight_bytes=per_param, cache_dtype=torch.float32
        )
    return facts


def open_graphs(directory: Path, target, meta: dict, threads: int | None = None):
    """``harness.runner.DecoderGraphs`` over lowered graphs in ``directory`` (``meta``: files, io, decoder)."""
    from edgepipe.harness.runner import TENSORRT_PROXY_SESSION, DecoderGraphs

    # TensorRT's engines are built on the device; here its ONNX graphs run in onnxruntime as the proxy
    proxy = target.runtime == "tensorrt"
    manifest = {
        "runtime": "onnxruntime" if proxy else target.runtime,
        "session_config": TENSORRT_PROXY_SESSION if proxy else {},
        "target": target.to_dict(),
        "io": meta["io"],
        "decoder": meta["decoder"],
        "graphs": {g: meta["files"][g] for g in ("prefill", "decode")},
    }
    return DecoderGraphs(str(directory), manifest, threads)


class DecoderBuild:
    """One decoder build: the stage records for the manifest and the models they load."""

    def __init__(self, cfg: RunConfig, cache: StageCache, progress: Progress) -> None:
        self.cfg, self.cache, self.progress = cfg, cache, progress
        self.recipe, self.target = cfg.recipe, cfg.target
        self.records: list[dict] = []
        backend = self.target.runtime_options.get("backend", "xnnpack")
        if self.target.runtime == "executorch" and backend != "xnnpack":
            raise UsageError(
                f"Target {self.target.name} lowers through ExecuTorch's {backend} backend; decoder bundles lower "
                "through XNNPACK so far.",
                hint="Use --target android-arm64 or raspberry-pi-5.",
            )

    def stage(self, name: str, payload: dict, fn, label: str, config=None, resumable: bool = False) -> StageResult:
        return run_stage(self.cache, self.progress, self.records, name, payload, fn, label, config, resumable)

    def route_why(self) -> str:
        if self.recipe.teacher in ("pretrain",) or self.recipe.teacher.endswith(".toml"):
            return "decoder recipe: edgepipe's own decoder, pretrained from the recipe"
        return "Llama / Mamba2 checkpoint: edgepipe's own decoders (prefill + decode graphs, KV cache plans)"

    # -- teacher --------------------------------------------------------------------------------------------
    def teacher_dir(self) -> tuple[Path, str]:
        """The teacher's checkpoint directory and content hash: pretrained (cached), another recipe's, or a path."""
        spec = self.recipe.teacher
        if spec == "pretrain":
            return self.pretrain_stage(self.recipe)
        if spec.endswith(".toml"):
            path = Path(spec)
            if not path.is_absolute() and self.recipe.path:
                path = Path(self.recipe.path).parent / path
            teacher = load_recipe(str(path))
            if teacher.teacher != "pretrain":
                raise UsageError(f'Teacher recipe {path} must pretrain its model (teacher = "pretrain").')
            return self.pretrain_stage(teacher)
        from edgepipe.pipeline import resolve_teacher

        path = resolve_teacher(self.recipe)
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"'{path}' has no tokenizer.json.", hint="Ship the fast tokenizer's tokenizer.json.")
        return path, checkpoint_hash(path)

    def pretrain_stage(self, recipe) -> tuple[Path, str]:
        from edgepipe.models.decoder import DecoderConfig
        from edgepipe.stages.pretrain import PretrainConfig, pretrain

        tables = recipe.decoder or {}
        arch = {k: v for k, v in tables.get("model", {}).items() if k != "max_context"}  # a cache length, not weights
        train = {**tables.get("pretrain", {}), **tables.get("tokenizer", {})}
        data = {
            name: sha256_file(resolve_data_file(train.get(name, default)))
            for name, default in (("data", "train.txt"), ("eval_data", "validation.txt"))
        }
        payload = {"model": arch, "pretrain": train, "data": data}

        def run(out: Path) -> dict:
            pcfg = PretrainConfig(**train)
            return pretrain(DecoderConfig(**{**arch, "max_context": pcfg.seq_len}), pcfg, out, self.progress)

        result = self.stage("pretrain", payload, run, f"pretrain {recipe.name}", resumable=True)
        return result.dir, result.key

    def student_stage(self, teacher_dir: Path, teacher_hash: str) -> tuple[Path, str]:
        """Distil the recipe's student (``[student] attention``: windowed:W, linear or mamba2) from the teacher."""
        from dataclasses import asdict

        from edgepipe.models.hf_decoders import load_decoder
        from edgepipe.stages.distill_lm import LMDistillConfig, distill_lm, init_student

        tables = self.recipe.decoder or {}
        form, mamba = self.recipe.student.attention, tables.get("mamba", {})
        cfg = LMDistillConfig(**tables.get("distill", {}))
        data = {name: sha256_file(resolve_data_file(getattr(cfg, name))) for name in ("data", "eval_data")}
        payload = {"teacher": teacher_hash, "form": form, "mamba": mamba, "distill": asdict(cfg), "data": data}

        def run(out: Path) -> dict:
            teacher = load_decoder(teacher_dir)
            if getattr(getattr(teacher, "spec", None), "kind", None) != "full":
                raise UsageError(f"The teacher of {self.recipe.name} must be a full-attention Llama-style decoder.")
            student = init_student(teacher, form, mamba, cfg.seed)
            return distill_lm(teacher, student, teacher_dir / "tokenizer.json", cfg, out, self.progress)

        config = {"form": form, "mamba": mamba, **asdict(cfg)}
        result = self.stage("distill", payload, run, f"distill {form} student", config=config, resumable=True)
        return result.dir, result.key

    # -- the build ------------------------------------------------------------------------------------------
    def run(self) -> Bundle:
        from edgepipe.models.hf_decoders import load_decoder

        teacher_dir, teacher_hash = self.teacher_dir()
        if self.recipe.student:
            model_dir, model_hash = self.student_stage(teacher_dir, teacher_hash)
        else:
            model_dir, model_hash = teacher_dir, teacher_hash
        tok_path = model_dir / "tokenizer.json"
        tok = load_tokenizer(tok_path)
        context = (self.recipe.decoder or {}).get("model", {}).get("max_context")
        v = self.recipe.validate

        def load_model():
            return load_decoder(model_dir, max_context=context)

        model = load_model()
        length = min(EVAL_TOKENS, model_context(model)) + 1
        skip = min(PREFILL_SKIP, length // 2)
        wins = eval_windows(tok, v.data, length)
        held_out = {
            "data": v.data,
            "sha256": sha256_file(resolve_data_file(v.data)),
            "windows": len(wins),
            "tokens_per_window": length,
            "scored_from": skip,
        }

        def reference(out: Path) -> dict:
            teacher = load_decoder(teacher_dir)
            t = score_torch(teacher, wins, skip)
            m = t if model_dir == teacher_dir else score_torch(model, wins, skip)
            np.savez(out / "scores.npz", teacher_top1=t["top1"], model_top1=m["top1"])
            return {"teacher": summarize(t, t["top1"]), "model": summarize(m, t["top1"])}

        ref = self.stage(
            "reference",
            {"teacher": teacher_hash, "model": model_hash, "held_out": held_out},
            reference,
            "teacher and model on held-back text",
        )
        with np.load(ref.dir / "scores.npz") as s:
            teacher_top1, model_top1 = s["teacher_top1"], s["model_top1"]

        precision = self.cfg.precision
        budget = self.recipe.quantize.fidelity_budget
        held = (wins, skip, held_out, model_top1)
        while True:
            lowered = self.lower_stage(model_hash, load_model, precision, tok, held)
            validated = self.validate_stage(lowered, wins, skip, held_out, teacher_top1, model_top1, precision)
            drop = 1.0 - validated.meta["lowered"].get("top1_vs_pytorch", 1.0)
            if precision == "fp32" or drop <= budget:
                break
            fallback = FALLBACK[precision]
            self.records[-1]["decision"] = f"{precision} lost {drop:.4f} top-1 agreement > budget {budget}: {fallback}"
            self.progress.note(
                f"{precision} broke the fidelity budget ({drop:.4f} > {budget}); falling back to {fallback}"
            )
            precision = fallback
        latency = self.latency_stage(lowered)
        return self.write_bundle(lowered, validated, latency, ref, precision, tok_path, teacher_dir, teacher_hash)

    def lowered_module(self, model, precision: str, tok):
        """The module the graphs are traced from: the model, or the model over the tiered INT8 KV cache (a8w16)."""
        if precision != "a8w16":
            return model, {}
        return tiered_decoder(model, tok, (self.recipe.decoder or {}).get("kv_cache", {}), self.recipe.name)

    def lower_stage(self, model_hash: str, load_model, precision: str, tok, held: tuple) -> StageResult:
        """Lower both graphs; static INT8 plans are fitted to the fidelity budget on the held-back windows
        (``held``: windows, prefilled tokens, their record, the PyTorch model's top-1), as the encoders' are."""
        from edgepipe.models.decoder import generate
        from edgepipe.stages.pretrain import encode_text

        target = self.target
        kv = (self.recipe.decoder or {}).get("kv_cache", {}) if precision == "a8w16" else {}
        quant = self.recipe.quantize
        static = precision in STATIC
        payload = {
            "model": model_hash,
            "runtime": target.runtime,
            "options": target.runtime_options,
            "precision": precision,
            "kv_cache": kv,
            "calibration": {"data": quant.calibration, "method": quant.method} if static else None,
            "fit": {"held_out": held[2], "budget": quant.fidelity_budget} if static else None,
            "check": self.recipe.validate.data,
            "graphs": GRAPHS_FORMAT,
        }

        def run(out: Path) -> dict:
            model = load_model()
            module, extra = self.lowered_module(model, precision, tok)
            calibration, fit = None, None
            if static:  # real text through both graphs: the activation scales of the Q/DQ pairs
                chunk = prefill_tokens(module)
                length = min(3 * chunk + CALIBRATION_DECODE_STEPS, model_context(model))
                windows = eval_windows(tok, quant.calibration, length, CALIBRATION_WINDOWS)
                calibration = calibration_feeds(module, list(windows), chunk, CALIBRATION_DECODE_STEPS)
                fit = self.agreement_drop(module, chunk, held)
            budget = quant.fidelity_budget
            lowered = lower_decoder(module, target, precision, out, calibration, quant.method, fit=fit, budget=budget)
            prompt = encode_text(tok, read_sentences(self.recipe.validate.data, 4))[:CHECK_PROMPT_TOKENS][None]
            prompt = torch.from_numpy(prompt)
            with torch.no_grad():
                logits = module.prefill(prompt)[0][:, -1]
                tokens = generate(module, prompt, CHECK_NEW_TOKENS)[:, prompt.shape[1] :]
            np.savez(
                out / "check.npz",
                **{"input.input_ids": prompt.numpy(), "output.tokens": tokens.numpy(), "output.logits": logits.numpy()},
            )
            return {
                "files": {role: p.name for role, p in lowered.files.items()},
                "report": {**lowered.report, **extra},
                "io": graph_io(module, lowered.report["prefill_tokens"]),
                "decoder": decoder_facts(model, module, lowered.report["prefill_tokens"], precision),
                "bytes": sum(p.stat().st_size for p in lowered.files.values()),
            }

        return self.stage("lower", payload, run, f"lower prefill + decode to {target.runtime} ({precision})")

    def agreement_drop(self, module, chunk: int, held: tuple):
        """``fit`` for a static INT8 plan: candidate graphs -> the drop in top-1 agreement with the PyTorch model on
        the held-back windows (``quick``: the first ``SENSITIVITY_WINDOWS``), run where validate runs them
        (TensorRT graphs: onnxruntime, the proxy)."""
        wins, skip, _, model_top1 = held
        io = graph_io(module, chunk)

        def drop(files: dict[str, Path], quick: bool = False) -> float:
            n = SENSITIVITY_WINDOWS if quick else len(wins)
            meta = {"files": {g: p.name for g, p in files.items()}, "io": io, "decoder": {"prefill_tokens": chunk}}
            top1 = score_graphs(open_graphs(files["decode"].parent, self.target, meta), wins[:n], skip)["top1"]
            return 1.0 - round(float((top1 == model_top1[:n]).mean()), 4)  # rounded as validate records it

        return drop

    def graphs(self, lowered: StageResult, threads: int | None = None):
        return open_graphs(lowered.dir, self.target, lowered.meta, threads)

    def validate_stage(self, lowered, wins, skip, held_out, teacher_top1, model_top1, precision) -> StageResult:
        from edgepipe.harness.runner import check_decoder, load_check

        def run(out: Path) -> dict:
            graphs = self.graphs(lowered)
            scores = score_graphs(graphs, wins, skip)
            check = check_decoder(graphs, *load_check(str(lowered.dir)), TOLERANCES[precision])
            if not check["passed"]:
                raise BuildError(
                    f"The {precision} decoder graphs disagree with PyTorch on check.npz: "
                    f"{'; '.join(check['problems'])}.",
                    hint="Try --precision fp32; run with --debug and report the bundle.",
                )
            proxy = self.target.runtime == "tensorrt"
            return {
                "runtime": "onnxruntime (proxy of the TensorRT graphs)" if proxy else self.target.runtime,
                "lowered": summarize(scores, teacher_top1, model_top1),
                "check": {k: check[k] for k in ("max_abs_error", "min_cosine", "token_agreement")},
            }

        return self.stage(
            "validate",
            {"artifact": lowered.key, "held_out": held_out},
            run,
            f"validate in {self.target.runtime} (teacher-forced)",
            config={"held_out": held_out, "precision": precision},
        )

    def latency_stage(self, lowered: StageResult) -> StageResult | None:
        from edgepipe.harness.runner import greedy
        from edgepipe.runtimes import get_runtime

        if not get_runtime(self.target.runtime).same_machine(self.target):
            return None
        payload = {"artifact": lowered.key, "machine": [platform.machine(), platform.processor(), os.cpu_count()]}

        def run(out: Path) -> dict:
            graphs = self.graphs(lowered)
            with np.load(lowered.dir / "check.npz") as c:
                prompt = np.resize(c["input.input_ids"], (1, LATENCY_PROMPT)).astype(np.int64)
            greedy(graphs, prompt, 4)  # warm-up
            run = greedy(graphs, prompt, LATENCY_STEPS + 1)
            steps = np.asarray(run["step_s"]) * 1e3
            return {
                "prompt_tokens": LATENCY_PROMPT,
                "ttft_ms": round(run["ttft_s"] * 1e3, 3),
                "decode_ms_p50": round(float(np.percentile(steps, 50)), 3),
                "tokens_per_s": round(float(1e3 / steps.mean()), 1),
                "where": "this machine",
            }

        return self.stage("latency", payload, run, "latency estimate here")

    def write_bundle(self, lowered, validated, latency, ref, precision, tok_path, teacher_dir, teacher_hash) -> Bundle:
        meta = lowered.meta
        graphs = {g: meta["files"][g] for g in ("prefill", "decode")}
        if self.target.runtime == "tensorrt":  # the runner loads engines; the ONNX graphs are what build them
            graphs = {"prefill": "prefill.plan", "decode": "decode.plan", "proxy": graphs}
        with staged_bundle(self.cfg.bundle_dir) as tmp, self.progress.stage("write bundle"):
            for name in (*meta["files"].values(), "check.npz"):
                shutil.copy2(lowered.dir / name, tmp / name)
            shutil.copy2(tok_path, tmp / "tokenizer.json")
            fidelity = {
                "metric": "held-back perplexity and top-1 next-token agreement with the fp32 teacher",
                "teacher": ref.meta["teacher"],
                "model": ref.meta["model"],
                "lowered": validated.meta["lowered"],
            }
            manifest = {
                "edgepipe_version": __version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "model": self.recipe.name,
                "kind": "decoder",
                "route": {"path": "edgepipe", "why": self.route_why()},
                "source_model": {"path": str(teacher_dir), "hash": teacher_hash},
                "recipe": self.recipe.to_dict(),
                "target": self.target.to_dict(),
                "runtime": self.target.runtime,
                "precision": precision,
                "requested_precision": self.cfg.precision,
                "graphs": graphs,
                "io": meta["io"],
                "decoder": {**meta["decoder"], "eos_id": load_tokenizer(tok_path).token_to_id("<|eos|>")},
                "validation": {**TOLERANCES[precision], "held_out": validated.meta},
                "lowering": meta["report"],
                "latency": latency.meta
                if latency
                else {"where": "not measurable here; run `edgepipe bench` on the device"},
                "fidelity": fidelity,
                "stages": self.records,
                "versions": self.cache.versions,
            }
            write_manifest(tmp, manifest)
        return Bundle(self.cfg.bundle_dir, read_manifest(self.cfg.bundle_dir))


def build_decoder(cfg: RunConfig, cache: StageCache, progress: Progress) -> Bundle:
    """Build a decoder bundle for ``cfg`` (see the module docstring)."""
    return DecoderBuild(cfg, cache, progress).run()
