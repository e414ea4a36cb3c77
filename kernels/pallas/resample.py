"""One iteration of confidence-based masked resampling in JAX: the `jnp` reference, the
counterpart of `soundstorm.kernels.resample.masked_resample_reference` (same candidates,
same noise, same kept frames; see that module for the rules, non-finite logits included),
and the Pallas version (`candidates` kernel, then the `select` kernel)."""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from soundstorm.kernels.pallas import rng
from soundstorm.kernels.pallas.select import select_reference

FLOAT32_MAX = float(jnp.finfo(jnp.float32).max)
Select = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sanitize_logits(logits: jax.Array) -> jax.Array:
    """float32, NaN -> -inf, +inf -> the largest finite float32."""
    x = logits.astype(jnp.float32)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    return jnp.where(x == jnp.inf, FLOAT32_MAX, x)


def masked_resample_reference(logits: jax.Array, tokens: jax.Array, eligible: jax.Array,
                              num_keep: jax.Array, keep_all, seed_lo: jax.Array,
                              seed_hi: jax.Array, level, iteration, temperature, noise_scale,
                              sample, table: Optional[jax.Array] = None,
                              select: Optional[Select] = None) -> jax.Array:
    """
    logits:      [B, T, C] float; tokens int32 [B, T] (MASK = C where undecoded)
    eligible:    bool [B, T]; num_keep int32 [B]
    keep_all:    bool scalar: keep every eligible candidate (the level's last iteration)
    seed_lo, seed_hi: uint32 [B] (`rng.split_seeds`)
    level, iteration: 1-based int scalars; temperature, noise_scale: float32 scalars
    sample:      bool scalar: draw candidates (else argmax)
    table:       `rng.gumbel_table()` as an array for bit-identical noise, or None
    select:      replaces `select_reference` (e.g. the Pallas kernel)
    All scalars may be traced: the candidate noise is drawn only when `sample`, the
    confidence noise only when noise_scale != 0, the ranking only without keep_all.
    returns      int32 [B, T]
    """
    B, T, C = logits.shape
    scores = sanitize_logits(logits)
    dead = jnp.max(scores, axis=-1) == -jnp.inf
    greedy = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    temperature = jnp.asarray(temperature, jnp.float32)
    noise_scale = jnp.asarray(noise_scale, jnp.float32)

    def drawn(_):
        keys = rng.frame_keys(rng.step_keys(seed_lo, seed_hi, level, iteration,
                                            rng.STREAM_CANDIDATE), T)
        noise = rng.to_gumbel(rng.code_keys(keys, C), table)
        temp = jnp.where(temperature > 0, temperature, jnp.float32(1))
        return jnp.argmax(scores / temp + noise, axis=-1).astype(jnp.int32)

    candidate = jax.lax.cond(jnp.asarray(sample), drawn, lambda _: greedy, None)
    candidate = jnp.where(dead, 0, candidate)

    def ranked(_):
        picked = jnp.take_along_axis(scores, candidate[..., None], axis=-1)[..., 0]
        log_p = picked - jax.nn.logsumexp(scores, axis=-1)

        def noisy(_):
            keys = rng.frame_keys(rng.step_keys(seed_lo, seed_hi, level, iteration,
                                                rng.STREAM_CONFIDENCE), T)
            return log_p + noise_scale * rng.to_gumbel(keys, table)

        confidence = jax.lax.cond(noise_scale != 0, noisy, lambda _: log_p, None)
        confidence = jnp.where(dead, -jnp.inf, confidence)
        return (select or select_reference)(confidence, eligible, num_keep) & eligible

    keep = jax.lax.cond(jnp.asarray(keep_all), lambda _: eligible, ranked, None)
    return jnp.where(keep, candidate, tokens)


# -- Pallas kernel ---------------------------------------------------------------------
FRAME_TILE = 128    # frames per program
CODE_LANES = 128    # codes are padded to a multiple of the lane count


def _mix32(x):
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def _gumbel(h):
    """uint32 -> Gumbel float32, as `rng.to_gumbel(h)` without a table."""
    u = ((h >> 9).astype(jnp.int32).astype(jnp.float32) + 0.5) * jnp.float32(2.0 ** -23)
    return -jnp.log(-jnp.log(u))


def _first_max(values, lanes):
    """(max, index of its first occurrence) along the last axis, [R, 1] each: a float min
    over the lanes that hold the max (Mosaic reduces floats; indices < 2**24 are exact)."""
    best = jnp.max(values, axis=1, keepdims=True)
    where = jnp.where(values == best, lanes, jnp.float32(2 ** 24))
    return best, jnp.min(where, axis=1, keepdims=True)


def _candidates_kernel(keys_ref, params_ref, logits_ref, cand_ref, conf_ref, *,
                       num_codes: int):
    """One row's FRAME_TILE frames x all codes: candidate and confidence of each frame.
    keys_ref (SMEM) int32 [B, 2]: the row's step keys (candidate, confidence streams);
    params_ref (SMEM) float32 [B, 3]: temperature, noise scale, sample (1.0 or 0.0)."""
    from jax.experimental import pallas as pl

    b, tile = pl.program_id(0), pl.program_id(1)
    x = logits_ref[...].astype(jnp.float32)                              # [F, Cp]
    code = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1)
    x = jnp.where(jnp.isnan(x), -jnp.inf, x)
    x = jnp.where(x == jnp.inf, FLOAT32_MAX, x)
    x = jnp.where(code < num_codes, x, -jnp.inf)                         # padded codes
    lanes = code.astype(jnp.float32)
    best, greedy = _first_max(x, lanes)
    dead = best == -jnp.inf

    frame = (tile * FRAME_TILE + jax.lax.broadcasted_iota(jnp.int32, (x.shape[0], 1), 0))
    spread = frame.astype(jnp.uint32) * jnp.uint32(rng.GOLDEN32)
    cand_key = jax.lax.bitcast_convert_type(keys_ref[b, 0], jnp.uint32)
    noise_key = jax.lax.bitcast_convert_type(keys_ref[b, 1], jnp.uint32)
    temperature, noise_scale, sample = params_ref[b, 0], params_ref[b, 1], params_ref[b, 2]

    fkey = _mix32(cand_key ^ spread)                                      # [F, 1]
    g = _gumbel(_mix32(fkey ^ (code.astype(jnp.uint32) * jnp.uint32(rng.GOLDEN32))))
    temp = jnp.where(temperature > 0, temperature, jnp.float32(1))
    _, drawn = _first_max(x / temp + g, lanes)
    candidate = jnp.where(sample > 0, drawn, greedy)
    candidate = jnp.where(dead, 0.0, candidate)

    picked = jnp.max(jnp.where(lanes == candidate, x, -jnp.inf), axis=1, keepdims=True)
    safe = jnp.where(dead, 0.0, best)
    lse = safe + jnp.log(jnp.sum(jnp.exp(x - safe), axis=1, keepdims=True))
    confidence = picked - lse + noise_scale * _gumbel(_mix32(noise_key ^ spread))
    cand_ref[...] = candidate.astype(jnp.int32)
    conf_ref[...] = jnp.where(dead, -jnp.inf, confidence)


def candidates(logits: jax.Array, seed_lo: jax.Array, seed_hi: jax.Array, level, iteration,
               temperature, noise_scale, sample, interpret: bool = False):
    """The per-frame half of masked resampling as a Pallas kernel: (candidate int32 [B, T],
    confidence float32 [B, T]) from logits [B, T, C], reading the logits once, with the
    Gumbel noise computed in the kernel (`rng.to_gumbel` without a table). One program per
    (row, 128 frames), codes padded to a multiple of 128. Per-row parameters as in
    `masked_resample_reference` (scalars or [B])."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import tpu as pltpu

    B, T, C = logits.shape
    Tp, Cp = -(-T // FRAME_TILE) * FRAME_TILE, -(-C // CODE_LANES) * CODE_LANES
    x = jnp.pad(logits, ((0, 0), (0, Tp - T), (0, Cp - C)))
    keys = jnp.stack([rng.step_keys(seed_lo, seed_hi, level, iteration, stream)
                      for stream in (rng.STREAM_CANDIDATE, rng.STREAM_CONFIDENCE)], axis=1)
    keys = jax.lax.bitcast_convert_type(keys, jnp.int32)
    params = jnp.stack([jnp.broadcast_to(jnp.asarray(v, jnp.float32), (B,))
                        for v in (temperature, noise_scale, sample)], axis=1)
    frames = pl.BlockSpec((None, FRAME_TILE, 1), lambda b, t, k, p: (b, t, 0))
    cand, conf = pl.pallas_call(
        functools.partial(_candidates_kernel, num_codes=C),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=2, grid=(B, Tp // FRAME_TILE),
            in_specs=[pl.BlockSpec((None, FRAME_TILE, Cp), lambda b, t, k, p: (b, t, 0))],
            out_specs=[frames, frames]),
        out_shape=[jax.ShapeDtypeStruct((B, Tp, 1), jnp.int32),
                   jax.ShapeDtypeStruct((B, Tp, 1), jnp.float32)],
        interpret=interpret,
    )(keys, params, x)
    return cand[:, :T, 0], conf[:, :T, 0]


def masked_resample(logits: jax.Array, tokens: jax.Array, eligible: jax.Array,
                    num_keep: jax.Array, keep_all, seed_lo: jax.Array, seed_hi: jax.Array,
                    level, iteration, temperature, noise_scale, sample,
                    interpret: bool = False) -> jax.Array:
    """`masked_resample_reference` with computed noise (`table=None`) as Pallas kernels:
    `candidates` (one read of the logits), then the `select` kernel keeps exactly
    num_keep[b] per row (unless keep_all). Same arguments and result, less the table."""
    from soundstorm.kernels.pallas.select import select

    candidate, confidence = candidates(logits, seed_lo, seed_hi, level, iteration,
                                       temperature, noise_scale, sample, interpret)
    keep = jax.lax.cond(jnp.asarray(keep_all), lambda _: eligible,
                        lambda _: select(confidence, eligible, num_keep, interpret) & eligible,
                        None)
    return jnp.where(keep, candidate, tokens)
