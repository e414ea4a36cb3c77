"""One iteration of confidence-based masked resampling, `jnp`: the JAX counterpart of
`soundstorm.kernels.resample.masked_resample_reference` (same candidates, same noise,
same kept frames; see that module for the rules, non-finite logits included)."""

from __future__ import annotations

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
