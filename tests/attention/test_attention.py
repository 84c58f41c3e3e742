"""Attention forms: each against its slow reference, windowed == full when the window covers the sequence, and
each form exported to ONNX Runtime and ExecuTorch (XNNPACK) matching eager PyTorch."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import Tensor, nn

from edgepipe.attention import AttentionSpec, get_attention
from edgepipe.attention.full import full_attention, full_attention_reference
from edgepipe.attention.linear import elu_feature, linear_attention, linear_attention_reference
from edgepipe.attention.windowed import export_seq_dim, windowed_attention, windowed_attention_reference
from edgepipe.errors import UsageError


def qkv_mask(b: int = 2, h: int = 3, n: int = 19, d: int = 8, seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """float64 q, k, v (b, h, n, d) and a key mask whose second row has 5 padded tokens at the end."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.ones(b, n, dtype=torch.int64)
    mask[1, n - 5 :] = 0
    return q, k, v, mask


def real_rows(x: Tensor, mask: Tensor) -> list[Tensor]:
    """Outputs at real (unpadded) query positions, per batch row: padded queries are free to hold anything."""
    return [x[i, :, mask[i].bool()] for i in range(x.shape[0])]


def assert_close_on_real(got: Tensor, want: Tensor, mask: Tensor, atol: float) -> None:
    for g, w in zip(real_rows(got, mask), real_rows(want, mask)):
        torch.testing.assert_close(g, w, atol=atol, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [4, 5, 8])
def test_windowed_matches_reference_with_padding_and_ragged_length(causal: bool, window: int) -> None:
    q, k, v, mask = qkv_mask(n=19)  # 19 is a multiple of none of the windows
    got = windowed_attention(q, k, v, mask, causal, window=window)
    want = windowed_attention_reference(q, k, v, mask, causal, window=window)
    assert got.shape == q.shape
    assert_close_on_real(got, want, mask, atol=1e-12)


def test_windowed_reference_sees_the_documented_span() -> None:
    """Bidirectional: 2w keys centred on the block; causal: previous block + own block up to the query."""
    n, w = 12, 4
    q = torch.zeros(1, 1, n, 1, dtype=torch.float64)  # equal scores: output = mean of the visible values
    v = torch.arange(n, dtype=torch.float64).reshape(1, 1, n, 1)
    bidir = windowed_attention_reference(q, q, v, None, False, window=w)[0, 0, :, 0]
    causal = windowed_attention_reference(q, q, v, None, True, window=w)[0, 0, :, 0]
    # query 5 is in block 1 = positions 4..7; centred span = 2..9, causal span = 0..5
    assert bidir[5].item() == pytest.approx(sum(range(2, 10)) / 8)
    assert causal[5].item() == pytest.approx(sum(range(0, 6)) / 6)
    torch.testing.assert_close(windowed_attention(q, q, v, None, False, window=w)[0, 0, :, 0], bidir)
    torch.testing.assert_close(windowed_attention(q, q, v, None, True, window=w)[0, 0, :, 0], causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [19, 32])
def test_windowed_equals_full_when_window_covers_seq(causal: bool, window: int) -> None:
    q, k, v, mask = qkv_mask(n=19)
    got = windowed_attention(q, k, v, mask, causal, window=window)
    assert_close_on_real(got, full_attention(q, k, v, mask, causal), mask, atol=1e-12)
    assert_close_on_real(got, full_attention_reference(q, k, v, mask, causal), mask, atol=1e-12)


def test_windowed_rejects_a_bad_window() -> None:
    q, k, v, _ = qkv_mask()
    with pytest.raises(ValueError, match="window"):
        windowed_attention(q, k, v, window=0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [4, 7, 64])
def test_linear_matches_reference_with_padding_and_ragged_length(causal: bool, chunk: int) -> None:
    q, k, v, mask = qkv_mask(n=19)
    got = linear_attention(q, k, v, mask, causal, chunk=chunk)
    want = linear_attention_reference(q, k, v, mask, causal)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)  # padded keys only: every query row is defined


def test_elu_feature_is_elu_plus_one() -> None:
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64)
    torch.testing.assert_close(elu_feature(x), torch.nn.functional.elu(x) + 1, atol=1e-15, rtol=0)


def test_get_attention_by_name() -> None:
    q, k, v, mask = qkv_mask()
    torch.testing.assert_close(
        get_attention("windowed:5")(q, k, v, mask, True), windowed_attention(q, k, v, mask, True, window=5)
    )
    torch.testing.assert_close(get_attention("linear")(q, k, v, mask, False), linear_attention(q, k, v, mask))
    torch.testing.assert_close(
        get_attention(AttentionSpec.parse("full"))(q, k, v, mask, False), full_attention(q, k, v, mask)
    )
    with pytest.raises(UsageError, match="windowed:W"):
        AttentionSpec.parse("sliding")


# ---------------------------------------------------------------- export to the runtimes

WINDOW = 16
FORMS = {
    "full": full_attention,
    "windowed": partial(windowed_attention, window=WINDOW),
    "windowed-causal": partial(windowed_attention, window=WINDOW, causal=True),
    "linear": linear_attention,
    "linear-causal": partial(linear_attention, causal=True, chunk=WINDOW),
}
BLOCKED = (
    "windowed",
    "windowed-causal",
    "linear-causal",
)  # reshape-into-blocks forms: seq = block * Dim on torch.export


class Block(nn.Module):
    """Q/K/V projections + a form + out projection; x: (batch, seq, hidden), mask: (batch, seq) float 1/0."""

    def __init__(self, form: str, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.attend = heads, FORMS[form]
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, _, hidden = x.shape
        # -1 for the sequence and contiguous() before the reshape back: XNNPACK delegates only reshapes whose
        # sizes are static but for one -1.
        q, k, v = (
            p(x).reshape(b, -1, self.heads, hidden // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v)
        )
        ctx = self.attend(q, k, v, mask)
        return self.o(ctx.transpose(1, 2).contiguous().reshape(b, -1, hidden))


def block_inputs(n: int, pad: int = 3, seed: int = 1) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(1, n)
    mask[0, n - pad :] = 0
    return torch.randn(1, n, 32, generator=g), mask


def eager(model: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return model(x, mask)


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> object:
    return tmp_path_factory.mktemp("onnx")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("form", list(FORMS))
def test_onnx_export_matches_eager_at_any_length(form: str, dynamo: bool, onnx_dir) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = Block(form).eval()
    path = onnx_dir / f"{form}-{dynamo}.onnx"
    if dynamo:
        seq = torch.export.Dim("seq", min=1, max=4096)
        program = torch.onnx.export(model, block_inputs(48), dynamo=True, dynamic_shapes=({1: seq}, {1: seq}))
        program.save(str(path))
    else:
        axes = {"x": {1: "seq"}, "mask": {1: "seq"}}
        torch.onnx.export(
            model, block_inputs(48), str(path), dynamo=False, input_names=["x", "mask"], dynamic_axes=axes
        )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    for n in (5, 21, 48, 100):  # below, between and at multiples of the 16-token block
        x, mask = block_inputs(n)
        got = torch.from_numpy(session.run(None, dict(zip(names, (x.numpy(), mask.numpy()))))[0])
        torch.testing.assert_close(got, eager(model, x, mask), atol=1e-4, rtol=0, msg=f"{form} n={n}")


class Pte:
    """A lowered program loaded in ExecuTorch's runtime. It holds the Program: a Method whose Program was garbage
    collected reads freed memory (segfaults seen here with executorch 1.5.1)."""

    def __init__(self, program: object) -> None:
        self.program, self.method = program, program.load_method("forward")

    def execute(self, inputs: list[Tensor]) -> list[Tensor]:
        return self.method.execute(inputs)


def lower_xnnpack(model: nn.Module, inputs: tuple[Tensor, ...], dynamic_shapes: object = None) -> tuple[Pte, int]:
    """torch.export -> XNNPACK -> .pte loaded in ExecuTorch's runtime; returns (program, delegated subgraphs)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools.backend_debug import get_delegation_info
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime

    exported = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    delegates = get_delegation_info(edge.exported_program().graph_module).num_delegated_subgraphs
    return Pte(Runtime.get().load_program(edge.to_executorch().buffer)), delegates


@pytest.mark.parametrize("form", list(FORMS))
def test_executorch_xnnpack_takes_the_block_as_one_subgraph_and_matches_eager(form: str) -> None:
    """Windowed and linear lower as one delegated subgraph. Full attention keeps ORT's fusable 4-D matmul form
    (ORT is the default target), which XNNPACK takes in a few subgraphs: its ``expand`` stays outside."""
    pytest.importorskip("executorch.exir")
    model = Block(form).eval()
    x, mask = block_inputs(48)
    method, delegates = lower_xnnpack(model, (x, mask))
    most = 3 if form == "full" else 1
    assert 1 <= delegates <= most, f"{form}: XNNPACK split the block into {delegates} delegated subgraphs"
    torch.testing.assert_close(method.execute([x, mask])[0], eager(model, x, mask), atol=1e-4, rtol=0)


@pytest.mark.parametrize("form", BLOCKED)
def test_executorch_dynamic_seq_exports_as_multiple_of_the_block(form: str) -> None:
    """The rule: blocked forms export for seq = block * Dim (the host pads); a free Dim fails on guards."""
    pytest.importorskip("executorch.exir")
    model = Block(form).eval()
    x, mask = block_inputs(3 * WINDOW)
    with pytest.raises(Exception, match="(?i)constraint"):
        seq = torch.export.Dim("seq", min=2, max=1024)
        torch.export.export(model, (x, mask), dynamic_shapes=({1: seq}, {1: seq}))
    seq = export_seq_dim(WINDOW, max_blocks=64)
    method, _ = lower_xnnpack(model, (x, mask), dynamic_shapes=({1: seq}, {1: seq}))
    for n in (WINDOW, 2 * WINDOW, 5 * WINDOW):
        x, mask = block_inputs(n)
        torch.testing.assert_close(method.execute([x, mask])[0], eager(model, x, mask), atol=1e-4, rtol=0)


def test_executorch_linear_exports_any_length_in_one_subgraph() -> None:
    """Bidirectional linear attention has no blocks: a free seq Dim exports and stays one delegated subgraph."""
    pytest.importorskip("executorch.exir")
    model = Block("linear").eval()
    seq = torch.export.Dim("seq", min=2, max=1024)
    method, delegates = lower_xnnpack(model, block_inputs(48), dynamic_shapes=({1: seq}, {1: seq}))
    assert delegates == 1
    for n in (7, 48, 100):
        x, mask = block_inputs(n)
        torch.testing.assert_close(method.execute([x, mask])[0], eager(model, x, mask), atol=1e-4, rtol=0)
