"""Distill: cut a smaller student from the teacher, swap its token mixer, and train it to match the teacher.

The student keeps a subset of the teacher's layers (and optionally the most important FFN neurons, or the
strongest channels of the residual stream), so training starts from a model that is already close. Training
matches the teacher's sentence embedding (cosine + MSE), per student layer the mean-pooled hidden state of the
teacher layer it was initialised from, and (``token_weight``) the last layer's state of every token. Batches
group sentences of similar length, so little compute goes to padding. The teacher's outputs are computed once per
(teacher, data) and cached, so steps never run the teacher and repeat runs with a different student reuse them.

A student whose token mixer differs from the teacher's (windowed, linear, Mamba-2) can first go through
``transfer_steps`` of attention transfer (LoLCATs, Zhang et al. 2024; MOHAWK's hidden-state alignment, Bick et al.
2024): every student mixer, on its own, learns to map its teacher layer's input to that layer's attention output,
so end-to-end training starts from layers that already mix tokens the way the teacher does.

Training runs under bf16 autocast where the CPU has native bf16 (``distill.precision``; see ``training_precision``):
weights, optimizer state and losses stay fp32, the matmuls run in bf16, and a step takes half the time at the same
held-back fidelity (measured on the default recipe; README, "The default student"). The teacher's targets are then
computed under the same autocast, which takes 0.6x the fp32 time; they are stored in fp16 either way, and their
sentence embeddings stay within 1e-4 cosine of fp32 ones.

Runs unchanged under ``torchrun --nproc_per_node=N``: each rank trains on its own slice of every batch and
gradients are averaged by DistributedDataParallel (gloo on CPU, nccl on GPU). Checkpoints (safetensors weights +
optimizer state) are written every ``CHECKPOINT_EVERY`` steps into the work directory, and a restarted run resumes
from the last one.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from edgepipe.cache import atomic_npz, load_checkpoint, remove_checkpoints, save_checkpoint
from edgepipe.config import DistillConfig, StudentConfig
from edgepipe.data import encode, load_tokenizer, read_sentences
from edgepipe.errors import BuildError, ModelError, UsageError
from edgepipe.models.transformer import Encoder, EncoderConfig
from edgepipe.progress import Progress
from edgepipe.stages.parallel import SINGLE, Ranks, native_bf16, train_device
from edgepipe.stages.parallel import init as init_ranks

STUDENT_WEIGHTS = "model.safetensors"
STUDENT_CONFIG = "config.json"
CPU = torch.device("cpu")
TEACHER_BATCH = 64
GROUP_BATCHES = 16  # batches per length-sorted pool in length_grouped_batches
CHECKPOINT_EVERY = 50
EVAL_EVERY = 100  # steps between held-back cosines on the progress bar
EVAL_BATCHES = 4  # held-back batches those use (the full set is measured before and after)
BASIS_SENTENCES = 512  # training sentences whose teacher states give a narrower student's basis


def make_student(teacher: Encoder, cfg: StudentConfig, basis: Tensor | None = None) -> tuple[Encoder, list[int]]:
    """A student initialised from the teacher.

    Embeddings are copied; student layer i is teacher layer ``cfg.layers[i]``. With ``cfg.ffn`` smaller than the
    teacher's, each layer keeps the FFN neurons with the largest ``|w_in| * |w_out|`` norm product (the neurons
    whose removal changes the output least, to first order). Windowed and linear attention reuse Q/K/V/O as they
    are; a Mamba-2 mixer is initialised from the attention weights (see ``BidirectionalMamba2.from_attention``).

    With ``cfg.hidden`` narrower than the teacher's, the student's residual stream is the teacher's projected on
    ``basis`` (teacher hidden, student hidden), orthonormal columns; ``residual_basis`` gives the teacher's
    strongest channels (weight subcloning, Samragh et al. 2023). Every weight that reads the stream is multiplied
    by the basis and every weight that writes it by its transpose, so attention and FFN keep the teacher's widths.
    Each LayerNorm keeps the diagonal of its gain in the basis (for channels: the kept channels' gains), scaled by
    sqrt(teacher hidden / student hidden), since it divides by the norm of fewer channels. A bias-free projection
    initialised to the basis maps the pooled state back to the teacher's embedding size.

    Returns:
        The student (train mode) and the teacher layer index each student layer mirrors.
    """
    tcfg = teacher.cfg
    if not cfg.layers:
        raise BuildError("student.layers is empty.", hint="List teacher layer indices, e.g. layers = [1, 3, 5].")
    bad = [i for i in cfg.layers if i >= tcfg.layers]
    if bad:
        have = f"0..{tcfg.layers - 1}"
        raise BuildError(f"student.layers {list(cfg.layers)} names layers the teacher lacks (it has {have}).")
    narrow = is_narrow(tcfg, cfg)
    if narrow and basis is None:
        raise ValueError("a student narrower than its teacher needs the basis of its residual stream")
    ffn = cfg.ffn or tcfg.ffn
    scfg = replace(tcfg, layers=len(cfg.layers), attention=cfg.attention, ffn=ffn)
    if narrow:
        scfg = replace(scfg, hidden=cfg.hidden, inner=tcfg.attention_width, output=tcfg.output or tcfg.hidden)
    student = Encoder(scfg)
    sd = student.state_dict()
    tsd = teacher.state_dict()
    for key in sd:
        if key in tsd and not key.startswith("layers."):
            sd[key] = tsd[key].clone()
    for si, ti in enumerate(cfg.layers):
        src, dst = f"layers.{ti}.", f"layers.{si}."
        keep = _ffn_keep(teacher.layers[ti], ffn)
        for key in [k for k in tsd if k.startswith(src)]:
            name = dst + key[len(src) :]
            if name not in sd:
                continue  # e.g. attention weights when the student mixes with Mamba-2
            value = tsd[key]
            if ".ffn_in." in key:
                value = value[keep]
            elif key.endswith("ffn_out.weight"):
                value = value[:, keep]
            sd[name] = value.clone()
        if cfg.attention == "mamba2":
            mamba_from_attention(student.layers[si].mixer, teacher.layers[ti].mixer)
            sd.update({k: v for k, v in student.state_dict().items() if k.startswith(dst + "mixer.")})
    if narrow:
        sd = {key: _narrow(key, value, basis) for key, value in sd.items() if key != "project.weight"}
        teacher_project = tsd.get("project.weight")  # a teacher that is itself narrow projects on to its output
        sd["project.weight"] = basis.clone() if teacher_project is None else teacher_project @ basis
    student.load_state_dict(sd)
    return student.train(), list(cfg.layers)


def is_narrow(tcfg: EncoderConfig, cfg: StudentConfig) -> bool:
    """Whether the student's residual stream is narrower than the teacher's; raises for a width it cannot take."""
    if cfg.hidden in (None, tcfg.hidden):
        return False
    if not 0 < cfg.hidden < tcfg.hidden:
        raise BuildError(
            f"student.hidden = {cfg.hidden}: a student's width is 1 to {tcfg.hidden}, its teacher's at most.",
            hint=f"Pick a width below {tcfg.hidden}, or leave student.hidden out to keep the teacher's.",
        )
    if cfg.attention == "mamba2":
        raise BuildError(
            "student.hidden with attention = 'mamba2': a Mamba-2 mixer is initialised from attention of the "
            "teacher's width, so it keeps that width.",
            hint="Leave student.hidden out for a Mamba-2 student, or use full, windowed:W or linear attention.",
        )
    return True


_READS_STREAM = ("embeddings.weight", "query.weight", "key.weight", "value.weight", "ffn_in.weight")
_WRITES_STREAM = ("out.weight", "out.bias", "ffn_out.weight", "ffn_out.bias")


def _narrow(key: str, value: Tensor, basis: Tensor) -> Tensor:
    """Teacher tensor ``key`` of a student whose residual stream is the teacher's projected on ``basis``."""
    if key.startswith("dense."):
        return value  # sentence-transformers' Dense layers read the projection's output, the teacher's width
    if key.endswith(_READS_STREAM):
        return value @ basis
    if key.endswith(_WRITES_STREAM):
        return basis.T @ value
    if key.endswith("norm.weight"):
        scale = math.sqrt(basis.shape[0] / basis.shape[1])
        return (basis.square() * value[:, None]).sum(0) * scale
    if key.endswith("norm.bias"):
        return basis.T @ value
    return value  # biases of Q/K/V and ffn_in live in the attention's and the FFN's own widths


@torch.no_grad()
def residual_basis(teacher: Encoder, tok, sentences: list[str], width: int) -> Tensor:
    """The ``width`` residual-stream channels of the teacher with the most energy, as a selection basis.

    Energy is each channel's mean square over every token of ``sentences``, read after the embeddings and after
    every layer (one choice serves every layer, since they all add into the same stream). Returns (teacher hidden,
    width): columns of the identity, in channel order. Channels rather than principal directions: a LayerNorm
    acts per channel, so a subset keeps each norm's gain and bias exact, while in a rotated basis the norms'
    per-channel gains mix. On all-MiniLM-L6-v2 at width 288 (all six layers, before training) the channels keep
    0.74 mean cosine to the teacher on held-back text and the principal directions 0.38, though these hold 90%
    and 95% of the energy.
    """
    teacher.eval()
    energy = torch.zeros(teacher.cfg.hidden, dtype=torch.float64)
    for i in range(0, len(sentences), TEACHER_BATCH):
        ids, mask = _tensors(tok, sentences[i : i + TEACHER_BATCH])
        for x in teacher.hidden_states(ids, mask):
            energy += x[mask.bool()].double().square().mean(0)
    keep = energy.argsort(descending=True)[:width].sort().values
    return torch.eye(teacher.cfg.hidden)[:, keep].contiguous()


@torch.no_grad()
def mamba_from_attention(mamba, attention) -> None:
    """Initialise a bidirectional Mamba-2 mixer from a self-attention layer's weights.

    Follows the attention-to-SSM correspondence used by Mamba-in-the-Llama (Wang et al., 2024) and MOHAWK (Bick et
    al., 2024): the SSM's input x takes W_V, B (the "keys" written into the state) takes W_K, C (the "queries" that
    read it) takes W_Q, and out_proj takes W_O. The mixer is built with one B/C group per attention head and
    state size = head dim, so every matrix maps one to one. The causal convs start as identities (last tap 1),
    the skip D at 0, and each direction's out_proj at half of W_O, so the two scans sum to one attention's scale.
    The gate z keeps its random init: Mamba-2's gated norm has no identity setting, and training adapts it.
    """
    hidden = attention.query.weight.shape[0]
    for scan in (mamba.forward_scan, mamba.backward_scan):
        c = scan.cfg
        z, xbc = c.intermediate, c.conv_dim
        assert c.intermediate == hidden and c.n_groups * c.state_size == hidden, "mixer not shaped like the attention"
        w = scan.in_proj.weight  # rows: [z | x | B | C | dt]
        w[z : z + hidden] = attention.value.weight
        w[z + hidden : z + 2 * hidden] = attention.key.weight
        w[z + 2 * hidden : z + xbc] = attention.query.weight
        scan.conv1d.weight.zero_()
        scan.conv1d.weight[:, 0, -1] = 1.0
        if scan.conv1d.bias is not None:
            scan.conv1d.bias.zero_()
        scan.D.zero_()
        scan.out_proj.weight.copy_(attention.out.weight * 0.5)


def _ffn_keep(layer, ffn: int) -> Tensor:
    w_in, w_out = layer.ffn_in.weight, layer.ffn_out.weight
    if ffn >= w_in.shape[0]:
        return torch.arange(w_in.shape[0])
    score = w_in.norm(dim=1) * w_out.norm(dim=0)
    return score.topk(ffn).indices.sort().values


def teacher_targets(
    teacher: Encoder,
    tok,
    sentences: list[str],
    progress,
    tokens: bool = False,
    precision: str = "fp32",
    shard: tuple[int, int] = (0, 1),
) -> dict[str, np.ndarray]:
    """The teacher's targets for ``sentences``, computed in ``precision`` (see ``training_precision``), stored fp16.

    ``embedding`` (n, embedding dim): the teacher's sentence embeddings (its own head), L2-normalised; ``pooled``
    (n, layers, hidden): every layer's mean-pooled hidden state (so one cache serves students cut from any layers);
    with ``tokens``, also the last layer's state of every token, ragged: ``tokens`` (total, hidden) with sentence i
    at rows ``offsets[i]:offsets[i + 1]``. Sentences run in order of length, so a batch pads little (random batches
    of MiniLM's training text pad to ~2.7x their mean length); rows keep the order of ``sentences``. ``shard``
    (rank, world) computes every world-th batch only and leaves the other rows zero, so the ranks' sum
    (``Ranks.sum_arrays``) is the whole set. The teacher runs on the device it is on.
    """
    dim = teacher.cfg.hidden
    lengths = token_lengths(tok, sentences)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    emb = np.zeros((len(sentences), teacher.cfg.embedding_dim), np.float16)
    pooled = np.zeros((len(sentences), teacher.cfg.layers, dim), np.float16)
    states_out = np.zeros((offsets[-1] if tokens else 0, dim), np.float16)
    order = np.argsort(lengths, kind="stable")
    rank, world = shard
    starts = list(range(0, len(sentences), TEACHER_BATCH))[rank::world]
    device = next(teacher.parameters()).device
    teacher.eval()
    with progress.steps("teacher targets", len(starts)) as bar, torch.no_grad():
        for i in starts:
            rows = order[i : i + TEACHER_BATCH]
            ids, mask = _tensors(tok, [sentences[r] for r in rows], device)
            with _autocast(precision, device):
                states = [x.float() for x in teacher.hidden_states(ids, mask)]
            emb[rows] = F.normalize(teacher.head(states[-1], mask).float(), dim=-1).half().cpu().numpy()
            pooled[rows] = torch.stack([_pool(x, mask) for x in states[1:]], 1).half().cpu().numpy()
            if tokens:
                last = states[-1].half().cpu().numpy()
                for j, r in enumerate(rows):
                    states_out[offsets[r] : offsets[r + 1]] = last[j, : lengths[r]]
            bar.advance()
    out = {"embedding": emb, "pooled": pooled}
    return {**out, "tokens": states_out, "offsets": offsets} if tokens else out


def token_lengths(tok, sentences: list[str]) -> np.ndarray:
    """Tokens per sentence (after truncation), (n,) int."""
    return np.array([sum(e.attention_mask) for e in tok.encode_batch(sentences)])


def length_grouped_batches(lengths: np.ndarray, batch_size: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of row indices, each of sentences of similar length, in a seeded random order.

    Each epoch shuffles the rows, cuts them into pools of ``GROUP_BATCHES`` batches, sorts each pool by length and
    slices it into batches, then shuffles the batches: every row is seen once per epoch, and a batch pads to
    little more than its mean length (the "length-grouped sampler" of HF's Trainer).
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    pool = batch_size * GROUP_BATCHES
    while len(out) < steps:
        rows = rng.permutation(len(lengths))
        epoch = []
        for i in range(0, len(rows), pool):
            chunk = rows[i : i + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        out += [epoch[i] for i in rng.permutation(len(epoch)) if len(epoch[i]) == batch_size or len(epoch) == 1]
    return out[:steps]


def _tensors(tok, sentences: list[str], device: torch.device = CPU) -> tuple[Tensor, Tensor]:
    """One tokenized batch as tensors on ``device``: ids int64 (batch, longest), mask float32 (batch, longest)."""
    b = encode(tok, sentences)
    return torch.from_numpy(b["input_ids"]).to(device), torch.from_numpy(b["attention_mask"]).float().to(device)


def _pool(x: Tensor, mask: Tensor) -> Tensor:
    return (mask.unsqueeze(-1) * x).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def _lr(step: int, cfg: DistillConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def training_precision(cfg: DistillConfig, attention: str, device: torch.device | None = None) -> str:
    """The arithmetic a distillation trains in: ``"bf16"`` (autocast) or ``"fp32"``.

    ``"auto"`` takes bf16 where the training device (default: this machine's, ``parallel.train_device``) runs it
    natively (``parallel.native_bf16``: Ampere+ GPUs, CPUs with AVX512-BF16 or AMX) and the student mixes with
    softmax attention (full, windowed). Linear attention's key-value sums and Mamba-2's scan accumulate over the
    whole sequence, so they stay fp32.
    """
    if cfg.precision != "auto":
        return cfg.precision
    softmax = attention == "full" or attention.startswith("windowed")
    return "bf16" if softmax and native_bf16(device or train_device()) else "fp32"


def _autocast(precision: str, device: torch.device = CPU):
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def distill(
    teacher: Encoder,
    student_cfg: StudentConfig,
    cfg: DistillConfig,
    out_dir: Path,
    progress,
    held_out: list[dict[str, np.ndarray]] | None = None,
    held_out_teacher: np.ndarray | None = None,
    tokenizer_path: Path | None = None,
    targets_cache: Path | None = None,
    ranks: Ranks | None = None,
) -> dict:
    """Train a student and write it (safetensors + config.json) into ``out_dir``.

    Data-parallel over ``ranks`` (default: ``parallel.init()``, which joins the job torchrun or accelerate launch
    started): each rank trains its slice of every batch on its device and DistributedDataParallel averages the
    gradients, so N ranks take the same steps as one process. Rank 0 alone writes into ``out_dir`` and shows
    progress. The teacher is moved to the training device while this runs, and back to the CPU after.

    Args:
        teacher: The fp32 teacher encoder.
        student_cfg: Which layers to keep, which mixer, FFN and residual-stream widths.
        cfg: Steps, batch size, learning rate, data file, seed.
        out_dir: Where the student goes; also holds resumable checkpoints while training.
        progress: ``edgepipe.progress.Progress`` (quiet in tests).
        held_out: Tokenized held-back batches to report fidelity on (None: skip).
        held_out_teacher: The teacher's embeddings of ``held_out``, (n, dim).
        tokenizer_path: The teacher's ``tokenizer.json``.
        targets_cache: A file to cache the teacher's targets in (None: keep them in memory only).
        ranks: Where this process trains (``parallel.Ranks``); ``held_out`` is only read on rank 0.

    Returns:
        Metrics: steps, final losses, held-back cosine before and after, seconds per step, sentences per second.
    """
    ranks = ranks or init_ranks()
    rank, world, device = ranks.rank, ranks.world, ranks.device
    if cfg.batch_size % world:
        raise UsageError(
            f"distill.batch_size = {cfg.batch_size} does not split evenly over {world} processes.",
            hint=f"Set distill.batch_size to a multiple of {world} (each process trains batch_size / {world} rows), "
            "or launch a process count that divides it.",
        )
    if not ranks.main:
        progress, held_out = Progress(quiet=True), None
    precision = training_precision(cfg, student_cfg.attention, device)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tok = load_tokenizer(tokenizer_path, cfg.max_len)
    sentences = read_sentences(cfg.data)
    rng.shuffle(sentences)
    sentences = sentences[: cfg.sentences or cfg.steps * cfg.batch_size]
    lengths = token_lengths(tok, sentences)
    plan = length_grouped_batches(lengths, cfg.batch_size, cfg.steps, cfg.seed)
    basis = None
    if is_narrow(teacher.cfg, student_cfg):
        if cfg.transfer_steps:
            raise BuildError(
                f"distill.transfer_steps with student.hidden = {student_cfg.hidden}: attention transfer feeds the "
                f"teacher's {teacher.cfg.hidden}-wide states to the student's mixers.",
                hint="Set distill.transfer_steps = 0 for a narrower student, or keep the teacher's width.",
            )
        basis = residual_basis(teacher, tok, sentences[:BASIS_SENTENCES], student_cfg.hidden)
    student, layer_map = make_student(teacher, student_cfg, basis)
    teacher.to(device), student.to(device)
    basis = basis.to(device) if basis is not None else None
    if not cfg.train_embeddings:
        for emb in (student.word_embeddings, student.position_embeddings, student.token_type_embeddings):
            emb.weight.requires_grad_(False)
    before = _held_out_fidelity(student, held_out, held_out_teacher)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    start = _resume(out_dir, student, opt, ranks)
    if rank == 0 and start < cfg.steps:
        cached = targets_cache is not None and targets_cache.is_file()
        progress.note(
            _estimate(teacher, student, layer_map, tok, sentences, lengths, plan, cfg, start, world, cached, precision)
        )
    transfer = None
    if start == 0 and cfg.transfer_steps:  # a resumed run's checkpoint already holds the transferred mixers
        transfer = attention_transfer(teacher, student, layer_map, tok, sentences, cfg, progress, precision, ranks)

    targets = _cached_targets(teacher, tok, sentences, progress, targets_cache, cfg.token_weight > 0, precision, ranks)

    model = HiddenStates(student)
    if world > 1:
        on = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=on)
    history: list[float] = []
    cosine = ""  # held-back mean cosine of the last evaluation, shown beside the loss
    t0 = time.perf_counter()
    with progress.steps("distill", cfg.steps) as bar:
        bar.set(start)
        for step in range(start, cfg.steps):
            idx = plan[step][rank::world]
            ids, mask = _tensors(tok, [sentences[i] for i in idx], device)
            t_emb = torch.from_numpy(targets["embedding"][idx]).float().to(device)
            t_pool = torch.from_numpy(targets["pooled"][idx][:, layer_map]).float().to(device)
            t_tok = _token_targets(targets, idx, ids.shape[1]).to(device) if cfg.token_weight else None
            if basis is not None:  # a narrower student matches the teacher's states in its own basis
                t_pool, t_tok = t_pool @ basis, (t_tok @ basis if t_tok is not None else None)
            with _autocast(precision, device):
                states, emb = model(ids, mask)
            tokens = lengths[plan[step]].sum() / world  # the whole batch's: N ranks' mean is one process's token mean
            loss = _loss([s.float() for s in states], emb.float(), mask, t_emb, t_pool, t_tok, cfg, tokens)
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            history.append(loss.item())
            if rank == 0 and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < cfg.steps:
                _checkpoint(out_dir, student, opt, step + 1)
            if rank == 0 and held_out and (step + 1) % EVAL_EVERY == 0:
                n = sum(len(b["input_ids"]) for b in held_out[:EVAL_BATCHES])
                seen = _held_out_fidelity(student, held_out[:EVAL_BATCHES], held_out_teacher[:n])
                cosine = f"held-back cos {seen['mean_cosine']:.3f}"
            bar.advance(info=f"loss {np.mean(history[-20:]):.4f}" + (f", {cosine}" if cosine else ""))
    seconds_per_step = (time.perf_counter() - t0) / max(1, cfg.steps - start)

    student.eval()
    after = _held_out_fidelity(student, held_out, held_out_teacher)
    if rank == 0:
        save_student(student, out_dir)
        if held_out is not None:
            np.save(out_dir / "held_out.npy", after.pop("embeddings"))
        remove_checkpoints(out_dir)
    teacher.cpu()
    before.pop("embeddings", None)
    return {
        "steps": cfg.steps,
        "resumed_from": start,
        "sentences": len(sentences),
        "world_size": world,
        "precision": precision,
        "final_loss": round(float(np.mean(history[-20:])), 5) if history else None,
        "seconds_per_step": round(seconds_per_step, 3),
        "sentences_per_s": round(cfg.batch_size / seconds_per_step, 1) if seconds_per_step else None,
        "device": device.type,
        "layer_map": layer_map,
        "held_out_before": before or None,
        "attention_transfer": transfer,
        "held_out": after or None,
    }


class MixerTransfer(torch.nn.Module):
    """The student's mixers, each fed its teacher layer's input; forward returns the mean relative error to the
    teacher's mixer outputs (a module, so DistributedDataParallel syncs its gradients under torchrun)."""

    def __init__(self, teacher: Encoder, student: Encoder, layer_map: list[int]) -> None:
        super().__init__()
        self.mixers = torch.nn.ModuleList(layer.mixer for layer in student.layers)
        self.layer_map = layer_map
        object.__setattr__(self, "teacher", teacher)  # not a submodule: frozen, and outside DDP's parameters

    def forward(self, input_ids: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            states = self.teacher.hidden_states(input_ids, mask)
            inputs = [states[t] for t in self.layer_map]
            targets = [self.teacher.layers[t].mixer(x, mask) for t, x in zip(self.layer_map, inputs)]
        weight = mask.unsqueeze(-1) / mask.sum()
        errors = []
        for mixer, x, y in zip(self.mixers, inputs, targets):
            errors.append(((mixer(x, mask) - y).square() * weight).sum() / ((y.square() * weight).sum() + 1e-9))
        return torch.stack(errors).mean()


def attention_transfer(
    teacher,
    student,
    layer_map,
    tok,
    sentences,
    cfg: DistillConfig,
    progress,
    precision: str = "fp32",
    ranks: Ranks | None = None,
) -> dict:
    """Train only the student's mixers, each to reproduce its teacher layer's mixer output from that layer's input.

    The layers train independently (inputs come from the teacher, not from the student's previous layer), so a
    mixer that cannot be initialised exactly from attention weights (linear attention's kernel, Mamba-2's gate and
    step sizes) gets a dense, per-token signal before the end-to-end loss sees only pooled states. Batches are
    drawn like the main loop's, with their own seed. Returns the relative error before and after.
    """
    ranks = ranks or SINGLE
    rank, world, device = ranks.rank, ranks.world, ranks.device
    teacher.eval()
    model = MixerTransfer(teacher, student, layer_map)
    opt = torch.optim.AdamW(model.mixers.parameters(), lr=cfg.transfer_lr, weight_decay=0.0)
    on = [device.index] if device.type == "cuda" else None
    step_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=on) if world > 1 else model
    plan = length_grouped_batches(token_lengths(tok, sentences), cfg.batch_size, cfg.transfer_steps, cfg.seed + 1)
    schedule = replace(cfg, lr=cfg.transfer_lr, steps=cfg.transfer_steps, warmup_steps=0)  # cosine decay, no warm-up
    history: list[float] = []
    with progress.steps("attention transfer", cfg.transfer_steps) as bar:
        for step, rows in enumerate(plan):
            ids, mask = _tensors(tok, [sentences[i] for i in rows[rank::world]], device)
            with _autocast(precision, device):
                loss = step_model(ids, mask).float()
            for group in opt.param_groups:
                group["lr"] = _lr(step, schedule)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.mixers.parameters(), 1.0)
            opt.step()
            history.append(loss.item())
            bar.advance(info=f"relative error {np.mean(history[-20:]):.4f}")
    return {
        "steps": cfg.transfer_steps,
        "relative_error_first": round(float(np.mean(history[:5])), 5),
        "relative_error_last": round(float(np.mean(history[-20:])), 5),
    }


def _estimate(
    teacher, student, layer_map, tok, sentences, lengths, plan, cfg: DistillConfig, start, world, cached, precision
):
    """How long distillation will take here, from one teacher batch and two training steps timed now (~3 s).

    The steps train a copy of the student, so its weights and the run's optimizer are untouched. Both timings are
    scaled by tokens: the teacher's to the sum of all sentence lengths, the step's to the plan's mean padded length.
    An attention-transfer step (teacher forward + every mixer's forward and backward) is timed the same way.
    """
    teacher_s = 0.0
    if not cached:  # one batch through the cache's own code path: tokenize, forward, pool, copy out token states
        typical = np.argsort(np.abs(lengths - np.median(lengths)))[:TEACHER_BATCH]
        t = time.perf_counter()
        batch = [sentences[i] for i in typical]
        teacher_targets(teacher, tok, batch, Progress(quiet=True), cfg.token_weight > 0, precision)
        teacher_s = (time.perf_counter() - t) * lengths.sum() / lengths[typical].sum() / world  # sharded over ranks
    probe = copy.deepcopy(student)
    device = next(probe.parameters()).device
    opt = torch.optim.AdamW([p for p in probe.parameters() if p.requires_grad], lr=cfg.lr)
    rows = plan[start][: max(1, cfg.batch_size // world)]
    times = []
    for _ in range(2):
        t = time.perf_counter()
        ids, mask = _tensors(tok, [sentences[i] for i in rows], device)
        opt.zero_grad(set_to_none=True)
        with _autocast(precision, device):
            last = probe.hidden_states(ids, mask)[-1]
        _pool(last.float(), mask).square().sum().backward()
        torch.nn.utils.clip_grad_norm_(probe.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    mean_len = np.mean([lengths[p].max() for p in plan[start:]])
    scale = mean_len / max(1, int(lengths[rows].max()))
    step_s = min(times) * scale
    steps_s = step_s * (cfg.steps - start)
    transfer, transfer_s = "", 0.0
    if start == 0 and cfg.transfer_steps:
        t = time.perf_counter()
        with _autocast(precision, device):
            error = MixerTransfer(teacher, probe, layer_map)(ids, mask)
        error.float().backward()
        transfer_s = (time.perf_counter() - t) * scale * cfg.transfer_steps
        transfer = f"; attention transfer: {cfg.transfer_steps} steps, ~{transfer_s / 60:.1f} min"
    where = "cached" if cached else f"{len(sentences)} sentences, ~{teacher_s / 60:.1f} min"
    return (
        f"distill: about {(teacher_s + transfer_s + steps_s) / 60:.1f} min here (teacher targets: {where}{transfer}; "
        f"{cfg.steps - start} steps at ~{step_s:.2f} s, {precision})"
    )


class HiddenStates(torch.nn.Module):
    """``Encoder.hidden_states`` and the sentence embedding as ``forward``, so DistributedDataParallel sees (and
    syncs) every parameter the loss reaches, a narrow student's output projection and Dense layers included."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[list[Tensor], Tensor]:
        states = self.encoder.hidden_states(input_ids, attention_mask)
        emb = self.encoder.head(states[-1].float(), attention_mask.float())  # pooling, projection, Dense layers
        return states, F.normalize(emb.float(), dim=-1)  # the loss compares directions, normalised or not


def _token_targets(targets: dict[str, np.ndarray], idx: np.ndarray, seq: int) -> Tensor:
    """The teacher's last-layer token states of sentences ``idx``, zero-padded to (len(idx), seq, hidden)."""
    offsets, states = targets["offsets"], targets["tokens"]
    out = np.zeros((len(idx), seq, states.shape[1]), np.float32)
    for j, i in enumerate(idx):
        rows = states[offsets[i] : offsets[i + 1]]
        out[j, : len(rows)] = rows
    return torch.from_numpy(out)


def _loss(
    states: list[Tensor], emb: Tensor, mask: Tensor, t_emb, t_pool, t_tok, cfg: DistillConfig, tokens=None
) -> Tensor:
    """Embedding cosine + MSE, per-layer pooled-state MSE and, with token targets, last-layer token-state MSE
    (per token: summed here, divided by ``tokens``, default this batch's)."""
    loss = (1 - (emb * t_emb).sum(-1)).mean() + F.mse_loss(emb, t_emb) * emb.shape[-1]
    if cfg.hidden_weight:
        pooled = torch.stack([_pool(s, mask) for s in states[1:]], 1)
        loss = loss + cfg.hidden_weight * F.mse_loss(pooled, t_pool)
    if t_tok is not None:
        err = (states[-1] - t_tok).square().mean(-1)  # (batch, seq)
        loss = loss + cfg.token_weight * (err * mask).sum() / (mask.sum() if tokens is None else tokens)
    return loss


def _cached_targets(
    teacher, tok, sentences, progress, cache: Path | None, tokens: bool, precision: str, ranks: Ranks = SINGLE
) -> dict[str, np.ndarray]:
    """The teacher's targets, computed once per (teacher, data, precision): rank 0 reads ``cache`` where it has it
    and sends it to the other ranks; else every rank computes its shard of the batches, the shards are summed into
    the whole set on every rank, and rank 0 writes ``cache`` for the next run, of any world size."""
    found = None
    if ranks.main and cache is not None and cache.is_file():
        try:
            with np.load(cache) as data:
                if not tokens or "tokens" in data.files:
                    found = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile):  # unreadable: computed again and replaced
            pass
    if ranks.from_main(found is not None):
        return ranks.arrays_from_main(found)
    targets = teacher_targets(teacher, tok, sentences, progress, tokens, precision, (ranks.rank, ranks.world))
    ranks.sum_arrays({k: v for k, v in targets.items() if k != "offsets"})  # offsets are the same on every rank
    if ranks.main and cache is not None:  # builds of other students share it: written whole under a private name
        atomic_npz(cache, targets)
    return targets


def _held_out_fidelity(student: Encoder, held_out, teacher_emb) -> dict:
    if held_out is None or teacher_emb is None:
        return {}
    from edgepipe.stages.validate import compare, embed_torch

    emb = embed_torch(student, held_out)
    student.train()
    return {**compare(emb, teacher_emb), "embeddings": emb}


def _checkpoint(out_dir: Path, student: Encoder, opt, step: int) -> None:
    save_checkpoint(out_dir, step, _cpu(student.state_dict()), {"optimizer": _cpu(opt.state_dict())})


def _resume(out_dir: Path, student: Encoder, opt, ranks: Ranks = SINGLE) -> int:
    """The step of rank 0's last complete checkpoint in ``out_dir`` (0: none), loaded into ``student`` and ``opt``
    on every rank: rank 0 reads it and sends it, so the other ranks need not see rank 0's disk."""
    saved = load_checkpoint(out_dir) if ranks.main else None
    saved = ranks.from_main(saved)
    if saved is None:
        return 0
    step, weights, state = saved
    try:
        student.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError):  # another student's checkpoint: start over (every rank alike)
        return 0
    return step


def _cpu(state):
    """``state`` (a state dict, maybe nested) with every tensor copied to the CPU, contiguous."""
    if isinstance(state, Tensor):
        return state.detach().cpu().contiguous()
    if isinstance(state, dict):
        return {k: _cpu(v) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_cpu(v) for v in state)
    return state


def save_student(student: Encoder, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(_cpu(student.state_dict()), str(out_dir / STUDENT_WEIGHTS))
    (out_dir / STUDENT_CONFIG).write_text(json.dumps(asdict(student.cfg), indent=2))


def load_student(path: Path) -> Encoder:
    """Load a student written by ``save_student`` (eval mode).

    Raises:
        ModelError: Missing or corrupt files.
    """
    try:
        cfg = EncoderConfig(**json.loads((path / STUDENT_CONFIG).read_text()))
        model = Encoder(cfg)
        model.load_state_dict(load_file(str(path / STUDENT_WEIGHTS)))
    except (OSError, ValueError, TypeError, RuntimeError) as exc:
        raise ModelError(f"Cannot load the student in {path}: {exc}.", hint="Rebuild with --force.") from None
    return model.eval()
