"""The counter-based generator of `soundstorm.kernels.rng` on JAX `uint32` values
(multiplications wrap mod 2**32, shifts are logical): bit-identical hashes.

`to_gumbel` by default reads the Gumbel value of a hash from a table of all 2**23 values
(`gumbel_table`, computed once by the torch reference's own float32 logarithm, as the C++
backend does), so the noise equals the reference's bit for bit: XLA's `log` differs from
torch's in the last bits for about a quarter of the inputs. Without a table it computes
-log(-log(u)) itself (a few ulp from the reference)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from soundstorm.kernels import rng as torch_rng

GOLDEN32 = torch_rng.GOLDEN32
STREAM_CANDIDATE = torch_rng.STREAM_CANDIDATE
STREAM_CONFIDENCE = torch_rng.STREAM_CONFIDENCE
GUMBEL_BITS = 23


def mix32(x: jax.Array) -> jax.Array:
    """lowbias32 on uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def split_seeds(seeds) -> tuple[np.ndarray, np.ndarray]:
    """int64 seeds [B] (host) -> (low, high) 32-bit halves as uint32 [B] each (JAX runs
    without 64-bit integers)."""
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)
    return (s & np.uint64(0xFFFFFFFF)).astype(np.uint32), (s >> np.uint64(32)).astype(np.uint32)


def step_keys(seed_lo: jax.Array, seed_hi: jax.Array, level, iteration, stream: int) -> jax.Array:
    """`rng.step_keys`: uint32 [B] from the seeds' halves, level and iteration (1-based,
    scalars or [B])."""
    level = jnp.asarray(level).astype(jnp.uint32)
    iteration = jnp.asarray(iteration).astype(jnp.uint32)
    tag = ((level & 0xFFFF) << 16) | ((iteration & 0xFFF) << 4) | jnp.uint32(stream & 0xF)
    tag = jnp.broadcast_to(tag, seed_lo.shape)
    return mix32(seed_lo ^ mix32(seed_hi ^ mix32(tag)))


def frame_keys(keys: jax.Array, num_frames: int) -> jax.Array:
    """uint32 [B] -> [B, T]; frame t is the absolute frame index."""
    t = jnp.arange(num_frames, dtype=jnp.uint32)
    return mix32(keys[:, None] ^ (t * jnp.uint32(GOLDEN32)))


def code_keys(fkeys: jax.Array, num_codes: int) -> jax.Array:
    """uint32 [B, T] -> [B, T, C]."""
    c = jnp.arange(num_codes, dtype=jnp.uint32)
    return mix32(fkeys[..., None] ^ (c * jnp.uint32(GOLDEN32)))


def to_uniform(h: jax.Array) -> jax.Array:
    """uint32 -> float32 strictly inside (0, 1), exactly as `rng.to_uniform`."""
    return ((h >> 9).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)


def to_gumbel(h: jax.Array, table: Optional[jax.Array] = None) -> jax.Array:
    """uint32 hash -> Gumbel(0, 1) float32: table[h >> 9] (bit-identical to the torch
    reference) given `gumbel_table()`, else -log(-log(u)) computed by XLA."""
    if table is not None:
        return table[(h >> 9).astype(jnp.int32)]
    return -jnp.log(-jnp.log(to_uniform(h)))


_TABLE: Optional[np.ndarray] = None


def gumbel_table() -> np.ndarray:
    """float32 [2**23] (32 MiB): `rng.to_gumbel` of every hash, indexed by its top 23 bits,
    computed once per process by the torch reference."""
    global _TABLE
    if _TABLE is None:
        import torch

        table = np.empty(1 << GUMBEL_BITS, dtype=np.float32)
        step = 1 << 20
        for start in range(0, 1 << GUMBEL_BITS, step):
            top = torch.arange(start, start + step, dtype=torch.int64)
            table[start:start + step] = torch_rng.to_gumbel(top << (32 - GUMBEL_BITS)).numpy()
        _TABLE = table
    return _TABLE
