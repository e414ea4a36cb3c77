"""Counter-based random numbers for decoding.

Every random value is a pure function of (seed, level, iteration, stream, frame[, code]):
a row's samples never depend on its batch companions, on padding, on the order in which
rows are scheduled, or on the backend. The mixing function is Chris Wellons' `lowbias32`
integer hash, chosen because it is a handful of 32-bit multiplies and shifts that every
backend (PyTorch int64 arithmetic here, `uint32` in Triton and Pallas) computes bit-exactly.

Values are held as non-negative int64 tensors in [0, 2**32); every multiply is followed by
`& MASK32`, so the wrap-around of int64 multiplication never leaks into the low 32 bits.
"""

from __future__ import annotations

from typing import Union

import torch

MASK32 = 0xFFFFFFFF
GOLDEN32 = 0x9E3779B9  # 2**32 / golden ratio: spreads consecutive counters apart
# Streams: independent noise for candidate sampling and for the confidence perturbation.
STREAM_CANDIDATE = 1
STREAM_CONFIDENCE = 2


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32: a bijective avalanche hash on uint32 values stored in int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def step_keys(seeds: torch.Tensor, level: Union[int, torch.Tensor],
              iteration: Union[int, torch.Tensor], stream: int) -> torch.Tensor:
    """One 32-bit key per row for a (level, iteration, stream) triple.

    seeds: int64 [B] (any 64-bit value); level, iteration: 1-based, one int for every row
    or int64 [B] (rows of one batch at different steps of their own decodes).
    Returns int64 [B] in [0, 2**32).
    """
    lo = seeds & MASK32
    hi = (seeds >> 32) & MASK32
    level = torch.as_tensor(level, dtype=torch.int64, device=seeds.device)
    iteration = torch.as_tensor(iteration, dtype=torch.int64, device=seeds.device)
    tag = ((level & 0xFFFF) << 16) | ((iteration & 0xFFF) << 4) | (stream & 0xF)
    return mix32(lo ^ mix32(hi ^ mix32(tag.expand_as(seeds))))


def frame_keys(keys: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Per-frame keys: int64 [B] -> int64 [B, T]; frame t is the absolute frame index."""
    t = torch.arange(num_frames, device=keys.device, dtype=torch.int64)
    return mix32(keys[:, None] ^ ((t * GOLDEN32) & MASK32))


def code_keys(fkeys: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Per-(frame, code) keys: int64 [B, T] -> int64 [B, T, C]."""
    c = torch.arange(num_codes, device=fkeys.device, dtype=torch.int64)
    return mix32(fkeys[..., None] ^ ((c * GOLDEN32) & MASK32))


def to_uniform(h: torch.Tensor) -> torch.Tensor:
    """uint32 hash -> float32 uniform strictly inside (0, 1): the top 23 bits plus one half
    ulp, so every step is exact in float32 and neither 0 nor 1 can occur."""
    return ((h >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def to_gumbel(h: torch.Tensor) -> torch.Tensor:
    """uint32 hash -> standard Gumbel(0, 1) sample, float32."""
    return -torch.log(-torch.log(to_uniform(h)))
