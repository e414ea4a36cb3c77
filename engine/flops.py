"""Analytic FLOP counts of a SoundStorm forward pass (matmuls and attention only; the
elementwise work, norms and the depthwise convolution are left out, as is customary).

Used by the benchmarks to turn wall time into achieved FLOP/s and to time `torch.matmul`
at exactly the shapes a forward pass multiplies (the matmul roofline)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

from soundstorm.engine.config import ModelConfig


@dataclass(frozen=True)
class Gemm:
    """`count` products of [batch, m, k] x [batch, k, n] (batch 1 = a plain matrix product)."""
    name: str
    batch: int
    m: int
    k: int
    n: int
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.m * self.k * self.n * self.count


def forward_gemms(config: ModelConfig, batch: int, frames: int, heads: int = 1) -> List[Gemm]:
    """The matrix products of one forward pass over [batch, frames] computing `heads`
    output heads (1 during decoding, Q for `level=None`)."""
    d, f, c, L = config.dim, config.ff_dim, config.conv_dim, config.depth
    rows = batch * frames
    bh, dh = batch * config.heads, config.head_dim
    lookup = []
    if config.prompt_lookup:   # the prompt lookup: level-1 key scores, finer values, votes
        # a vote for each head that copies: the finer levels', and level 1's with
        # `semantic_copy` (its semantic-id match is elementwise, not a product)
        votes = min(heads, config.num_quantizers - 1 + config.semantic_copy)
        lookup = [Gemm("lookup_scores", batch, frames, config.prompt_lookup, frames),
                  Gemm("lookup_values", batch, frames, frames, d),
                  Gemm("lookup_votes", batch, frames, frames, config.codebook_size * votes)]
    return lookup + [
        Gemm("ffn_up", 1, rows, d, f, 2 * L),
        Gemm("ffn_down", 1, rows, f, d, 2 * L),
        Gemm("qkv", 1, rows, d, 3 * d, L),
        Gemm("attn_scores", bh, frames, dh, frames, L),
        Gemm("attn_values", bh, frames, frames, dh, L),
        Gemm("attn_out", 1, rows, d, d, L),
        Gemm("conv_in", 1, rows, d, 2 * c, L),
        Gemm("conv_out", 1, rows, c, d, L),
        Gemm("head", 1, rows, d, config.codebook_size, heads),
    ]


def forward_flops(config: ModelConfig, batch: int, frames: int, heads: int = 1) -> int:
    return sum(g.flops for g in forward_gemms(config, batch, frames, heads))
