"""Bidirectional attention over each row's real keys, JAX: the `jnp` reference and a
flash-attention Pallas kernel (online softmax over key blocks, scores never written to
HBM). Rotary embeddings are applied before (XLA fuses them into the QKV projection's
epilogue), so both take rotated q and k, as `soundstorm.kernels.attention` computes them.

Why a kernel: the reference writes the [B, H, T, T] float32 scores and reads them back,
144 MB per layer for one 30 s row of the paper's model (16 heads, 1500 frames), several
times the layer's weights; the kernel reads q, k, v once and skips key blocks past a
row's length."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

BLOCK_Q = 128       # queries per program (a multiple of 8 sublanes)
BLOCK_K = 128       # keys per step of the online softmax (a multiple of 128 lanes)


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array,
                        lengths: jax.Array) -> jax.Array:
    """
    q, k, v: float [B, H, T, dh] (q, k rotated); lengths: int32 [B] real frames (1..T)
    returns  [B, H, T, dh] in q's dtype: softmax(q k^T / sqrt(dh) over keys < length) v,
             scores, softmax and products in float32
    """
    T = q.shape[2]
    key_mask = jnp.arange(T)[None, :] < lengths[:, None]
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(key_mask[:, None, None, :], scores / jnp.sqrt(jnp.float32(q.shape[-1])),
                       -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bhkd->bhqd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def _flash_kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, *, scale: float):
    from jax.experimental import pallas as pl

    length = lengths_ref[pl.program_id(0)]
    q = q_ref[...].astype(jnp.float32) * scale                        # [BLOCK_Q, dh]
    rows, dh = q.shape

    def step(j, carry):
        m, l, acc = carry
        start = j * BLOCK_K
        k = k_ref[pl.ds(pl.multiple_of(start, BLOCK_K), BLOCK_K), :].astype(jnp.float32)
        v = v_ref[pl.ds(pl.multiple_of(start, BLOCK_K), BLOCK_K), :].astype(jnp.float32)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32)   # [BLOCK_Q, BLOCK_K]
        key = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where(key < length, s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + jnp.sum(p, axis=1, keepdims=True)
        acc = alpha * acc + jax.lax.dot_general(p, v, (((1,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
        return m_new, l, acc

    init = (jnp.full((rows, 1), -jnp.inf, jnp.float32), jnp.zeros((rows, 1), jnp.float32),
            jnp.zeros((rows, dh), jnp.float32))
    # Only the key blocks that hold real frames (every row has at least one).
    # (lax.div: lengths are positive, and Mosaic lowers it without floor's sign fix-up)
    blocks = jax.lax.div(length + (BLOCK_K - 1), jnp.int32(BLOCK_K))
    _, l, acc = jax.lax.fori_loop(0, blocks, step, init)
    o_ref[...] = (acc / l).astype(o_ref.dtype)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    interpret: bool = False) -> jax.Array:
    """`attention_reference` as a Pallas kernel: one program per (row, head, 128 queries),
    the head's keys and values whole in VMEM (frames padded to a multiple of 128), an
    online softmax over 128-key blocks up to the row's length. Same arguments and result."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, H, T, dh = q.shape
    Tp = -(-T // BLOCK_Q) * BLOCK_Q
    pad = ((0, 0), (0, 0), (0, Tp - T), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    query = pl.BlockSpec((None, None, BLOCK_Q, dh), lambda b, h, i, lengths: (b, h, i, 0))
    whole = pl.BlockSpec((None, None, Tp, dh), lambda b, h, i, lengths: (b, h, 0, 0))
    kernel = functools.partial(_flash_kernel, scale=float(dh) ** -0.5)
    out = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(B, H, Tp // BLOCK_Q),
            in_specs=[query, whole, whole], out_specs=query),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
    )(lengths.astype(jnp.int32), q, k, v)
    return out[:, :, :T]
