"""Summed multi-level embedding lookup (paper §3.1), JAX: the `jnp` reference of
`soundstorm.kernels.embedding.summed_embedding_reference`."""

from __future__ import annotations

import functools

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


# -- Pallas kernel ---------------------------------------------------------------------
FRAME_TILE = 8      # frames per program: the sublane count of a TPU vreg


def _embedding_kernel(rows_ref, semantic_hbm, acoustic_hbm, out_ref, buf, sems, *,
                      levels: int):
    """One tile of FRAME_TILE frames: gather its (1 + Q) rows per frame from the two
    tables in HBM (one DMA per row, all in flight at once), then sum them.
    rows_ref (SMEM) [1, (1 + Q) * FRAME_TILE]: for each frame the semantic row, then the
    acoustic rows of its Q levels; buf (VMEM) [1 + Q, FRAME_TILE, D]."""
    from jax.experimental.pallas import tpu as pltpu

    copies = []
    for t in range(FRAME_TILE):
        for q in range(levels + 1):
            row = rows_ref[0, t * (levels + 1) + q]
            table = semantic_hbm if q == 0 else acoustic_hbm
            copy = pltpu.make_async_copy(table.at[pl_ds(row, 1)], buf.at[q, pl_ds(t, 1)],
                                         sems.at[0])
            copy.start()
            copies.append(copy)
    for copy in copies:
        copy.wait()
    out_ref[...] = jnp.sum(buf[...].astype(jnp.float32), axis=0).astype(out_ref.dtype)


def pl_ds(start, size):
    from jax.experimental import pallas as pl

    return pl.ds(start, size)


def summed_embedding(semantic: jax.Array, tokens: jax.Array, semantic_table: jax.Array,
                     acoustic_table: jax.Array, rate_num: int, rate_den: int,
                     interpret: bool = False) -> jax.Array:
    """`summed_embedding_reference` as a Pallas kernel: the tables stay in HBM and each
    program gathers the rows of FRAME_TILE frames by DMA (the acoustic table of the paper's
    model is 48 MiB in float32: it cannot sit in VMEM, and one-hot matmuls against it
    would cost more than the forward pass). Same arguments and result; `interpret` runs it
    in the TPU interpreter on any backend."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, T, Q = tokens.shape
    C = (acoustic_table.shape[0] - 1) // Q
    D = semantic_table.shape[1]
    N = B * T
    Np = -(-N // FRAME_TILE) * FRAME_TILE
    sem = semantic[:, semantic_frame_index(T, rate_num, rate_den)].reshape(N, 1)
    rows = jnp.concatenate([sem, embedding_rows(tokens, Q, C).reshape(N, Q)], axis=1)
    rows = jnp.pad(rows.astype(jnp.int32), ((0, Np - N), (0, 0)))       # pad frames: row 0
    # [programs, 1, K]: a block's last two dims (1, K) are the array's, as Mosaic requires
    rows = rows.reshape(Np // FRAME_TILE, 1, FRAME_TILE * (Q + 1))
    kernel = functools.partial(_embedding_kernel, levels=Q)
    out = pl.pallas_call(
        kernel, grid=(Np // FRAME_TILE,),
        in_specs=[pl.BlockSpec((None, 1, FRAME_TILE * (Q + 1)), lambda i: (i, 0, 0),
                               memory_space=pltpu.SMEM),
                  pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
        out_specs=pl.BlockSpec((FRAME_TILE, D), lambda i: (i, 0)),
        out_shape=jax.ShapeDtypeStruct((Np, D), semantic_table.dtype),
        scratch_shapes=[pltpu.VMEM((Q + 1, FRAME_TILE, D), semantic_table.dtype),
                        pltpu.SemaphoreType.DMA((1,))],
        interpret=pltpu.InterpretParams() if interpret else False,
    )(rows, semantic_table, acoustic_table)
    return out[:N].reshape(B, T, D)
