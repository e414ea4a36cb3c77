"""Summed multi-level embedding lookup (paper §3.1), JAX: the `jnp` reference of
`soundstorm.kernels.embedding.summed_embedding_reference`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def embedding_rows(tokens: jax.Array, num_levels: int, codebook_size: int) -> jax.Array:
    """int32 [B, T, Q] codes (C = MASK) -> rows of the acoustic table [B, T, Q]: level q's
    code c at q * C + c, MASK at the last row Q * C."""
    offsets = jnp.arange(num_levels, dtype=jnp.int32) * codebook_size
    return jnp.where(tokens >= codebook_size, num_levels * codebook_size, tokens + offsets)


def semantic_frame_index(num_frames: int, rate_num: int, rate_den: int) -> jax.Array:
    """int32 [T]: the semantic index frame t reads, floor(t * num / den) (exact: computed
    on the host in Python integers)."""
    import numpy as np

    return jnp.asarray((np.arange(num_frames, dtype=np.int64) * rate_num) // rate_den,
                       dtype=jnp.int32)


def summed_embedding_reference(semantic: jax.Array, tokens: jax.Array,
                               semantic_table: jax.Array, acoustic_table: jax.Array,
                               rate_num: int, rate_den: int) -> jax.Array:
    """
    semantic:       int32 [B, S]
    tokens:         int32 [B, T, Q]  codes in [0, C) or C for MASK
    semantic_table: [V, D]; acoustic_table: [Q * C + 1, D] (MASK at the last row)
    returns         [B, T, D] in the tables' dtype
    """
    B, T, Q = tokens.shape
    C = (acoustic_table.shape[0] - 1) // Q
    sem = semantic[:, semantic_frame_index(T, rate_num, rate_den)]
    rows = embedding_rows(tokens, Q, C)
    return semantic_table[sem] + acoustic_table[rows].sum(axis=2)
