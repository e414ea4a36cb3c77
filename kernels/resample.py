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

Non-finite logits have one defined outcome, the same in every backend: on load, NaN
becomes -inf and +inf becomes the largest finite float32 (-inf stays). A frame whose
logits are then all -inf (all NaN, all -inf, or a mix) gets candidate 0 and confidence
-inf, noise or not: it ranks below every frame with a finite confidence and above every
non-eligible frame, so exactly `num_keep[b]` frames are still kept (ties between such
frames go to the earlier one, as all ties do).
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
    logits:      [B, T, C] any float dtype (computed in float32; NaN counts as -inf and
                 +inf as the largest finite float32, see the module docstring)
    tokens:      int64 [B, T]  the level's current ids, MASK (= C) where not yet decoded
    eligible:    bool [B, T]   positions that may be written (MASK, real frame, not prompt)
    num_keep:    int64 [B]     how many candidates to keep per row (a value >= the row's
                               eligible count keeps them all), or None to keep every
                               eligible candidate of every row (the last iteration)
    seeds:       int64 [B]     per-row seeds
    level, iteration: 1-based; int or int64 [B]
    temperature: > 0 where sampling, float or float [B]; `DecodeConfig` keeps it at or
                 above 1e-4, so logits / temperature stays within float32
    noise_scale: multiplier of the confidence Gumbel noise (already annealed); float or [B]
    sample:      draw candidates (True) or take the argmax (False); bool or bool [B]
    any_sample:  whether any row samples (None: a tensor `sample` counts as yes, a Python
                 value as itself); False skips the candidate noise, whatever `sample` holds
    any_noise:   whether any row perturbs its confidence (None: a tensor `noise_scale`
                 counts as yes, a Python value when it is not 0)
    returns      int64 [B, T]  tokens with the kept candidates written
    """
    B, T, C = logits.shape
    scores = sanitize_logits(logits)
    # frames with no finite logit: candidate 0, confidence -inf (see the module docstring)
    dead = scores.amax(dim=-1) == float("-inf")
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
    candidate = candidate.masked_fill(dead, 0)
    if num_keep is None:
        return torch.where(eligible, candidate, tokens)

    log_p = scores.gather(-1, candidate[..., None]).squeeze(-1) - scores.logsumexp(dim=-1)
    confidence = log_p
    if any_noise:
        keys = rng.frame_keys(rng.step_keys(seeds, level, iteration, rng.STREAM_CONFIDENCE), T)
        scale = _per_row(noise_scale, B, scores.device)
        confidence = confidence + scale[:, None] * rng.to_gumbel(keys)
    confidence = confidence.masked_fill(dead, float("-inf"))
    # Rank eligible frames first, each group by confidence (both sorts stable, so ties go
    # to the earlier frame), and keep ranks < k: exactly k per row whenever k <= the
    # row's eligible count, even when some eligible confidences are -inf.
    order = confidence.argsort(dim=1, descending=True, stable=True)
    order = order.gather(1, eligible.gather(1, order).to(torch.uint8).argsort(
        dim=1, descending=True, stable=True))
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(T, device=order.device).expand(B, T))
    keep = (rank < num_keep[:, None]) & eligible
    return torch.where(keep, candidate, tokens)


FLOAT32_MAX = torch.finfo(torch.float32).max


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """logits (any float dtype) -> float32 with NaN as -inf and +inf as the largest finite
    float32 (-inf is kept): the only non-finite value left is -inf."""
    return logits.float().nan_to_num(nan=float("-inf"), posinf=FLOAT32_MAX,
                                     neginf=float("-inf"))


def _per_row(value: Scalar, batch: int, device: torch.device,
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(value, dtype=dtype, device=device).expand(batch)
