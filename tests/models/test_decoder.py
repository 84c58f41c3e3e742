"""LLaMA-style decoder: cached decoding equals no-cache recompute for every attention form, and the prefill and
decode graphs run in ONNX Runtime and ExecuTorch (XNNPACK) with eager's numbers."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from edgepipe.errors import UsageError
from edgepipe.models.decoder import (
    DecodeGraph,
    DecoderConfig,
    DecoderLM,
    PrefillGraph,
    RMSNorm,
    generate,
    generate_reference,
)
from edgepipe.runtimes.decoder_graphs import graph_io

FORMS = ["full", "windowed:8", "linear"]
ATOL = 1e-4


def tiny_decoder(attention: str = "full", seed: int = 0, max_context: int = 64) -> DecoderLM:
    """2 layers, hidden 64, 4 query heads sharing 2 kv heads, vocab 256; seeded, eval mode."""
    torch.manual_seed(seed)
    cfg = DecoderConfig(
        vocab_size=256, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, attention=attention, max_context=max_context
    )
    return DecoderLM(cfg).eval()


def ids(n: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


# -- eager: every decode path equals the no-cache forward ----------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_step_loop_equals_forward(form: str) -> None:
    model, x = tiny_decoder(form), ids(40)
    want = model(x)
    logits, *state = model.prefill(x[:, :12])
    assert max_diff(logits, want[:, :12]) < ATOL
    got = []
    for t in range(12, 40):  # past 2w = 16 for windowed:8, so the rolling cache wraps
        logits, *state = model.step(x[:, t : t + 1], torch.full((2,), t), *state)
        got.append(logits)
    assert max_diff(torch.cat(got, dim=1), want[:, 12:]) < ATOL


@pytest.mark.parametrize("form", FORMS)
@torch.no_grad()
def test_step_chunks_from_empty_state_equal_forward(form: str) -> None:
    model, x = tiny_decoder(form), ids(40)
    state, got = model.init_state(2), []
    for start in range(0, 40, 8):  # static-shape prefill chunks, the ExecuTorch prefill path
        logits, *state = model.step(x[:, start : start + 8], torch.full((2,), start), *state)
        got.append(logits)
    assert max_diff(torch.cat(got, dim=1), model(x)) < ATOL


@pytest.mark.parametrize("form", FORMS)
def test_generate_equals_no_cache_recompute(form: str) -> None:
    model = tiny_decoder(form)
    prompt = ids(5)
    out = generate(model, prompt, 20)  # 25 tokens: past 2w = 16 for windowed:8
    assert out.shape == (2, 25)
    assert torch.equal(out, generate_reference(model, prompt, 20))


def test_windowed_decode_state_is_flat_and_full_grows() -> None:
    for context in (64, 4096):
        windowed = tiny_decoder("windowed:8", max_context=context)
        assert [tuple(t.shape) for t in windowed.init_state(1)] == [(2, 1, 2, 16, 16)] * 2  # 2w slots, any context
        assert tiny_decoder("full", max_context=context).init_state(1)[0].shape[3] == context
    assert [tuple(t.shape) for t in tiny_decoder("linear").init_state(3)] == [(2, 3, 2, 16, 16), (2, 3, 2, 16, 1)]


def test_rmsnorm_matches_definition() -> None:
    norm = RMSNorm(64, eps=1e-6)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 5, 64)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert max_diff(norm(x).detach(), want.detach()) < 1e-5


def test_config_rejects_heads_not_divisible_by_kv_heads() -> None:
    with pytest.raises(UsageError, match="kv_heads"):
        DecoderConfig(heads=6, kv_heads=4)
    with pytest.raises(UsageError, match="Accepted"):
        DecoderConfig(attention="sparse")


def test_graph_io_describes_the_real_outputs() -> None:
    model = tiny_decoder("windowed:8")
    io = graph_io(model, 4)  # the bundle's contract (runtimes.decoder_graphs): batch 1, a 4-token prefill chunk
    assert [i["name"] for i in io["decode"]["inputs"]] == ["input_ids", "position", "k_cache", "v_cache"]
    assert [o["name"] for o in io["decode"]["outputs"]] == ["logits", "k_cache_out", "v_cache_out"]
    with torch.no_grad():
        out = model.step(ids(1, batch=1), torch.tensor([3]), *model.init_state(1))
    assert [list(t.shape) for t in out] == [o["shape"] for o in io["decode"]["outputs"]]
    assert io["prefill"]["outputs"][0]["shape"] == [1, 4, 256]


# -- lowering: ONNX Runtime and ExecuTorch run the graphs with eager's numbers ---------------------------------------


def close(got, want) -> bool:
    """Within ATOL, relative to the magnitude for large values (linear attention's running sums reach ~100)."""
    want = np.asarray(want, dtype=np.float64)
    return max_diff(got, want) <= ATOL * max(1.0, float(np.abs(want).max()))


def onnx_session(module, inputs: tuple, names: list[str], outputs: list[str], path: Path, seq_dim=None):
    """Export and open in ONNX Runtime. Static graphs, and a dynamic ``seq`` where the tracer copes (full
    attention, Mamba-2), go through edgepipe's TorchScript exporter; the windowed and linear forms need ``seq_dim``
    (a torch.export Dim) and the dynamo exporter: the TorchScript tracer turns their shape checks into tensors."""
    import onnxruntime as ort

    from edgepipe.runtimes.onnxruntime import export_onnx

    if seq_dim is None:
        prefill = names == ["input_ids"]
        export_onnx(
            module, inputs, path, names, outputs, {"input_ids": {1: "seq"}, "logits": {1: "seq"}} if prefill else {}
        )
    else:
        ep = torch.export.export(module, inputs, dynamic_shapes=({1: seq_dim},))
        torch.onnx.export(ep, f=str(path), dynamo=True, output_names=outputs, optimize=False, verbose=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(session, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Feed by name, and only what the graph takes: the TorchScript exporter drops unused inputs (MambaLM's
    ``position``), so hosts should do the same."""
    return session.run(None, {i.name: inputs[i.name].numpy() for i in session.get_inputs()})


@pytest.mark.parametrize(
    "form", ["full", pytest.param("windowed:8", marks=pytest.mark.slow), pytest.param("linear", marks=pytest.mark.slow)]
)
def test_onnx_prefill_matches_eager_at_two_lengths(form: str, tmp_path: Path) -> None:
    model = tiny_decoder(form)
    m = model.seq_multiple if form != "full" else 16
    # Blocked forms export for multiples of their block (dynamo exporter, ~40 s here: hence slow); the example
    # has 2 blocks because torch.export specialises a size of 1.
    seq = None if form == "full" else m * torch.export.Dim("blocks", min=1, max=4)
    names = ["logits", *model.state_names]
    session = onnx_session(PrefillGraph(model), (ids(2 * m),), ["input_ids"], names, tmp_path / "p.onnx", seq)
    for n in (2 * m, 3 * m):
        with torch.no_grad():
            want = model.prefill(ids(n))
        assert all(close(g, w) for g, w in zip(run_onnx(session, {"input_ids": ids(n)}), want))


@pytest.mark.parametrize("form", FORMS)
def test_onnx_decode_matches_eager(form: str, tmp_path: Path) -> None:
    model = tiny_decoder(form)
    with torch.no_grad():
        _, *state = model.prefill(ids(20))
    names = list(model.state_names)
    outs = ["logits", *[s + "_out" for s in names]]
    step_in = (ids(1), torch.tensor([20, 20]), *state)
    session = onnx_session(DecodeGraph(model), step_in, ["input_ids", "position", *names], outs, tmp_path / "d.onnx")
    for _ in range(3):  # feed the graph's own state back
        with torch.no_grad():
            want = model.step(*step_in)
        got = run_onnx(session, dict(zip(["input_ids", "position", *names], step_in)))
        assert all(close(g, w) for g, w in zip(got, want))
        step_in = (ids(1, seed=int(step_in[1][0])), step_in[1] + 1, *(torch.from_numpy(g) for g in got[1:]))


def lower_executorch(module: torch.nn.Module, inputs: tuple, path: Path, dynamic_shapes=None) -> tuple[int, Counter]:
    """Export + XNNPACK lowering; returns (delegate count, ops left outside the delegates)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    ep = torch.export.export(module, inputs, dynamic_shapes=dynamic_shapes)
    edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
    calls = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    delegates = sum("executorch_call_delegate" in str(n.target) for n in calls)
    outside = Counter(
        re.sub(r"<EdgeOpOverload: ([^>]*)>.*", r"\1", str(n.target)).replace("aten.", "").split(".")[0]
        for n in calls
        if "executorch_call_delegate" not in str(n.target) and "getitem" not in str(n.target)
    )
    path.write_bytes(edge.to_executorch().buffer)
    return delegates, outside


def run_executorch(path: Path, inputs: tuple) -> list[torch.Tensor]:
    from executorch.runtime import Runtime

    return list(Runtime.get().load_program(str(path)).load_method("forward").execute(list(inputs)))


# Left outside the delegate: the token embedding (a gather), position's int64->float cast, an arange of static size.
OUTSIDE_OK = {"embedding", "dim_order_ops", "arange"}


@pytest.mark.parametrize(
    ("form", "tokens"),
    [
        ("windowed:8", 1),
        pytest.param("full", 1, marks=pytest.mark.slow),
        pytest.param("full", 16, marks=pytest.mark.slow),
        pytest.param("windowed:8", 16, marks=pytest.mark.slow),
    ],
)
def test_executorch_step_matches_eager_in_one_delegate(form: str, tokens: int, tmp_path: Path) -> None:
    """The decode step (T = 1) and the static-shape prefill chunk (T = 16) ExecuTorch bundles use (~30-60 s per
    lowering on a busy 2-core box: one case runs by default)."""
    pytest.importorskip("executorch.exir")
    model = tiny_decoder(form)
    with torch.no_grad():
        _, *state = model.prefill(ids(20, batch=1))
    step_in = (ids(tokens, batch=1), torch.tensor([20]), *state)
    delegates, outside = lower_executorch(DecodeGraph(model), step_in, tmp_path / "step.pte")
    assert delegates == 1 and set(outside) <= OUTSIDE_OK, outside
    with torch.no_grad():
        want = model.step(*step_in)
    assert all(close(g, w) for g, w in zip(run_executorch(tmp_path / "step.pte", step_in), want))


@pytest.mark.slow
def test_executorch_dynamic_prefill_matches_eager(tmp_path: Path) -> None:
    pytest.importorskip("executorch.exir")
    model = tiny_decoder("windowed:8")
    seq = 8 * torch.export.Dim("blocks", min=1, max=8)
    path = tmp_path / "prefill.pte"
    lower_executorch(PrefillGraph(model), (ids(16, batch=1),), path, dynamic_shapes=({1: seq},))  # 2 blocks
    for n in (16, 40):
        with torch.no_grad():
            want = model.prefill(ids(n, batch=1))
        assert all(close(g, w) for g, w in zip(run_executorch(path, (ids(n, batch=1),)), want))
