"""How much does the harness add to what it measures? Runner loop vs a bare loop, same ORT session, same inputs.

    python scripts/bench_runner_overhead.py                       # synthetic encoder-sized ONNX, batch 1 x 128
    python scripts/bench_runner_overhead.py artifacts/minilm-student/host-cpu --batch 1 --seq 128 --threads 2

Both loops share one onnxruntime session and one set of inputs. "bare" is `session.run(None, feeds)` timed with
perf_counter in a plain for-loop; "runner" is runner.py's own timed loop (its prepared call, gc off, the power /
temperature sampler running as on a device). Blocks of the two alternate `--rounds` times; the goal metric is
the median over rounds of (runner p50 / bare p50 of the same round), since neighbouring blocks see the same machine
load. Goal: within 1.05.

``--json FILE`` writes a ``benchrecord`` record: one row per loop (bare, runner) with every timed run (ms) and its
per-block p50s, and the paired ratio in the record's settings.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchrecord import Record  # noqa: E402  (scripts/ is on sys.path when the script runs)

from edgepipe.harness import runner  # noqa: E402  (the script runs from a checkout)


def synthetic_model(path: Path, hidden: int, layers: int, vocab: int = 4096, seed: int = 0) -> None:
    """An encoder-shaped ONNX graph: embedding -> `layers` residual MLP blocks (4x) -> masked mean -> L2 norm."""
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)

    def init(name: str, shape: tuple[int, ...]) -> object:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [
        init("emb", (vocab, hidden)),
        numpy_helper.from_array(np.int64([-1]), "axis_last"),
        numpy_helper.from_array(np.int64([1]), "axis_seq"),
    ]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h0"])]
    for i in range(layers):
        inits += [init(f"w{i}a", (hidden, 4 * hidden)), init(f"w{i}b", (4 * hidden, hidden))]
        nodes += [
            helper.make_node("MatMul", [f"h{i}", f"w{i}a"], [f"u{i}"]),
            helper.make_node("Relu", [f"u{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"w{i}b"], [f"d{i}"]),
            helper.make_node("Add", [f"h{i}", f"d{i}"], [f"h{i + 1}"]),
        ]
    nodes += [
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis_last"], ["m3"]),
        helper.make_node("Mul", [f"h{layers}", "m3"], ["hm"]),
        helper.make_node("ReduceSum", ["hm", "axis_seq"], ["s"], keepdims=0),
        helper.make_node("ReduceSum", ["m3", "axis_seq"], ["c"], keepdims=0),
        helper.make_node("Div", ["s", "c"], ["mean"]),
        helper.make_node("ReduceL2", ["mean"], ["n"], axes=[-1], keepdims=1),
        helper.make_node("Div", ["mean", "n"], ["sentence_embedding"]),
    ]
    io = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")
    ]
    out = [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])]
    model = helper.make_model(
        helper.make_graph(nodes, "synthetic", io, out, inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    save(model, str(path))


def p50_ms(times_s: list[float]) -> float:
    return float(np.percentile(np.asarray(times_s) * 1e3, 50))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", type=Path, help="an onnxruntime bundle (default: a synthetic model)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--runs", type=int, default=100, help="timed runs per block")
    p.add_argument("--rounds", type=int, default=7, help="alternating bare/runner blocks")
    p.add_argument("--hidden", type=int, default=256, help="synthetic model width")
    p.add_argument("--layers", type=int, default=4, help="synthetic model depth")
    p.add_argument("--json", type=Path, help="write the benchrecord record here")
    args = p.parse_args()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "json"}
    record = Record("bench_runner_overhead", **settings)

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle:
            manifest = runner.load_manifest(str(args.bundle))
            graph = runner.graph_path(str(args.bundle), manifest)
            check_inputs, _ = runner.load_check(str(args.bundle))
            what = f"{args.bundle}"
        else:
            graph = str(Path(tmp) / "synthetic.onnx")
            synthetic_model(Path(graph), args.hidden, args.layers)
            manifest = {"target": {}}
            rng = np.random.default_rng(1)
            check_inputs = {
                "input_ids": rng.integers(1, 4096, (2, 64), dtype=np.int64),
                "attention_mask": np.ones((2, 64), np.int64),
            }
            what = f"synthetic encoder (hidden {args.hidden}, {args.layers} MLP blocks)"
        session = runner.OrtSession(graph, manifest, args.threads)
        feeds = runner.bench_inputs({n: check_inputs[n] for n in session.input_names}, args.batch, args.seq)
        run = session.prepare(feeds)
        bare_feeds = {n: np.ascontiguousarray(feeds[n]) for n in session.input_names}
        sess = session.session

        def bare_loop(n: int) -> list[float]:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                sess.run(None, bare_feeds)
                times.append(time.perf_counter() - t0)
            return times

        def runner_loop(n: int) -> list[float]:
            sampler = runner.Sampler(0.1, gpu=False)
            sampler.start()
            try:
                return runner.time_runs(run, n)
            finally:
                sampler.stop(n)

        for _ in range(max(10, args.runs // 10)):  # warm-up, both paths
            run()
            sess.run(None, bare_feeds)
        bare, ours, raw = [], [], {"bare": [], "runner": []}
        for _ in range(args.rounds):
            times = bare_loop(args.runs)
            bare.append(p50_ms(times))
            raw["bare"] += [t * 1e3 for t in times]
            times = runner_loop(args.runs)
            ours.append(p50_ms(times))
            raw["runner"] += [t * 1e3 for t in times]
        b, r = statistics.median(bare), statistics.median(ours)
        shape = list(feeds[session.input_names[0]].shape)
        print(
            f"model: {what}; inputs {shape}; threads {args.threads or 'default'}; "
            f"{args.rounds} x {args.runs} runs each; sensors: {len(runner._power_sources())} power, "
            f"{len(runner._thermal_zones())} thermal"
        )
        print(f"bare loop p50   {b:9.4f} ms  (blocks: {', '.join(f'{x:.4f}' for x in bare)})")
        print(f"runner loop p50 {r:9.4f} ms  (blocks: {', '.join(f'{x:.4f}' for x in ours)})")
        paired = statistics.median(o / x for x, o in zip(bare, ours))  # neighbours in time: drift cancels
        print(f"ratio of median p50s runner/bare {r / b:.4f}")
        print(
            f"median paired ratio runner/bare {paired:.4f}  ({'within' if paired <= 1.05 else 'OUTSIDE'} the 5% goal)"
        )
        print(f"onnxruntime {ort.__version__}, numpy {np.__version__}")
    if args.json:
        record.data["settings"].update(model=what, inputs=shape, paired_ratio=round(paired, 4))
        record.add(loop="bare", block_p50_ms=[round(x, 4) for x in bare], ms=raw["bare"])
        record.add(loop="runner", block_p50_ms=[round(x, 4) for x in ours], ms=raw["runner"])
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
