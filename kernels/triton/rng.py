"""The counter-based generator of `soundstorm.kernels.rng`, as Triton device functions on
uint32 values: bit-identical hashes, so kernels draw exactly the reference's noise."""

from __future__ import annotations

import triton
import triton.language as tl

from soundstorm.kernels import rng


@triton.jit
def mix32(x):
    """lowbias32 on a uint32 tensor (multiplications wrap mod 2**32, shifts are logical)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def step_tag(level, iteration, stream: tl.constexpr):
    """mix32 of the (level, iteration, stream) tag, the seed-independent part of
    `rng.step_keys`: level, iteration integer scalars (1-based), stream a constant."""
    level = level.to(tl.uint32)
    iteration = iteration.to(tl.uint32)
    return mix32(((level & 0xFFFF) << 16) | ((iteration & 0xFFF) << 4) | stream)


@triton.jit
def step_key(seed, tag):
    """`rng.step_keys` for one row: seed int64 scalar, tag = `step_tag(...)` (uint32)."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return mix32(lo ^ mix32(hi ^ tag))


@triton.jit
def spread(i):
    """(i * GOLDEN32) mod 2**32 for a non-negative int32 index tensor."""
    return i.to(tl.uint32) * tl.full(i.shape, 0x9E3779B9, tl.uint32)


@triton.jit
def to_gumbel(h):
    """uint32 hash -> Gumbel(0, 1) float32, as `rng.to_gumbel` (exact uniform, then
    -log(-log(u)))."""
    u = ((h >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    return -tl.log(-tl.log(u))
