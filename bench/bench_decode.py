"""Decode speed of the engine against the matmul roofline, measured in one run.

    python bench/bench_decode.py                       # small preset, 10 s, batch 1, fp32
    python bench/bench_decode.py --preset tiny --seconds 2 --repeats 3 --json

Reports wall time (median and spread over repeats, warm-up excluded), real-time factor,
forward passes, achieved FLOP/s from the analytic count (soundstorm.engine.flops), and that
as a fraction of torch.matmul's FLOP/s at the same shapes and dtype. Decode runs and matmul
passes alternate within one process, so both see the same machine load; the fraction is
the median of the per-round ratios (this machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.engine import resolve_dtype
from soundstorm.engine.flops import forward_gemms


def matmul_pass(config: ModelConfig, batch: int, frames: int,
                dtype: torch.dtype) -> Callable[[], float]:
    """A function that runs torch.matmul over one forward pass's products and returns the
    seconds it took. Each layer gets its own weight matrix, as in the model, so the
    roofline sees the same weight traffic rather than one cache-hot operand."""
    operands = []
    for g in forward_gemms(config, batch, frames):
        shape_a = (g.batch, g.m, g.k) if g.batch > 1 else (g.m, g.k)
        shape_b = (g.batch, g.k, g.n) if g.batch > 1 else (g.k, g.n)
        a = torch.randn(shape_a, dtype=dtype)
        operands += [(a, torch.randn(shape_b, dtype=dtype)) for _ in range(g.count)]

    def one_pass() -> float:
        start = time.perf_counter()
        for a, b in operands:
            torch.matmul(a, b)
        return time.perf_counter() - start

    return one_pass


def run(preset: str, seconds: float, batch: int, dtype: str, repeats: int, backend: str) -> dict:
    """Alternate one decode and one matmul pass per round, so both see the same machine
    load; the fraction of matmul FLOP/s is the median of the per-round ratios."""
    torch.manual_seed(0)
    torch_dtype = resolve_dtype(dtype)
    engine = Engine.from_preset(preset, dtype=torch_dtype, backend=backend)
    cfg = engine.config
    S = round(seconds * cfg.semantic_rate)
    semantic = torch.randint(0, cfg.semantic_vocab_size, (batch, S))
    frames = cfg.frames_for(S)
    decode = DecodeConfig()
    passes = decode.num_forward_passes(cfg.num_quantizers)
    pass_flops = sum(g.flops for g in forward_gemms(cfg, batch, frames))
    flops = passes * pass_flops
    roofline = matmul_pass(cfg, batch, frames, torch_dtype)

    engine.generate(semantic, decode=decode, seed=0)  # warm-up: allocator, caches
    roofline()
    walls, matmul_rates, fractions = [], [], []
    for r in range(repeats):
        start = time.perf_counter()
        engine.generate(semantic, decode=decode, seed=r)
        walls.append(time.perf_counter() - start)
        matmul_rates.append(pass_flops / min(roofline() for _ in range(3)))
        fractions.append(flops / walls[-1] / matmul_rates[-1])

    wall = statistics.median(walls)
    audio = batch * frames / cfg.frame_rate
    return {
        "preset": preset, "seconds": seconds, "batch": batch, "dtype": dtype,
        "backend": engine.backend, "threads": torch.get_num_threads(), "frames": frames,
        "forward_passes": passes, "wall_s_median": wall, "wall_s_min": min(walls),
        "wall_s_max": max(walls), "real_time_factor": wall / audio,
        "gflop_per_pass": pass_flops / 1e9, "achieved_gflops": flops / wall / 1e9,
        "matmul_gflops": statistics.median(matmul_rates) / 1e9,
        "fraction_of_matmul": statistics.median(fractions),
        "fraction_min": min(fractions), "fraction_max": max(fractions),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small", choices=ModelConfig.preset_names())
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    a = p.parse_args()
    r = run(a.preset, a.seconds, a.batch, a.dtype, a.repeats, a.backend)
    print(f"{r['preset']} preset, {r['seconds']:g} s of audio ({r['frames']} frames), batch "
          f"{r['batch']}, {r['dtype']}, backend {r['backend']}, {r['threads']} threads")
    print(f"  wall time         {r['wall_s_median']:.3f} s (median of {a.repeats}; "
          f"min {r['wall_s_min']:.3f}, max {r['wall_s_max']:.3f})")
    print(f"  real-time factor  {r['real_time_factor']:.3f}")
    print(f"  forward passes    {r['forward_passes']} ({r['gflop_per_pass']:.1f} GFLOP each)")
    print(f"  achieved          {r['achieved_gflops']:.1f} GFLOP/s")
    print(f"  torch.matmul      {r['matmul_gflops']:.1f} GFLOP/s at the same shapes")
    print(f"  fraction          {r['fraction_of_matmul']:.2f} of matmul FLOP/s "
          f"(per-round min {r['fraction_min']:.2f}, max {r['fraction_max']:.2f})")
    if a.json:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
