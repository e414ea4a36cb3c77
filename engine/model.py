"""The SoundStorm model (paper §3.1): summed per-frame embeddings, a bidirectional
Conformer, one output head per RVQ level. Plain PyTorch; the fused ops are called through
`self.ops` (see `soundstorm.kernels.dispatch`), the PyTorch references by default."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from soundstorm.engine.config import OPTIONAL_FIELDS, ModelConfig
from soundstorm.engine.files import (CHECKSUM_KEY, WEIGHT_DTYPES, read_format_json,
                                     tensor_sha256, write_model_dir)
from soundstorm.kernels import Ops, get_ops

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "soundstorm"
FORMAT_VERSION = 1

Level = Union[int, torch.Tensor, None]


class FeedForward(nn.Module):
    """Pre-norm feed-forward with swish (a Conformer 'half' FFN; the block scales by 1/2)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.norm(x))

    def body(self, h: torch.Tensor) -> torch.Tensor:
        """Everything after the pre-norm (the block fuses that norm with its residual)."""
        return self.down(F.silu(self.up(h), inplace=True))


class RotarySelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        return self.body(self.norm(x), key_mask, ops)

    def body(self, h: torch.Tensor, key_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        B, T, D = h.shape
        # [B, T, 3, H, dh] -> three [B, H, T, dh]
        q, k, v = self.qkv(h).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = ops.rotary_attention(q, k, v, key_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class ConvModule(nn.Module):
    """norm -> pointwise (GLU pair) -> [GLU, depthwise conv, norm, swish] -> pointwise."""

    def __init__(self, dim: int, inner: int, kernel: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.pointwise_in = nn.Linear(dim, 2 * inner)
        self.depthwise = nn.Conv1d(inner, inner, kernel, padding=kernel // 2, groups=inner)
        self.inner_norm = nn.LayerNorm(inner)
        self.pointwise_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, frame_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        return self.body(self.norm(x), frame_mask, ops)

    def body(self, h: torch.Tensor, frame_mask: Optional[torch.Tensor],
             ops: Ops) -> torch.Tensor:
        h = self.pointwise_in(h)
        h = ops.conv_module(h, self.depthwise.weight, self.depthwise.bias,
                            self.inner_norm.weight, self.inner_norm.bias, frame_mask,
                            self.inner_norm.eps)
        return self.pointwise_out(h)


class ConformerBlock(nn.Module):
    """x + FFN/2, + MHSA, + Conv, + FFN/2, then LayerNorm (Gulati et al., 2020)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ff1 = FeedForward(config.dim, config.ff_dim)
        self.attn = RotarySelfAttention(config.dim, config.heads)
        self.conv = ConvModule(config.dim, config.conv_dim, config.conv_kernel)
        self.ff2 = FeedForward(config.dim, config.ff_dim)
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, x: torch.Tensor, frame_mask: Optional[torch.Tensor], ops: Ops) -> torch.Tensor:
        # Each residual add is fused with the norm that the next sub-module starts with
        # (`ops.residual_norm` returns the sum and its normalisation).
        x, h = ops.residual_norm(x, self.ff1(x), 0.5, *_norm_args(self.attn.norm))
        x, h = ops.residual_norm(x, self.attn.body(h, frame_mask, ops), 1.0,
                                 *_norm_args(self.conv.norm))
        x, h = ops.residual_norm(x, self.conv.body(h, frame_mask, ops), 1.0,
                                 *_norm_args(self.ff2.norm))
        _, out = ops.residual_norm(x, self.ff2.body(h), 0.5, *_norm_args(self.norm))
        return out


# The initial offset of the prompt lookup's copy gates (see `PromptLookup.reset_parameters`).
COPY_GATE_INIT = -4.0
# The parameters of level 1's copy (`ModelConfig.semantic_copy`), as state_dict keys.
SEMANTIC_COPY_KEYS = ("lookup.semantic_context", "lookup.semantic_log_scale",
                      "lookup.level1_copy_weight", "lookup.level1_copy_match",
                      "lookup.level1_copy_bias")
# The parameters of the prompt prior (`ModelConfig.prompt_prior`), as state_dict keys.
PROMPT_PRIOR_KEYS = ("prior.weight", "prior.log_smoothing")


class PromptLookup(nn.Module):
    """A lookup into the reference frames: the real frames whose Q codes are all known
    (the voice prompt; during decoding, also any frame decoded completely).

    Every frame i whose level-1 code is known attends to the references j != i with
    weights softmax_j(s * k_i . k_j): k is a learned `prompt_lookup`-wide embedding of the
    level-1 code, mixed over the frame and its two neighbours with three learned weights
    and scaled to unit length, and s a learned sharpness. The keys see level 1 in context
    and nothing else, not even position. Frame i reads g * sum_j w_ij v_j, v_j the sum of
    learned embeddings of j's codes at levels 2..Q and g a learned gain that starts at 0
    (the model starts as the one without the lookup), and adds it to its input. A frame
    with no reference (no prompt) or no level-1 code yet reads 0.

    The same weights also give each reading frame a vote for its level-q code (q >= 2),
    v_iq(c) = sum_j w_ij [code_jq = c], and the output at level q is the mixture
    (1 - g_iq) softmax(head logits) + g_iq v_iq with a learned gate
    g_iq = sigmoid(h_i . a_q + b_q) of the final hidden state (`copy`; b_q starts at -4,
    the gate almost shut): a direct path from the prompt's codes to the prediction, which
    the input read alone does not give (the network has to learn to carry a code from its
    input to its output). Level 1, and frames that read nothing, keep the head's logits.

    With `ModelConfig.semantic_copy`, level 1 gets a copy of its own (`semantic_weights`):
    every real frame i reads the references j != i with weights
    softmax_j(s' * m_ij), m_ij = u_0 [id(i-1) = id(j-1)] + u_1 [id(i) = id(j)]
    + u_2 [id(i+1) = id(j+1)] the learned-weight match of the semantic ids the frames read
    (a neighbour past either end matches nothing) and s' a learned sharpness; level 1's
    output is (1 - g_i1) softmax(head logits) + g_i1 v_i1 with v_i1 the vote of those
    weights for the references' level-1 codes and g_i1 = sigmoid(h_i . a_1 + c_1 m_i + b_1),
    m_i = max_j m_ij the best match frame i has (0 without a reference), c_1 starting at 0
    and b_1 at -4: how far to trust the prompt depends first on whether it said the same
    thing in the same context. What a speaker's level-1 codes are for a sound is much of
    the voice, and the level-1 keys cannot find it: level 1 is what is being decoded.

    Keys start random, so equal level-1 contexts match best and, at the initial sharpness,
    far above the rest: the lookup starts as "copy the finer codes of the prompt frame
    that says the same", which is what keeps a speaker's voice, and learns which contexts
    count as alike.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        Q, C, D, K = (config.num_quantizers, config.codebook_size, config.dim,
                      config.prompt_lookup)
        self.codebook_size = C
        self.key_embed = nn.Embedding(C + 1, K)
        # Weights of the previous frame, the frame itself and the next frame in a key.
        self.context = nn.Parameter(torch.empty(3))
        # log of the sharpness s (a log keeps it positive).
        self.log_scale = nn.Parameter(torch.empty(()))
        self.gain = nn.Parameter(torch.empty(()))
        # Level q's code c (q = 2..Q) at row (q - 2) * C + c.
        self.value_embed = nn.Embedding((Q - 1) * C, D)
        # The copy gate of level q at row q - 2: a per-frame logit h . a_q + b_q.
        self.copy_weight = nn.Parameter(torch.empty(Q - 1, D))
        self.copy_bias = nn.Parameter(torch.empty(Q - 1))
        self.semantic_copy = config.semantic_copy
        if self.semantic_copy:
            # Weights of the previous, own and next frame's semantic-id match; log of the
            # sharpness s'; level 1's copy gate, the per-frame logit h . a_1 + c_1 m + b_1.
            self.semantic_context = nn.Parameter(torch.empty(3))
            self.semantic_log_scale = nn.Parameter(torch.empty(()))
            self.level1_copy_weight = nn.Parameter(torch.empty(D))
            self.level1_copy_match = nn.Parameter(torch.empty(()))
            self.level1_copy_bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_embed.weight, std=self.key_embed.weight.shape[1] ** -0.5)
        with torch.no_grad():
            self.context.copy_(torch.tensor([0.5, 1.0, 0.5]))
            self.log_scale.fill_(math.log(16.0))
            self.gain.zero_()
        nn.init.normal_(self.value_embed.weight, std=0.02)
        # The gates start almost shut (sigmoid(-4) = 0.018), as the gain starts at 0: the
        # model starts as the one without the lookup. Open from the start, the copy does
        # the finer levels' work before the network has learnt anything, and level 1, which
        # only the network can learn, trains far more slowly.
        nn.init.zeros_(self.copy_weight)
        nn.init.constant_(self.copy_bias, COPY_GATE_INIT)
        if self.semantic_copy:
            with torch.no_grad():
                self.semantic_context.copy_(torch.tensor([0.5, 1.0, 0.5]))
                self.semantic_log_scale.fill_(math.log(16.0))
            nn.init.zeros_(self.level1_copy_weight)
            nn.init.zeros_(self.level1_copy_match)
            nn.init.constant_(self.level1_copy_bias, COPY_GATE_INIT)

    def forward(self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens int64 [B, T, Q] (MASK = codebook_size), frame_mask bool [B, T] or None ->
        what each frame reads into its input, [B, T, D] in the weights' dtype. Free of host
        syncs."""
        return self.read(tokens, self.weights(tokens, frame_mask))

    def read(self, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`forward` from the lookup's `weights` [B, T, T]."""
        Q, C = tokens.shape[2], self.codebook_size
        weights = weights * self.gain.to(weights.dtype)
        offsets = torch.arange(Q - 1, device=tokens.device) * C
        finer = tokens[..., 1:].clamp(0, C - 1) + offsets                         # [B, T, Q-1]
        values = self.value_embed(finer).sum(dim=2)                               # [B, T, D]
        return torch.bmm(weights.to(values.dtype), values)

    def weights(self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """[B, T, T] (float32, or float64 for a float64 model): how much frame i reads of
        frame j, before the gain; rows sum to 1, or are 0 where a frame reads nothing."""
        B, T, Q = tokens.shape
        C = self.codebook_size
        # Padding frames may hold any value: clamp so that the gathers stay in range; they
        # are neither references nor neighbours.
        codes = tokens.clamp(0, C)
        real, reference = _real_and_references(codes, frame_mask, C)             # [B, T]
        # Scores in float32 at least (float64 for a float64 model).
        dtype = torch.promote_types(self.key_embed.weight.dtype, torch.float32)
        e = self.key_embed(codes[..., 0]).to(dtype) * real[..., None]
        w = self.context.to(dtype)
        k = (w[1] * e + w[0] * F.pad(e[:, :-1], (0, 0, 1, 0))
             + w[2] * F.pad(e[:, 1:], (0, 0, 0, 1)))
        k = k * torch.rsqrt(k.square().sum(dim=2, keepdim=True) + 1e-12)
        scores = torch.bmm(k, k.transpose(1, 2)) * self.log_scale.to(dtype).exp()   # [B, T, T]
        reads = real & (codes[..., 0] != C)                                       # [B, T]
        t = torch.arange(T, device=tokens.device)
        allowed = (reads[:, :, None] & reference[:, None, :]
                   & (t[:, None] != t[None, :]))                                  # [B, T, T]
        # A finite fill: a row with no reference stays finite (uniform) and is zeroed next.
        weights = torch.softmax(scores.masked_fill(~allowed, -1e9), dim=2)
        return weights.masked_fill(~allowed, 0.0)

    def semantic_weights(self, semantic: torch.Tensor, tokens: torch.Tensor,
                         frame_mask: Optional[torch.Tensor], num: int, den: int
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Level 1's lookup (only with `semantic_copy`): the weights [B, T, T] (float32 at
        least) with which frame i's vote takes from reference frame j (real, all codes
        known, j != i), by the match m_ij of the semantic ids (`semantic` [B, S], frame t
        reads index t * num // den) of the two frames and their neighbours (rows sum to 1,
        or are 0 where a frame has no reference); and each frame's best match max_j m_ij
        [B, T] (0 without a reference). Free of host syncs."""
        B, T, Q = tokens.shape
        C = self.codebook_size
        codes = tokens.clamp(0, C)
        t = torch.arange(T, device=tokens.device)
        index = (t * num // den).clamp(max=semantic.shape[1] - 1)
        ids = semantic.gather(1, index[None].expand(B, T))                        # [B, T]
        real, reference = _real_and_references(codes, frame_mask, C)             # [B, T]
        dtype = torch.promote_types(self.semantic_context.dtype, torch.float32)
        same = ((ids[:, :, None] == ids[:, None, :]) & real[:, :, None]
                & real[:, None, :]).to(dtype)                                     # [B, T, T]
        u = self.semantic_context.to(dtype)
        match = (u[1] * same + u[0] * F.pad(same[:, :-1, :-1], (1, 0, 1, 0))
                 + u[2] * F.pad(same[:, 1:, 1:], (0, 1, 0, 1)))
        scores = match * self.semantic_log_scale.to(dtype).exp()
        allowed = real[:, :, None] & reference[:, None, :] & (t[:, None] != t[None, :])
        weights = torch.softmax(scores.masked_fill(~allowed, -1e9), dim=2)
        best = match.masked_fill(~allowed, 0.0).amax(dim=2)
        return weights.masked_fill(~allowed, 0.0), best

    def copy(self, logits: torch.Tensor, h: torch.Tensor, tokens: torch.Tensor,
             weights: torch.Tensor, level: Level,
             semantic: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """The head's `logits` of `level` (as `SoundStorm.logits` returns them, level already
        checked) mixed with the lookup's vote: at level q >= 2, for every frame that reads
        (a row of `weights` [B, T, T] that is not 0), the log of
        (1 - g) softmax(logits) + g * vote, g = sigmoid(h . a_q + b_q) from the final hidden
        states `h` [B, T, D]; at level 1 the same with `semantic`, the weights and best
        matches of `semantic_weights` (with `semantic_copy`; None leaves level 1 alone),
        and g = sigmoid(h . a_1 + c_1 m + b_1); elsewhere the logits unchanged. Same
        shape and dtype as `logits`; computed in the weights' dtype. Free of host syncs."""
        B, T, Q = tokens.shape
        C = self.codebook_size
        dtype = weights.dtype
        hd, a, b = h.to(dtype), self.copy_weight.to(dtype), self.copy_bias.to(dtype)
        sw = best = None
        if semantic is not None:
            sw, best = semantic[0].to(dtype), semantic[1].to(dtype)
        codes = torch.arange(C, device=tokens.device)
        reads = (weights.sum(dim=2) > 0).to(dtype)                                # [B, T]
        if level is None:                                   # every head: levels 2..Q at once
            onehot = (tokens[..., 1:, None] == codes).to(dtype).flatten(2)      # [B, T, (Q-1)C]
            vote = torch.bmm(weights, onehot).view(B, T, Q - 1, C)
            gate = torch.einsum("btd,qd->btq", hd, a) + b                        # [B, T, Q-1]
            finer = self.mix(logits[:, :, 1:], vote, gate, reads[..., None])
            first = logits[:, :, :1]
            if sw is not None:
                first = self.mix(logits[:, :, 0], self.vote(tokens, sw, 1),
                                 self.gate_logit(hd, 1, best),
                                 (sw.sum(dim=2) > 0).to(dtype))[:, :, None]
            return torch.cat([first.to(finer.dtype), finer], dim=2)
        if isinstance(level, torch.Tensor):                 # one level per row
            idx = level.to(device=tokens.device, dtype=torch.long) - 1          # [B]
            first = (idx == 0)[:, None, None]                                   # [B, 1, 1]
            column = tokens.gather(2, idx[:, None, None].expand(B, T, 1))[..., 0]
            row = (idx - 1).clamp(min=0)
            gate = torch.einsum("btd,bd->bt", hd, a[row]) + b[row][:, None]
            if sw is None:
                reads = reads * (idx >= 1).to(dtype)[:, None]
            else:
                weights = torch.where(first, sw, weights)
                reads = (weights.sum(dim=2) > 0).to(dtype)
                gate = torch.where(first[..., 0], self.gate_logit(hd, 1, best), gate)
            vote = torch.bmm(weights, (column[..., None] == codes).to(dtype))   # [B, T, C]
        elif level == 1:
            if sw is None:
                return logits
            vote = self.vote(tokens, sw, 1)
            gate = self.gate_logit(hd, 1, best)
            reads = (sw.sum(dim=2) > 0).to(dtype)
        else:
            vote = self.vote(tokens, weights, level)
            gate = self.gate_logit(hd, level)
        return self.mix(logits, vote, gate, reads)

    def gate_logit(self, h: torch.Tensor, level: int,
                   best: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The copy gate's logit of level q = `level` for final hidden states h [..., D],
        in h's dtype (the gate is its sigmoid): h . a_q + b_q at q = 2..Q; at level 1 (with
        `semantic_copy`) h . a_1 + c_1 m + b_1, m = `best` [...] (`semantic_weights`)."""
        if level == 1:
            a, b = self.level1_copy_weight, self.level1_copy_bias
            return (h @ a.to(h.dtype) + self.level1_copy_match.to(h.dtype) * best.to(h.dtype)
                    + b.to(h.dtype))
        a, b = self.copy_weight[level - 2], self.copy_bias[level - 2]
        return h @ a.to(h.dtype) + b.to(h.dtype)

    def vote(self, tokens: torch.Tensor, weights: torch.Tensor, level: int) -> torch.Tensor:
        """The vote of `weights` [B, T, T] for level `level`'s code (the lookup's weights
        at levels 2..Q, `semantic_weights` at level 1), [B, T, C] in the weights' dtype: the
        weight each frame gives the references that hold code c."""
        codes = torch.arange(self.codebook_size, device=tokens.device)
        return torch.bmm(weights, (tokens[..., level - 1, None] == codes).to(weights.dtype))

    @staticmethod
    def mix(logits: torch.Tensor, vote: torch.Tensor, gate: torch.Tensor,
            reads: torch.Tensor) -> torch.Tensor:
        """log((1 - g) softmax(logits) + g * vote), g = sigmoid(gate) * reads, where `reads`
        (1 or 0, the shape of `gate`) is 1; the logits elsewhere. Logits [..., C], vote
        [..., C] (its dtype is the computation's), gate and reads [...]."""
        dtype = vote.dtype
        g = (torch.sigmoid(gate) * reads)[..., None]
        p = torch.softmax(logits.to(dtype), dim=-1)
        mixed = torch.log((p + g * (vote - p)).clamp_min(torch.finfo(dtype).tiny))
        return torch.where(reads[..., None] > 0, mixed, logits.to(dtype)).to(logits.dtype)


class PromptPrior(nn.Module):
    """The prompt speaker's code frequencies as a prior on every level's output
    (`ModelConfig.prompt_prior`).

    At level q, with n_qc the number of reference frames (real frames whose Q codes are all
    known: the voice prompt; during decoding also any frame decoded completely) that hold
    code c and N their count, the output's log-probabilities gain
        beta_q * log((n_qc + alpha_q) / (N + alpha_q * C))
    (then renormalised by the softmax that reads them): the output distribution times the
    prompt's smoothed code frequencies to the power beta_q. beta_q (`weight`) starts at 0,
    the model without the prior; alpha_q = exp(`log_smoothing`) starts at 1. A speaker
    uses a part of each codebook; a voice the model never heard drifts, code by code, to
    those of the voices it did, and this pulls every frame back to the prompt's. A row
    without a reference gets the uniform prior, which changes nothing.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.weight = nn.Parameter(torch.empty(config.num_quantizers))
        self.log_smoothing = nn.Parameter(torch.empty(config.num_quantizers))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.log_smoothing)

    def log_prior(self, tokens: torch.Tensor, frame_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """log((n_qc + alpha_q) / (N + alpha_q C)), [B, Q, C] in float32 (float64 for a
        float64 model), before the weight. Free of host syncs."""
        B, T, Q = tokens.shape
        C = self.codebook_size
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        codes = tokens.clamp(0, C)
        reference = _real_and_references(codes, frame_mask, C)[1].to(dtype)      # [B, T]
        index = codes.clamp(max=C - 1) + torch.arange(Q, device=tokens.device) * C
        counts = torch.zeros(B, Q * C, dtype=dtype, device=tokens.device).scatter_add_(
            1, index.flatten(1), reference[:, :, None].expand(B, T, Q).flatten(1))
        alpha = self.log_smoothing.to(dtype).exp()[:, None]                      # [Q, 1]
        total = reference.sum(dim=1)[:, None, None]                              # [B, 1, 1]
        return torch.log((counts.view(B, Q, C) + alpha) / (total + alpha * C))

    def forward(self, logits: torch.Tensor, tokens: torch.Tensor,
                frame_mask: Optional[torch.Tensor], level: Level) -> torch.Tensor:
        """`logits` of `level` (as `SoundStorm.forward` computes them before the prior: an
        int level or one level per row [B, T, C], None [B, T, Q, C]) plus the weighted log
        prior of their level, in the logits' dtype. Free of host syncs."""
        lp = self.log_prior(tokens, frame_mask)
        lp = lp * self.weight.to(lp.dtype)[:, None]                                 # [B, Q, C]
        if level is None:
            add = lp[:, None]                                                   # [B, 1, Q, C]
        elif isinstance(level, torch.Tensor):
            row = (level.to(device=tokens.device, dtype=torch.long) - 1)[:, None, None]
            add = lp.gather(1, row.expand(-1, 1, lp.shape[2]))                  # [B, 1, C]
        else:
            add = lp[:, level - 1, None]                                        # [B, 1, C]
        return (logits.to(lp.dtype) + add).to(logits.dtype)


def _real_and_references(codes: torch.Tensor, frame_mask: Optional[torch.Tensor],
                         mask_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """bool [B, T] each, for codes [B, T, Q] (clamped to 0..mask_id): the real frames
    (`frame_mask`, or every frame), and the reference frames the prompt lookup, level 1's
    copy and the prompt prior read: real frames whose Q codes are all known."""
    real = (torch.ones_like(codes[..., 0], dtype=torch.bool) if frame_mask is None
            else frame_mask)
    return real, real & (codes != mask_id).all(dim=2)


def _frame_mask(tokens: torch.Tensor, lengths: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """bool [B, T]: the real frames of rows `lengths` long (None: no padding)."""
    if lengths is None:
        return None
    return torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None]


def _norm_args(norm: nn.LayerNorm) -> tuple:
    return norm.weight, norm.bias, norm.eps


class SoundStorm(nn.Module):
    """Bidirectional Conformer over summed semantic + RVQ token embeddings, Q heads.

    Token convention: `tokens[b, t, q]` is a code in [0, C) or C (= `config.mask_id`) for
    MASK. Levels are 1-based in every public argument, as in the paper.
    """

    def __init__(self, config: ModelConfig, ops: Optional[Ops] = None):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config must be a ModelConfig, got {type(config).__name__}")
        # Before allocating: a config too large for this machine fails here, not in torch.
        dtype, count = torch.get_default_dtype(), config.num_parameters()
        check_memory(count * _element_size(dtype), torch.get_default_device(),
                     f"a SoundStorm model of {count:,} parameters in {dtype}")
        self.config = config
        self.ops = ops or get_ops("torch")
        Q, C, D = config.num_quantizers, config.codebook_size, config.dim
        self.semantic_embed = nn.Embedding(config.semantic_vocab_size, D)
        # Level q's code c lives at row q * C + c; the last row is the shared MASK.
        self.acoustic_embed = nn.Embedding(Q * C + 1, D)
        self.lookup = PromptLookup(config) if config.prompt_lookup else None
        self.prior = PromptPrior(config) if config.prompt_prior else None
        self.blocks = nn.ModuleList(ConformerBlock(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        self.head_weight = nn.Parameter(torch.empty(Q, C, D))
        self.head_bias = nn.Parameter(torch.zeros(Q, C))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Summing Q + 1 unit-variance embeddings would swamp the first LayerNorm's input
        # scale for no benefit; a small init keeps all presets in the same regime.
        for weight in (self.semantic_embed.weight, self.acoustic_embed.weight, self.head_weight):
            nn.init.normal_(weight, std=0.02)
        nn.init.zeros_(self.head_bias)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------------------
    def forward(self, semantic: torch.Tensor, tokens: torch.Tensor,
                lengths: Optional[torch.Tensor] = None, level: Level = None) -> torch.Tensor:
        """
        semantic: int64 [B, S]    semantic ids at `semantic_rate`; frame t reads index
                                  floor(t * semantic_rate / frame_rate)
        tokens:   int64 [B, T, Q] codes, MASK = codebook_size; frames at or past a row's
                                  length are ignored
        lengths:  int64 [B] real frames per row (1..T), or None for no padding
        level:    int in 1..Q -> logits [B, T, C];
                  int64 [B] (one level per row) -> [B, T, C];
                  None -> [B, T, Q, C] (all heads)
        Only the requested head(s) are computed. Values are not range-checked here (that
        would cost a host sync per pass); `Engine.generate` checks its inputs.
        """
        h, weights = self.hidden(semantic, tokens, lengths)
        logits = self.logits(h, level)
        if weights is not None:
            logits = self.lookup.copy(logits, h, tokens, weights, level,
                                      self.semantic_weights(semantic, tokens, lengths, level))
        if self.prior is not None:
            logits = self.prior(logits, tokens, _frame_mask(tokens, lengths), level)
        return logits

    def semantic_weights(self, semantic: torch.Tensor, tokens: torch.Tensor,
                         lengths: Optional[torch.Tensor] = None, level: Level = None
                         ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """Level 1's lookup, its weights and best matches (`PromptLookup.semantic_weights`),
        for the arguments of `forward`, or None where `level` leaves level 1 out or the
        model has no `semantic_copy`."""
        if self.lookup is None or not self.lookup.semantic_copy or \
                (isinstance(level, int) and level != 1):
            return None
        num, den = self.config.semantic_index_fraction()
        return self.lookup.semantic_weights(semantic, tokens,
                                            _frame_mask(tokens, lengths), num, den)

    def hidden(self, semantic: torch.Tensor, tokens: torch.Tensor,
               lengths: Optional[torch.Tensor] = None
               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The final hidden states h [B, T, D] (after the last LayerNorm, before the heads)
        and the prompt lookup's weights [B, T, T] (None without a lookup), for the same
        arguments as `forward`, which is `logits(h, level)` then, with a lookup, its copy
        (with `semantic_copy`, level 1's from `semantic_weights`), then, with
        `prompt_prior`, the prior (`PromptPrior`)."""
        cfg = self.config
        self._check_shapes(semantic, tokens, lengths)
        frame_mask = _frame_mask(tokens, lengths)
        num, den = cfg.semantic_index_fraction()
        x = self.ops.summed_embedding(semantic, tokens, self.semantic_embed.weight,
                                      self.acoustic_embed.weight, num, den)
        weights = None
        if self.lookup is not None:
            weights = self.lookup.weights(tokens, frame_mask)
            x = x + self.lookup.read(tokens, weights).to(x.dtype)
        for block in self.blocks:
            x = block(x, frame_mask, self.ops)
        return self.norm(x), weights

    def logits(self, h: torch.Tensor, level: Level) -> torch.Tensor:
        """Apply the head(s) of `level` (see `forward`) to final hidden states [B, T, D]."""
        Q = self.config.num_quantizers
        if level is None:
            return torch.einsum("btd,qcd->btqc", h, self.head_weight) + self.head_bias
        if isinstance(level, torch.Tensor):
            if level.ndim != 1 or level.shape[0] != h.shape[0] or level.is_floating_point():
                raise ValueError(f"level as a tensor must be integer [B] = [{h.shape[0]}], "
                                 f"got {level.dtype} {tuple(level.shape)}")
            idx = level.to(device=h.device, dtype=torch.long) - 1
            w = self.head_weight[idx]                        # [B, C, D]
            return torch.baddbmm(self.head_bias[idx][:, None, :], h, w.transpose(1, 2))
        if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= Q:
            raise ValueError(f"level must be an int in 1..{Q} (levels are 1-based), a [B] "
                             f"tensor, or None; got {level!r}")
        return F.linear(h, self.head_weight[level - 1], self.head_bias[level - 1])

    def _check_shapes(self, semantic: torch.Tensor, tokens: torch.Tensor,
                      lengths: Optional[torch.Tensor]) -> None:
        cfg = self.config
        if tokens.ndim != 3 or tokens.shape[2] != cfg.num_quantizers:
            raise ValueError(f"tokens must be [B, T, Q={cfg.num_quantizers}], "
                             f"got {tuple(tokens.shape)}")
        B, T, _ = tokens.shape
        if semantic.ndim != 2 or semantic.shape[0] != B:
            raise ValueError(f"semantic must be [B={B}, S], got {tuple(semantic.shape)}")
        if T > cfg.max_frames:
            raise ValueError(f"tokens has {T} frames, more than max_frames={cfg.max_frames}")
        num, den = cfg.semantic_index_fraction()
        if T > 0 and ((T - 1) * num) // den >= semantic.shape[1]:
            raise ValueError(f"semantic has {semantic.shape[1]} ids, too few for {T} frames "
                             f"(needs {((T - 1) * num) // den + 1})")
        if lengths is not None and (lengths.ndim != 1 or lengths.shape[0] != B):
            raise ValueError(f"lengths must be [B={B}], got {tuple(lengths.shape)}")

    # -- weights I/O --------------------------------------------------------------------
    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Write `config.json` and `model.safetensors` (float weights as they are, with the
        sha256 of every tensor in the file's metadata, checked by `from_pretrained`)."""
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        quantised = next((k for k, v in state.items() if not v.is_floating_point()), None)
        if quantised is not None:
            raise ValueError(f"this model is int8-quantised ({quantised!r} is "
                             f"{state[quantised].dtype}); weights are saved in float: "
                             f"save the float model it was quantised from")
        config = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                  "model": self.config.to_dict()}
        return write_model_dir(directory, config, state, FORMAT_NAME, CONFIG_FILE, WEIGHTS_FILE)

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], device: Union[str, torch.device, None] = None,
                        dtype: Optional[torch.dtype] = None) -> "SoundStorm":
        """Load a directory written by `save_pretrained` onto `device` (default CPU), in
        `dtype` (default: as stored). Every check of `read_weights` runs first (names,
        shapes, dtypes, room in memory, checksums, finite values); the first problem
        raises `ValueError` naming the file and the tensor. Nothing is unpickled."""
        directory = Path(directory)
        config = load_config(directory)
        device = torch.device(device) if device is not None else torch.device("cpu")
        state = read_weights(directory, config, device, dtype)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state, assign=True)
        return model.eval()


def expected_shapes(config: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """{state_dict key: shape} of `SoundStorm(config)`, in state_dict order, without
    building its `depth` blocks (one block is built on the meta device and repeated)."""
    with torch.device("meta"):
        one = SoundStorm(dataclasses.replace(config, depth=1)).state_dict()
    block = {k[len("blocks.0."):]: tuple(v.shape) for k, v in one.items()
             if k.startswith("blocks.0.")}
    shapes: Dict[str, Tuple[int, ...]] = {}
    for key, value in one.items():
        if not key.startswith("blocks.0."):
            shapes[key] = tuple(value.shape)
        elif "blocks.0." + next(iter(block)) == key:        # the first block key: every block
            for i in range(config.depth):
                shapes.update((f"blocks.{i}.{k}", shape) for k, shape in block.items())
    return shapes


def read_weights(directory: Union[str, Path], config: ModelConfig,
                 device: Union[str, torch.device, None] = None,
                 dtype: Optional[torch.dtype] = None,
                 keep: bool = True) -> Dict[str, torch.Tensor]:
    """Read and check `directory/model.safetensors` against `config`, one tensor at a time.

    Checks, in order, each failure a ValueError naming the file (and the tensor): every
    tensor `config` expects is there with its shape and nothing else is; every dtype is
    float16, bfloat16, float32 or float64; the parameters fit in the memory available on
    `device` (with `keep`); every tensor's bytes match the sha256 recorded by
    `save_pretrained` (files without checksums, such as older exports, skip this); every
    value is finite, also after conversion to `dtype`.

    keep:    True: returns {key: tensor on `device` in `dtype` (None: as stored)}.
             False: checks only, never holding more than one tensor; returns {}.
    """
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"model weights not found: {weights}")
    expected = expected_shapes(config)
    device = torch.device(device) if device is not None else torch.device("cpu")
    state: Dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            found = set(f.keys())
            stored: Dict[str, torch.dtype] = {}
            for key, shape in expected.items():
                if key not in found:
                    raise ValueError(f"{weights}: missing tensor {key!r} (shape {shape}) "
                                     f"expected by config {directory / CONFIG_FILE}")
                info = f.get_slice(key)
                got = tuple(info.get_shape())
                if got != shape:
                    raise ValueError(f"{weights}: tensor {key!r} has shape {got}, "
                                     f"the config expects {shape}")
                name = info.get_dtype()
                if name not in WEIGHT_DTYPES:
                    raise ValueError(f"{weights}: tensor {key!r} has dtype "
                                     f"{_SAFETENSORS_NAMES.get(name, name)}, expected a "
                                     "floating-point dtype (float16, bfloat16, float32 or "
                                     "float64)")
                stored[key] = WEIGHT_DTYPES[name]
            unexpected = sorted(found - set(expected))
            if unexpected:
                raise ValueError(f"{weights}: unexpected tensor {unexpected[0]!r} "
                                 f"({len(unexpected)} unexpected in all)")
            checksums = _recorded_checksums(f.metadata() or {}, weights, expected)
            if keep:
                needed = sum(_numel(shape) * _element_size(dtype or stored[key])
                             for key, shape in expected.items())
                check_memory(needed, device, f"loading {weights}")
            for key in expected:
                t = f.get_tensor(key)
                if checksums is not None and tensor_sha256(t) != checksums[key]:
                    raise ValueError(f"{weights}: tensor {key!r} does not match the sha256 "
                                     "checksum recorded when the file was saved: the file "
                                     "is corrupt")
                _check_finite(t, f"{weights}: tensor {key!r}")
                if keep:
                    converted = t.to(device=device, dtype=dtype or t.dtype)
                    if converted.dtype != t.dtype:
                        _check_finite(converted, f"{weights}: tensor {key!r} converted to "
                                                 f"{converted.dtype}")
                    state[key] = converted
    except SafetensorError as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from e
    return state


def check_pretrained(directory: Union[str, Path]) -> Tuple[ModelConfig, bool]:
    """Every check `SoundStorm.from_pretrained` makes on a model directory (config, names,
    shapes, dtypes, checksums, finite values) except the room in memory, without building
    the model or holding more than one tensor. Returns (config, whether checksums were
    recorded, and so verified); raises what `from_pretrained` would."""
    config = load_config(directory)
    read_weights(directory, config, keep=False)
    return config, _has_checksums(Path(directory) / WEIGHTS_FILE)


def _has_checksums(weights: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt", device="cpu") as f:
        return CHECKSUM_KEY in (f.metadata() or {})


def _recorded_checksums(metadata: Dict[str, str], weights: Path,
                        expected: Dict[str, Tuple[int, ...]]) -> Optional[Dict[str, str]]:
    """The {tensor: sha256} recorded in the file's metadata, or None if none was."""
    if CHECKSUM_KEY not in metadata:
        return None
    try:
        checksums = json.loads(metadata[CHECKSUM_KEY])
    except json.JSONDecodeError:
        checksums = None
    if not isinstance(checksums, dict):
        raise ValueError(f"{weights}: the {CHECKSUM_KEY!r} metadata is not a JSON object of "
                         "checksums: the file is corrupt")
    for key in expected:
        if not isinstance(checksums.get(key), str):
            raise ValueError(f"{weights}: no sha256 checksum recorded for tensor {key!r}: the "
                             "file is corrupt")
    return checksums


def _check_finite(t: torch.Tensor, what: str) -> None:
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ValueError(f"{what} holds {bad} non-finite value(s) (NaN or inf) out of "
                         f"{t.numel()}; a model with them generates nothing meaningful")


_SAFETENSORS_NAMES = {"I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16",
                      "I8": "torch.int8", "U8": "torch.uint8", "BOOL": "torch.bool"}


def _numel(shape: Tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# -- memory ---------------------------------------------------------------------------
class InsufficientMemoryError(MemoryError, ValueError):
    """A model whose parameters would not fit in the memory available (raised before
    anything is allocated). A ValueError too: the command line reports it in one line."""


def available_memory(device: Union[str, torch.device]) -> Optional[int]:
    """Bytes that can still be allocated on `device`, or None where it cannot be told
    (meta, or an unknown device type). CPU: the smaller of the kernel's MemAvailable and
    what the process's cgroup (v2) still allows; CUDA: the device's free memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError, AttributeError):
            return None
    return max(0, min(limits))


def check_memory(needed: int, device: Union[str, torch.device], what: str) -> None:
    """Raise `InsufficientMemoryError` if `needed` bytes of parameters would not fit in
    the memory available on `device` (see `available_memory`)."""
    available = available_memory(device)
    if available is not None and needed > available:
        raise InsufficientMemoryError(
            f"{what}: the parameters need {needed:,} bytes ({needed / 2**30:.2f} GiB) on "
            f"{device}, more than the {available:,} bytes ({available / 2**30:.2f} GiB) "
            "available")


def load_config(directory: Union[str, Path]) -> ModelConfig:
    """Read and validate `directory/config.json`."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    data = read_format_json(path, FORMAT_NAME, FORMAT_VERSION, f"{FORMAT_NAME} model config")
    if not isinstance(data.get("model"), dict):
        raise ValueError(f"{path}: missing the \"model\" object with the ModelConfig fields")
    try:
        config = ModelConfig.from_dict(data["model"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: invalid model config: {e}") from e
    # A saved config names every field: one left out would silently take its default,
    # which may still fit the weights' shapes (e.g. the number of heads).
    missing = sorted({f.name for f in dataclasses.fields(ModelConfig)} - set(data["model"])
                     - set(OPTIONAL_FIELDS))
    if missing:
        raise ValueError(f"{path}: invalid model config: missing field(s) {missing}")
    return config
