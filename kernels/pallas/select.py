"""Keep exactly k candidates per row, by confidence, without a sort: the selection step of
masked resampling (paper §3.3): the `jnp` reference and the Pallas kernel.

Torch ranks eligible frames by confidence (descending, ties to the earlier frame) and keeps
ranks < k. Here each confidence becomes an unsigned 32-bit key that orders as the float
does, the k-th largest key of the row is found by bisection over its 32 bits (32 counting
passes over the row, static shapes), every frame above it is kept, and of the frames equal
to it the earliest ones fill the rest. The same frames as torch's sort, exactly k of them
whenever the row has at least k eligible frames (all of them otherwise)."""

from __future__ import annotations

import functools

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


# -- Pallas kernel ---------------------------------------------------------------------
ROW_TILE = 8        # rows per program: the sublane count of a TPU vreg
FRAME_TILE = 128    # frames are padded to a multiple of the lane count
INT_MIN = -(2 ** 31)


def _signed_keys(confidence):
    """float32 -> int32 with the same order, in int32 arithmetic only (Mosaic compares
    signed integers): the unsigned key of `order_keys` with its top bit flipped."""
    bits = jax.lax.bitcast_convert_type(confidence, jnp.int32)
    bits = jnp.where(bits == INT_MIN, 0, bits)                      # -0.0 -> 0.0
    return jnp.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _count(mask):
    """Per-row count [R, 1] as float32 (exact below 2**24 frames; Mosaic reduces floats)."""
    return jnp.sum(mask.astype(jnp.float32), axis=1, keepdims=True)


def _select_kernel(conf_ref, eligible_ref, keep_n_ref, out_ref, *, index_bits: int):
    keys = _signed_keys(conf_ref[...])
    eligible = eligible_ref[...] != 0
    k = keep_n_ref[...].astype(jnp.float32)                          # [R, 1]
    # The k-th largest key, bit by bit from the top, in the unsigned order (a candidate
    # pattern c compares as the signed value c ^ INT_MIN).
    v = jnp.zeros(k.shape, jnp.int32)
    for i in range(KEY_BITS):
        cand = v | jnp.int32(jnp.uint32(1 << (KEY_BITS - 1 - i)).view(jnp.int32))
        ok = _count(eligible & (keys >= (cand ^ INT_MIN))) >= k
        v = jnp.where(ok, cand, v)
    v = v ^ INT_MIN
    above = eligible & (keys > v)
    at = eligible & (keys == v)
    room = k - _count(above)
    # Of the frames at the threshold, the earliest `room`: the largest frame bound j with
    # #(at & frame < j) <= room, again by bisection (no cumulative sum on the TPU).
    frame = jax.lax.broadcasted_iota(jnp.int32, keys.shape, 1)
    j = jnp.zeros(k.shape, jnp.int32)
    for i in range(index_bits):
        cand = j | (1 << (index_bits - 1 - i))
        ok = _count(at & (frame < cand)) <= room
        j = jnp.where(ok, cand, j)
    out_ref[...] = (above | (at & (frame < j))).astype(jnp.int32)


def select(confidence: jax.Array, eligible: jax.Array, num_keep: jax.Array,
           interpret: bool = False) -> jax.Array:
    """`select_reference` as a Pallas kernel: one program per 8 rows, each row whole in
    VMEM (frames padded to a multiple of 128), 32 + log2(frames) counting passes.
    Same arguments and result as `select_reference`; `interpret` runs it on any backend."""
    from jax.experimental import pallas as pl

    B, T = confidence.shape
    Bp, Tp = -(-B // ROW_TILE) * ROW_TILE, -(-T // FRAME_TILE) * FRAME_TILE
    conf = jnp.pad(confidence.astype(jnp.float32), ((0, Bp - B), (0, Tp - T)))
    elig = jnp.pad(eligible.astype(jnp.int32), ((0, Bp - B), (0, Tp - T)))
    k = jnp.pad(num_keep.astype(jnp.int32), (0, Bp - B))[:, None]
    rows = pl.BlockSpec((ROW_TILE, Tp), lambda i: (i, 0))
    kernel = functools.partial(_select_kernel, index_bits=max(1, (Tp).bit_length()))
    out = pl.pallas_call(
        kernel, grid=(Bp // ROW_TILE,),
        in_specs=[rows, rows, pl.BlockSpec((ROW_TILE, 1), lambda i: (i, 0))],
        out_specs=rows, out_shape=jax.ShapeDtypeStruct((Bp, Tp), jnp.int32),
        interpret=interpret)(conf, elig, k)
    return out[:B, :T] != 0
