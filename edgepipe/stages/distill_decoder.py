"""Distil a decoder student from a decoder teacher: next-token KL plus last-hidden-state matching, on real text.

Students (``init_student``):

- ``windowed:W``: the teacher's own weights with windowed attention (each query sees its block and the previous
  one; decode keeps a rolling cache of 2W slots). Nothing changes shape, so the student starts as the teacher on
  every context shorter than W and distillation teaches it to do without the far context.
- ``mamba2``: Mamba-2 blocks initialised from the teacher's attention, as in "The Mamba in the Llama" (Wang et al.,
  2024) and MOHAWK (Bick et al., 2024): the SSM's C, B and x projections take the attention's W_q, W_k and W_v
  (grouped K/V heads repeated to every head, one group per head), out_proj takes W_o, and each block's RMSNorm the
  attention's input norm; the embedding, final norm and LM head are the teacher's. The depthwise conv starts as the
  identity (it passes the current token through), the z gate and the dt projection start fresh (seeded), A and D at
  Mamba-2's defaults. Mamba-2 blocks have no MLP, so the teacher's MLPs (half its layer weights) have no home.

Training reads windows of the packed training text exactly as ``stages.pretrain`` does (step s reads a seeded slice
of a permutation, so a resumed run sees the same data), and checkpoints the same way into ``out_dir/train_state``.
The loss is ``kl_weight * T^2 * KL(teacher_T || student_T) + hidden_weight * MSE(normalised last hidden states)``
with ``T = temperature``.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepipe.cache import RESUME
from edgepipe.config import DecoderConfig, DecoderDistillConfig, MambaConfig
from edgepipe.data import encode_text, read_sentences, windows
from edgepipe.errors import UsageError
from edgepipe.models.decoder import DecoderLM
from edgepipe.models.mamba import MambaLM
from edgepipe.stages.pretrain import train_steps

EVAL_BATCH = 8


def init_student(teacher: DecoderLM, form: str, mamba: dict | None = None, seed: int = 0) -> DecoderLM | MambaLM:
    """A student for ``form`` (``windowed:W`` or ``mamba2``) initialised from ``teacher`` (module docstring).

    Args:
        teacher: A full-attention DecoderLM.
        form: ``windowed:W``, ``linear`` or ``mamba2``.
        mamba: MambaConfig fields overriding the defaults derived from the teacher (``mamba2`` only).
        seed: Seeds the fresh parameters.

    Raises:
        UsageError: An unknown form, or Mamba-2 fields that do not fit the teacher's attention shapes.
    """
    torch.manual_seed(seed)
    c = teacher.cfg
    if form != "mamba2":
        student = DecoderLM(DecoderConfig(**{**c.to_dict(), "attention": form}))
        student.load_state_dict(teacher.state_dict())
        return student.eval()
    fields = {
        "vocab_size": c.vocab_size,
        "hidden": c.hidden,
        "layers": c.layers,
        "head_dim": c.head_dim,
        "state_size": c.head_dim,
        "expand": 1,  # intermediate = hidden = heads * head_dim: x takes W_v, out_proj W_o
        "n_groups": c.heads,  # one B/C group per head: C takes W_q, B the repeated W_k
        "chunk_size": 64,
        "eps": c.eps,
        "tie_embeddings": c.tie_embeddings,
        **(mamba or {}),
    }
    cfg = MambaConfig(**fields)
    if cfg.intermediate != c.heads * c.head_dim or cfg.n_groups != c.heads or cfg.state_size != c.head_dim:
        raise UsageError(
            f"A Mamba-2 student initialised from attention needs expand*hidden = heads*head_dim "
            f"({c.heads * c.head_dim}), n_groups = heads ({c.heads}) and state_size = head_dim ({c.head_dim}); "
            f"got {cfg.intermediate}, {cfg.n_groups}, {cfg.state_size}.",
            hint="Leave those fields out of [mamba]: they are derived from the teacher.",
        )
    student = MambaLM(cfg)
    with torch.no_grad():
        student.embed.weight.copy_(teacher.embed.weight)
        student.norm.weight.copy_(teacher.norm.weight)
        if not c.tie_embeddings:
            student.lm_head.weight.copy_(teacher.lm_head.weight)
        groups = c.heads // c.kv_heads
        for src, dst in zip(teacher.layers, student.layers, strict=True):
            a, mix, inner = src.attn, dst.mixer, cfg.intermediate
            dst.norm.weight.copy_(src.attn_norm.weight)
            w_k = a.k_proj.weight.reshape(c.kv_heads, c.head_dim, c.hidden).repeat_interleave(groups, 0)
            w_v = a.v_proj.weight.reshape(c.kv_heads, c.head_dim, c.hidden).repeat_interleave(groups, 0)
            gn = cfg.n_groups * cfg.state_size
            rows = mix.in_proj.weight  # [z (inner), x (inner), B (gn), C (gn), dt (heads)]
            rows[inner : 2 * inner] = w_v.reshape(inner, c.hidden)
            rows[2 * inner : 2 * inner + gn] = w_k.reshape(gn, c.hidden)
            rows[2 * inner + gn : 2 * inner + 2 * gn] = a.q_proj.weight
            mix.out_proj.weight.copy_(a.o_proj.weight)
            mix.conv1d.weight.zero_()
            mix.conv1d.weight[:, 0, -1] = 1.0  # identity: the conv passes the current token through
            if mix.conv1d.bias is not None:
                mix.conv1d.bias.zero_()
    return student.eval()


def _last_hidden(model: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """(logits, the final norm's output) of a no-cache forward."""
    seen: list[Tensor] = []
    hook = model.norm.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        logits = model(ids)
    finally:
        hook.remove()
    return logits, seen[0]


def distill_loss(
    student: nn.Module, teacher: nn.Module, batch: Tensor, cfg: DecoderDistillConfig
) -> tuple[Tensor, dict]:
    """KL at temperature T (scaled by T^2) plus MSE of the L2-normalised last hidden states; batch (b, seq + 1)."""
    ids = batch[:, :-1]
    with torch.no_grad():
        t_logits, t_hidden = _last_hidden(teacher, ids)
    s_logits, s_hidden = _last_hidden(student, ids)
    t = cfg.temperature
    kl = F.kl_div(
        F.log_softmax(s_logits / t, dim=-1).flatten(0, 1),
        F.log_softmax(t_logits / t, dim=-1).flatten(0, 1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)
    hidden = F.mse_loss(F.normalize(s_hidden, dim=-1), F.normalize(t_hidden, dim=-1)) * s_hidden.shape[-1]
    loss = cfg.kl_weight * kl + cfg.hidden_weight * hidden
    return loss, {"kl": kl.item(), "hidden": hidden.item()}


@torch.no_grad()
def evaluate(student: nn.Module, teacher: nn.Module, stream: np.ndarray, seq_len: int, max_tokens: int) -> dict:
    """Held-back perplexity of student and teacher, the student's top-1 agreement with the teacher and its KL."""
    wins = windows(stream[: max_tokens + max_tokens // seq_len + 1], seq_len + 1)
    nll_s = nll_t = agree = kl = count = 0.0
    for i in range(0, len(wins), EVAL_BATCH):
        batch = torch.from_numpy(wins[i : i + EVAL_BATCH])
        ids, target = batch[:, :-1], batch[:, 1:].reshape(-1)
        s, t = student(ids).flatten(0, 1), teacher(ids).flatten(0, 1)
        nll_s += F.cross_entropy(s, target, reduction="sum").item()
        nll_t += F.cross_entropy(t, target, reduction="sum").item()
        agree += (s.argmax(-1) == t.argmax(-1)).sum().item()
        log_t = F.log_softmax(t, dim=-1)
        kl += (log_t.exp() * (log_t - F.log_softmax(s, dim=-1))).sum().item()
        count += target.numel()
    count = max(count, 1)
    return {
        "perplexity": round(math.exp(nll_s / count), 3),
        "teacher_perplexity": round(math.exp(nll_t / count), 3),
        "top1_vs_teacher": round(agree / count, 4),
        "kl_to_teacher": round(kl / count, 4),  # mean KL(teacher || student) per token, nats
        "tokens": int(count),
    }


def distill_decoder(
    teacher: DecoderLM,
    student: nn.Module,
    tokenizer_path: Path,
    cfg: DecoderDistillConfig,
    out_dir: Path,
    progress,
    stop_after: int | None = None,
    train_sentences: list[str] | None = None,
    eval_sentences: list[str] | None = None,
) -> dict:
    """Train ``student`` to match ``teacher``; write it to ``out_dir`` as an HF directory with tokenizer.json.

    Args:
        teacher: The fp32 teacher (eval mode, frozen).
        student: From ``init_student``.
        tokenizer_path: The teacher's tokenizer.json (copied into ``out_dir``).
        cfg: Budget and loss weights.
        out_dir: Output; ``out_dir/train_state`` holds the resumable checkpoint while training.
        progress: ``edgepipe.progress.Progress``.
        stop_after: Stop (checkpointed) after this many steps in total: an interruption for tests.
        train_sentences, eval_sentences: Text instead of ``cfg.data`` / ``cfg.eval_data`` (tests).

    Returns:
        Metrics: steps, seconds per step, loss curve, held-back perplexity (student, teacher) and top-1 agreement
        before and after; ``{"stopped_at": step}`` when stopped early.
    """
    from tokenizers import Tokenizer

    from edgepipe.models.hf_decoders import save_hf

    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    ckpt = out_dir / "train_state"
    tok = Tokenizer.from_file(str(tokenizer_path))
    stream = encode_text(tok, train_sentences if train_sentences is not None else read_sentences(cfg.data))
    wins = windows(stream, cfg.seq_len + 1)
    if len(wins) < cfg.batch_size:
        raise UsageError(f"{cfg.data} gives {len(wins)} windows of {cfg.seq_len + 1} tokens; a batch needs more.")
    held = encode_text(tok, eval_sentences if eval_sentences is not None else read_sentences(cfg.eval_data))
    teacher.eval().requires_grad_(False)
    before = None
    if not (ckpt / RESUME).is_file():  # a fresh run, not a resumed one
        with progress.stage("student vs teacher before distillation"):
            before = evaluate(student, teacher, held, cfg.seq_len, cfg.eval_tokens)

    def loss_fn(batch: Tensor) -> tuple[Tensor, str]:
        loss, parts = distill_loss(student, teacher, batch, cfg)
        return loss, f" (kl {parts['kl']:.3f})"

    start, end, history, seconds_per_step = train_steps(
        student, wins, cfg, ckpt, progress, "distill", loss_fn, stop_after
    )
    if end < cfg.steps:
        return {"stopped_at": end}
    student.eval()
    with progress.stage("student vs teacher on held-back text"):
        after = evaluate(student, teacher, held, cfg.seq_len, cfg.eval_tokens)
    progress.note(
        f"distill: held-back perplexity {after['perplexity']:.1f} (teacher {after['teacher_perplexity']:.1f}), "
        f"top-1 agreement {after['top1_vs_teacher']:.3f}"
    )
    save_hf(student, out_dir)
    shutil.copy2(tokenizer_path, out_dir / "tokenizer.json")
    metrics = {
        "steps": cfg.steps,
        "resumed_from": start,
        "seconds_per_step": round(seconds_per_step, 3),
        "threads": torch.get_num_threads(),
        "final_loss": round(float(np.mean(history[-20:])), 4),
        "loss_every_10": [round(float(np.mean(history[i : i + 10])), 4) for i in range(0, len(history), 10)],
        "before": before,
        "held_out": after,
        "config": asdict(cfg),
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    return metrics
