"""The whole level-wise decode of a batch (paper §3.3) as one jitted XLA program.

The schedule is planned on the host exactly as the torch decoder plans it
(`soundstorm.engine.decode.plan_decode`): one entry per iteration (level, iteration,
sample, annealed noise scale, keep-all) and the candidates each row keeps. The program
then runs a `lax.fori_loop` over those entries with static shapes: each step reads the
level's column, runs the forward pass with that level's head only, resamples the masked
frames and writes the column back. Rows carry their own lengths (padding frames are never
eligible and never attended to) and prompts (prompt frames are never MASK, so never
eligible), so the torch decoder's invariants hold here by the same construction.
`decode_all` is the program on one device; `sharded_program` runs it on every device of a
mesh over that device's rows."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from soundstorm.engine.config import DecodeConfig, ModelConfig
from soundstorm.engine.xla.model import forward
from soundstorm.kernels.pallas.resample import masked_resample_reference


@dataclass(frozen=True)
class Schedule:
    """The planned decode, as arrays (N = iterations in all, B = rows)."""
    level: np.ndarray        # int32 [N], 1-based
    iteration: np.ndarray    # int32 [N], 1-based
    sample: np.ndarray       # bool [N]
    noise: np.ndarray        # float32 [N]: g * (1 - i / s)
    keep_all: np.ndarray     # bool [N]
    num_keep: np.ndarray     # int32 [N, B]
    temperature: np.float32

    def arrays(self) -> tuple:
        return (self.level, self.iteration, self.sample, self.noise, self.keep_all,
                self.num_keep, self.temperature)


def plan(to_decode: Sequence[int], steps_per_level: Sequence[int],
         decode: DecodeConfig) -> Schedule:
    """The torch decoder's plan (`plan_decode`) as a `Schedule`."""
    import torch

    from soundstorm.engine.decode import plan_decode

    p = plan_decode(list(to_decode), steps_per_level, decode, torch.device("cpu"))
    return Schedule(
        level=np.array([s.level for s in p.steps], np.int32),
        iteration=np.array([s.iteration for s in p.steps], np.int32),
        sample=np.array([s.sample for s in p.steps], np.bool_),
        noise=np.array([s.noise_scale for s in p.steps], np.float32),
        keep_all=np.array([s.keep_all for s in p.steps], np.bool_),
        num_keep=p.num_keep.numpy().astype(np.int32),
        temperature=np.float32(decode.temperature))


def decode_step(params, config: ModelConfig, semantic, tokens, lengths, seed_lo, seed_hi,
                schedule: tuple, index, table, embedding=None, resample=None, attention=None):
    """Iteration `index` of `schedule` (`Schedule.arrays()`) over every row:
    tokens int32 [B, T, Q] -> the tokens after it."""
    level_a, iteration_a, sample_a, noise_a, keep_all_a, num_keep_a, temperature = schedule
    B, T, Q = tokens.shape
    level = level_a[index]
    column = jax.lax.dynamic_index_in_dim(tokens, level - 1, axis=2, keepdims=False)
    frame_valid = jnp.arange(T)[None, :] < lengths[:, None]
    eligible = (column == config.mask_id) & frame_valid
    logits = forward(params, config, semantic, tokens, lengths, level, embedding, attention)
    args = (logits, column, eligible, num_keep_a[index], keep_all_a[index], seed_lo, seed_hi,
            level, iteration_a[index], temperature, noise_a[index], sample_a[index])
    new = resample(*args) if resample is not None else masked_resample_reference(*args, table)
    return jax.lax.dynamic_update_index_in_dim(tokens, new, level - 1, axis=2)


@functools.partial(jax.jit, static_argnames=("config", "embedding", "resample", "attention"))
def decode_all(params, config: ModelConfig, semantic, tokens, lengths, seed_lo, seed_hi,
               schedule: tuple, table, embedding=None, resample=None, attention=None):
    """Every iteration of `schedule` in one program (`lax.fori_loop`).

    params:   `soundstorm.engine.xla.params` pytree
    semantic: int32 [B, S]; tokens int32 [B, T, Q] (prompt frames set, MASK elsewhere)
    lengths:  int32 [B] real frames per row; seed_lo, seed_hi: uint32 [B]
    schedule: `Schedule.arrays()`; table: the Gumbel table or None
    embedding, resample, attention: Pallas kernels in place of the `jnp` references (the
              resampling kernel computes its noise: `table` is then unused), or None
    returns   int32 [B, T, Q]
    """
    steps = schedule[0].shape[0]

    def body(index, tokens):
        return decode_step(params, config, semantic, tokens, lengths, seed_lo, seed_hi,
                           schedule, index, table, embedding, resample, attention)

    return jax.lax.fori_loop(0, steps, body, tokens)


@functools.lru_cache(maxsize=64)
def sharded_program(mesh, config: ModelConfig, embedding=None, resample=None, attention=None,
                    one_step: bool = False):
    """The decode (or, with `one_step`, one iteration of it) jitted over `mesh`'s "data"
    axis with `shard_map`: every device runs the whole program on its own rows, with no
    communication (rows are independent) and with the Pallas kernels, which XLA could not
    partition by itself, running on local rows. Arguments as `decode_all` (plus `index`
    before `table` with `one_step`), rows split: semantic, tokens, lengths, seeds and the
    schedule's num_keep."""
    from jax.sharding import PartitionSpec as P

    rows = P("data")
    schedule = (P(), P(), P(), P(), P(), P(None, "data"), P())

    if one_step:
        def body(params, semantic, tokens, lengths, seed_lo, seed_hi, sched, index, table):
            return decode_step(params, config, semantic, tokens, lengths, seed_lo, seed_hi,
                               sched, index, table, embedding, resample, attention)
        specs = (P(), rows, rows, rows, rows, rows, schedule, P(), P())
    else:
        def body(params, semantic, tokens, lengths, seed_lo, seed_hi, sched, table):
            def step(index, tokens):
                return decode_step(params, config, semantic, tokens, lengths, seed_lo,
                                   seed_hi, sched, index, table, embedding, resample,
                                   attention)
            return jax.lax.fori_loop(0, sched[0].shape[0], step, tokens)
        specs = (P(), rows, rows, rows, rows, rows, schedule, P())
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=rows,
                                 check_vma=False))
