"""The decoder recipe: teacher -> (student) -> prefill + decode graphs -> validate -> latency -> bundle.

The teacher is pretrained from the recipe (``teacher = "pretrain"``: ``stages.pretrain`` on the shipped text), taken
from another decoder recipe (``teacher = "tinylm-teacher.toml"``), or read from a Hugging Face Llama / Mamba2
checkpoint directory. Every stage goes through the same driver as the other recipes (``build.driver.Build``).

Fidelity is measured on held-back text, teacher-forced, in the target runtime: ``EVAL_WINDOWS`` windows of the
validation split, each prefilled for one chunk and then decoded token by token through the bundle's own graphs
(``harness.runner.DecoderGraphs``), so the numbers cover the KV cache path a device runs, tiered INT8 archive
included. Per window the first chunk is context only; every later token is scored: held-back perplexity, and
top-1 next-token agreement with the fp32 teacher and with the unquantized model in PyTorch.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from edgepipe.build.driver import Attempt, Build, Bundle
from edgepipe.cache import StageCache, StageResult, checkpoint_hash
from edgepipe.config import DecoderConfig, RunConfig, load_recipe, resolve_data_file, resolve_teacher
from edgepipe.data import load_tokenizer, read_sentences
from edgepipe.errors import BuildError, ModelError, UsageError
from edgepipe.manifest import sha256_file
from edgepipe.precisions import DECODER_PLANS, PLANS, STATIC, tolerance
from edgepipe.progress import Progress
from edgepipe.runtimes import get_runtime
from edgepipe.runtimes.decoder_graphs import calibration_feeds, graph_io, prefill_tokens
from edgepipe.stages.validate import (
    EVAL_TOKENS,
    eval_windows,
    model_context,
    score_graphs,
    score_torch,
    summarize,
)

GRAPHS_FORMAT = 2  # bump when the lowered graphs change for the same inputs (2: a8w16 INT8 layer boundaries)
CHECK_PROMPT_TOKENS = 24
CHECK_NEW_TOKENS = 16
PREFILL_SKIP = 32  # context tokens before the first scored prediction (one prefill chunk)
SENSITIVITY_WINDOWS = 2  # held-back windows that rank each GEMM for a static INT8 plan (the fit uses all)
LATENCY_PROMPT = 128
LATENCY_STEPS = 32
CALIBRATION_WINDOWS = 16  # static INT8 (TensorRT int8-fp16): windows of calibration text fed through both graphs
CALIBRATION_DECODE_STEPS = 8


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
    """One decoder build: the driver's stage records and the models they load."""

    def __init__(self, cfg: RunConfig, cache: StageCache, progress: Progress, route: dict) -> None:
        self.build = Build(cfg, cache, progress)
        self.cfg, self.recipe, self.target, self.route, self.progress = cfg, cfg.recipe, cfg.target, route, progress
        self.tables = cfg.recipe.decoder
        backend = getattr(self.target.runtime_options, "backend", None)
        if self.target.runtime == "executorch" and backend != "xnnpack":
            raise UsageError(
                f"Target {self.target.name} lowers through ExecuTorch's {backend} backend; decoder bundles lower "
                "through XNNPACK so far.",
                hint="Use --target android-arm64 or raspberry-pi-5.",
            )

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
        path = resolve_teacher(self.recipe)
        if not (path / "tokenizer.json").is_file():
            raise ModelError(f"'{path}' has no tokenizer.json.", hint="Ship the fast tokenizer's tokenizer.json.")
        return path, checkpoint_hash(path)

    def pretrain_stage(self, recipe) -> tuple[Path, str]:
        from edgepipe.stages.pretrain import pretrain

        tables = recipe.decoder
        arch = {k: v for k, v in tables.model.items() if k != "max_context"}  # a cache length, not weights
        pcfg = tables.pretrain
        data = {name: sha256_file(resolve_data_file(getattr(pcfg, name))) for name in ("data", "eval_data")}
        payload = {"model": arch, "pretrain": asdict(pcfg), "data": data}

        def run(out: Path) -> dict:
            model_cfg = DecoderConfig(**{**arch, "vocab_size": pcfg.vocab_size, "max_context": pcfg.seq_len})
            return pretrain(model_cfg, pcfg, out, self.progress)

        result = self.build.stage("pretrain", payload, run, f"pretrain {recipe.name}", resumable=True)
        return result.dir, result.key

    def student_stage(self, teacher_dir: Path, teacher_hash: str) -> tuple[Path, str]:
        """Distil the recipe's student (``[student] attention``: windowed:W, linear or mamba2) from the teacher."""
        from edgepipe.models.hf_decoders import load_decoder
        from edgepipe.stages.distill_decoder import distill_decoder, init_student

        form, mamba, cfg = self.recipe.student.attention, self.tables.mamba, self.tables.distill
        data = {name: sha256_file(resolve_data_file(getattr(cfg, name))) for name in ("data", "eval_data")}
        payload = {"teacher": teacher_hash, "form": form, "mamba": mamba, "distill": asdict(cfg), "data": data}

        def run(out: Path) -> dict:
            teacher = load_decoder(teacher_dir)
            if getattr(getattr(teacher, "spec", None), "kind", None) != "full":
                raise UsageError(f"The teacher of {self.recipe.name} must be a full-attention Llama-style decoder.")
            student = init_student(teacher, form, mamba, cfg.seed)
            return distill_decoder(teacher, student, teacher_dir / "tokenizer.json", cfg, out, self.progress)

        config = {"form": form, "mamba": mamba, **asdict(cfg)}
        result = self.build.stage("distill", payload, run, f"distill {form} student", config=config, resumable=True)
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
        v = self.recipe.validate

        def load_model():
            return load_decoder(model_dir, max_context=self.tables.max_context)

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

        ref = self.build.stage(
            "reference",
            {"teacher": teacher_hash, "model": model_hash, "held_out": held_out},
            reference,
            "teacher and model on held-back text",
        )
        with np.load(ref.dir / "scores.npz") as s:
            teacher_top1, model_top1 = s["teacher_top1"], s["model_top1"]

        held = (wins, skip, held_out, model_top1)

        def attempt(precision: str) -> Attempt:
            lowered = self.lower_stage(model_hash, load_model, precision, tok, held)
            validated = self.validate_stage(lowered, wins, skip, held_out, teacher_top1, model_top1, precision)
            return Attempt(precision, lowered, validated, 1.0 - validated.meta["lowered"].get("top1_vs_pytorch", 1.0))

        best = self.build.fit_precision(
            attempt,
            DECODER_PLANS.get(self.target.runtime, ()),
            "decoder",
            "top-1 next-token agreement vs the unquantized model on held-back text",
        )
        latency = self.latency_stage(best.lowered)
        return self.write_bundle(best, latency, ref, tok_path, teacher_dir, teacher_hash)

    def lowered_module(self, model, precision: str, tok):
        """The module the graphs are traced from: the model, or the model over the tiered INT8 KV cache (a8w16)."""
        if precision != "a8w16":
            return model, {}
        from edgepipe.models.kv_cache import tiered_decoder

        return tiered_decoder(model, tok, self.tables.kv_cache, self.recipe.name)

    def lower_stage(self, model_hash: str, load_model, precision: str, tok, held: tuple) -> StageResult:
        """Lower both graphs; static INT8 plans are fitted to the fidelity budget on the held-back windows
        (``held``: windows, prefilled tokens, their record, the PyTorch model's top-1), as the encoders' are."""
        from edgepipe.data import encode_text
        from edgepipe.models.decoder import generate

        target = self.target
        kv = asdict(self.tables.kv_cache) if precision == "a8w16" else {}
        quant = self.recipe.quantize
        static = precision in STATIC
        payload = {
            "model": model_hash,
            "runtime": target.runtime,
            "options": target.options,
            "cpu_features": target.cpu_features,  # int8 choices follow them (runtimes.onnxruntime)
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
            runtime = get_runtime(target.runtime)
            budget = quant.fidelity_budget
            lowered = runtime.lower_decoder(module, target, precision, out, calibration, quant.method, fit, budget)
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

        return self.build.stage("lower", payload, run, f"lower prefill + decode to {target.runtime} ({precision})")

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
            check = check_decoder(graphs, *load_check(str(lowered.dir)), tolerance(precision, "decoder"))
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
                "check": {k: check[k] for k in ("max_abs_error", "min_cosine", "token_agreement", "greedy_agreement")},
            }

        return self.build.stage(
            "validate",
            {"artifact": lowered.key, "held_out": held_out},
            run,
            f"validate in {self.target.runtime} (teacher-forced)",
            config={"held_out": held_out, "precision": precision},
        )

    def latency_stage(self, lowered: StageResult) -> StageResult | None:
        from edgepipe.harness.runner import greedy

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

        return self.build.latency({"artifact": lowered.key}, run)

    def write_bundle(self, best: Attempt, latency, ref, tok_path, teacher_dir, teacher_hash) -> Bundle:
        meta = best.lowered.meta
        graphs = {g: meta["files"][g] for g in ("prefill", "decode")}
        if self.target.runtime == "tensorrt":  # the runner loads engines; the ONNX graphs are what build them
            graphs = {"prefill": "prefill.plan", "decode": "decode.plan", "proxy": graphs}
        files = {name: best.lowered.dir / name for name in (*meta["files"].values(), "check.npz")}
        files["tokenizer.json"] = tok_path
        manifest = self.build.manifest(
            kind="decoder",
            family="decoder",
            best=best,
            latency=latency,
            route=self.route,
            source_model={"path": str(teacher_dir), "hash": teacher_hash},
            graphs=graphs,
            io=meta["io"],
            decoder={**meta["decoder"], "eos_id": load_tokenizer(tok_path).token_to_id("<|eos|>")},
            fidelity={
                "metric": "held-back perplexity and top-1 next-token agreement with the fp32 teacher",
                "teacher": ref.meta["teacher"],
                "model": ref.meta["model"],
                "lowered": best.validated.meta["lowered"],
            },
        )
        return self.build.write_bundle(files, manifest)


def build_decoder(cfg: RunConfig, cache: StageCache, progress: Progress, route: dict) -> Bundle:
    """Build a decoder bundle for ``cfg`` (see the module docstring)."""
    return DecoderBuild(cfg, cache, progress, route).run()
