"""Real-time-factor suite: preset x audio length x batch x backend x dtype (x int8).

Each case times the default decode (16 + Q - 1 forward passes) with pytest-benchmark
(warm-up round excluded) and records in `extra_info`: real-time factor, frames/s, forward
passes, achieved FLOP/s from the analytic count, torch.matmul FLOP/s at the same shapes and
dtype, and their ratio. On CPU each float32 case of backends torch and cpp has an int8
twin (`quantize="int8"`, id `...-cpp-int8`) that also records the int8 roofline
(torch._int_mm at the linear layers' shapes) and its fraction of it. A matmul pass runs before every timed round (pytest-benchmark's
untimed `setup`), so both see the same machine load; the ratio is the median of per-round
ratios. A length longer than a preset holds (10 and 30 s at `tiny`, which holds 5.12 s) is
skipped, saying so.
"""

from __future__ import annotations

import functools
import statistics

import pytest
import torch

from soundstorm.engine import DecodeConfig, Engine, ModelConfig
from soundstorm.engine.benchmark import bench_inputs, matmul_pass, max_seconds
from soundstorm.engine.flops import forward_flops
from soundstorm.kernels import available_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PRESETS = ("tiny", "small", "paper")
SECONDS = (5, 10, 30)
BATCHES = (1, 8)
DTYPES = ("float32", "bfloat16") + (("float16",) if DEVICE.type == "cuda" else ())
# Backends whose engines take quantize="int8" (on the CPU, in float32).
INT8_BACKENDS = ("torch", "cpp") if DEVICE.type == "cpu" else ()
# Cases whose whole decode costs more than this many FLOPs are marked slow on CPU
# (about ten seconds each at this machine's matmul rate).
CPU_SLOW_FLOPS = 1.5e12


def is_slow(preset: str, seconds: float, batch: int, dtype: str) -> bool:
    if DEVICE.type == "cuda":
        return False
    cfg = ModelConfig.preset(preset)
    frames = cfg.frames_for(round(seconds * cfg.semantic_rate))
    total = DecodeConfig().num_forward_passes(cfg.num_quantizers) * forward_flops(cfg, batch, frames)
    # bf16/fp16 matmuls run far below fp32 speed on CPUs without native support.
    return total > CPU_SLOW_FLOPS or (dtype != "float32" and preset != "tiny")


def too_long(preset: str, seconds: float) -> str:
    """Why a preset cannot run `seconds` of audio ("" when it can)."""
    cfg = ModelConfig.preset(preset)
    longest = max_seconds(cfg)
    if seconds <= longest:
        return ""
    return (f"the {preset} preset holds at most {longest:g} s ({cfg.max_frames} frames), "
            f"not {seconds:g} s")


def cases():
    for preset in PRESETS:
        for seconds in SECONDS:
            for batch in BATCHES:
                for backend in available_backends(DEVICE):
                    variants = [(dtype, None) for dtype in DTYPES]
                    if backend in INT8_BACKENDS:
                        variants.append(("float32", "int8"))
                    for dtype, quantize in variants:
                        marks = [pytest.mark.slow] if is_slow(preset, seconds, batch, dtype) else []
                        if too_long(preset, seconds):
                            marks = [pytest.mark.skip(reason=too_long(preset, seconds))]
                        name = quantize or dtype
                        yield pytest.param(preset, seconds, batch, backend, dtype, quantize,
                                           marks=marks,
                                           id=f"{preset}-{seconds}s-b{batch}-{backend}-{name}")


@functools.lru_cache(maxsize=4)
def engine_for(preset: str, backend: str, dtype: str, quantize) -> Engine:
    return Engine.from_preset(preset, device=DEVICE, dtype=dtype, backend=backend,
                              quantize=quantize)


@pytest.mark.parametrize("preset,seconds,batch,backend,dtype,quantize", list(cases()))
def test_rtf(benchmark, request, preset, seconds, batch, backend, dtype, quantize):
    engine = engine_for(preset, backend, dtype, quantize)
    cfg = engine.config
    semantic = bench_inputs(engine, seconds, batch)
    frames = cfg.frames_for(semantic.shape[1])
    passes = DecodeConfig().num_forward_passes(cfg.num_quantizers)
    pass_flops = forward_flops(cfg, batch, frames)
    roofline = matmul_pass(engine, batch, frames)
    roofline()
    roofline8 = matmul_pass(engine, batch, frames, int8=True) if quantize else None
    matmul_s: list[float] = []
    int8_s: list[float] = []

    def before_round():
        matmul_s.append(min(roofline() for _ in range(2)))
        if roofline8 is not None:
            int8_s.append(min(roofline8() for _ in range(2)))

    def decode():
        engine.generate(semantic, seed=0)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(decode, setup=before_round, rounds=request.config.getoption("--rounds"),
                       warmup_rounds=1, iterations=1)
    walls = list(benchmark.stats.stats.data)
    matmul_s = matmul_s[-len(walls):]
    wall = statistics.median(walls)
    ratios = [(pass_flops / w * passes) / (pass_flops / m) for w, m in zip(walls, matmul_s)]
    benchmark.extra_info.update({
        "real_time_factor": wall / (batch * frames / cfg.frame_rate),
        "frames_per_s": batch * frames / wall,
        "forward_passes": passes,
        "achieved_gflops": passes * pass_flops / wall / 1e9,
        "matmul_gflops": pass_flops / statistics.median(matmul_s) / 1e9,
        "fraction_of_matmul": statistics.median(ratios),
        "device": str(DEVICE), "threads": torch.get_num_threads(), "quantize": quantize,
    })
    if roofline8 is not None:
        int8_s = int8_s[-len(walls):]
        benchmark.extra_info.update({
            "int8_matmul_gflops": pass_flops / statistics.median(int8_s) / 1e9,
            "fraction_of_int8_matmul": statistics.median(
                [m / (w / passes) for w, m in zip(walls, int8_s)]),
        })
    assert benchmark.extra_info["forward_passes"] == 16 + cfg.num_quantizers - 1
