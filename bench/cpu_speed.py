"""The CPU fast path side by side in one run: the small preset's default decode (10 s,
batch 1) on backend torch in float32 (the baseline), cpp in float32 and cpp with int8
linear layers, alternating round by round with the float32 matmul roofline and the int8
one (`soundstorm.engine.benchmark.matmul_pass`) at the same shapes, so every figure sees
the same machine load.

    python bench/cpu_speed.py                        # small, 10 s, batch 1, 5 rounds
    python bench/cpu_speed.py --preset tiny --seconds 2 --rounds 2
    python bench/cpu_speed.py --json cpu_speed.json
    python bench/cpu_speed.py --threads 1 --cpu-time     # on a busy machine

Prints per variant the median wall time, its speed-up over torch float32 (median of the
per-round ratios) and its fraction of each roofline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from soundstorm.engine import DecodeConfig, Engine
from soundstorm.engine.benchmark import bench_inputs, matmul_pass
from soundstorm.engine.flops import forward_flops

VARIANTS = (("torch", None), ("cpp", None), ("cpp", "int8"))


def measure(preset: str, seconds: float, batch: int, rounds: int, variants=VARIANTS,
            progress=None, cpu_time: bool = False) -> dict:
    """cpu_time: time with the process's CPU time instead of the wall clock (with one
    thread, a measure of the work done that other processes' load barely moves)."""
    clock = time.process_time if cpu_time else time.perf_counter
    engines = {f"{b}-{q or 'float32'}": Engine.from_preset(preset, backend=b, quantize=q)
               for b, q in variants}
    first = next(iter(engines.values()))
    cfg = first.config
    semantic = bench_inputs(first, seconds, batch)
    frames = cfg.frames_for(semantic.shape[1])
    passes = DecodeConfig().num_forward_passes(cfg.num_quantizers)
    flops = passes * forward_flops(cfg, batch, frames)
    fp32 = matmul_pass(first, batch, frames)
    int8 = matmul_pass(first, batch, frames, int8=True)

    def timed(fn) -> float:
        start = clock()
        fn()
        return clock() - start

    for engine in engines.values():                 # warm-up
        engine.generate(semantic, seed=0)
    fp32(), int8()
    walls = {name: [] for name in engines}
    roof = {"float32": [], "int8": []}
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        for name, engine in engines.items():
            walls[name].append(timed(lambda: engine.generate(semantic, seed=r + 1)))
        roof["float32"].append(passes * min(timed(fp32) for _ in range(2)))
        roof["int8"].append(passes * min(timed(int8) for _ in range(2)))
    base = walls["torch-float32"]
    out = {"preset": preset, "seconds": seconds, "batch": batch, "frames": frames,
           "forward_passes": passes, "threads": torch.get_num_threads(), "rounds": rounds,
           "clock": "process CPU time" if cpu_time else "wall",
           "roofline_s": {k: statistics.median(v) for k, v in roof.items()}, "variants": {}}
    for name, w in walls.items():
        out["variants"][name] = {
            "wall_s": statistics.median(w), "wall_s_min": min(w), "wall_s_max": max(w),
            "gflops": flops / statistics.median(w) / 1e9,
            "speedup_over_torch_float32": statistics.median(b / x for b, x in zip(base, w)),
            "fraction_of_float32_matmul": statistics.median(
                m / x for m, x in zip(roof["float32"], w)),
            "fraction_of_int8_matmul": statistics.median(m / x for m, x in zip(roof["int8"], w)),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process's CPU time (use with --threads 1 on a busy "
                        "machine)")
    p.add_argument("--json", metavar="PATH", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.preset, args.seconds, args.batch, args.rounds,
                progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True),
                cpu_time=args.cpu_time)
    print(f"{r['preset']} preset, {r['seconds']:g} s ({r['frames']} frames), batch "
          f"{r['batch']}, {r['forward_passes']} passes, {r['threads']} threads, "
          f"{r['rounds']} rounds, {r['clock']}")
    print(f"  roofline per decode: float32 matmul {r['roofline_s']['float32']:.3f} s, "
          f"int8 (_int_mm for the linear layers) {r['roofline_s']['int8']:.3f} s")
    print(f"  {'variant':<14} {'time s':>8} {'GFLOP/s':>8} {'vs torch':>9} "
          f"{'of fp32 mm':>11} {'of int8 mm':>11}")
    for name, v in r["variants"].items():
        print(f"  {name:<14} {v['wall_s']:>8.3f} {v['gflops']:>8.1f} "
              f"{v['speedup_over_torch_float32']:>8.2f}x "
              f"{v['fraction_of_float32_matmul']:>11.2f} {v['fraction_of_int8_matmul']:>11.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
