"""Every peer a user could pick for the teacher, and edgepipe's bundles, timed in one interleaved run.

Peers (all-MiniLM-L6-v2 as it is, each the way a user would get it):
- ONNX Runtime: fp32 with ORT's BERT fusions; int8-dynamic on the fused graph.
- OpenVINO: the plain ONNX export converted (``openvino.convert_model``) in f32; in bf16 (inference precision hint)
  where the CPU has native bf16 (AVX512-BF16 or AMX-BF16); INT8 by NNCF as its documentation shows it
  (``nncf.quantize``, ``ModelType.TRANSFORMER``, 300 sentences of train.txt, everything else default).
- Optimum, where the ``optimum`` extra is installed (its own environment): ``optimum-cli export onnx`` (fp32) and
  ``optimum-cli onnxruntime quantize --avx512`` on it (dynamic int8).
- PyTorch eager fp32, timed in a phase of its own after the others: its thread pool spins and steals the cores the
  interleaved candidates share.

edgepipe's bundles (``--bundle``, repeatable; default: the teacher's and the default student's host-cpu bundles
where built) run in their own runtime. Every row gets, per shape (1x128, 1x512, 8x128): the median ms, the ratio to
the fastest peer at that shape (> 1: faster than the best peer), the mean / min cosine of its sentence embeddings vs
the PyTorch teacher on held-back text (validation.txt), and its share of this CPU's peak matrix throughput:
model FLOPs / time / peak. The peak is assumed from /proc/cpuinfo flags and the clock (printed at the start; --ghz
overrides the clock, which /proc/cpuinfo reports as the current, not the turbo, frequency):

    (AMD Zen 4, cpu family 25, double-pumps AVX-512: half of each AVX-512 figure)
    fp32: AVX-512 2 FMA pipes x 16 lanes x 2 = 64 FLOP/cycle/core, AVX2+FMA 2 x 8 x 2 = 32
    bf16: AMX-BF16 1024 FLOP/cycle/core; AVX512-BF16 (vdpbf16ps) 2 x 32 x 2 = 128; else the fp32 peak
    int8: AMX-INT8 2048 op/cycle/core; AVX512-VNNI 2 x 64 x 2 = 256; AVX-VNNI 128; AVX2 without VNNI
          (vpmaddubsw + vpmaddwd) 64

Model FLOPs count the weight GEMMs (2 x tokens x (4 h^2 + 2 h ffn) per layer) and attention (2 x 2 x tokens x seq x h
per layer); embeddings, norms and pooling are left out.

Usage:
    python scripts/bench_default.py --bundle artifacts/minilm-teacher/host-cpu \\
        --bundle artifacts/minilm-student/host-cpu [--repeats 150] [--json benchmarks/default.json]

Inputs are real text (validation.txt) tiled to each shape. Candidates are interleaved round by round so machine
noise hits them alike. Timings on a shared machine mean nothing: run it on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from benchrecord import Record

from edgepipe.config import Target, load_recipe, load_target, resolve_teacher
from edgepipe.data import batches, encode, load_tokenizer, read_sentences
from edgepipe.models.hf import load_encoder
from edgepipe.runtimes import cpu_flags, cpu_has_bf16, get_runtime
from edgepipe.runtimes import onnxruntime as ort_rt
from edgepipe.stages.validate import compare

SHAPES = ((1, 128), (1, 512), (8, 128))
EAGER = "pytorch eager fp32 (teacher)"


def real_inputs(tok_path: Path, batch: int, seq: int) -> dict[str, np.ndarray]:
    """Token ids of real held-back sentences, concatenated and cut to (batch, seq); mask all ones."""
    tok = load_tokenizer(tok_path, 512)
    ids = np.concatenate([encode(tok, [s])["input_ids"][0, 1:-1] for s in read_sentences("validation.txt", 400)])
    ids = np.resize(ids, batch * seq).reshape(batch, seq).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64)}


def timed(fn, feeds, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn(feeds)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(feeds)
        out.append((time.perf_counter() - t) * 1e3)
    return out


# -- the CPU's peak -------------------------------------------------------------------------------------------------
def clock_ghz() -> tuple[float, str]:
    """The core clock: cpufreq's maximum where the kernel exposes it, else /proc/cpuinfo's current 'cpu MHz'."""
    try:
        khz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        return khz / 1e6, "cpufreq cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return float(line.split(":")[1]) / 1e3, "/proc/cpuinfo cpu MHz (current clock)"
    return 0.0, "unknown"


def double_pumped() -> bool:
    """AMD Zen 4 (family 25 with AVX-512) runs 512-bit instructions as two 256-bit halves: half the AVX-512 rate."""
    info = Path("/proc/cpuinfo").read_text()
    field = {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in info.splitlines()[:30])}
    return field.get("vendor_id") == "AuthenticAMD" and field.get("cpu family") == "25"


def peak_per_cycle(flags: set[str]) -> dict[str, tuple[int, str]]:
    """FLOP (int8: op) per cycle per core for fp32, bf16 and int8 matrix arithmetic, and the unit assumed."""
    half = 2 if double_pumped() else 1
    note = " (double-pumped: half rate)" if half == 2 else ""
    if "avx512f" in flags:
        fp32 = (64 // half, "AVX-512 FMA, 2 pipes x 16 fp32 x 2" + note)
    else:
        fp32 = (32, "AVX2 FMA, 2 pipes x 8 fp32 x 2")
    if "amx_bf16" in flags:
        bf16 = (1024, "AMX-BF16 tiles")
    elif "avx512_bf16" in flags:
        bf16 = (128 // half, "AVX512-BF16 vdpbf16ps, 2 pipes x 32 bf16 x 2" + note)
    else:
        bf16 = (fp32[0], "no native bf16: the fp32 peak")
    if "amx_int8" in flags:
        int8 = (2048, "AMX-INT8 tiles")
    elif "avx512_vnni" in flags:
        int8 = (256 // half, "AVX512-VNNI vpdpbusd, 2 pipes x 64 int8 x 2" + note)
    elif "avx_vnni" in flags:
        int8 = (128, "AVX-VNNI vpdpbusd, 2 pipes x 32 int8 x 2")
    else:
        int8 = (64, "AVX2 without VNNI: vpmaddubsw + vpmaddwd, ~64 int8 op")
    return {"fp32": fp32, "bf16": bf16, "int8": int8}


def model_flops(layers: int, hidden: int, ffn: int, batch: int, seq: int) -> float:
    """Weight GEMMs and attention of a BERT encoder over (batch, seq) tokens (the module docstring's count)."""
    tokens = batch * seq
    return layers * (2 * tokens * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * tokens * seq * hidden)


def arithmetic(precision: str) -> str:
    return {"bf16": "bf16", "int8-dynamic": "int8", "w8a8": "int8", "int8-fp16": "int8", "int8": "int8"}.get(
        precision, "fp32"
    )


# -- candidates -------------------------------------------------------------------------------------------------
def openvino_peers(teacher, example, work: Path, threads: int) -> dict:
    """OpenVINO f32, bf16 (native bf16 CPUs only) and NNCF INT8 of the teacher's plain export: {name: (fn, kind)}."""
    try:
        import nncf
        import openvino as ov
    except ImportError:
        print('openvino / nncf are not installed: pip install "edgepipe[openvino]" to add their rows', file=sys.stderr)
        return {}
    onnx_path = work / "teacher.plain.onnx"
    ort_rt.export_encoder(teacher, example, onnx_path)
    model = ov.convert_model(str(onnx_path))
    core = ov.Core()

    def compiled(m, hint: str):
        config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
        c = core.compile_model(m, "CPU", config)
        request, out = c.create_infer_request(), c.output(0)
        return lambda f: np.array(request.infer(f)[out])

    rows = {"openvino fp32 (teacher)": (compiled(model, "f32"), "fp32")}
    if cpu_has_bf16():
        rows["openvino bf16 (teacher)"] = (compiled(model, "bf16"), "bf16")
    else:
        print("no native bf16 on this CPU (avx512_bf16 / amx_bf16): no OpenVINO bf16 row", file=sys.stderr)
    tok = load_tokenizer(resolve_teacher(load_recipe("minilm-teacher")) / "tokenizer.json", 128)
    calib = [encode(tok, [s]) for s in read_sentences("train.txt", 300)]
    int8 = nncf.quantize(model, nncf.Dataset(calib), model_type=nncf.ModelType.TRANSFORMER, subset_size=300)
    rows["openvino int8 nncf (teacher)"] = (compiled(int8, "f32"), "int8")
    return rows


def optimum_peers(teacher_dir: Path, work: Path, target: Target, threads: int) -> dict:
    """Optimum's own ORT path for the teacher, as optimum-cli gives it: {name: (fn, kind)}."""
    try:
        from optimum.exporters.onnx import main_export
        from optimum.onnxruntime import ORTQuantizer
        from optimum.onnxruntime.configuration import AutoQuantizationConfig
    except ImportError:
        print('optimum-onnx is not installed: pip install "edgepipe[optimum]" to add its rows', file=sys.stderr)
        return {}
    export = work / "optimum-fp32"
    main_export(str(teacher_dir), export, task="feature-extraction", device="cpu")  # optimum-cli export onnx
    config = AutoQuantizationConfig.avx512(is_static=False, per_channel=False)  # optimum-cli ... quantize --avx512
    ORTQuantizer.from_pretrained(export).quantize(save_dir=work / "optimum-int8", quantization_config=config)
    rows = {}
    for name, path, kind in (
        ("optimum-cli export fp32 (teacher)", export / "model.onnx", "fp32"),
        ("optimum-cli quantize --avx512 (teacher)", work / "optimum-int8" / "model_quantized.onnx", "int8"),
    ):
        s = ort_rt.load(path, target, threads=threads)
        if "sentence_embedding" in s.output_names:  # a sentence-transformers checkpoint: pooled in the graph
            rows[name] = (lambda f, s=s: s.run(f)["sentence_embedding"], kind)
        else:
            rows[name] = (lambda f, s=s: mean_pool(s.run(f)["last_hidden_state"], f["attention_mask"]), kind)
    return rows


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


def bundle_row(path: Path, threads: int, teacher_cfg) -> tuple[str, tuple, tuple[int, int, int]] | None:
    """An edgepipe bundle in its own runtime: (name, (fn, kind), (layers, hidden, ffn))."""
    if not (path / "manifest.json").is_file():
        print(f"no bundle at {path}: build it with `edgepipe build` to add its row", file=sys.stderr)
        return None
    manifest = json.loads((path / "manifest.json").read_text())
    target = Target.from_dict(manifest["target"])
    session = get_runtime(manifest["runtime"]).load(path / manifest["graphs"]["model"], target, threads)
    student = (manifest.get("recipe") or {}).get("student") or {}
    shape = (
        len(student.get("layers") or ()) or teacher_cfg.layers,
        student.get("hidden") or teacher_cfg.hidden,
        student.get("ffn") or teacher_cfg.ffn,
    )
    name = f"edgepipe {manifest['model']} ({manifest['runtime']} {manifest['precision']})"
    return name, (lambda f, s=session: s.run(f)["sentence_embedding"], arithmetic(manifest["precision"])), shape


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, action="append", help="An edgepipe bundle to time (repeatable).")
    ap.add_argument("--repeats", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="Interleaving rounds (each times every candidate).")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--ghz", type=float, help="Core clock for the peak (default: read from the kernel).")
    ap.add_argument("--fidelity-sentences", type=int, default=256, help="Held-back sentences for the cosines.")
    ap.add_argument("--shapes", default=",".join(f"{b}x{s}" for b, s in SHAPES), help="e.g. 1x128,8x128")
    ap.add_argument("--json", type=Path, help="Write a benchrecord Record with every raw timing.")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    torch.set_num_threads(args.threads)
    bundles = args.bundle or [Path("artifacts/minilm-teacher/host-cpu"), Path("artifacts/minilm-student/host-cpu")]

    flags = cpu_flags()
    ghz, clock_source = (args.ghz, "--ghz") if args.ghz else clock_ghz()
    per_cycle = peak_per_cycle(flags)
    peak = {k: v * ghz * 1e9 * args.threads for k, (v, _) in per_cycle.items()}
    print(f"peak assumed: {args.threads} cores x {ghz:.2f} GHz ({clock_source}) x FLOP/cycle/core:")
    for kind, (per, unit) in per_cycle.items():
        print(f"  {kind}: {per} ({unit}) = {peak[kind] / 1e9:.0f} GFLOP/s")

    teacher_dir = resolve_teacher(load_recipe("minilm-teacher"))
    teacher = load_encoder(teacher_dir)
    tcfg = teacher.cfg
    tok_path = teacher_dir / "tokenizer.json"
    work = Path(tempfile.mkdtemp(prefix="bench-default-"))
    example = real_inputs(tok_path, 1, 16)
    target = load_target("host-cpu")
    peers: dict[str, tuple] = {}
    for precision, kind in (("fp32", "fp32"), ("int8-dynamic", "int8")):
        lowered = ort_rt.lower_encoder(teacher, example, target, precision, work / precision)
        s = ort_rt.load(lowered.files["model"], target, threads=args.threads)
        peers[f"ort {precision} fused (teacher)"] = (lambda f, s=s: s.run(f)["sentence_embedding"], kind)
    peers.update(openvino_peers(teacher, example, work, args.threads))
    peers.update(optimum_peers(teacher_dir, work, target, args.threads))
    ours: dict[str, tuple] = {}
    shape_of = {name: (tcfg.layers, tcfg.hidden, tcfg.ffn) for name in (*peers, EAGER)}
    for path in bundles:
        row = bundle_row(path, args.threads, tcfg)
        if row:
            ours[row[0]], shape_of[row[0]] = row[1], row[2]

    def eager(f):
        return teacher(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()

    record = Record(
        "bench_default",
        repeats=args.repeats,
        warmup=args.warmup,
        rounds=args.rounds,
        threads=args.threads,
        fidelity_sentences=args.fidelity_sentences,
        peak={"ghz": ghz, "clock": clock_source, "per_cycle": {k: list(v) for k, v in per_cycle.items()}},
    )
    interleaved = {**peers, **ours}
    with torch.no_grad():
        text = read_sentences("validation.txt", args.fidelity_sentences)
        held = list(batches(load_tokenizer(tok_path, 128), text, 32))
        reference = np.concatenate([eager(b) for b in held])
        fidelity = {
            name: compare(np.concatenate([fn(b) for b in held]), reference)
            for name, (fn, _) in {**interleaved, EAGER: (eager, "fp32")}.items()
        }
        times: dict[tuple, list[float]] = {}
        for batch, seq in shapes:
            feeds = real_inputs(tok_path, batch, seq)
            for _ in range(args.rounds):  # interleave: each round times every candidate, so drift hits all alike
                for name, (fn, _) in interleaved.items():
                    times.setdefault((name, batch, seq), []).extend(
                        timed(fn, feeds, args.warmup, max(1, args.repeats // args.rounds))
                    )
        for batch, seq in shapes:  # PyTorch alone: its spinning thread pool would slow the others
            times[(EAGER, batch, seq)] = timed(eager, real_inputs(tok_path, batch, seq), args.warmup, args.repeats)

    kinds = {name: kind for name, (_, kind) in {**interleaved, EAGER: (eager, "fp32")}.items()}
    print(f"\n{'candidate':52s} {'shape':>6s} {'ms':>8s} {'x best peer':>11s} {'cos mean/min':>15s} {'% peak':>7s}")
    for batch, seq in shapes:
        medians = {n: float(np.median(t)) for (n, b, s), t in times.items() if (b, s) == (batch, seq)}
        best_peer = min((n for n in medians if n not in ours), key=medians.get)
        for name, ms in medians.items():
            flops = model_flops(*shape_of[name], batch, seq)
            share = flops / (ms / 1e3) / peak[kinds[name]]
            vs = medians[best_peer] / ms
            fid = fidelity[name]
            print(
                f"{name:52s} {batch}x{seq:<4d} {ms:8.2f} {vs:11.2f} {fid['mean_cosine']:.4f}/{fid['min_cosine']:.4f} "
                f"{100 * share:6.1f}%"
            )
            record.add(
                ms=times[(name, batch, seq)],
                name=name,
                shape=f"{batch}x{seq}",
                peer=name not in ours,
                arithmetic=kinds[name],
                best_peer=best_peer,
                vs_best_peer=round(vs, 4),
                mean_cosine=fid["mean_cosine"],
                min_cosine=fid["min_cosine"],
                gflop=round(flops / 1e9, 4),
                peak_share=round(share, 5),
                eager_phase=name == EAGER,
            )
        print(f"  (best peer at {batch}x{seq}: {best_peer})")
    print(f"(x best peer: the fastest peer's median / the row's; > 1 is faster. {args.threads} threads. PyTorch eager")
    print(f" timed alone after the interleaved rounds. cos: vs the PyTorch teacher on {len(reference)} held-back")
    print(" sentences. % peak: model FLOPs / time / the peak of the row's arithmetic printed above.)")
    if args.json:
        record.write(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
