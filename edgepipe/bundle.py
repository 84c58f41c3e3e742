"""Reading bundles back: verify every file against the manifest and run check.npz in the bundle's runtime.

The checks are the on-device runner's own (``edgepipe.harness.runner``), so ``edgepipe check`` here and
``edgepipe bench`` on a device judge a bundle by exactly the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.config import Target
from edgepipe.errors import BundleError, UsageError
from edgepipe.harness import runner
from edgepipe.manifest import read_manifest
from edgepipe.runtimes import get_runtime


@dataclass
class CheckReport:
    bundle: Path
    manifest: dict
    result: dict  # runner.compare_outputs: passed, problems, max_abs_error, min/mean cosine, per-output figures

    @property
    def passed(self) -> bool:
        return self.result["passed"]


def open_bundle(path: Path) -> dict:
    """Read a bundle's manifest and verify the sha256 and size of every file it lists.

    Raises:
        BundleError: No manifest, bad schema, or a missing/changed file.
    """
    manifest = read_manifest(path)
    problems = runner.verify_files(str(path), manifest)["problems"]
    if problems:
        listed = "; ".join(f"{p['path']}: {p['problem']}" for p in problems[:3])
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
    runtime = get_runtime(manifest["runtime"])
    target = Target(**manifest["target"])
    runnable, why = runtime.can_run_here(target)
    if not runnable:
        raise BundleError(
            f"Bundle {path} cannot run on this machine: {why}.", hint="Run it on the device: `edgepipe bench`."
        )
    try:
        inputs, expected = runner.load_check(str(path))
        if runner.bench_kind(manifest) == "decoder":
            graphs = decoder_graphs(path, manifest)
            return CheckReport(path, manifest, runner.check_decoder(graphs, inputs, expected, manifest["validation"]))
    except runner.RunnerError as exc:
        raise BundleError(f"Bundle {path}: {exc}.", hint="Rebuild the bundle.") from None
    outputs = runtime.load(path / manifest["graphs"]["model"], target).run(inputs)
    return CheckReport(path, manifest, runner.compare_outputs(outputs, expected, manifest["validation"]))


def decoder_graphs(path: Path, manifest: dict, threads: int | None = None) -> runner.DecoderGraphs:
    """A decoder bundle's graphs in its runtime here; TensorRT bundles without TensorRT here run their ONNX graphs
    in onnxruntime (the proxy the build validated)."""
    if manifest["runtime"] == "tensorrt":
        from edgepipe.runtimes.tensorrt import tensorrt_here

        if tensorrt_here() is not None:
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
    if manifest.get("kind") != "decoder":
        raise UsageError(
            f"Bundle {path} holds the {manifest.get('kind', 'encoder')} {manifest.get('model')}; "
            "generate needs a decoder bundle.",
            hint="Build one: edgepipe build --model tinylm-teacher",
        )
    runtime = get_runtime(manifest["runtime"])
    runnable, why = runtime.can_run_here(Target(**manifest["target"]))
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
