"""Mamba-2 (SSD) blocks: chunked matrix form for prefill, one-token recurrent step for decode, a bidirectional variant
for encoders, and ``MambaLM``, a decoder built from them (Hugging Face ``Mamba2ForCausalLM`` layout).

The chunked form follows mamba's ``ssd_minimal`` but is written for the runtimes: every contraction is a 3-D ``bmm``
(or a matmul against a constant), tensors stay at most 5-D (XNNPACK fails at run time on ``ssd_minimal``'s 7-D
einsums), prefix sums are matmuls with triangular buffers (XNNPACK does not delegate ``cumsum``), masks are additive
float buffers, softplus is ``relu(x) + log(1 + exp(-|x|))`` and the RMS means are matmuls with a ``1/dim`` column.

Graph I/O contract of ``MambaLM`` (the same as ``edgepipe.models.decoder``'s, so one generate loop serves both)::

    prefill:  input_ids   int64 (batch, seq)
           -> logits      float32 (batch, seq, vocab)
              conv_state  float32 (layers, batch, conv_dim, conv_kernel - 1)   the causal conv's last inputs
              ssm_state   float32 (layers, batch, heads, head_dim, state_size)
    decode:   input_ids   int64 (batch, T)    T = 1: the recurrent step; fixed T > 1: a prefill chunk (chunked form)
              position    int64 (batch,)      unused (the state carries the history); the TorchScript ONNX exporter
                                              drops it, so hosts feed inputs by name and only those a graph has
              conv_state, ssm_state
           -> logits float32 (batch, T, vocab), conv_state_out, ssm_state_out

The state has the same size at every context length. Any ``seq`` works in eager mode and in TorchScript-exported
ONNX graphs (the scan pads to whole chunks with ``dt = 0``, which leaves the state untouched); ``torch.export``
graphs (ExecuTorch, the dynamo ONNX exporter) take multiples of ``chunk_size``: the host prefills the largest
multiple, or runs fixed-size decode chunks from ``init_state()``, and feeds the rest of the prompt token by token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edgepipe.config import MambaConfig
from edgepipe.errors import UsageError
from edgepipe.models.decoder import RMSNorm, stack_layers

NEG = torch.finfo(torch.float32).min


def softplus(x: Tensor) -> Tensor:
    """Overflow-free softplus from ops XNNPACK delegates (``log1p`` stays outside it in executorch 1.5.1)."""
    return torch.relu(x) + torch.log(1.0 + torch.exp(-torch.abs(x)))


def _heads_from_groups(t: Tensor, heads: int) -> Tensor:
    """(..., groups, N) -> (..., heads, N): head h reads group h // (heads // groups), like repeat_interleave."""
    *lead, g, n = t.shape
    r = heads // g
    if r == 1:
        return t
    # A broadcast multiply by ones: XNNPACK delegates it, but neither expand nor a concat of a tensor with itself.
    return (t.reshape(*lead, g, 1, n) * t.new_ones(r, 1)).reshape(*lead, heads, n)


class GatedRMSNorm(nn.Module):
    """Mamba-2's output norm: ``rmsnorm(y * silu(z))`` over groups of ``group_size`` channels, then ``* weight``."""

    def __init__(self, dim: int, group_size: int, eps: float) -> None:
        super().__init__()
        self.eps, self.group_size = eps, group_size
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("avg", torch.full((group_size, 1), 1.0 / group_size), persistent=False)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y, z: (batch, seq, dim) -> (batch, seq, dim)"""
        b, n, d = y.shape
        y = (y * F.silu(z)).reshape(b, n, d // self.group_size, self.group_size)
        y = y * torch.rsqrt(torch.matmul(y * y, self.avg) + self.eps)
        return y.reshape(b, n, d) * self.weight


def ssd_reference(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """Slow, obviously correct selective scan, one token at a time (no D skip).

    ``h_t = exp(dt_t * A) h_{t-1} + dt_t x_t B_t^T``,  ``y_t = h_t C_t``.

    Args:
        x: (batch, seq, heads, head_dim)
        dt: (batch, seq, heads), already softplus'd.
        A: (heads,) negative.
        B, C: (batch, seq, heads, state_size)

    Returns:
        y (batch, seq, heads, head_dim), final state (batch, heads, head_dim, state_size).
    """
    b, n, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(n):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = state * decay + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1), state


class Mamba2Mixer(nn.Module):
    """The Mamba-2 token mixer (Hugging Face ``Mamba2Mixer`` weights): in_proj -> causal depthwise conv -> SSD ->
    gated RMSNorm -> out_proj."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, q = cfg.heads, cfg.chunk_size
        self.in_proj = nn.Linear(cfg.hidden, cfg.intermediate + cfg.conv_dim + h, bias=cfg.use_bias)
        self.conv1d = nn.Conv1d(
            cfg.conv_dim, cfg.conv_dim, cfg.conv_kernel, groups=cfg.conv_dim, bias=cfg.use_conv_bias
        )
        self.dt_bias = nn.Parameter(torch.zeros(h))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, h + 1, dtype=torch.float32)))
        self.D = nn.Parameter(torch.ones(h))
        self.norm = GatedRMSNorm(cfg.intermediate, cfg.intermediate // cfg.n_groups, cfg.eps)
        self.out_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=cfg.use_bias)
        m = math.ceil(cfg.max_context / q) + 1  # chunk-level matrices: at most max_context / chunk_size + 1 rows
        ones_q, ones_m = torch.ones(q, q), torch.ones(m, m)
        self.register_buffer("cumsum_q", torch.triu(ones_q), persistent=False)  # a @ triu = inclusive prefix sum
        self.register_buffer("last_q", torch.eye(q)[:, q - 1 :].contiguous(), persistent=False)
        self.register_buffer("causal_q", torch.triu(torch.full((q, q), NEG), diagonal=1), persistent=False)
        self.register_buffer("tril_m", torch.tril(ones_m), persistent=False)
        self.register_buffer("below_m", torch.tril(ones_m, diagonal=-1), persistent=False)
        self.register_buffer("causal_m", torch.triu(torch.full((m, m), NEG), diagonal=1), persistent=False)

    # -- pieces shared by the chunked and the recurrent form --------------------------------------------------------

    def _split(self, zxbcdt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cfg
        z = zxbcdt[..., : c.intermediate]
        xbc = zxbcdt[..., c.intermediate : c.intermediate + c.conv_dim]
        dt = zxbcdt[..., c.intermediate + c.conv_dim :]
        return z, xbc, dt

    def _dt(self, dt: Tensor) -> Tensor:
        dt = softplus(dt + self.dt_bias)
        if self.cfg.dt_min > 0.0 or math.isfinite(self.cfg.dt_max):
            dt = torch.clamp(dt, self.cfg.dt_min, self.cfg.dt_max)
        return dt

    def _xbc(self, xbc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(..., conv_dim) -> x (..., heads, head_dim), B, C (..., heads, state_size)."""
        c = self.cfg
        gn = c.n_groups * c.state_size
        x = xbc[..., : c.intermediate].reshape(*xbc.shape[:-1], c.heads, c.head_dim)
        B = xbc[..., c.intermediate : c.intermediate + gn].reshape(*xbc.shape[:-1], c.n_groups, c.state_size)
        C = xbc[..., c.intermediate + gn :].reshape(*xbc.shape[:-1], c.n_groups, c.state_size)
        return x, _heads_from_groups(B, c.heads), _heads_from_groups(C, c.heads)

    # -- prefill ------------------------------------------------------------------------------------------------------

    def ssd_chunked(
        self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, initial_state: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """The SSD scan in chunked matrix form (no D skip); ``seq`` must be a multiple of ``chunk_size``.

        Args:
            x: (batch, seq, heads, head_dim)
            dt: (batch, seq, heads), already softplus'd.
            B, C: (batch, seq, heads, state_size)
            initial_state: (batch, heads, head_dim, state_size) to continue from, or None for zeros.

        Returns:
            y (batch, seq, heads, head_dim), final state (batch, heads, head_dim, state_size).
        """
        b, n, h, p = x.shape
        q, ns = self.cfg.chunk_size, B.shape[-1]
        nc, bh = n // q, b * h
        A = -torch.exp(self.A_log)
        # Head-major chunks: (b*h, nc, q, ...) so every contraction below is a 3-D bmm over b*h*nc.
        xdt = (x * dt.reshape(b, n, h, 1)).permute(0, 2, 1, 3).reshape(bh * nc, q, p)
        Bc = B.permute(0, 2, 1, 3).reshape(bh * nc, q, ns)
        Cc = C.permute(0, 2, 1, 3).reshape(bh * nc, q, ns)
        a = (dt * A).permute(0, 2, 1).reshape(bh, nc, q)
        # 2-D matmuls against constants (XNNPACK's fully-connected); a 3-D @ 2-D matmul would add an expand.
        cs = torch.matmul(a.reshape(-1, q), self.cumsum_q).reshape(bh, nc, q)  # decay from chunk start, inclusive
        total = torch.matmul(cs.reshape(-1, q), self.last_q).reshape(bh, nc, 1)  # = cs[..., -1:] exactly, no slice

        # 1. Within a chunk: y_l = sum_{s<=l} (C_l . B_s) exp(cs_l - cs_s) dt_s x_s, an attention-like masked matmul.
        decay = torch.exp(cs.reshape(bh, nc, q, 1) - cs.reshape(bh, nc, 1, q) + self.causal_q)
        scores = torch.bmm(Cc, Bc.transpose(1, 2)) * decay.reshape(bh * nc, q, q)
        y = torch.bmm(scores, xdt)

        # 2. Each chunk's own contribution to the state at its end: (state_size, head_dim) per chunk.
        to_end = torch.exp(total - cs).reshape(bh * nc, q, 1)
        chunk_states = torch.bmm((Bc * to_end).transpose(1, 2), xdt).reshape(bh, nc, ns * p)

        # 3. Across chunks, with the initial state as chunk -1: the state at the start of chunk i is
        #    sum_{j<i} exp(decay of the chunks between) * chunk_states[j]. The segment sums are a matmul of masked
        #    totals, not a difference of prefix sums, which would cancel badly once those reach thousands at long
        #    contexts. Rows 0..nc-1 give the chunk starts, row nc the final state (buffer rows, no slice of a result).
        m = nc + 1
        init = (
            torch.zeros(bh, 1, ns * p)
            if initial_state is None
            else initial_state.transpose(2, 3).reshape(bh, 1, ns * p)
        )
        states_in = torch.cat([init, chunk_states], dim=1)  # (bh, m, ns*p)
        totals = torch.cat([torch.zeros(bh, 1, 1), total.reshape(bh, nc, 1)], dim=1).reshape(bh, 1, m)

        # A sliced buffer is not a constant to XNNPACK (an mm with it stays outside), so the strictly-lower matrix
        # is broadcast to a batch (a delegated multiply) and used in a bmm.
        below = self.below_m[:m, :m].reshape(1, m, m) * totals.new_ones(bh, 1, 1)

        def carried(rows: slice) -> Tensor:
            seg = torch.bmm(self.tril_m[rows, :m] * totals, below)
            return torch.bmm(torch.exp(seg + self.causal_m[rows, :m]), states_in)

        starts = carried(slice(0, nc)).reshape(bh * nc, ns, p)
        final = carried(slice(nc, m)).reshape(b, h, ns, p).transpose(2, 3)

        # 4. The carried-in state read out at each position, decayed from the chunk start.
        y = y + torch.bmm(Cc, starts) * torch.exp(cs).reshape(bh * nc, q, 1)
        return y.reshape(b, h, n, p).permute(0, 2, 1, 3), final

    def forward_with_state(
        self,
        u: Tensor,
        key_mask: Tensor | None = None,
        conv_state: Tensor | None = None,
        ssm_state: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The whole sequence at once (or a chunk continuing from a state), plus the state to continue from.

        Args:
            u: (batch, seq, hidden)
            key_mask: (batch, seq) 1/0: padded positions neither feed the conv nor move the state.
            conv_state: (batch, conv_dim, conv_kernel - 1) to continue from, or None (zeros).
            ssm_state: (batch, heads, head_dim, state_size) to continue from, or None (zeros).

        Returns:
            out (batch, seq, hidden), conv_state (batch, conv_dim, conv_kernel - 1),
            ssm_state (batch, heads, head_dim, state_size).
        """
        cfg = self.cfg
        b, n, _ = u.shape
        z, xbc, dt = self._split(self.in_proj(u))
        dt = self._dt(dt)
        if key_mask is not None:
            keep = key_mask.to(u.dtype)
            xbc, dt = xbc * keep.reshape(b, n, 1), dt * keep.reshape(b, n, 1)
        # Causal conv: the previous inputs (zeros at the start) on the left by concat (a quantized F.pad breaks
        # PT2E), no padding inside the conv.
        if conv_state is None:
            conv_state = torch.zeros(b, cfg.conv_dim, cfg.conv_kernel - 1)
        xpad = torch.cat([conv_state, xbc.transpose(1, 2)], dim=2)
        conv_state = xpad[:, :, -(cfg.conv_kernel - 1) :]
        x, B, C = self._xbc(F.silu(self.conv1d(xpad)).transpose(1, 2))
        # Pad to whole chunks with dt = 0, which leaves the state untouched. torch.export graphs take multiples of
        # chunk_size (pad is statically 0); a traced (TorchScript) graph keeps the padding, sized at run time.
        pad = (-n) % cfg.chunk_size
        padded = bool(torch.jit.is_tracing() or pad)
        if padded:
            x, B, C = (torch.cat([t, t.new_zeros(b, pad, *t.shape[2:])], dim=1) for t in (x, B, C))
            dt = torch.cat([dt, dt.new_zeros(b, pad, cfg.heads)], dim=1)
        y, ssm_state = self.ssd_chunked(x, dt, B, C, ssm_state)
        y = y + x * self.D.reshape(cfg.heads, 1)
        if padded:
            y = y[:, :n]
        return self.out_proj(self.norm(y.reshape(b, n, cfg.intermediate), z)), conv_state, ssm_state

    def forward(self, u: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """u: (batch, seq, hidden), key_mask: (batch, seq) 1/0 or None -> (batch, seq, hidden)"""
        return self.forward_with_state(u, key_mask)[0]

    # -- decode -------------------------------------------------------------------------------------------------------

    def step(self, u: Tensor, conv_state: Tensor, ssm_state: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token through the recurrence.

        Args:
            u: (batch, 1, hidden)
            conv_state: (batch, conv_dim, conv_kernel - 1)
            ssm_state: (batch, heads, head_dim, state_size)

        Returns:
            out (batch, 1, hidden), new conv_state, new ssm_state.
        """
        cfg = self.cfg
        b, h, p, ns = ssm_state.shape
        z, xbc, dt = self._split(self.in_proj(u))
        window = torch.cat([conv_state, xbc.reshape(b, cfg.conv_dim, 1)], dim=2)  # (b, conv_dim, kernel)
        x, B, C = self._xbc(F.silu(self.conv1d(window)).reshape(b, cfg.conv_dim))
        dt = self._dt(dt.reshape(b, h))
        A = -torch.exp(self.A_log)
        decay = torch.exp(dt * A).reshape(b, h, 1, 1)
        ssm_state = ssm_state * decay + (x * dt.reshape(b, h, 1)).reshape(b, h, p, 1) * B.reshape(b, h, 1, ns)
        y = torch.bmm(ssm_state.reshape(b * h, p, ns), C.reshape(b * h, ns, 1)).reshape(b, h, p)
        y = (y + x * self.D.reshape(h, 1)).reshape(b, 1, cfg.intermediate)
        return self.out_proj(self.norm(y, z)), window[:, :, 1:], ssm_state


class BidirectionalMamba2(nn.Module):
    """Encoder token mixer: a forward Mamba-2 scan plus a second, separately weighted scan over the reversed
    sequence, summed (the Vision-Mamba / BiMamba arrangement).

    Padding must be on the right and given as ``mask``: masked positions neither feed the convs nor move the
    states, so the reversed scan over a padded row equals the reversed scan over the row without its padding.
    The two ``torch.flip`` copies per call are plain copies (ExecuTorch runs them outside the XNNPACK delegate).
    """

    def __init__(
        self,
        hidden: int,
        *,
        state_size: int = 64,
        head_dim: int = 64,
        expand: int = 2,
        n_groups: int = 1,
        conv_kernel: int = 4,
        chunk_size: int = 64,
        max_context: int = 16384,
    ) -> None:
        super().__init__()
        cfg = MambaConfig(
            vocab_size=1,
            hidden=hidden,
            layers=1,
            state_size=state_size,
            head_dim=min(head_dim, expand * hidden),
            expand=expand,
            n_groups=n_groups,
            conv_kernel=conv_kernel,
            chunk_size=chunk_size,
            max_context=max_context,
        )
        self.forward_scan = Mamba2Mixer(cfg)
        self.backward_scan = Mamba2Mixer(cfg)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (batch, seq, hidden), mask: (batch, seq) float 1/0 or None -> (batch, seq, hidden)"""
        rev_mask = None if mask is None else torch.flip(mask, dims=[1])
        back = self.backward_scan(torch.flip(x, dims=[1]), rev_mask)
        return self.forward_scan(x, mask) + torch.flip(back, dims=[1])


class MambaBlock(nn.Module):
    """Pre-norm residual block: x = x + mixer(norm(x))."""

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.mixer = Mamba2Mixer(cfg)


class MambaLM(nn.Module):
    """Mamba-2 language model: embedding, ``cfg.layers`` blocks, final RMSNorm, LM head (optionally tied)."""

    state_names = ("conv_state", "ssm_state")

    def __init__(self, cfg: MambaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(MambaBlock(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.hidden, cfg.eps)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @property
    def seq_multiple(self) -> int:
        """Prefill lengths of exported graphs must be multiples of this."""
        return self.cfg.chunk_size

    def _check_length(self, n: int) -> None:
        if n > self.cfg.max_context:
            raise UsageError(
                f"Sequence of {n} tokens is longer than max_context={self.cfg.max_context}; "
                "raise max_context in the model config or prefill less and continue with decode steps."
            )

    def forward(self, input_ids: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """input_ids: (batch, seq) int64, key_mask: (batch, seq) 1/0 or None -> logits (batch, seq, vocab)"""
        return self.prefill(input_ids, key_mask)[0]

    def init_state(self, batch: int = 1) -> tuple[Tensor, Tensor]:
        """Zero states: conv (layers, batch, conv_dim, kernel - 1), ssm (layers, batch, heads, head_dim, state)."""
        c = self.cfg
        return (
            torch.zeros(c.layers, batch, c.conv_dim, c.conv_kernel - 1),
            torch.zeros(c.layers, batch, c.heads, c.head_dim, c.state_size),
        )

    def prefill(self, input_ids: Tensor, key_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """input_ids: (batch, seq) -> logits (batch, seq, vocab), conv_state, ssm_state (see ``init_state``)."""
        self._check_length(input_ids.shape[1])
        x = self.embed(input_ids)
        convs, ssms = [], []
        for layer in self.layers:
            h, conv, ssm = layer.mixer.forward_with_state(layer.norm(x), key_mask)
            x = x + h
            convs.append(conv.reshape(1, *conv.shape))
            ssms.append(ssm.reshape(1, *ssm.shape))
        return self.lm_head(self.norm(x)), stack_layers(convs), stack_layers(ssms)

    def step(
        self, input_ids: Tensor, position: Tensor, conv_state: Tensor, ssm_state: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Run T new tokens from the given state: T = 1 is the recurrent decode step; a fixed T > 1 (a multiple of
        ``chunk_size`` in exported graphs) is a static-shape prefill chunk in the chunked form.

        Args:
            input_ids: (batch, T) int64
            position: (batch,) int64; unused (the state carries the history), kept so both decoders share one I/O.
            conv_state, ssm_state: as from ``init_state`` / ``prefill`` / a previous step.

        Returns:
            logits (batch, T, vocab), new conv_state, new ssm_state.
        """
        t = input_ids.shape[1]
        x = self.embed(input_ids)
        convs, ssms = [], []
        for i, layer in enumerate(self.layers):
            # Slices, not select: XNNPACK does not delegate select.
            conv = conv_state[i : i + 1].reshape(conv_state.shape[1:])
            ssm = ssm_state[i : i + 1].reshape(ssm_state.shape[1:])
            if t == 1:
                h, conv, ssm = layer.mixer.step(layer.norm(x), conv, ssm)
            else:
                h, conv, ssm = layer.mixer.forward_with_state(layer.norm(x), None, conv, ssm)
            x = x + h
            convs.append(conv.reshape(1, *conv.shape))
            ssms.append(ssm.reshape(1, *ssm.shape))
        return self.lm_head(self.norm(x)), stack_layers(convs), stack_layers(ssms)
