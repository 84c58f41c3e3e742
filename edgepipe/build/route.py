"""Which recipe builds a model: edgepipe's encoder, edgepipe's decoder, or Optimum's exporters, and why.

The manifest records the route and its reason, so a user sees why a checkpoint took the path it did.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from edgepipe.config import RunConfig
from edgepipe.errors import ModelError, UsageError
from edgepipe.models.hf import encoder_config_from_hf, read_config, task_head
from edgepipe.models.sbert import MODULES_FILE

EDGEPIPE_MODEL_TYPES = ("bert",)  # what edgepipe.models.hf loads into edgepipe's own Encoder
EDGEPIPE_TASKS = (None, "sentence-similarity")  # edgepipe's encoder bundles are sentence embeddings


@dataclass(frozen=True)
class Route:
    """Which path a build takes and why: ``edgepipe`` (own models) or ``optimum`` (Optimum's exporters)."""

    path: str
    why: str
    model_type: str | None = None
    task: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def choose_route(cfg: RunConfig, checkpoint: Path) -> Route:
    """Route a build: recipes and BERT checkpoints through edgepipe, every other checkpoint through Optimum.

    A BERT checkpoint whose architecture has a task head (``BertForSequenceClassification``, ...) goes to Optimum,
    which exports it with the head (the graph gives its logits), unless ``--task sentence-similarity`` asks for
    sentence embeddings (edgepipe's encoder; the route says the head is dropped). A sentence-transformers directory
    (``modules.json``) is a sentence encoder: edgepipe's, with its modules (``models.sbert``).

    Raises:
        UsageError: ``--task`` given with a recipe (recipes build sentence encoders).
        ModelError: The checkpoint has no readable config.json, or it is a sentence-transformers model whose
            transformer edgepipe does not re-implement (Optimum would drop its Pooling/Dense/Normalize modules).
    """
    task = cfg.task
    if cfg.recipe.student is not None or cfg.recipe.path.endswith(".toml"):
        if task not in EDGEPIPE_TASKS:
            raise UsageError(
                f"--task {task} applies to checkpoint directories; recipe {cfg.recipe.name} builds sentence "
                "embeddings.",
                hint="Drop --task, or pass --model a checkpoint directory.",
            )
        return Route("edgepipe", f"recipe {cfg.recipe.name}: edgepipe's own models, distill/swap/precision plans apply")
    hf = read_config(checkpoint)
    model_type = hf.get("model_type")
    sentence_model = (checkpoint / MODULES_FILE).is_file()
    head = task_head(hf)
    if sentence_model and task is None and model_type not in EDGEPIPE_MODEL_TYPES:
        raise ModelError(
            f"{checkpoint} is a sentence-transformers model on model_type '{model_type}', which edgepipe does not "
            f"re-implement (it does {', '.join(EDGEPIPE_MODEL_TYPES)}): Optimum's export would drop its pooling, "
            "Dense and Normalize modules.",
            hint="Pass --task feature-extraction to export the transformer's token states alone through Optimum.",
        )
    if head and task is None and not sentence_model and model_type in EDGEPIPE_MODEL_TYPES:
        why = (
            f"{head} has a task head: Optimum exports it with the head (the graph gives its logits); "
            "--task sentence-similarity builds sentence embeddings with edgepipe's encoder instead, without the head"
        )
        return Route("optimum", why, model_type, task)
    if model_type in EDGEPIPE_MODEL_TYPES and task in EDGEPIPE_TASKS:
        try:
            encoder_config_from_hf(hf, checkpoint)
        except ModelError as exc:
            if sentence_model:
                raise
            return Route("optimum", f"edgepipe's BERT encoder cannot load it ({exc.message})", model_type, task)
        why = (
            f"model_type '{model_type}' is re-implemented by edgepipe (edgepipe.models.hf): "
            "distill, swap and the precision plans apply"
        )
        if sentence_model:
            why += "; its sentence-transformers modules (modules.json) are the graph's head"
        if head and not sentence_model:
            why += f"; {head}'s task head is dropped: --task {task} asks for sentence embeddings"
        return Route("edgepipe", why, model_type, task)
    if model_type in EDGEPIPE_MODEL_TYPES:
        why = f"--task {task}: edgepipe's own {model_type} encoder builds sentence embeddings only"
    else:
        why = f"model_type '{model_type}' is not one edgepipe re-implements ({', '.join(EDGEPIPE_MODEL_TYPES)})"
    return Route("optimum", why, model_type, task)


def decoder_route(cfg: RunConfig) -> Route:
    """Decoder recipes and Llama / Mamba2 checkpoints: edgepipe's own decoders."""
    teacher = cfg.recipe.teacher
    if teacher == "pretrain" or teacher.endswith(".toml"):
        return Route("edgepipe", "decoder recipe: edgepipe's own decoder, pretrained from the recipe")
    return Route(
        "edgepipe", "Llama / Mamba2 checkpoint: edgepipe's own decoders (prefill + decode graphs, KV cache plans)"
    )
