"""Keep exactly k candidates per row, by confidence, without a sort: the selection step of
masked resampling (paper §3.3), `jnp` reference.

Torch ranks eligible frames by confidence (descending, ties to the earlier frame) and keeps
ranks < k. Here each confidence becomes an unsigned 32-bit key that orders as the float
does, the k-th largest key of the row is found by bisection over its 32 bits (32 counting
passes over the row, static shapes), every frame above it is kept, and of the frames equal
to it the earliest ones fill the rest. The same frames as torch's sort, exactly k of them
whenever the row has at least k eligible frames (all of them otherwise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

KEY_BITS = 32


def order_keys(confidence: jax.Array) -> jax.Array:
    """float32 -> uint32 with the same order (-inf lowest of the finite-or--inf values,
    above key 0; -0.0 and 0.0 equal, as they compare)."""
    bits = jax.lax.bitcast_convert_type(confidence, jnp.uint32)
    # -0.0 as 0.0, by its bits: XLA may flush subnormals to zero in a float comparison
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def kth_key(keys: jax.Array, eligible: jax.Array, num_keep: jax.Array) -> jax.Array:
    """uint32 [B]: the largest v with #(eligible & keys >= v) >= num_keep (the k-th largest
    eligible key; 0xFFFFFFFF for k = 0 and 0 when fewer than k are eligible)."""
    def bit(i, v):
        cand = v | (jnp.uint32(1) << (KEY_BITS - 1 - i).astype(jnp.uint32))
        count = jnp.sum(eligible & (keys >= cand[:, None]), axis=1, dtype=jnp.int32)
        return jnp.where(count >= num_keep, cand, v)

    return jax.lax.fori_loop(0, KEY_BITS, bit, jnp.zeros(keys.shape[:1], jnp.uint32))


def select_reference(confidence: jax.Array, eligible: jax.Array,
                     num_keep: jax.Array) -> jax.Array:
    """
    confidence: float32 [B, T] (no NaN; -inf allowed)
    eligible:   bool [B, T]
    num_keep:   int32 [B]
    returns     bool [B, T]: the num_keep[b] most confident eligible frames of row b
                (ties to the earlier frame), all eligible frames if there are fewer
    """
    keys = order_keys(confidence)
    v = kth_key(keys, eligible, num_keep)[:, None]
    above = eligible & (keys > v)
    at = eligible & (keys == v)
    room = num_keep[:, None] - jnp.sum(above, axis=1, keepdims=True, dtype=jnp.int32)
    return above | (at & (jnp.cumsum(at, axis=1, dtype=jnp.int32) <= room))
