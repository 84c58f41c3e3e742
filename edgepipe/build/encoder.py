"""The encoder recipe: teacher -> (distill) -> lower -> validate -> latency -> bundle, each stage cached.

Sentence encoders (edgepipe's own BERT re-implementation, ``models.transformer``) judged by the cosine of their
embeddings to the teacher's on held-back text. A sentence-transformers teacher brings its modules (``models.sbert``):
the graph computes its pooling, Dense layers and Normalize, text is cut at its ``max_seq_length`` (and lowercased
where ``do_lower_case``), and the bundle's ``tokenizer.json`` does the same. The stages are plain functions
(``stages/``); this module wires them through ``build.driver.Build``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgepipe.build.driver import Attempt, Build, Bundle, time_session
from edgepipe.cache import StageCache, StageResult, checkpoint_hash, digest
from edgepipe.config import RunConfig, Target, resolve_data_file, resolve_teacher
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError, EdgepipeError, ModelError, UsageError
from edgepipe.manifest import sha256_file
from edgepipe.models.hf import checkpoint_key, read_config, task_head, tokenizer_file
from edgepipe.models.sbert import read_modules, sentence_tokenizer
from edgepipe.progress import Progress
from edgepipe.runtimes import QuantInputs, get_runtime
from edgepipe.stages.distill import distill, load_student, training_precision
from edgepipe.stages.parallel import SINGLE, Ranks
from edgepipe.stages.validate import compare, embed_session, embed_torch

CHECK_SENTENCES = 8
NOT_VALIDATED = "not validated here"
VALIDATE_BATCH = 32
LATENCY_SEQ = 128
IO = {
    "inputs": [
        {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
        {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
    ],
    "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", "dim"]}],
}


class EncoderBuild:
    """One encoder build: the teacher (loaded once, lazily), its tokenizer and the driver's stage records."""

    def __init__(
        self, cfg: RunConfig, cache: StageCache, progress: Progress, route: dict, student: Path | None = None
    ) -> None:
        self.build = Build(cfg, cache, progress)
        self.student_dir = student  # --student: a student `edgepipe distill` trained, maybe on another machine
        self.cfg, self.recipe, self.target, self.route = cfg, cfg.recipe, cfg.target, route
        self.teacher_dir = resolve_teacher(self.recipe)
        self.modules = read_modules(self.teacher_dir)  # sentence-transformers modules, None for a plain checkpoint
        self.tokenizer_path = sentence_tokenizer(tokenizer_file(self.teacher_dir), self.modules, cache.root)
        self.teacher_hash = checkpoint_key(self.teacher_dir)
        self.selection: dict | None = None  # the candidates measured when the target names several (select)
        v = self.recipe.validate
        self.tok = load_tokenizer(self.tokenizer_path, self.max_len(v.max_len))
        self.held_out = {
            "data": v.data,
            "sha256": sha256_file(resolve_data_file(v.data)),
            "samples": v.samples,
            "max_len": self.max_len(v.max_len),
        }
        self.notes()

    def max_len(self, asked: int) -> int:
        """Tokens per text: the recipe's, cut to the sentence-transformers model's ``max_seq_length``."""
        limit = self.modules.max_seq_length if self.modules else None
        return min(asked, limit) if limit else asked

    def notes(self) -> None:
        """One line each for what the bundle does not do the way its source does (prompts, a dropped head)."""
        m, say = self.modules, self.build.progress.note
        if m and m.prompts:
            default = f"; encode() prepends {m.default_prompt_name!r} by default" if m.default_prompt_name else ""
            say(
                f"the model has prompts ({', '.join(m.prompts)}){default}: the bundle embeds the text it is given, "
                "so prepend a prompt to the text yourself"
            )
        head = None if m else task_head(read_config(self.teacher_dir))
        if head:
            say(
                f"{head}'s task head is dropped: edgepipe's encoder builds sentence embeddings; build the checkpoint "
                "without --task (through Optimum) to keep it"
            )
        self._teacher = None

    def teacher(self):
        if self._teacher is None:
            from edgepipe.models.hf import load_encoder

            self._teacher = load_encoder(self.teacher_dir)
        return self._teacher

    def validation_batches(self) -> list[dict[str, np.ndarray]]:
        v = self.recipe.validate
        return list(batches(self.tok, read_sentences(v.data, v.samples), VALIDATE_BATCH))

    # -- the build ----------------------------------------------------------------------------------------------
    def run(self) -> Bundle:
        teacher_emb = self.reference()
        if self.student_dir is not None and not self.recipe.student:
            raise UsageError(
                f"--student {self.student_dir}: recipe {self.recipe.name} has no [student] table to take it.",
                hint="Build the recipe the student was distilled from, or drop --student.",
            )
        if self.student_dir is not None:
            model_stage = self.given_student(self.student_dir)
        else:
            model_stage = self.student_stage(teacher_emb) if self.recipe.student else None
        model_hash = model_stage.key if model_stage else self.teacher_hash
        model_loader = (lambda: load_student(model_stage.dir)) if model_stage else self.teacher
        # The unquantized model's own held-back embeddings: the reference a quantized artifact is judged against.
        model_ref = np.load(model_stage.dir / "held_out.npy") if model_stage else teacher_emb

        def attempt(precision: str, target: Target | None = None) -> Attempt:
            target = target or self.target
            lowered = self.lower_stage(model_hash, model_loader, model_ref, precision, target)
            validated = self.validate_stage(lowered, model_ref, teacher_emb, precision, target)
            vs_pytorch = validated.meta["vs_pytorch"]
            return Attempt(precision, lowered, validated, 1.0 - vs_pytorch["mean_cosine"] if vs_pytorch else 0.0)

        if self.cfg.select_runtime:
            best, latency = self.select(attempt)
        else:
            best = self.build.fit_precision(
                attempt, self.target.precisions, "encoder", "mean cosine vs the unquantized model on held-back text"
            )
            latency = self.latency_stage(best.lowered)
        v = self.recipe.validate
        vs_teacher = (best.validated.meta["vs_teacher"] or {}).get("mean_cosine")
        if vs_teacher is None:
            if v.strict:
                raise BuildError(
                    f"{self.recipe.name} at {best.precision}: the bundle cannot run here "
                    f"({best.validated.meta['why']}), so validate.min_cosine cannot be checked (strict).",
                    hint="Build without --strict and check it on the device with `edgepipe bench`.",
                )
            self.build.progress.note(f"{NOT_VALIDATED}: {best.validated.meta['why']}")
        elif vs_teacher < v.min_cosine:
            missed = f"held-back mean cosine vs the teacher is {vs_teacher:.4f}, below the recipe's bar {v.min_cosine}"
            if v.strict:
                raise BuildError(
                    f"{self.recipe.name} at {best.precision}: {missed} (validate.min_cosine, strict).",
                    hint="More distill.steps or a wider student would close it; without --strict it ships with a "
                    "warning.",
                )
            self.build.progress.note(
                f"{missed} (validate.min_cosine): more distill.steps or a wider student would close it"
            )
        return self.write_bundle(best, latency, model_loader)

    def select(self, attempt: Callable[[str, Target], Attempt]) -> tuple[Attempt, StageResult]:
        """Lower, validate and time every candidate of the target here; the fastest inside the budget ships.

        A candidate whose runtime is not installed, whose plan this CPU cannot run, or whose held-back drop breaks
        ``quantize.fidelity_budget`` is recorded with the reason and left out. The winner becomes the bundle's
        target (its runtime and plan); the manifest's ``selection`` lists every candidate and why the winner won.
        """
        budget, rows, best = self.recipe.quantize.fidelity_budget, [], None
        for candidate in self.target.candidates:
            target = self.target.for_candidate(candidate)
            row: dict = {"candidate": candidate}
            try:
                tried = attempt(target.precision, target)
                latency = self.latency_stage(tried.lowered, target)
            except EdgepipeError as exc:
                rows.append({**row, "left_out": exc.message})
                self.build.progress.note(f"candidate {candidate} left out: {exc.message}")
                continue
            ms = latency.meta["p50_ms"] if latency else None
            vs_teacher = (tried.validated.meta["vs_teacher"] or {}).get("mean_cosine")
            row.update(p50_ms=ms, drop=round(tried.drop, 6), mean_cosine_vs_teacher=vs_teacher)
            if ms is None:
                row["left_out"] = "not measurable on this machine"
            elif tried.drop > budget:
                row["left_out"] = f"drop {tried.drop:.4f} > budget {budget}"
            elif best is None or ms < best[2].meta["p50_ms"]:
                best = (target, tried, latency)
            rows.append(row)
        if best is None:
            raise BuildError(
                f"No candidate of target {self.target.name} validated inside the fidelity budget {budget}: "
                + "; ".join(f"{r['candidate']}: {r['left_out']}" for r in rows),
                hint="Pass --precision to build the target's own runtime at one plan, or raise "
                "quantize.fidelity_budget with --set.",
            )
        target, tried, latency = best
        winner = f"{target.runtime}:{target.precision}"
        self.selection = {
            "measure": f"p50 ms at 1x{LATENCY_SEQ} on this machine; held-back drop vs the unquantized model "
            f"<= budget {budget}",
            "candidates": rows,
            "winner": winner,
            "why": f"fastest of the candidates inside the budget ({latency.meta['p50_ms']} ms)",
        }
        self.target = self.build.target = target
        self.build.progress.note(f"shipping {winner}: {self.selection['why']}")
        return tried, latency

    def reference(self) -> np.ndarray:
        """The teacher's held-back embeddings (cached): what every bundle's fidelity is measured against."""

        def run(out: Path) -> dict:
            np.save(out / "teacher.npy", embed_torch(self.teacher(), self.validation_batches()))
            return {"sentences": self.recipe.validate.samples}

        payload = {"teacher": self.teacher_hash, "held_out": self.held_out}
        ref = self.build.stage("reference", payload, run, "teacher on held-back text")
        return np.load(ref.dir / "teacher.npy")

    def student_payload(self) -> dict:
        """The distill stage's cache payload: teacher, student shape, recipe, data and training arithmetic."""
        recipe = self.recipe
        d = recipe.distill
        data_sha = sha256_file(resolve_data_file(d.data))
        precision = training_precision(d, recipe.student.attention)  # "auto" differs by CPU
        n = d.sentences or d.steps * d.batch_size
        # The teacher's targets serve any student of this (teacher, data, precision); 2: every layer is pooled.
        targets_key = digest([self.teacher_hash, data_sha, d.max_len, n, d.seed, d.token_weight > 0, 2, precision])
        return {
            "teacher": self.teacher_hash,
            "student": recipe.student.__dict__,
            "distill": d.__dict__,
            "data": data_sha,
            "precision": precision,
            "targets": targets_key,
        }

    def recipe_hash(self) -> str:
        """What a student depends on in the recipe: teacher, student shape, distill table, data and held-back set.

        Unlike the distill stage's cache key it leaves out package versions and the arithmetic "auto" resolved to,
        so a student distilled on a GPU cluster matches the same recipe built on a laptop (``--student``).
        """
        payload = self.student_payload()
        return digest({**{k: payload[k] for k in ("teacher", "student", "distill", "data")}, "held_out": self.held_out})

    def given_student(self, path: Path) -> StageResult:
        """``--student DIR``: the entry `edgepipe distill` wrote (or a copy of it), checked against this recipe.

        Raises:
            UsageError: DIR holds no student from `edgepipe distill`, or one of another recipe.
        """
        try:
            meta = json.loads((path / "meta.json").read_text())
            model_hash = checkpoint_hash(path)
            load_student(path)
        except (OSError, ValueError, ModelError):
            raise UsageError(
                f"--student {path} holds no student from `edgepipe distill` (meta.json, config.json, "
                "model.safetensors).",
                hint="Pass the directory `edgepipe distill` printed as its student, copied whole.",
            ) from None
        ours, theirs = self.recipe_hash(), meta.get("recipe_hash")
        if theirs != ours:
            raise UsageError(
                f"--student {path} was distilled for recipe hash {theirs}; this build's {self.recipe.name} (with its "
                f"--set overrides) hashes to {ours}.",
                hint=f"Build with the recipe and overrides it was distilled from ({meta.get('recipe', '?')}), or "
                f"distill this one: edgepipe distill --model {self.recipe.name}.",
            )
        config = {"student": self.recipe.student.__dict__, **self.recipe.distill.__dict__, "from": str(path)}
        metrics = {k: v for k, v in meta.items() if k != "seconds"}
        record = {"stage": "distill", "config": config, "cache_key": model_hash, "cache_hit": True, "seconds": 0.0}
        self.build.records.append({**record, "metrics": metrics})
        self.build.progress.note(f"student from --student {path} (recipe hash {ours} matches)")
        return StageResult("distill", model_hash, path, meta, True, 0.0)

    def student_stage(self, teacher_emb: np.ndarray | None, ranks: Ranks = SINGLE) -> StageResult | None:
        """The distill stage through the cache; under a launcher, every rank trains and rank 0 owns the entry.

        Rank 0 decides whether the entry is there and tells the others, so all take the same branch; the other
        ranks train beside it, writing nothing, and get None.
        """
        recipe, d = self.recipe, self.recipe.distill
        payload = self.student_payload()
        targets_key = payload["targets"]

        def run(out: Path) -> dict:
            metrics = distill(
                self.teacher(),
                recipe.student,
                d,
                out,
                self.build.progress,
                held_out=self.validation_batches() if ranks.main else None,
                held_out_teacher=teacher_emb,
                tokenizer_path=self.tokenizer_path,
                targets_cache=self.build.cache.root / "teacher-targets" / f"{targets_key}.npz",
                ranks=ranks,
            )
            return {**metrics, "recipe": recipe.name, "recipe_hash": self.recipe_hash()}

        cache = self.build.cache
        if ranks.world > 1 and not ranks.main:
            if not ranks.from_main(None):
                run(cache.work_dir("distill", payload))  # rank 0's directory: this rank only reads its name
            return None
        if ranks.world > 1:
            ranks.from_main(not cache.force and cache.lookup("distill", payload) is not None)
        config = {"student": recipe.student.__dict__, **d.__dict__}
        return self.build.stage("distill", payload, run, "distill student", config=config, resumable=True)

    def lower_stage(self, model_hash: str, model_loader, model_ref, precision: str, target: Target) -> StageResult:
        q = self.recipe.quantize
        runtime = get_runtime(target.runtime)
        calib_sentences = read_sentences(q.calibration, q.samples)
        example = encode(self.tok, calib_sentences[:2])
        payload = {
            "model": model_hash,
            "runtime": target.runtime,
            "options": target.options,
            "cpu_features": target.cpu_features,  # int8 choices follow them (runtimes.onnxruntime)
            "precision": precision,
            "quantize": q.__dict__,
            "calibration": sha256_file(resolve_data_file(q.calibration)),
            **({"max_len": self.max_len(q.max_len)} if self.max_len(q.max_len) != q.max_len else {}),
        }

        def run(out: Path) -> dict:
            calib_tok = load_tokenizer(self.tokenizer_path, self.max_len(q.max_len))
            quant = QuantInputs(
                calibration=list(batches(calib_tok, calib_sentences, VALIDATE_BATCH)),
                held_out=self.validation_batches(),
                reference=model_ref,
                config=q,
            )
            lowered = runtime.lower_encoder(model_loader(), example, target, precision, out, quant)
            return {
                "files": {role: p.name for role, p in lowered.files.items()},
                "report": lowered.report,
                "bytes": sum(p.stat().st_size for p in lowered.files.values()),
            }

        return self.build.stage("lower", payload, run, f"lower to {target.runtime} ({precision})")

    def validate_stage(self, lowered, model_ref, teacher_emb, precision, target: Target) -> StageResult:
        runtime = get_runtime(target.runtime)
        runnable, why = runtime.can_run_here(target)
        artifact = lowered.dir / lowered.meta["files"]["model"]
        payload = {"artifact": lowered.key, "held_out": self.held_out, "runnable": runnable}
        if not runnable:
            payload["claims"] = "none"  # earlier versions recorded the PyTorch model's cosine here

        def run(out: Path) -> dict:
            proxy = lowered.meta["report"].get("proxy")
            if not runnable and proxy:  # the lowering ran the artifact's numerics in a proxy (Ethos-U: TOSA reference)
                outputs = np.load(lowered.dir / proxy["outputs"])
                n = len(outputs)
                return {
                    "runtime": proxy["runtime"],
                    "where": why,
                    "samples": n,
                    "vs_pytorch": compare(outputs, model_ref[:n]),
                    "vs_teacher": compare(outputs, teacher_emb[:n]),
                }
            if not runnable:  # the artifact never ran: no fidelity is claimed; `edgepipe bench` on the device checks it
                return {"runtime": "not run here", "why": why, "vs_pytorch": None, "vs_teacher": None}
            outputs = embed_session(runtime.load(artifact, target), self.validation_batches())
            return {
                "runtime": target.runtime,
                "where": why,
                "vs_pytorch": compare(outputs, model_ref),
                "vs_teacher": compare(outputs, teacher_emb),
            }

        return self.build.stage(
            "validate",
            payload,
            run,
            f"validate in {target.runtime}",
            config={"held_out": self.held_out, "precision": precision},
        )

    def latency_stage(self, lowered: StageResult, target: Target | None = None) -> StageResult | None:
        target = target or self.target

        def run(out: Path) -> dict:
            session = get_runtime(target.runtime).load(lowered.dir / lowered.meta["files"]["model"], target)
            ids = encode(self.tok, read_sentences(self.recipe.validate.data, 8))["input_ids"].ravel()
            ids = np.resize(ids, (1, LATENCY_SEQ))
            feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, LATENCY_SEQ), np.int64)}
            return {"shape": [1, LATENCY_SEQ], **time_session(session, feeds)}

        return self.build.latency({"artifact": lowered.key, "shape": [1, LATENCY_SEQ]}, run, target)

    def write_bundle(self, best: Attempt, latency: StageResult | None, model_loader) -> Bundle:
        lowered = best.lowered
        files = {name: lowered.dir / name for name in lowered.meta["files"].values()}
        files["tokenizer.json"] = self.tokenizer_path  # the source's, cut and lowercased as sentence-transformers does

        def write_check(tmp: Path) -> None:
            check = encode(self.tok, read_sentences(self.recipe.validate.data, CHECK_SENTENCES))
            expected = embed_torch(model_loader(), [check])
            np.savez(
                tmp / "check.npz",
                **{f"input.{k}": v for k, v in check.items()},
                **{"output.sentence_embedding": expected},
            )

        return self.build.write_bundle(files, self.manifest(best, latency), write_check)

    def manifest(self, best: Attempt, latency: StageResult | None) -> dict:
        fidelity = {"teacher": {"mean_cosine": 1.0, "min_cosine": 1.0}}
        for rec in self.build.records:
            if rec["stage"] == "distill":  # cut (and mixer swapped) from the teacher, then trained
                if rec["metrics"].get("held_out_before"):
                    fidelity["initialised"] = rec["metrics"]["held_out_before"]
                fidelity["student"] = rec["metrics"].get("held_out")
        held = best.validated.meta
        if held["vs_teacher"] is None:  # the bundle never ran here: say so instead of quoting the PyTorch model's
            fidelity["lowered"] = {"not_validated": f"{NOT_VALIDATED}: {held['why']}"}
        else:
            fidelity["lowered"] = held["vs_teacher"]
        fidelity["lowered_vs_pytorch"] = held["vs_pytorch"]
        fidelity["bar"] = {"min_mean_cosine": self.recipe.validate.min_cosine}
        cos = fidelity["lowered"].get("mean_cosine")
        fidelity["meets_bar"] = None if cos is None else cos >= self.recipe.validate.min_cosine
        return self.build.manifest(
            kind=self.recipe.kind,
            family="encoder",
            best=best,
            latency=latency,
            route=self.route,
            source_model={"path": str(self.teacher_dir), "hash": self.teacher_hash},
            graphs={"model": best.lowered.meta["files"]["model"]},
            io={**IO, "max_seq_length": self.modules.max_seq_length} if self.modules else IO,
            fidelity=fidelity,
            **({"sentence_transformers": self.modules.to_dict()} if self.modules else {}),
            **({"selection": self.selection} if self.selection else {}),
        )


def build_encoder(
    cfg: RunConfig, cache: StageCache, progress: Progress, route: dict, student: Path | None = None
) -> Bundle:
    """Build an encoder bundle for ``cfg`` (see the module docstring); ``student``: a distilled student to use."""
    return EncoderBuild(cfg, cache, progress, route, student).run()


def cached_student(cfg: RunConfig, cache: StageCache | None = None):
    """The student a build of ``cfg``'s recipe has already distilled, loaded; None when no build made it yet.

    For benchmarks that compare runtimes on the shipped student without training one.
    """
    cache = cache or StageCache()
    entry = cache.lookup("distill", EncoderBuild(cfg, cache, Progress(quiet=True), {}).student_payload())
    return load_student(entry) if entry else None
