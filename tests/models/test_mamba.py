"""Mamba-2: the chunked SSD equals the sequential scan, the one-token step continues prefill exactly, the
bidirectional mixer ignores right padding, and the graphs run in ONNX Runtime and ExecuTorch with eager's numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_decoder import OUTSIDE_OK, close, ids, lower_executorch, max_diff, onnx_session, run_executorch, run_onnx

from edgepipe.errors import UsageError
from edgepipe.models.decoder import DecodeGraph, PrefillGraph, generate, generate_reference
from edgepipe.models.mamba import BidirectionalMamba2, MambaConfig, MambaLM, softplus, ssd_reference
from edgepipe.runtimes.decoder_graphs import graph_io

ATOL = 1e-4


def tiny_mamba(seed: int = 0, chunk_size: int = 8) -> MambaLM:
    """2 layers, hidden 64, 8 heads of 16 in 2 groups, state 16, vocab 256; seeded, weights perturbed off their
    init (D = 1, dt_bias = 0) so every parameter matters; eval mode."""
    torch.manual_seed(seed)
    cfg = MambaConfig(
        vocab_size=256, hidden=64, layers=2, state_size=16, head_dim=16, n_groups=2, chunk_size=chunk_size,
        max_context=4096,
    )  # fmt: skip
    model = MambaLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def scan_inputs(n: int, heads: int = 8, seed: int = 0, dt_scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, heads, 16, generator=g)
    dt = dt_scale * softplus(torch.randn(2, n, heads, generator=g))
    B, C = torch.randn(2, n, heads, 16, generator=g), torch.randn(2, n, heads, 16, generator=g)
    return x, dt, B, C


@torch.no_grad()
def test_ssd_chunked_equals_sequential_scan_with_initial_state() -> None:
    mixer = tiny_mamba().layers[0].mixer
    x, dt, B, C = scan_inputs(32)
    A = -torch.exp(mixer.A_log)
    y_ref, state_ref = ssd_reference(x, dt, A, B, C)
    y, state = mixer.ssd_chunked(x, dt, B, C)
    assert close(y, y_ref) and close(state, state_ref)
    # Continuing from the state after 16 tokens gives the second half.
    y1, s1 = mixer.ssd_chunked(x[:, :16], dt[:, :16], B[:, :16], C[:, :16])
    y2, s2 = mixer.ssd_chunked(x[:, 16:], dt[:, 16:], B[:, 16:], C[:, 16:], initial_state=s1)
    assert close(torch.cat([y1, y2], dim=1), y_ref) and close(s2, state_ref)


@torch.no_grad()
def test_ssd_chunked_stays_exact_when_decay_sums_are_large() -> None:
    """2048 tokens with big steps: prefix sums of the decay reach thousands; the chunk-level segment sums must not
    be differences of those (they would lose ~1e-3 in the exponent)."""
    mixer = tiny_mamba(chunk_size=64).layers[0].mixer
    x, dt, B, C = scan_inputs(2048, dt_scale=0.5)
    A = -torch.exp(mixer.A_log)
    assert float((dt * A).sum(1).abs().max()) > 1000
    y_ref, state_ref = ssd_reference(x, dt, A, B, C)
    y, state = mixer.ssd_chunked(x, dt, B, C)
    assert close(y, y_ref) and close(state, state_ref)


@torch.no_grad()
def test_prefill_then_steps_equal_forward() -> None:
    model, x = tiny_mamba(), ids(40)
    want = model(x)
    logits, *state = model.prefill(x[:, :13])  # not a multiple of the chunk: padded inside with dt = 0
    assert max_diff(logits, want[:, :13]) < ATOL
    got = []
    for t in range(13, 40):
        logits, *state = model.step(x[:, t : t + 1], torch.full((2,), t), *state)
        got.append(logits)
    assert max_diff(torch.cat(got, dim=1), want[:, 13:]) < ATOL


@torch.no_grad()
def test_step_chunks_from_empty_state_equal_forward() -> None:
    model, x = tiny_mamba(), ids(48)
    state, got = model.init_state(2), []
    for start in range(0, 48, 16):
        logits, *state = model.step(x[:, start : start + 16], torch.full((2,), start), *state)
        got.append(logits)
    assert max_diff(torch.cat(got, dim=1), model(x)) < ATOL


def test_generate_equals_no_cache_recompute() -> None:
    model, prompt = tiny_mamba(), ids(6)
    assert torch.equal(generate(model, prompt, 20), generate_reference(model, prompt, 20))


def test_state_size_does_not_depend_on_context() -> None:
    model = tiny_mamba()
    with torch.no_grad():
        short, long = model.prefill(ids(8))[1:], model.prefill(ids(200))[1:]
    assert [t.shape for t in short] == [t.shape for t in long] == [t.shape for t in model.init_state(2)]
    assert [o["shape"] for o in graph_io(model, 8)["decode"]["outputs"][1:]] == [[2, 1, 192, 3], [2, 1, 8, 16, 16]]


def test_softplus_matches_torch_without_overflow() -> None:
    x = torch.tensor([-100.0, -5.0, 0.0, 3.0, 50.0, 1e4])
    assert max_diff(softplus(x), F.softplus(x)) < 1e-6


def test_config_rejects_heads_that_do_not_divide() -> None:
    with pytest.raises(UsageError, match="head_dim"):
        MambaConfig(hidden=64, head_dim=48)
    with pytest.raises(UsageError, match="max_context"):
        tiny_mamba().prefill(ids(5000))


@torch.no_grad()
def test_bidirectional_is_forward_plus_reversed_scan_and_ignores_right_padding() -> None:
    torch.manual_seed(0)
    bi = BidirectionalMamba2(64, head_dim=16, state_size=16, chunk_size=8).eval()
    x = torch.randn(2, 20, 64)

    def scan(mixer, u):  # the recurrent step, token by token: the slow reference
        conv, ssm = torch.zeros(2, mixer.cfg.conv_dim, 3), torch.zeros(2, mixer.cfg.heads, 16, 16)
        out = []
        for t in range(u.shape[1]):
            y, conv, ssm = mixer.step(u[:, t : t + 1], conv, ssm)
            out.append(y)
        return torch.cat(out, dim=1)

    want = scan(bi.forward_scan, x) + scan(bi.backward_scan, x.flip(1)).flip(1)
    assert max_diff(bi(x), want) < ATOL
    mask = torch.ones(2, 20)
    mask[1, 13:] = 0
    assert max_diff(bi(x, mask)[1, :13], bi(x[1:, :13])[0]) < ATOL


def test_onnx_prefill_and_decode_match_eager(tmp_path: Path) -> None:
    model = tiny_mamba()
    names = ["input_ids", "position", *model.state_names]
    outs = ["logits", *model.state_names]
    pre = onnx_session(PrefillGraph(model), (ids(16),), ["input_ids"], outs, tmp_path / "p.onnx")
    for n in (16, 13, 40):  # any length: the traced graph pads to whole chunks at run time
        with torch.no_grad():
            want = model.prefill(ids(n))
        assert all(close(g, w) for g, w in zip(run_onnx(pre, {"input_ids": ids(n)}), want))
    step_in = (ids(1), torch.tensor([40, 40]), *want[1:])
    dec = onnx_session(DecodeGraph(model), step_in, names, ["logits", "conv_out", "ssm_out"], tmp_path / "d.onnx")
    with torch.no_grad():
        want = model.step(*step_in)
    assert all(close(g, w) for g, w in zip(run_onnx(dec, dict(zip(names, step_in))), want))


@pytest.mark.parametrize("tokens", [1, pytest.param(16, marks=pytest.mark.slow)])
def test_executorch_step_matches_eager_in_one_delegate(tokens: int, tmp_path: Path) -> None:
    """The recurrent decode step and the static-shape prefill chunk (chunked SSD) each lower to one delegate."""
    pytest.importorskip("executorch.exir")
    model = tiny_mamba()
    with torch.no_grad():
        _, *state = model.prefill(ids(20, batch=1))
    step_in = (ids(tokens, batch=1), torch.tensor([20]), *state)
    delegates, outside = lower_executorch(DecodeGraph(model), step_in, tmp_path / "step.pte")
    # Outside: the embedding and the small ones/zeros constants (full) fed into the delegate.
    assert delegates == 1 and set(outside) <= OUTSIDE_OK | {"full"}, outside
    with torch.no_grad():
        want = model.step(*step_in)
    assert all(close(g, w) for g, w in zip(run_executorch(tmp_path / "step.pte", step_in), want))
