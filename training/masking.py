"""SoundStorm's training mask (paper §3.2), drawn per example and vectorised over the batch.

For every row b of real length T_b (frames numbered 1..T_b as in the paper):

- a prompt delimiter t ~ U{0, ..., T_b - 1}: frames 1..t are the voice prompt and are never
  masked (in 0-based tensor indexing: frames [0, t)); t = 0 means no prompt;
- an RVQ level q ~ U{1, ..., Q} (or, when the run gives `level_weights`, level q with
  probability w_q / sum(w): a way to spend more of a small budget on the levels that
  matter most, optionally moving to `level_weights_end` over the run; validation always
  draws uniformly, as the paper does);
- a mask ratio p = cos(u), u ~ U[0, pi/2]; each frame after t is masked at level q with
  probability p (iid Bernoulli);
- every frame after t is masked at all levels > q;
- optionally (`finer_full_mask` f > 0), a row training a level q > 1 masks every frame
  after t at level q with probability f instead (p = 1): what the paper's schedule asks
  at inference, where each finer level is decoded in one pass from the prompt and the
  coarser levels alone, with none of its own tokens to lean on;
- the loss is the cross-entropy on the masked level-q tokens only. Semantic conditioning
  is never masked (it is not even an input here); padding frames are never masked and
  never counted.

Because t <= T_b - 1, every row has at least one frame after its prompt. A row whose
Bernoulli draw masks nothing gets exactly one level-q token masked instead: the eligible
frame whose Bernoulli uniform came closest to being masked. So every row contributes to
the loss and no row ever divides by zero (a p close to 0 is otherwise common: p < 0.05 has
probability ~3%).

All randomness comes from the counter-based hash in `soundstorm.kernels.rng`, keyed by
(seed, sample key, stream, frame): an example's mask depends only on its own key, never on
its batch companions, its padding, the batch size or the number of processes. That is
what makes a 2-process run reproduce a 1-process run and makes resuming exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from soundstorm.kernels.rng import MASK32, mix32, to_uniform, frame_keys

IGNORE_INDEX = -100

# Independent streams of the per-example hash.
_STREAM_PROMPT = 0x11
_STREAM_LEVEL = 0x22
_STREAM_RATIO = 0x33
_STREAM_FRAMES = 0x44
_STREAM_FULL = 0x55


@dataclass
class MaskedBatch:
    """One masked batch.

    inputs:     int64 [B, T, Q] model input: ground truth with MASK (= codebook_size)
                where masked; padding frames as given
    targets:    int64 [B, T]    ground truth of level q at the masked level-q frames,
                                IGNORE_INDEX (-100) everywhere else
    level:      int64 [B]       the level q of each row (1-based)
    prompt_len: int64 [B]       the delimiter t: frames [0, t) are the prompt
    ratio:      float32 [B]     the mask ratio p = cos(u) drawn for the row (1 for a row
                                fully masked by finer_full_mask)
    """
    inputs: torch.Tensor
    targets: torch.Tensor
    level: torch.Tensor
    prompt_len: torch.Tensor
    ratio: torch.Tensor

    @property
    def loss_mask(self) -> torch.Tensor:
        """bool [B, T]: the masked level-q tokens (those the loss is computed on)."""
        return self.targets != IGNORE_INDEX


def row_keys(seed: int, sample_keys: torch.Tensor, stream: int) -> torch.Tensor:
    """int64 [B] 32-bit keys for one stream, from a run seed and per-example keys.

    seed: any int in [0, 2**63); sample_keys: int64 [B] (unique per example and epoch).
    """
    s = torch.full_like(sample_keys, 0)
    lo, hi = seed & MASK32, (seed >> 32) & MASK32
    k = mix32(s + (lo ^ stream))
    k = mix32(k ^ hi)
    k = mix32(k ^ (sample_keys & MASK32))
    return mix32(k ^ ((sample_keys >> 32) & MASK32))


def check_level_weights(weights: Sequence[float], num_quantizers: int,
                        name: str = "level_weights") -> tuple:
    """The weights as a tuple of floats, or ValueError naming the setting `name` and what is
    wrong with them."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or \
            len(weights) != num_quantizers or not all(
                isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                and w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"{name} must be {num_quantizers} numbers >= 0 (one per RVQ "
                         f"level, coarse to fine) with a positive sum, got {weights!r}")
    return tuple(float(w) for w in weights)


def check_finer_full_mask(value: float) -> float:
    """`value` if it is a probability, else ValueError naming finer_full_mask."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not 0.0 <= value <= 1.0:
        raise ValueError(f"finer_full_mask must be a number in [0, 1] (the share of rows "
                         f"training a level > 1 that mask all of it), got {value!r}")
    return float(value)


def level_weights_at(step: int, steps: int, start: Optional[Sequence[float]],
                     end: Optional[Sequence[float]], num_quantizers: int) -> Optional[tuple]:
    """The level weights of optimizer step `step` (0-based) of a `steps`-step run.

    Without `end` the weights stay `start` (None: uniform). With `end` each level's share
    moves linearly from its share under `start` (uniform when None) at step 0 to its share
    under `end` at the last step; shares, not raw weights, are mixed, so (3, 2, 1, 1) and
    (6, 4, 2, 2) schedule alike. Returns `start` as checked when there is no `end`, the
    mixed shares when there is, or None (uniform throughout).
    """
    if end is None:
        return None if start is None else check_level_weights(start, num_quantizers)
    a = (check_level_weights(start, num_quantizers) if start is not None
         else (1.0,) * num_quantizers)
    b = check_level_weights(end, num_quantizers, "level_weights_end")
    f = min(max(step / max(steps - 1, 1), 0.0), 1.0)
    sa, sb = sum(a), sum(b)
    return tuple((1 - f) * x / sa + f * y / sb for x, y in zip(a, b))


def draw_levels(seed: int, keys: torch.Tensor, num_quantizers: int,
                level_weights: Optional[Sequence[float]] = None) -> torch.Tensor:
    """int64 [B] the 1-based level of each row: uniform, or in proportion to the weights."""
    h = row_keys(seed, keys, _STREAM_LEVEL)
    if level_weights is None:
        return h % num_quantizers + 1
    weights = check_level_weights(level_weights, num_quantizers)
    w = torch.tensor(weights, dtype=torch.float64, device=keys.device)
    edges = w.cumsum(0) / w.sum()
    u = to_uniform(h).to(torch.float64)                           # in (0, 1)
    # the first level whose cumulative share exceeds u; a level of weight 0 is never drawn
    # (rounding in the last edge could leave u past it: fall back to the last weighted level)
    last = max(q for q, x in enumerate(weights) if x > 0)
    return torch.searchsorted(edges, u, right=True).clamp(max=last) + 1


def sample_mask(tokens: torch.Tensor, lengths: torch.Tensor, sample_keys: torch.Tensor,
                seed: int, mask_id: int,
                level_weights: Optional[Sequence[float]] = None,
                finer_full_mask: float = 0.0) -> MaskedBatch:
    """Draw the §3.2 mask for every row.

    tokens:      int64 [B, T, Q] ground-truth codes in [0, mask_id); frames at or past a
                 row's length are padding (any value)
    lengths:     int64 [B] real frames per row, 1..T
    sample_keys: int64 [B] per-example keys (the data pipeline gives each example of an
                 epoch its own); equal keys and seed give equal masks
    seed:        the run's seed
    mask_id:     the MASK id (= codebook_size)
    level_weights: None (levels drawn uniformly, the paper's) or Q weights >= 0
    finer_full_mask: in [0, 1], the probability that a row training a level > 1 masks all
                 of that level after its prompt (0: the paper's cosine ratio for every row)
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [B, T, Q], got shape {tuple(tokens.shape)}")
    B, T, Q = tokens.shape
    if lengths.shape != (B,) or sample_keys.shape != (B,):
        raise ValueError(f"lengths and sample_keys must be [B={B}], got "
                         f"{tuple(lengths.shape)} and {tuple(sample_keys.shape)}")
    device = tokens.device
    lengths = lengths.to(device=device, dtype=torch.int64)
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must lie in 1..{T}, got {lengths.tolist()}")
    keys = sample_keys.to(device=device, dtype=torch.int64)
    check_finer_full_mask(finer_full_mask)

    # The modulo bias of a 32-bit hash reduced mod T_b <= 2**16 is below 2**-16: negligible.
    prompt_len = row_keys(seed, keys, _STREAM_PROMPT) % lengths                      # [B]
    level = draw_levels(seed, keys, Q, level_weights)                                # [B]
    u = to_uniform(row_keys(seed, keys, _STREAM_RATIO)).double() * (math.pi / 2)
    ratio = torch.cos(u).float()                                                     # [B]
    if finer_full_mask > 0:
        full = (level > 1) & (to_uniform(row_keys(seed, keys, _STREAM_FULL)).double()
                              < finer_full_mask)
        ratio = ratio.masked_fill(full, 1.0)       # every uniform draw lies below 1

    t = torch.arange(T, device=device)
    real = t[None, :] < lengths[:, None]                                             # [B, T]
    after_prompt = real & (t[None, :] >= prompt_len[:, None])                        # [B, T]
    draw = to_uniform(frame_keys(row_keys(seed, keys, _STREAM_FRAMES), T))           # [B, T]
    masked_q = after_prompt & (draw < ratio[:, None])
    # A row the draw left empty: mask the eligible frame closest to being masked.
    empty = ~masked_q.any(dim=1)
    nearest = draw.masked_fill(~after_prompt, 2.0).argmin(dim=1)                     # [B]
    fallback = F.one_hot(nearest, T).bool() & empty[:, None]
    masked_q = masked_q | fallback

    q_index = torch.arange(Q, device=device)[None, None, :]                          # 0-based
    at_q = q_index == (level - 1)[:, None, None]
    finer = q_index > (level - 1)[:, None, None]
    mask = (masked_q[..., None] & at_q) | (after_prompt[..., None] & finer)           # [B, T, Q]
    inputs = tokens.masked_fill(mask, mask_id)
    truth_q = tokens.gather(2, (level - 1)[:, None, None].expand(B, T, 1)).squeeze(2)
    targets = truth_q.masked_fill(~masked_q, IGNORE_INDEX)
    return MaskedBatch(inputs=inputs, targets=targets, level=level, prompt_len=prompt_len,
                       ratio=ratio)


@dataclass
class LossParts:
    """Per-row sums of a masked batch (all float32/int64 [B]), for exact aggregation over
    micro-batches and processes: loss_sum (summed cross-entropy of the masked level-q
    tokens), correct (argmax hits among them), count (how many)."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor


def masked_loss(logits: torch.Tensor, batch: MaskedBatch) -> LossParts:
    """logits: [B, T, C] of each row's level (any float dtype; computed in float32)."""
    B, T, C = logits.shape
    logits = logits.float()
    ce = F.cross_entropy(logits.reshape(B * T, C), batch.targets.reshape(B * T),
                         ignore_index=IGNORE_INDEX, reduction="none").view(B, T)
    mask = batch.loss_mask
    with torch.no_grad():
        correct = ((logits.argmax(dim=-1) == batch.targets) & mask).sum(dim=1)
    return LossParts(loss_sum=ce.sum(dim=1), correct=correct, count=mask.sum(dim=1))
