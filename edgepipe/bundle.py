"""Reading bundles back: verify every file against the manifest and run check.npz in the bundle's runtime.

The checks are the on-device runner's own (``edgepipe.harness.runner``), so ``edgepipe check`` here and
``edgepipe bench`` on a device judge a bundle by exactly the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.config import Target
from edgepipe.errors import BundleError, ModelError, UsageError
from edgepipe.harness import runner
from edgepipe.harness.remote import check_tolerance
from edgepipe.manifest import read_manifest
from edgepipe.runtimes import get_runtime


@dataclass
class CheckReport:
    bundle: Path
    manifest: dict
    result: dict  # runner.compare_outputs: passed, problems, max_abs_error, min/mean cosine, per-output figures
    tolerance: dict  # what the check was judged by: edgepipe's own table for the bundle's plan (check_tolerance)

    @property
    def family(self) -> str:
        return runner.bench_kind(self.manifest)

    @property
    def manifest_says(self) -> dict:
        """The tolerance the bundle's own manifest claims (reported beside the one used, never used)."""
        said = self.manifest.get("validation")
        return {k: v for k, v in said.items() if k in self.tolerance} if isinstance(said, dict) else {}

    @property
    def passed(self) -> bool:
        return self.result["passed"]


@contextmanager
def manifest_fields(path: Path) -> Iterator[None]:
    """Reading a verified manifest's other fields: one that edgepipe did not write (a bundle from elsewhere, or an
    older edgepipe's) becomes one BundleError line instead of a traceback."""
    try:
        yield
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BundleError(
            f"{path}/manifest.json has a malformed field ({type(exc).__name__}: {exc}).", hint="Rebuild the bundle."
        ) from None


def open_bundle(path: Path) -> dict:
    """Read a bundle's manifest and verify the sha256 and size of every file it lists.

    Raises:
        BundleError: No manifest, bad schema, or a missing/changed file.
    """
    manifest = read_manifest(path)
    problems = runner.verify_files(str(path), manifest)["problems"]
    if problems:
        listed = "; ".join(f"{p['path']} ({p['problem']})" for p in problems[:5])
        listed += f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise BundleError(
            f"Bundle {path} does not match its manifest: {listed}.",
            hint="Copy the bundle again or rebuild it with `edgepipe build`.",
        )
    return manifest


def check_bundle(path: Path) -> CheckReport:
    """Run the bundle's check.npz in its runtime here and compare with the expected outputs.

    Raises:
        BundleError: The bundle is incomplete, corrupt, or cannot run on this machine.
        MissingExtraError: The bundle's runtime is not installed here.
    """
    path = Path(path)
    manifest = open_bundle(path)
    tolerance = check_tolerance(manifest)
    runtime = get_runtime(manifest["runtime"])
    target = Target.from_dict(manifest["target"])
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(
            f"Bundle {path} cannot run on this machine: {why}.", hint="Run it on the device: `edgepipe bench`."
        )
    try:
        inputs, expected = runner.load_check(str(path))
        if runner.bench_kind(manifest) == "decoder":
            graphs = decoder_graphs(path, manifest)
            return CheckReport(path, manifest, runner.check_decoder(graphs, inputs, expected, tolerance), tolerance)
    except runner.RunnerError as exc:
        raise BundleError(f"Bundle {path}: {exc}.", hint="Rebuild the bundle.") from None
    graph = manifest["graphs"].get("model")  # open_bundle checked that the manifest lists it under a safe name
    if not isinstance(graph, str):
        raise BundleError(f"Bundle {path}: manifest.json has no graphs.model.", hint="Rebuild the bundle.")
    outputs = runtime.load(path / graph, target).run(inputs)
    return CheckReport(path, manifest, runner.compare_outputs(outputs, expected, tolerance), tolerance)


@dataclass
class TextFidelity:
    bundle: Path
    manifest: dict
    teacher: Path
    result: dict  # validate.compare of the bundle's embeddings with the teacher's: mean/min cosine, max abs, n
    worst: list[tuple[float, str]]  # the lowest-cosine lines, lowest first


def text_fidelity(
    path: Path, text: Path, samples: int = 512, teacher: Path | None = None, worst: int = 5, batch_size: int = 32
) -> TextFidelity:
    """Fidelity of an encoder bundle to its teacher on your own text: the bundle's sentence embeddings in its runtime
    here against the teacher's in PyTorch, one line of ``text`` per sentence (the first ``samples`` lines).

    The teacher is the checkpoint the bundle was built from (its manifest's ``source_model``, checked by content
    hash) unless ``teacher`` names another directory.

    Raises:
        UsageError: Unreadable or empty text, or a bundle that is not one of edgepipe's encoders.
        ModelError: The teacher checkpoint is missing here or is not the one the bundle was built from.
        BundleError: The bundle is corrupt or cannot run on this machine.
    """
    from edgepipe.cache import checkpoint_hash
    from edgepipe.data import batches, load_tokenizer  # torch-side imports: the device runner imports this module
    from edgepipe.models.hf import load_encoder
    from edgepipe.stages.validate import compare, cosines, embed_session, embed_torch

    path, text = Path(path), Path(text).expanduser()
    manifest = open_bundle(path)
    if manifest.get("kind") != "encoder" or manifest.get("route", {}).get("path", "edgepipe") != "edgepipe":
        raise UsageError(
            f"Bundle {path} holds {manifest.get('model')} ({manifest.get('kind')}, built via "
            f"{manifest.get('route', {}).get('path', 'edgepipe')}); --text compares sentence embeddings, so it takes "
            "bundles of edgepipe's own encoders.",
            hint="Check decoder and Optimum bundles with `edgepipe check BUNDLE` (their check.npz).",
        )
    try:
        lines = [line.strip() for line in text.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise UsageError(
            f"Cannot read --text '{text}' ({reason}).", hint="Pass a UTF-8 text file, one sentence per line."
        ) from None
    sentences = [line for line in lines if line][:samples]
    if not sentences:
        raise UsageError(f"--text '{text}' has no non-empty lines.", hint="Pass a text file, one sentence per line.")

    source = manifest.get("source_model")
    if not (isinstance(source, dict) and isinstance(source.get("path"), str) and isinstance(source.get("hash"), str)):
        raise BundleError(f"Bundle {path}'s manifest has no source_model path and hash.", hint="Rebuild the bundle.")
    teacher_dir = Path(teacher).expanduser() if teacher else Path(source["path"])
    if not teacher_dir.is_dir():
        raise ModelError(
            f"The teacher {teacher_dir} that bundle {path} was built from is not on this machine.",
            hint="Pass its checkpoint directory with --teacher.",
        )
    found = checkpoint_hash(teacher_dir)
    if found != source["hash"]:
        raise ModelError(
            f"Teacher {teacher_dir} is not the checkpoint bundle {path} was built from (hash {found}, the manifest "
            f"says {source['hash']}).",
            hint="Pass the bundle's own teacher with --teacher.",
        )
    runtime = get_runtime(manifest["runtime"])
    target = Target.from_dict(manifest["target"])
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(f"Bundle {path} cannot run on this machine: {why}.", hint="Build it for --target host-cpu.")

    tok = load_tokenizer(path / "tokenizer.json", validated_length(manifest))
    tokenized = list(batches(tok, sentences, batch_size))
    graph = manifest["graphs"].get("model")  # open_bundle checked that the manifest lists it under a safe name
    if not isinstance(graph, str):
        raise BundleError(f"Bundle {path}: manifest.json has no graphs.model.", hint="Rebuild the bundle.")
    out = embed_session(runtime.load(path / graph, target), tokenized)
    ref = embed_torch(load_encoder(teacher_dir), tokenized)
    lowest = sorted(zip(cosines(out, ref).tolist(), sentences))[:worst]
    return TextFidelity(path, manifest, teacher_dir, compare(out, ref), lowest)


def decoder_graphs(path: Path, manifest: dict, threads: int | None = None) -> runner.DecoderGraphs:
    """A decoder bundle's graphs in its runtime here; TensorRT bundles without TensorRT here run their ONNX graphs
    in onnxruntime (the proxy the build validated)."""
    if manifest["runtime"] == "tensorrt":
        from edgepipe.runtimes.tensorrt import tensorrt_here

        if tensorrt_here() is not None:
            if not isinstance(manifest["graphs"].get("proxy"), dict):
                raise runner.RunnerError(
                    "manifest.json of a TensorRT decoder has no graphs.proxy", runner.EXIT_BAD_FILES
                )
            manifest = {
                **manifest,
                "runtime": "onnxruntime",
                "graphs": manifest["graphs"]["proxy"],
                "session_config": runner.TENSORRT_PROXY_SESSION,
            }
    return runner.DecoderGraphs(str(path), manifest, threads)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    tokens: list[int]
    ttft_ms: float
    tokens_per_s: float | None  # decode rate after the first token (None when only one token was made)


def generate(path: Path, prompt: str, max_new_tokens: int = 32, threads: int | None = None, on_text=None) -> Generation:
    """Greedy generation with a decoder bundle's graphs in its runtime here (the runner's loop, tokenizer.json).

    ``on_text(piece)`` receives the generated text as it grows (for streaming output).

    Raises:
        UsageError: An empty prompt, or a bundle that is not a decoder.
        BundleError: The bundle is corrupt, has no tokenizer, or cannot run on this machine.
    """
    from tokenizers import Tokenizer

    path = Path(path)
    manifest = open_bundle(path)
    if runner.bench_kind(manifest) != "decoder":  # manifest "kind" names the model; this asks how the bundle runs
        what = (
            "an Optimum text-generation export (one graph, its cache inside)"
            if manifest.get("kind") == "decoder"
            else f"the {manifest.get('kind', 'encoder')} {manifest.get('model')}"
        )
        raise UsageError(
            f"Bundle {path} holds {what}; generate runs edgepipe's decoder bundles (prefill + decode graphs).",
            hint="Build one: edgepipe build --model tinylm-teacher (or a Llama / Mamba2 checkpoint directory)",
        )
    runtime = get_runtime(manifest["runtime"])
    runnable, why = runtime.can_run_here(Target.from_dict(manifest["target"]))
    if not runnable:
        raise BundleError(f"Bundle {path} cannot run on this machine: {why}.", hint="Build it for --target host-cpu.")
    if not (path / "tokenizer.json").is_file():
        raise BundleError(f"Bundle {path} has no tokenizer.json.", hint="Rebuild the bundle.")
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    ids = tok.encode(prompt, add_special_tokens=False).ids
    if not ids:
        raise UsageError("The prompt is empty.", hint='Pass some text: --prompt "The kernel"')
    try:
        graphs = decoder_graphs(path, manifest, threads)
        shown = [""]

        def stream(tokens: list[int]) -> None:  # the text grows; BPE bytes can split a character, so diff strings
            text = tok.decode(tokens)
            if on_text is not None and text.startswith(shown[0]) and len(text) > len(shown[0]):
                on_text(text[len(shown[0]) :])
                shown[0] = text

        eos = manifest["decoder"].get("eos_id")
        run = runner.greedy(graphs, np.asarray([ids], dtype=np.int64), max_new_tokens, eos, stream)
    except runner.RunnerError as exc:
        raise BundleError(f"Bundle {path}: {exc}.", hint="Check it with `edgepipe check`.") from None
    steps = run["step_s"]
    return Generation(
        text=tok.decode(run["tokens"]),
        prompt_tokens=len(ids),
        tokens=run["tokens"],
        ttft_ms=run["ttft_s"] * 1e3,
        tokens_per_s=len(steps) / sum(steps) if steps else None,
    )


def validated_length(manifest: dict) -> int:
    """Tokens per text the build validated: the recipe's ``validate.max_len``, cut to a sentence-transformers
    source's ``max_seq_length`` (``io.max_seq_length``), as the encoder build cuts it."""
    asked = manifest.get("recipe", {}).get("validate", {}).get("max_len", 128)
    limit = manifest.get("io", {}).get("max_seq_length")
    return min(asked, limit) if limit else asked


def load(path: Path | str) -> LoadedBundle:
    """Open a bundle for use here: every file verified against its manifest, its runtime checked on this machine.

    ``encode`` (encoders) and ``generate`` (decoders) then run the bundle's graphs in that runtime (onnxruntime,
    ExecuTorch, OpenVINO where installed), the way the build validated them.

    Raises:
        BundleError: The bundle is incomplete, corrupt, or its runtime cannot run it on this machine.
        MissingExtraError: The bundle's runtime is not installed here.
    """
    path = Path(path)
    manifest = open_bundle(path)  # a bundle from elsewhere is untrusted: sha256 of every file first
    runtime = get_runtime(manifest["runtime"])
    target = Target.from_dict(manifest["target"])
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(f"Bundle {path} cannot run on this machine: {why}.", hint="Run it on the device.")
    return LoadedBundle(path, manifest, runtime, target)


class LoadedBundle:
    """A verified bundle and its runtime here (``edgepipe.load``); the graphs load on first use."""

    def __init__(self, path: Path, manifest: dict, runtime, target: Target) -> None:
        self.path, self.manifest, self.runtime, self.target = path, manifest, runtime, target
        self._session, self._tok = None, None

    def __repr__(self) -> str:
        m = self.manifest
        return f"LoadedBundle({str(self.path)!r}: {m['model']} in {m['runtime']}, {m['precision']})"

    def encode(self, texts: str | list[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings of ``texts``, computed by the bundle's graph in its runtime.

        Texts are tokenized with the bundle's tokenizer.json and truncated at the length the build validated
        (``validated_length``).

        Args:
            texts: One sentence, or a list of them.
            batch_size: Sentences per runtime call.

        Returns:
            ``(len(texts), dim)`` float32; ``(dim,)`` for one string.

        Raises:
            UsageError: The bundle is not an encoder with a ``sentence_embedding`` output, or a text is not a str.
        """
        from edgepipe.data import batches, load_tokenizer

        m = self.manifest
        outputs = [o["name"] for o in (m.get("io") or {}).get("outputs", [])]
        if runner.bench_kind(m) != "encoder" or "sentence_embedding" not in outputs:
            raise UsageError(
                f"Bundle {self.path} holds {m.get('model')} ({m.get('kind')}, outputs {outputs}); encode returns "
                "sentence embeddings, the output edgepipe's encoders have.",
                hint="Decoder bundles: .generate(prompt); Optimum exports: run their graph with its own io.",
            )
        one = isinstance(texts, str)
        texts = [texts] if one else list(texts)
        bad = [type(t).__name__ for t in texts if not isinstance(t, str)]
        if bad:
            raise UsageError(f"encode takes strings; got {', '.join(sorted(set(bad)))}.", hint="Pass a list of str.")
        if not texts:
            _, expected = runner.load_check(str(self.path))
            return np.zeros((0, expected["sentence_embedding"].shape[-1]), np.float32)
        if self._session is None:
            self._tok = load_tokenizer(self.path / "tokenizer.json", validated_length(m))
            self._session = self.runtime.load(self.path / m["graphs"]["model"], self.target)
        runs = [self._session.run(b)["sentence_embedding"] for b in batches(self._tok, texts, batch_size)]
        out = np.concatenate(runs).astype(np.float32)
        return out[0] if one else out

    def generate(self, prompt: str, max_new_tokens: int = 32, threads: int | None = None) -> Generation:
        """Greedy continuation of ``prompt`` with a decoder bundle's prefill and decode graphs (``edgepipe generate``).

        Raises:
            UsageError: An empty prompt, or a bundle that is not one of edgepipe's decoders.
        """
        return generate(self.path, prompt, max_new_tokens, threads)
