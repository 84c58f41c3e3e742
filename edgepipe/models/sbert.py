"""sentence-transformers directories: ``modules.json`` and the modules after the transformer.

``SentenceTransformer.encode`` runs the modules ``modules.json`` lists, in order: the transformer (a Hugging Face
checkpoint in the directory itself or in a sub-folder), ``Pooling`` (``1_Pooling/config.json``: cls, max, mean,
mean_sqrt_len_tokens, weightedmean, lasttoken, several concatenated; ``include_prompt``), any ``Dense`` layers
(``2_Dense/config.json`` + weights), ``Normalize``; ``Dropout`` does nothing at inference. ``read_modules`` turns
them into the head edgepipe's ``Encoder`` computes inside its graph (``models.transformer.sentence_head``), and the
tokenizer settings the bundle's ``tokenizer.json`` carries (``max_seq_length``, ``do_lower_case``). A module it
cannot lower stops the build with one line naming it. A directory without ``modules.json`` is a plain checkpoint:
mean pooling and L2 normalisation, edgepipe's sentence embedding.

Only configuration is read here (JSON); ``models.hf`` loads the Dense weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgepipe.errors import ModelError
from edgepipe.models.transformer import POOLING_MODES, DenseSpec

MODULES_FILE = "modules.json"
RESAVE = "Re-save the model with SentenceTransformer.save()."
# sentence-transformers' legacy pooling keys, in the order its Pooling concatenates them
LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
TORCH_ACTIVATIONS = {  # Dense's activation_function (a torch.nn class path) -> ACTIVATIONS key
    "torch.nn.modules.linear.Identity": "identity",
    "torch.nn.modules.activation.Tanh": "tanh",
    "torch.nn.modules.activation.ReLU": "relu",
    "torch.nn.modules.activation.GELU": "gelu",
    "torch.nn.modules.activation.Sigmoid": "sigmoid",
}
LOWERED = ("Transformer", "Pooling", "Dense", "Normalize", "Dropout")  # module classes edgepipe lowers
ST_CONFIGS = ("sentence_bert_config.json", "sentence_roberta_config.json", "sentence_distilbert_config.json")


@dataclass(frozen=True)
class SentenceModules:
    """What a sentence-transformers directory's modules compute after the transformer, and how it tokenizes."""

    transformer: str = ""  # the Hugging Face checkpoint's folder inside the directory ("": the directory itself)
    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    dense: tuple[DenseSpec, ...] = ()
    dense_paths: tuple[str, ...] = ()  # the folder of each Dense layer (its config.json and weights)
    normalize: bool = True
    max_seq_length: int | None = None
    do_lower_case: bool = False
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    modules: tuple[str, ...] = ()  # the module classes in order, as modules.json names them

    @property
    def default_head(self) -> bool:
        """Whether the head is the one a plain checkpoint gets (mean pooling, no Dense, normalised)."""
        return self.pooling == ("mean",) and not self.dense and self.normalize

    def to_dict(self) -> dict:
        return asdict(self)


def _read_json(path: Path, source: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{source}: {path.relative_to(source)} is missing.", hint=RESAVE) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}).", hint=RESAVE) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object.", hint=RESAVE)
    return data


def _class_name(kind: str) -> str:
    """``sentence_transformers.models.Pooling`` / ``sentence_transformers.sentence_transformer.modules.pooling.Pooling``
    -> ``Pooling``; anything outside sentence_transformers keeps its full path (custom code)."""
    return kind.rsplit(".", 1)[-1] if kind.startswith("sentence_transformers.") else kind


def read_modules(path: Path) -> SentenceModules | None:
    """The modules of the sentence-transformers directory ``path``; None when it has no ``modules.json``.

    Raises:
        ModelError: A module edgepipe cannot lower (named), modules in an order it does not compute, or a broken
            module config.
    """
    path = Path(path)
    if not (path / MODULES_FILE).is_file():
        return None
    try:
        listed = json.loads((path / MODULES_FILE).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{path / MODULES_FILE} is not valid JSON ({exc}).", hint=RESAVE) from None
    if not isinstance(listed, list) or not all(isinstance(m, dict) and "type" in m for m in listed):
        raise ModelError(f"{path / MODULES_FILE} is not a list of modules.", hint=RESAVE)
    names = tuple(_class_name(m["type"]) for m in listed)
    for module, name in zip(listed, names):
        if name not in LOWERED:
            raise ModelError(
                f"{path}: module {module.get('path') or module.get('name')} ({module['type']}) is not one edgepipe "
                f"lowers (it lowers {', '.join(LOWERED)}).",
                hint="Remove it from modules.json if the model works without it, or export with sentence-transformers.",
            )
    if names[:1] != ("Transformer",) or names.count("Transformer") != 1:
        raise ModelError(f"{path}: modules.json must start with the one Transformer module (it lists {list(names)}).")
    fields: dict = {"transformer": listed[0].get("path", ""), "modules": names}
    fields.update(_transformer_settings(path, listed[0].get("path", "")))
    fields.update(_prompts(path))
    dense, dense_paths, seen_pooling, seen_normalize = [], [], False, False
    for module, name in zip(listed[1:], names[1:]):
        where = path / module.get("path", "")
        if name == "Pooling":
            if seen_pooling or dense or seen_normalize:
                raise ModelError(f"{path}: a second Pooling, or Pooling after Dense/Normalize, is not lowered.")
            seen_pooling = True
            fields.update(_pooling(_read_json(where / "config.json", path), where))
        elif name == "Dense":
            if not seen_pooling or seen_normalize:
                raise ModelError(
                    f"{path}: Dense module {module.get('path')} "
                    f"{'after Normalize' if seen_normalize else 'before Pooling'} is not lowered "
                    "(edgepipe's head: Pooling, Dense..., Normalize)."
                )
            dense.append(_dense(_read_json(where / "config.json", path), where))
            dense_paths.append(module.get("path", ""))
        elif name == "Normalize":
            config = _read_json(where / "config.json", path) if (where / "config.json").is_file() else {}
            if config.get("module_input_name", "sentence_embedding") != "sentence_embedding":
                raise ModelError(f"{where}: Normalize of {config['module_input_name']!r} is not lowered.")
            seen_normalize = True
    if not seen_pooling:
        raise ModelError(
            f"{path}: modules.json has no Pooling module: the model gives token embeddings, not a sentence embedding.",
            hint="edgepipe builds sentence embeddings; add a Pooling module, or build the checkpoint with --task.",
        )
    if not fields["include_prompt"] and fields["default_prompt_name"]:
        raise ModelError(
            f"{path}: Pooling excludes the prompt (include_prompt = false) and encode() prepends the default prompt "
            f"{fields['default_prompt_name']!r}: the graph takes token ids, so it cannot tell prompt tokens apart.",
            hint="Set default_prompt_name to null in config_sentence_transformers.json to build the prompt-free "
            "encoder.",
        )
    return SentenceModules(**fields, dense=tuple(dense), dense_paths=tuple(dense_paths), normalize=seen_normalize)


def _pooling(config: dict, where: Path) -> dict:
    mode = config.get("pooling_mode")
    if mode is None:
        modes = tuple(m for key, m in LEGACY_POOLING_KEYS.items() if config.get(key)) or ("mean",)
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad:
        raise ModelError(f"{where}: pooling mode {bad[0]!r} is not lowered (accepted: {', '.join(POOLING_MODES)}).")
    return {"pooling": modes, "include_prompt": bool(config.get("include_prompt", True))}


def _dense(config: dict, where: Path) -> DenseSpec:
    activation = config.get("activation_function", "torch.nn.modules.activation.Tanh")
    if activation not in TORCH_ACTIVATIONS:
        raise ModelError(
            f"{where}: Dense activation {activation!r} is not lowered "
            f"(accepted: {', '.join(a.rsplit('.', 1)[-1] for a in TORCH_ACTIVATIONS)}).",
        )
    for key in ("module_input_name", "module_output_name"):
        if config.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise ModelError(f"{where}: Dense on {config[key]!r} is not lowered (only on the sentence embedding).")
    try:
        spec = DenseSpec(
            in_features=int(config["in_features"]),
            out_features=int(config["out_features"]),
            bias=bool(config.get("bias", True)),
            activation=TORCH_ACTIVATIONS[activation],
            residual=bool(config.get("use_residual", False)),
        )
    except KeyError as exc:
        raise ModelError(f"{where}/config.json lacks {exc.args[0]!r}.", hint=RESAVE) from None
    return spec


def _transformer_settings(path: Path, folder: str) -> dict:
    """``max_seq_length`` and ``do_lower_case`` as sentence-transformers resolves them for the Transformer module:
    its config file, else the tokenizer's ``model_max_length``, capped at ``max_position_embeddings``."""
    where = path / folder
    config = next((_read_json(where / n, path) for n in ST_CONFIGS if (where / n).is_file()), {})
    length = config.get("max_seq_length")
    if length is None:
        tok_config = where / "tokenizer_config.json"
        tok = _read_json(tok_config, path) if tok_config.is_file() else {}
        length = tok.get("model_max_length")
        if not isinstance(length, int) or length > 1_000_000:  # transformers' "no limit" is 1e30
            length = None
        hf = where / "config.json"
        positions = _read_json(hf, path).get("max_position_embeddings") if hf.is_file() else None
        if isinstance(positions, int) and positions > 0:
            length = positions if length is None else min(length, positions)
    return {"max_seq_length": length, "do_lower_case": bool(config.get("do_lower_case", False))}


def _prompts(path: Path) -> dict:
    file = path / "config_sentence_transformers.json"
    config = _read_json(file, path) if file.is_file() else {}
    prompts = {k: v for k, v in (config.get("prompts") or {}).items() if isinstance(v, str) and v}
    return {"prompts": prompts, "default_prompt_name": config.get("default_prompt_name")}


def sentence_tokenizer(src: Path, modules: SentenceModules | None, cache_root: Path) -> Path:
    """``src`` (a ``tokenizer.json``) as sentence-transformers tokenizes for ``modules``: truncation at
    ``max_seq_length`` and, with ``do_lower_case``, a Lowercase normaliser first (what its Transformer module does).

    Returns ``src`` itself for a plain checkpoint, else the rewritten file, kept under ``cache_root/tokenizers/`` by
    content (the build's own tokenization and the bundle's ``tokenizer.json`` both use it).
    """
    if modules is None or (modules.max_seq_length is None and not modules.do_lower_case):
        return src
    from tokenizers import Tokenizer, normalizers

    tok = Tokenizer.from_file(str(src))
    if modules.max_seq_length:
        tok.enable_truncation(max_length=modules.max_seq_length)
    if modules.do_lower_case:
        steps = [normalizers.Lowercase()] + ([tok.normalizer] if tok.normalizer is not None else [])
        tok.normalizer = normalizers.Sequence(steps)
    text = tok.to_str()
    out = Path(cache_root) / "tokenizers" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out)
    return out
