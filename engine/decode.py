"""Level-wise iterative parallel decoding (paper §3.3) over a padded batch.

The schedule is computed on the host before the loop (`plan_decode`); the loop
(`decode_levels`) then runs fixed shapes, reads the schedule from device tensors, and
never syncs with the host, so it can later be captured step by step in CUDA graphs.

Invariants kept (DESIGN.md):
1. prompt frames (all levels) never change; padding frames are never sampled or counted;
2. levels go coarse to fine; while level q is decoded, levels > q stay MASK;
3. after iteration i of s_q, exactly floor(n_q * cos(pi/2 * i/s_q)) level-q tokens remain
   masked (float64; 0 after the last iteration), n_q = the row's non-prompt frames;
4. candidates ~ softmax(logits / temperature); confidence = log softmax(logits)[candidate]
   + g (1 - i/s_q) Gumbel;
   the last iteration of a level is greedy when `greedy_last`;
5. a token once written is never masked again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch

from soundstorm.engine.config import DecodeConfig
from soundstorm.engine.model import SoundStorm
from soundstorm.kernels import Ops

OnStep = Callable[[int, int, torch.Tensor], None]


def masked_after(n: int, iteration: int, steps: int) -> int:
    """Tokens still masked after `iteration` (1-based) of `steps`, from `n` at the start of
    the level: floor(n * cos(pi/2 * i/s)) in float64, and exactly 0 after the last."""
    if iteration >= steps:
        return 0
    return math.floor(n * math.cos(math.pi / 2 * iteration / steps))


@dataclass(frozen=True)
class Step:
    level: int          # 1-based RVQ level
    iteration: int      # 1-based iteration within the level
    steps: int          # iterations of this level
    sample: bool        # draw candidates (else argmax)
    noise_scale: float  # annealed confidence noise: g * (1 - i/s)
    keep_all: bool      # last iteration of the level: every remaining candidate is kept


@dataclass
class DecodePlan:
    steps: List[Step]
    num_keep: torch.Tensor  # int64 [num_steps, B]: candidates kept per row at each step


def plan_decode(to_decode: Sequence[int], steps_per_level: Sequence[int],
                decode: DecodeConfig, device: torch.device) -> DecodePlan:
    """Precompute the whole schedule for rows with `to_decode[b]` frames to generate."""
    steps: List[Step] = []
    keep_rows: List[List[int]] = []
    for level, s in enumerate(steps_per_level, start=1):
        for i in range(1, s + 1):
            last = i == s
            greedy = decode.temperature == 0 or (last and decode.greedy_last)
            steps.append(Step(level, i, s, sample=not greedy,
                              noise_scale=decode.gumbel_scale * (1 - i / s), keep_all=last))
            keep_rows.append([masked_after(n, i - 1, s) - masked_after(n, i, s)
                              for n in to_decode])
    num_keep = torch.tensor(keep_rows, dtype=torch.int64, device=device)
    return DecodePlan(steps, num_keep.view(len(steps), len(to_decode)))


@torch.no_grad()
def decode_levels(model: SoundStorm, ops: Ops, semantic: torch.Tensor, tokens: torch.Tensor,
                  lengths: Optional[torch.Tensor], frame_valid: torch.Tensor,
                  seeds: torch.Tensor, plan: DecodePlan, decode: DecodeConfig,
                  on_step: Optional[OnStep] = None) -> torch.Tensor:
    """
    semantic:    int64 [B, S]
    tokens:      int64 [B, T, Q] prompt frames filled, every other frame MASK; updated
                 in place and returned
    lengths:     int64 [B] real frames per row, or None when no row is padded
    frame_valid: bool [B, T] real frames
    seeds:       int64 [B]
    """
    mask_id = model.config.mask_id
    for index, step in enumerate(plan.steps):
        column = tokens[:, :, step.level - 1]
        eligible = (column == mask_id) & frame_valid
        logits = model(semantic, tokens, lengths, level=step.level)
        column.copy_(ops.masked_resample(
            logits, column, eligible, None if step.keep_all else plan.num_keep[index],
            seeds, step.level, step.iteration, decode.temperature, step.noise_scale,
            step.sample))
        if on_step is not None:
            on_step(step.level, step.iteration, tokens.masked_fill(~frame_valid[..., None], -1))
    return tokens


def reference_decode(engine, batch, on_step: Optional[OnStep] = None) -> torch.Tensor:
    """The whole batch in lockstep through `decode_levels`: the plain reference that the
    engine's scheduled decode (`Engine.generate`, `submit`, `generate_many`) is tested
    against. `batch` comes from `engine.prepare(...)`; returns int64 [B, T, Q] like
    `Engine.generate`."""
    T = batch.tokens.shape[1]
    device = engine.device
    lengths = None if min(batch.frames) == T else torch.tensor(batch.frames, device=device)
    plan = plan_decode(batch.to_decode, batch.steps_per_level, batch.decode, device)
    frame_valid = batch.frame_valid.to(device)
    with engine.runner.device_guard():
        tokens = decode_levels(engine.model, engine.ops, batch.semantic.to(device),
                               batch.tokens.to(device, copy=True), lengths, frame_valid,
                               batch.seeds.to(device), plan, batch.decode, on_step)
    return tokens.masked_fill_(~frame_valid[..., None], -1)
