"""One iteration of confidence-based masked resampling for the level being decoded
(paper §3.3, following MaskGIT).

For every eligible (masked, real, non-prompt) frame of the level: draw a candidate from
softmax(logits / temperature) (Gumbel-max with counter-based noise) or take the argmax;
score it with its log-probability under the model (softmax(logits), whatever the
temperature, as MaskGIT does) plus `noise_scale` times a Gumbel sample; keep exactly
`num_keep[b]` of the highest-scoring candidates in row b, leave the others MASK.
"""

from __future__ import annotations

from typing import Optional

import torch

from soundstorm.kernels import rng


def masked_resample_reference(logits: torch.Tensor, tokens: torch.Tensor,
                              eligible: torch.Tensor, num_keep: Optional[torch.Tensor],
                              seeds: torch.Tensor, level: int, iteration: int,
                              temperature: float, noise_scale: float,
                              sample: bool) -> torch.Tensor:
    """
    logits:      [B, T, C] any float dtype (computed in float32)
    tokens:      int64 [B, T]  the level's current ids, MASK (= C) where not yet decoded
    eligible:    bool [B, T]   positions that may be written (MASK, real frame, not prompt)
    num_keep:    int64 [B]     how many candidates to keep per row (<= eligible count), or
                               None to keep every eligible candidate (the last iteration)
    seeds:       int64 [B]     per-row seeds; level, iteration: 1-based
    temperature: > 0 when `sample`; ignored otherwise
    noise_scale: multiplier of the confidence Gumbel noise (already annealed)
    sample:      draw candidates (True) or take the argmax (False)
    returns      int64 [B, T]  tokens with the kept candidates written
    """
    B, T, C = logits.shape
    scores = logits.float()
    if sample:
        keys = rng.frame_keys(rng.step_keys(seeds, level, iteration, rng.STREAM_CANDIDATE), T)
        noise = rng.to_gumbel(rng.code_keys(keys, C))
        candidate = (scores / temperature + noise).argmax(dim=-1)
    else:
        candidate = scores.argmax(dim=-1)
    if num_keep is None:
        return torch.where(eligible, candidate, tokens)

    log_p = scores.gather(-1, candidate[..., None]).squeeze(-1) - scores.logsumexp(dim=-1)
    confidence = log_p
    if noise_scale != 0.0:
        keys = rng.frame_keys(rng.step_keys(seeds, level, iteration, rng.STREAM_CONFIDENCE), T)
        confidence = confidence + noise_scale * rng.to_gumbel(keys)
    confidence = confidence.masked_fill(~eligible, float("-inf"))
    # Rank by confidence (stable, so ties go to the earlier frame) and keep ranks < k:
    # exactly k per row, since the k best are all eligible whenever k <= eligible count.
    order = confidence.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(T, device=order.device).expand(B, T))
    keep = (rank < num_keep[:, None]) & eligible
    return torch.where(keep, candidate, tokens)
