"""One iteration of confidence-based masked resampling for the level being decoded
(paper §3.3, following MaskGIT).

For every eligible (masked, real, non-prompt) frame of the level: draw a candidate from
softmax(logits / temperature) (Gumbel-max with counter-based noise) or take the argmax;
score it with its log-probability under the model (softmax(logits), whatever the
temperature, as MaskGIT does) plus `noise_scale` times a Gumbel sample; keep exactly
`num_keep[b]` of the highest-scoring candidates in row b, leave the others MASK.

Every per-step parameter (level, iteration, temperature, noise scale, sample) is either
one value for the whole batch or a tensor with one value per row: the scheduler packs rows
at different levels and iterations of their own decodes into one pass.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from soundstorm.kernels import rng

Scalar = Union[int, float, bool, torch.Tensor]


def masked_resample_reference(logits: torch.Tensor, tokens: torch.Tensor,
                              eligible: torch.Tensor, num_keep: Optional[torch.Tensor],
                              seeds: torch.Tensor, level: Scalar, iteration: Scalar,
                              temperature: Scalar, noise_scale: Scalar,
                              sample: Scalar, any_sample: Optional[bool] = None,
                              any_noise: Optional[bool] = None) -> torch.Tensor:
    """
    logits:      [B, T, C] any float dtype (computed in float32)
    tokens:      int64 [B, T]  the level's current ids, MASK (= C) where not yet decoded
    eligible:    bool [B, T]   positions that may be written (MASK, real frame, not prompt)
    num_keep:    int64 [B]     how many candidates to keep per row (a value >= the row's
                               eligible count keeps them all), or None to keep every
                               eligible candidate of every row (the last iteration)
    seeds:       int64 [B]     per-row seeds
    level, iteration: 1-based; int or int64 [B]
    temperature: > 0 where sampling; float or float [B]
    noise_scale: multiplier of the confidence Gumbel noise (already annealed); float or [B]
    sample:      draw candidates (True) or take the argmax (False); bool or bool [B]
    any_sample:  whether any row samples (None: a tensor `sample` counts as yes, a Python
                 value as itself); False skips the candidate noise, whatever `sample` holds
    any_noise:   whether any row perturbs its confidence (None: a tensor `noise_scale`
                 counts as yes, a Python value when it is not 0)
    returns      int64 [B, T]  tokens with the kept candidates written
    """
    B, T, C = logits.shape
    scores = logits.float()
    greedy = scores.argmax(dim=-1)
    if any_sample is None:
        any_sample = isinstance(sample, torch.Tensor) or bool(sample)
    if any_noise is None:
        any_noise = isinstance(noise_scale, torch.Tensor) or noise_scale != 0.0
    if any_sample:
        keys = rng.frame_keys(rng.step_keys(seeds, level, iteration, rng.STREAM_CANDIDATE), T)
        noise = rng.to_gumbel(rng.code_keys(keys, C))
        temp = _per_row(temperature, B, scores.device)
        # rows that do not sample may carry temperature 0: keep their division finite
        temp = torch.where(temp > 0, temp, torch.ones_like(temp))
        drawn = (scores / temp[:, None, None] + noise).argmax(dim=-1)
        candidate = torch.where(_per_row(sample, B, scores.device, torch.bool)[:, None], drawn, greedy)
    else:
        candidate = greedy
    if num_keep is None:
        return torch.where(eligible, candidate, tokens)

    log_p = scores.gather(-1, candidate[..., None]).squeeze(-1) - scores.logsumexp(dim=-1)
    confidence = log_p
    if any_noise:
        keys = rng.frame_keys(rng.step_keys(seeds, level, iteration, rng.STREAM_CONFIDENCE), T)
        scale = _per_row(noise_scale, B, scores.device)
        confidence = confidence + scale[:, None] * rng.to_gumbel(keys)
    confidence = confidence.masked_fill(~eligible, float("-inf"))
    # Rank by confidence (stable, so ties go to the earlier frame) and keep ranks < k:
    # exactly k per row, since the k best are all eligible whenever k <= eligible count.
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(T, device=order.device).expand(B, T))
    keep = (rank < num_keep[:, None]) & eligible
    return torch.where(keep, candidate, tokens)


def _per_row(value: Scalar, batch: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).expand(batch)
