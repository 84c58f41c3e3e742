"""Pretrain a small LLaMA-style decoder from scratch on ``calibration_data/train.txt``: the tinylm teacher.

Two steps, both seeded and deterministic on CPU:

1. ``train_tokenizer``: a byte-level BPE (``tokenizers``) with ``<|bos|>``, ``<|eos|>`` and ``<|pad|>``.
2. ``pretrain``: every sentence is tokenized and followed by ``<|eos|>``, the file is packed into one token stream
   and cut into windows of ``seq_len + 1`` tokens; step ``s`` reads a fixed, seeded slice of a permutation of the
   windows, so the data a step sees is a function of ``s`` alone. AdamW with linear warm-up and cosine decay.
   Weights (safetensors) and optimizer state (``torch.save``, read back with ``weights_only=True``) are written
   every ``checkpoint_every`` steps, so an interrupted run resumes and ends with the same weights.

The result is a Hugging Face Llama directory (``save_hf``: config.json + model.safetensors) plus tokenizer.json and
metrics.json, which ``edgepipe.models.hf_decoders.load_decoder`` reads like any user's Llama checkpoint.

``python -m edgepipe.stages.pretrain --out ~/.cache/edgepipe/tinylm-teacher`` trains the recipe's default.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgepipe.cache import load_checkpoint, remove_checkpoints, save_checkpoint
from edgepipe.config import MODELS_DIR, SPECIAL_TOKENS, DecoderConfig, PretrainConfig, load_recipe
from edgepipe.data import encode_text, read_sentences, windows
from edgepipe.errors import UsageError
from edgepipe.models.decoder import DecoderLM

ETA_AFTER = 5  # steps before the progress note with the time estimate
RECIPE = MODELS_DIR / "tinylm-teacher.toml"


def train_tokenizer(sentences: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``sentences``; the same sentences give the same tokenizer.

    Args:
        sentences: Training text, one sentence per item.
        vocab_size: Vocabulary size including the 256 byte tokens and ``SPECIAL_TOKENS`` (ids 0, 1, 2).

    Returns:
        The trained ``tokenizers.Tokenizer`` (no post-processor: ``encode_text`` adds ``<|eos|>`` itself).
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sentences, trainer=trainer, length=len(sentences))
    return tok


def batch_indices(step: int, n_windows: int, batch_size: int, seed: int) -> np.ndarray:
    """Window indices for ``step``: consecutive slices of a seeded permutation, a new permutation each epoch.

    A pure function of ``step``, so a resumed run reads the same data as an uninterrupted one.
    """
    per_epoch = max(1, n_windows // batch_size)
    epoch, slot = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return perm[slot * batch_size : (slot + 1) * batch_size]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then cosine decay to ``cfg.lr * cfg.min_lr_ratio`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def init_weights(model: DecoderLM, seed: int) -> None:
    """GPT-2-style init: N(0, 0.02) for linears and the embedding, residual outputs scaled by 1/sqrt(2 * layers)."""
    gen = torch.Generator().manual_seed(seed)
    resid = 0.02 / math.sqrt(2 * model.cfg.layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                std = resid if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif name.endswith("bias"):
                p.zero_()


def _optimizer(model: DecoderLM, cfg: PretrainConfig) -> torch.optim.AdamW:
    # No weight decay on norms and biases (1-D parameters).
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def lm_loss(model: DecoderLM, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; batch: (b, seq_len + 1) int64."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


@torch.no_grad()
def perplexity(model: DecoderLM, stream: np.ndarray, seq_len: int, max_tokens: int, batch_size: int = 8) -> float:
    """exp(mean next-token loss) over non-overlapping windows of ``seq_len + 1`` tokens, at most ``max_tokens``."""
    was_training = model.training
    model.eval()
    wins = windows(stream[: max_tokens + max_tokens // seq_len + 1], seq_len + 1)
    total, count = 0.0, 0
    for i in range(0, len(wins), batch_size):
        batch = torch.from_numpy(wins[i : i + batch_size])
        total += lm_loss(model, batch).item() * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    return math.exp(total / max(1, count))


def train_steps(model, wins: np.ndarray, cfg, ckpt: Path, progress, label: str, loss_fn, stop_after: int | None):
    """The training loop pretraining and LM distillation share: seeded batches of ``wins`` by step, warm-up +
    cosine lr, clipped AdamW steps, progress with the loss, an early time estimate, resumable checkpoints.

    Args:
        model: Trained in place (resumed from ``ckpt`` if a checkpoint is there).
        wins: (n, seq_len + 1) token windows.
        cfg: Has steps, batch_size, seed, lr, warmup_steps, min_lr_ratio, weight_decay, grad_clip, checkpoint_every.
        ckpt: The checkpoint directory.
        progress: ``edgepipe.progress.Progress``.
        label: The progress bar's name.
        loss_fn: batch (b, seq_len + 1) -> (loss, extra text for the progress bar).
        stop_after: Stop (checkpointed) after this many steps in total.

    Returns:
        (start step, end step, loss history, seconds per step of this run).
    """
    model.train()
    opt = _optimizer(model, cfg)
    start, history = _resume(ckpt, model, opt)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    t0 = time.perf_counter()
    with progress.steps(label, cfg.steps) as bar:
        bar.set(start)
        for step in range(start, end):
            batch = torch.from_numpy(wins[batch_indices(step, len(wins), cfg.batch_size, cfg.seed)])
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss, extra = loss_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            history.append(loss.item())
            bar.advance(info=f"loss {np.mean(history[-20:]):.3f}{extra}")
            if step == start + ETA_AFTER:
                per_step = (time.perf_counter() - t0) / (ETA_AFTER + 1)
                progress.note(
                    f"{label}: {end - start} steps at {per_step:.2f} s/step here "
                    f"({torch.get_num_threads()} threads), about {per_step * (end - start) / 60:.1f} min"
                )
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == end:
                _checkpoint(ckpt, model, opt, step + 1, history)
    return start, end, history, (time.perf_counter() - t0) / max(1, end - start)


def _state_dict(model: DecoderLM) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage: a tied lm_head is the embedding, so it is left out and re-tied on load.
    skip = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in skip}


def _checkpoint(ckpt: Path, model: DecoderLM, opt, step: int, history: list[float]) -> None:
    # weights and state of one step, then the pointer: a kill mid-write leaves the previous checkpoint in force
    save_checkpoint(ckpt, step, _state_dict(model), {"optimizer": opt.state_dict(), "history": history})


def _resume(ckpt: Path, model: DecoderLM, opt) -> tuple[int, list[float]]:
    saved = load_checkpoint(ckpt)
    if saved is None:
        return 0, []
    step, weights, state = saved
    try:
        model.load_state_dict(weights, strict=not model.cfg.tie_embeddings)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError):  # another model's checkpoint: start over
        return 0, []
    return step, list(state["history"])


def pretrain(
    model_cfg: DecoderConfig,
    cfg: PretrainConfig,
    out_dir: Path,
    progress,
    stop_after: int | None = None,
    train_sentences: list[str] | None = None,
    eval_sentences: list[str] | None = None,
) -> dict:
    """Train a tokenizer and a decoder from scratch; write an HF Llama directory with tokenizer.json into ``out_dir``.

    Args:
        model_cfg: Architecture; ``vocab_size`` is replaced by the tokenizer's, ``max_context`` by ``cfg.seq_len``
            if smaller.
        cfg: Tokenizer and training budget.
        out_dir: Output directory; ``out_dir/train_state`` holds the resumable checkpoint while training.
        progress: ``edgepipe.progress.Progress`` (quiet in tests).
        stop_after: Stop (checkpointed, not finished) after this many steps in total: an interruption for tests.
        train_sentences, eval_sentences: Text to use instead of ``cfg.data`` / ``cfg.eval_data`` (tests).

    Returns:
        Metrics: steps, final loss, loss curve every 10 steps, seconds per step, held-back perplexity, tokens seen.
        With ``stop_after`` the run stops early and returns ``{"stopped_at": step}``.
    """
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    ckpt = out_dir / "train_state"
    ckpt.mkdir(parents=True, exist_ok=True)
    train_text = train_sentences if train_sentences is not None else read_sentences(cfg.data)
    tok_path = ckpt / "tokenizer.json"
    if tok_path.is_file():  # a resumed run keeps the tokenizer the checkpoint was trained with
        tok = Tokenizer.from_file(str(tok_path))
    else:
        with progress.stage(f"BPE tokenizer ({cfg.vocab_size} tokens) on {len(train_text)} sentences"):
            tok = train_tokenizer(train_text, cfg.vocab_size)
        tok.save(str(tok_path))
    stream = encode_text(tok, train_text)
    wins = windows(stream, cfg.seq_len + 1)
    if len(wins) < cfg.batch_size:
        raise UsageError(
            f"{cfg.data} gives {len(wins)} windows of {cfg.seq_len + 1} tokens; a batch needs {cfg.batch_size}.",
            hint="Use more text or a smaller pretrain.batch_size / seq_len.",
        )
    arch = DecoderConfig(
        **{
            **model_cfg.to_dict(),
            "vocab_size": tok.get_vocab_size(),
            "max_context": max(model_cfg.max_context, cfg.seq_len),
        }
    )
    model = DecoderLM(arch)
    init_weights(model, cfg.seed)
    start, end, history, seconds_per_step = train_steps(
        model, wins, cfg, ckpt, progress, "pretrain", lambda batch: (lm_loss(model, batch), ""), stop_after
    )
    if end < cfg.steps:
        return {"stopped_at": end}

    eval_text = eval_sentences if eval_sentences is not None else read_sentences(cfg.eval_data)
    with progress.stage("held-back perplexity"):
        ppl = perplexity(model, encode_text(tok, eval_text), cfg.seq_len, cfg.eval_tokens)
    progress.note(f"pretrain: held-back perplexity {ppl:.2f} on {cfg.eval_data} ({cfg.eval_tokens} tokens max)")

    from edgepipe.models.hf_decoders import save_hf

    model.eval()
    save_hf(model, out_dir)
    tok.save(str(out_dir / "tokenizer.json"))
    metrics = {
        "steps": cfg.steps,
        "resumed_from": start,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "train_tokens": int(len(stream)),
        "final_loss": round(float(np.mean(history[-20:])), 4),
        "loss_every_10": [round(float(np.mean(history[i : i + 10])), 4) for i in range(0, len(history), 10)],
        "seconds_per_step": round(seconds_per_step, 3),
        "threads": torch.get_num_threads(),
        "held_out_perplexity": round(ppl, 3),
        "eval_data": cfg.eval_data,
        "parameters": sum(p.numel() for p in model.parameters()),
        "config": asdict(cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    remove_checkpoints(ckpt)
    (ckpt / "tokenizer.json").unlink(missing_ok=True)
    ckpt.rmdir()
    return metrics


def main(argv: list[str] | None = None) -> None:
    """Pretrain the tinylm teacher: ``python -m edgepipe.stages.pretrain --out ~/.cache/edgepipe/tinylm-teacher``."""
    import argparse

    from edgepipe.progress import Progress

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--out", type=Path, required=True, help="Output directory (HF Llama checkpoint + tokenizer.json).")
    ap.add_argument("--recipe", type=Path, default=RECIPE, help="Decoder recipe TOML ([model], [pretrain]).")
    ap.add_argument("--steps", type=int, help="Override pretrain.steps.")
    ap.add_argument("--batch-size", type=int, help="Override pretrain.batch_size.")
    ap.add_argument("--lr", type=float, help="Override pretrain.lr.")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's).")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    tables = load_recipe(str(args.recipe)).decoder
    if tables is None:
        raise SystemExit(f'{args.recipe} is not a decoder recipe (kind = "decoder").')
    cfg = tables.pretrain
    arch = {k: v for k, v in tables.model.items() if k != "max_context"}  # a cache length, not weights
    model_cfg = DecoderConfig(**{**arch, "vocab_size": cfg.vocab_size, "max_context": cfg.seq_len})
    overrides = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr}
    cfg = PretrainConfig(**{**asdict(cfg), **{k: v for k, v in overrides.items() if v is not None}})
    metrics = pretrain(model_cfg, cfg, args.out.expanduser(), Progress())
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("loss_every_10", "config")}, indent=2))


if __name__ == "__main__":
    main()
