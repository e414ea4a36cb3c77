"""Predicted GPU decode time of a preset: a roofline over every op of a forward pass.

    python bench/gpu_prediction.py                         # paper, 30 s, batch 1 and 8, H100 and H200
    python bench/gpu_prediction.py --gpu h200 --batch 8 --ops
    python bench/gpu_prediction.py --backend torch --no-graphs    # the eager PyTorch baseline
    python bench/gpu_prediction.py --preset small --seconds 10 --json

Each op of one forward pass (and of the decoding step around it) costs

    time = max(tensor FLOPs / (peak tensor FLOP/s * matmul or attention fraction),
               other FLOPs / (peak vector FLOP/s * vector fraction),
               bytes / (HBM bandwidth * bandwidth fraction)) + gap per kernel

FLOPs of the matrix products are those of `soundstorm.engine.flops` (the attention
products go to the attention op); bytes of the fused ops are those of `op_costs.py`
(Triton kernels, or the PyTorch references with `--backend torch`); a matrix product reads
its input, its weight and bias and writes its output once. With CUDA graphs (the engine's
default on CUDA) a kernel costs its roofline time plus a gap between dependent kernels;
without them, at least the host's launch cost (the host issues kernels asynchronously, so
a kernel shorter than its launch leaves the GPU waiting). Between passes only the step's
parameters move (three non-blocking copies from pinned memory); the host's own work for
a pass is hidden behind the previous pass. Nothing here is measured: the fractions, gap and
launch cost are assumptions, printed with the result so a GPU run can be held against it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from op_costs import INT64, op_costs  # noqa: E402

from soundstorm.engine.config import DecodeConfig, ModelConfig  # noqa: E402
from soundstorm.engine.flops import forward_gemms  # noqa: E402
from soundstorm.engine.scheduler import length_buckets, smallest_fit  # noqa: E402


@dataclass(frozen=True)
class Gpu:
    """Published peak figures (dense, no sparsity)."""
    name: str
    tensor_tflops: float      # bf16/fp16 tensor-core FLOP/s, 1e12
    vector_tflops: float      # fp32 FLOP/s on the CUDA cores, 1e12
    hbm_tb_per_s: float       # HBM bandwidth, 1e12 bytes/s


GPUS: Dict[str, Gpu] = {
    "h100": Gpu("H100 SXM (HBM3)", tensor_tflops=989.4, vector_tflops=66.9, hbm_tb_per_s=3.35),
    "h200": Gpu("H200 SXM (HBM3e)", tensor_tflops=989.4, vector_tflops=66.9, hbm_tb_per_s=4.8),
}


@dataclass(frozen=True)
class Assumptions:
    """What fraction of each peak a well-shaped kernel reaches, and the fixed costs."""
    matmul_fraction: float = 0.7       # cuBLAS bf16 products of these shapes
    attention_fraction: float = 0.4    # flash-style attention at head_dim 64 (softmax exp-bound)
    vector_fraction: float = 0.5       # elementwise arithmetic on the CUDA cores
    bandwidth_fraction: float = 0.8    # streaming kernels
    gap_us: float = 1.0                # between two dependent kernels on the GPU
    launch_us: float = 6.0             # host cost of one eager launch (PyTorch dispatch)
    cuda_graphs: bool = True           # the forward pass and resampling replay as one graph

    def __post_init__(self) -> None:
        for name in ("matmul_fraction", "attention_fraction", "vector_fraction",
                     "bandwidth_fraction"):
            v = getattr(self, name)
            if not 0 < v <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {v}")
        for name in ("gap_us", "launch_us"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class OpLoad:
    """The work of one call of an op: FLOPs on tensor cores (matmul or attention), other
    FLOPs, DRAM bytes, kernels launched; `host_s`: host time not hidden behind the GPU."""
    name: str
    calls: int                        # per forward pass
    tensor_flops: float = 0.0
    attention: bool = False           # tensor FLOPs at the attention fraction
    vector_flops: float = 0.0
    bytes: float = 0.0
    weight_bytes: float = 0.0         # of `bytes`: parameters read
    kernels: int = 1
    host_s: float = 0.0
    notes: str = ""


def bucket_frames(config: ModelConfig, frames: int) -> int:
    """The length a lockstep decode of `frames` frames runs at (the scheduler's bucket)."""
    if not 1 <= frames <= config.max_frames:
        raise ValueError(f"frames must be in 1..{config.max_frames}, got {frames}")
    return smallest_fit(length_buckets(config.max_frames), frames)


def pass_loads(config: ModelConfig, frames: int, batch: int, sample: bool,
               fused: bool = True, act_bytes: int = 2, padded: bool = False,
               cuda_graphs: bool = True, launch_us: float = 6.0) -> List[OpLoad]:
    """The ops of one decoding step at [batch, frames]: the forward pass computing one
    head, the resampling, the step's token bookkeeping and the scheduler's host work.
    `sample`: some row samples (else every row takes the argmax and keeps all candidates);
    `fused`: the Triton kernels (else the PyTorch references)."""
    B, T, D, L = batch, frames, config.dim, config.depth
    gemms = {g.name: g for g in forward_gemms(config, batch, frames)}
    fused_ops = {c.name: c for c in op_costs(config, frames, batch, act_bytes, sample, padded)}

    def op_bytes(name: str) -> float:
        c = fused_ops[name]
        return c.fused_bytes if fused else c.reference_bytes

    def op_kernels(name: str, triton_kernels: int) -> int:
        # A PyTorch reference runs about one kernel per full pass over its tensors.
        return triton_kernels if fused else len(fused_ops[name].reference)

    def gemm(name: str, weight_copies: int = 1, kernels: int = 1,
             notes: str = "matmul, bias in the epilogue") -> OpLoad:
        g = gemms[name]
        weight = weight_copies * (g.k * g.n + g.n) * act_bytes
        act = (g.m * g.k + g.m * g.n) * act_bytes
        return OpLoad(name, g.count, tensor_flops=g.flops / g.count, bytes=act + weight,
                      weight_bytes=weight, kernels=kernels, notes=notes)

    attn_flops = (gemms["attn_scores"].flops + gemms["attn_values"].flops) / L
    rows = B * T
    loads = [
        OpLoad("summed_embedding", 1, vector_flops=fused_ops["summed_embedding"].flops,
               bytes=op_bytes("summed_embedding"),
               kernels=op_kernels("summed_embedding", 1)),
        gemm("ffn_up"),
        OpLoad("ffn_swish", 2 * L, vector_flops=4 * rows * config.ff_dim,
               bytes=2 * rows * config.ff_dim * act_bytes, notes="in place, not fused"),
        gemm("ffn_down"),
        gemm("qkv"),
        # With a frame mask the Triton launcher derives key lengths (4 small kernels).
        OpLoad("rotary_attention", L, tensor_flops=attn_flops, attention=True,
               vector_flops=fused_ops["rotary_attention"].flops - attn_flops,
               bytes=op_bytes("rotary_attention"),
               kernels=op_kernels("rotary_attention", 5)),
        gemm("attn_out"),
        gemm("conv_in"),
        OpLoad("conv_module", L, vector_flops=fused_ops["conv_module"].flops,
               bytes=op_bytes("conv_module"), kernels=op_kernels("conv_module", 1)),
        gemm("conv_out"),
        OpLoad("residual_norm", 4 * L, vector_flops=fused_ops["residual_norm"].flops,
               bytes=op_bytes("residual_norm"), kernels=op_kernels("residual_norm", 1)),
        OpLoad("final_norm", 1, vector_flops=8 * rows * D, bytes=2 * rows * D * act_bytes,
               notes="nn.LayerNorm"),
        gemm("head", weight_copies=B, kernels=4,
             notes="each row's level: index, gather weight and bias, batched product"),
        OpLoad("masked_resample", 1, vector_flops=fused_ops["masked_resample"].flops,
               bytes=op_bytes("masked_resample"),
               kernels=op_kernels("masked_resample", 2 if sample else 1)),
        # Frame mask, the level's column, eligibility, scatter of the new tokens.
        OpLoad("step_tokens", 1, bytes=rows * config.num_quantizers * INT64 + 8 * rows * INT64,
               kernels=9, notes="gather, compare, scatter"),
    ]
    # The runner's work around each step: three small non-blocking copies of the step's
    # parameters from pinned host memory (rows stay resident in the bucket: nothing else
    # moves), then the graph launch. The host prepares a pass (~0.1 ms of Python) while
    # the GPU runs the previous one, so it is hidden whenever a pass takes longer.
    loads.append(OpLoad("runner_parameters", 1, bytes=5 * B * INT64, kernels=3,
                        notes="3 non-blocking host-to-device copies (pinned)"))
    return loads


def op_seconds(load: OpLoad, gpu: Gpu, a: Assumptions) -> Tuple[float, str]:
    """Seconds of one call and what bounds it: compute, attention, vector, memory, gaps
    (between kernels), launch (eager, host-bound) or host."""
    fraction = a.attention_fraction if load.attention else a.matmul_fraction
    times = {
        "attention" if load.attention else "compute":
            load.tensor_flops / (gpu.tensor_tflops * 1e12 * fraction),
        "vector": load.vector_flops / (gpu.vector_tflops * 1e12 * a.vector_fraction),
        "memory": load.bytes / (gpu.hbm_tb_per_s * 1e12 * a.bandwidth_fraction),
    }
    bound = max(times, key=times.get)
    roofline = times[bound]
    gaps = load.kernels * a.gap_us * 1e-6
    if gaps > roofline:
        bound = "gaps"
    gpu_s = roofline + gaps
    seconds = gpu_s
    if not a.cuda_graphs and load.kernels:
        launch_s = load.kernels * a.launch_us * 1e-6
        if launch_s > seconds:
            seconds, bound = launch_s, "launch"
    if load.host_s:
        seconds, bound = seconds + load.host_s, ("host" if load.host_s >= gpu_s else bound)
    return seconds, bound


def sampled_passes(decode: DecodeConfig, num_quantizers: int) -> Tuple[int, int]:
    """(passes in which some row samples and ranks candidates, passes that take the argmax
    and keep every candidate) of a schedule."""
    steps = decode.resolve(num_quantizers)
    last = len(steps) if decode.greedy_last else 0
    sampled = sum(steps) - last if decode.temperature > 0 else 0
    return sampled, sum(steps) - sampled


def predict(config: ModelConfig, seconds: float, batch: int, gpu: Gpu,
            assumptions: Assumptions = Assumptions(), fused: bool = True,
            decode: DecodeConfig = DecodeConfig(), act_bytes: int = 2) -> dict:
    """Predicted time of one lockstep decode of `batch` clips of `seconds`, per op."""
    if not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    # As the benchmarks do (`bench_inputs`): ceil(seconds * semantic rate) semantic ids.
    frames = config.frames_for(math.ceil(seconds * config.semantic_rate))
    if not 1 <= frames <= config.max_frames:
        raise ValueError(f"{seconds:g} s is {frames} frames; the preset decodes 1 to "
                         f"max_frames={config.max_frames}")
    T = bucket_frames(config, frames)
    sampled, greedy = sampled_passes(decode, config.num_quantizers)
    passes = sampled + greedy
    kinds = [(n, pass_loads(config, T, batch, sample, fused, act_bytes, padded=T > frames,
                            cuda_graphs=assumptions.cuda_graphs,
                            launch_us=assumptions.launch_us))
             for n, sample in ((sampled, True), (greedy, False)) if n]
    # Every op at 100 % of the peaks, no gaps, launches or host work: the floor of this model.
    ideal = Assumptions(1.0, 1.0, 1.0, 1.0, gap_us=0.0, launch_us=0.0)
    rows: List[dict] = []
    ideal_s = 0.0
    for i, load in enumerate(kinds[0][1]):
        total_s, flops, nbytes, weights, kernels, bounds = 0.0, 0.0, 0.0, 0.0, 0, set()
        for n, loads in kinds:
            ld = loads[i]
            s, bound = op_seconds(ld, gpu, assumptions)
            total_s += n * ld.calls * s
            if not ld.host_s:
                ideal_s += n * ld.calls * op_seconds(ld, gpu, ideal)[0]
            flops += n * ld.calls * ld.tensor_flops
            nbytes += n * ld.calls * ld.bytes
            weights += n * ld.calls * ld.weight_bytes
            kernels += n * ld.calls * ld.kernels
            bounds.add(bound)
        rows.append({"op": load.name, "calls_per_pass": load.calls,
                     "tensor_gflop_per_pass": flops / passes / 1e9,
                     "mb_per_pass": nbytes / passes / 1e6,
                     "weight_mb_per_pass": weights / passes / 1e6,
                     "kernels_per_pass": kernels / passes,
                     "ms_per_pass": total_s / passes * 1e3, "ms_per_decode": total_s * 1e3,
                     "bound": "/".join(sorted(bounds)), "notes": load.notes})
    decode_s = sum(r["ms_per_decode"] for r in rows) / 1e3
    tensor_flops = sum(r["tensor_gflop_per_pass"] for r in rows) * 1e9 * passes
    total_bytes = sum(r["mb_per_pass"] for r in rows) * 1e6 * passes
    audio_s = batch * frames / config.frame_rate
    return {
        "gpu": gpu.name, "batch": batch, "seconds": seconds, "frames": frames,
        "bucket_frames": T, "forward_passes": passes, "sampled_passes": sampled,
        "backend": "triton" if fused else "torch", "act_bytes": act_bytes,
        "assumptions": asdict(assumptions), "peaks": asdict(gpu), "ops": rows,
        "ms_per_pass": decode_s / passes * 1e3, "ms_per_decode": decode_s * 1e3,
        "real_time_factor": decode_s / audio_s, "audio_s_per_s": audio_s / decode_s,
        # Every matrix product (attention included) at 100 % of peak, nothing else.
        "compute_limit_ms": tensor_flops / (gpu.tensor_tflops * 1e12) * 1e3,
        # Every byte at 100 % of the HBM bandwidth, nothing else.
        "bandwidth_limit_ms": total_bytes / (gpu.hbm_tb_per_s * 1e12) * 1e3,
        # Each op at max(compute, memory) at 100 % of the peaks: the roofline floor.
        "roofline_limit_ms": ideal_s * 1e3,
        "tensor_tflop_per_decode": tensor_flops / 1e12,
        "gb_per_decode": total_bytes / 1e9,
        "weight_mb_per_pass": sum(r["weight_mb_per_pass"] for r in rows),
        "kernels_per_pass": sum(r["kernels_per_pass"] for r in rows),
    }


def op_table(p: dict) -> str:
    lines = [f"{p['gpu']}, batch {p['batch']}, {p['seconds']:g} s ({p['frames']} frames, run at "
             f"{p['bucket_frames']}), {p['backend']} ops, "
             f"{'CUDA graphs' if p['assumptions']['cuda_graphs'] else 'eager, no graphs'}; "
             f"{p['forward_passes']} passes",
             f"{'op':<18} {'calls/pass':>10} {'GFLOP/pass':>11} {'MB/pass':>9} "
             f"{'kernels':>8} {'ms/pass':>8} {'ms/decode':>10}  bound"]
    for r in p["ops"]:
        lines.append(f"{r['op']:<18} {r['calls_per_pass']:>10} "
                     f"{r['tensor_gflop_per_pass']:>11.1f} {r['mb_per_pass']:>9.1f} "
                     f"{r['kernels_per_pass']:>8.1f} {r['ms_per_pass']:>8.3f} "
                     f"{r['ms_per_decode']:>10.2f}  {r['bound']}")
    lines.append(f"{'total':<18} {'':>10} {sum(r['tensor_gflop_per_pass'] for r in p['ops']):>11.1f} "
                 f"{sum(r['mb_per_pass'] for r in p['ops']):>9.1f} {p['kernels_per_pass']:>8.1f} "
                 f"{p['ms_per_pass']:>8.3f} {p['ms_per_decode']:>10.2f}")
    return "\n".join(lines)


def summary_table(predictions: Sequence[dict]) -> str:
    lines = [f"{'GPU':<18} {'batch':>5} {'ms/pass':>8} {'ms/decode':>10} {'RTF':>8} "
             f"{'audio s/s':>10} {'compute limit ms':>17} {'bandwidth limit ms':>19} "
             f"{'roofline limit ms':>18}"]
    for p in predictions:
        lines.append(f"{p['gpu']:<18} {p['batch']:>5} {p['ms_per_pass']:>8.2f} "
                     f"{p['ms_per_decode']:>10.1f} {p['real_time_factor']:>8.5f} "
                     f"{p['audio_s_per_s']:>10.0f} {p['compute_limit_ms']:>17.1f} "
                     f"{p['bandwidth_limit_ms']:>19.1f} {p['roofline_limit_ms']:>18.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--gpu", nargs="+", default=list(GPUS), choices=list(GPUS))
    p.add_argument("--backend", default="triton", choices=["triton", "torch"],
                   help="fused Triton kernels or the PyTorch references (default: triton)")
    p.add_argument("--no-graphs", action="store_true",
                   help="eager steps: each kernel costs at least the host's launch")
    d = Assumptions()
    for name in ("matmul_fraction", "attention_fraction", "vector_fraction",
                 "bandwidth_fraction", "gap_us", "launch_us"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    p.add_argument("--ops", action="store_true", help="print the per-op table of each setting")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args(argv)
    try:
        assumptions = Assumptions(a.matmul_fraction, a.attention_fraction, a.vector_fraction,
                                  a.bandwidth_fraction, a.gap_us, a.launch_us,
                                  cuda_graphs=not a.no_graphs)
        cfg = ModelConfig.preset(a.preset)
        predictions = [predict(cfg, a.seconds, b, GPUS[g], assumptions, a.backend == "triton")
                       for g in a.gpu for b in a.batch]
    except ValueError as e:
        p.error(str(e))
    first = predictions[0]
    print(f"{a.preset} preset, {a.seconds:g} s, bf16, {first['forward_passes']} forward passes, "
          f"{a.backend} ops, {'CUDA graphs' if assumptions.cuda_graphs else 'eager, no graphs'}")
    print(f"assumed: {assumptions.matmul_fraction:g} of peak for matmuls, "
          f"{assumptions.attention_fraction:g} for attention, {assumptions.vector_fraction:g} "
          f"for vector math, {assumptions.bandwidth_fraction:g} of HBM bandwidth; "
          f"{assumptions.gap_us:g} us between kernels, {assumptions.launch_us:g} us per eager launch")
    print(f"weights read per pass: {first['weight_mb_per_pass']:.3g} MB at batch "
          f"{first['batch']} (the model has {cfg.num_parameters() / 1e6:.3g}M parameters; "
          "a pass reads every block's and one head's)")
    if a.ops:
        for pred in predictions:
            print()
            print(op_table(pred))
        print()
    print(summary_table(predictions))
    if a.json:
        print(json.dumps({"preset": a.preset, "predictions": predictions}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
