"""The autoregressive baseline of the paper's runtime comparison (§4.3, Figure 3): an
AudioLM-style acoustic generator.

AudioLM replaces SoundStorm's single model with two decoder-only Transformers over
flattened RVQ tokens (frame-major: all levels of frame t, then frame t + 1):

- coarse stage: the first `coarse_levels` levels over the whole clip, after the semantic
  ids as a prefix: S + T * Qc positions, T * Qc of them generated one token at a time;
- fine stage: the remaining levels in non-overlapping windows (3 s), each window's coarse
  tokens as the prefix: per window W * Qc prefix positions and W * Qf generated tokens.

Both stages here have SoundStorm's width and depth, a key/value cache preallocated for the
longest sequence, and one output head per RVQ level (a step computes only the head of the
level it samples). Weights are random: the runtime does not depend on them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from soundstorm.engine.config import ModelConfig
from soundstorm.kernels.attention import apply_rotary, rotary_tables


class CausalBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ff_dim: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, ff_dim)
        self.down = nn.Linear(ff_dim, dim)

    def forward(self, x: torch.Tensor, start: int, cache_k: torch.Tensor,
                cache_v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [B, n, D] positions start..start+n-1; caches [B, H, L, dh] filled below start."""
        B, n, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = apply_rotary(q, cos[start:start + n], sin[start:start + n])
        k = apply_rotary(k, cos[start:start + n], sin[start:start + n])
        cache_k[:, :, start:start + n] = k
        cache_v[:, :, start:start + n] = v
        keys, values = cache_k[:, :, :start + n], cache_v[:, :, :start + n]
        # A prefill of n > 1 positions attends causally; one new position sees everything.
        y = F.scaled_dot_product_attention(q, keys, values, is_causal=n > 1 and start == 0)
        x = x + self.out(y.transpose(1, 2).reshape(B, n, D))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class ARStage(nn.Module):
    """Decoder-only Transformer over a vocabulary of semantic ids and per-level codes."""

    def __init__(self, config: ModelConfig, max_len: int):
        super().__init__()
        self.config = config
        self.max_len = max_len
        Q, C, D = config.num_quantizers, config.codebook_size, config.dim
        # rows: semantic ids, then level q's code c at V + q * C + c
        self.embed = nn.Embedding(config.semantic_vocab_size + Q * C, D)
        self.blocks = nn.ModuleList(CausalBlock(D, config.heads, config.ff_dim)
                                    for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        self.heads = nn.Parameter(torch.randn(Q, C, D) * 0.02)

    def level_rows(self, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Embedding rows of 0-based `level`'s codes."""
        return self.config.semantic_vocab_size + level * self.config.codebook_size + codes

    @torch.no_grad()
    def run(self, prefix_rows: torch.Tensor, levels: list[int], generator: torch.Generator,
            temperature: float = 1.0) -> torch.Tensor:
        """Prefill `prefix_rows` [B, P], then sample one token per entry of `levels` (0-based
        RVQ level of each generated position, in order). Returns codes [B, len(levels)]."""
        B, P = prefix_rows.shape
        L = P + len(levels)
        if L > self.max_len:
            raise ValueError(f"sequence of {L} positions exceeds max_len={self.max_len}")
        cfg, dev = self.config, prefix_rows.device
        dtype = self.embed.weight.dtype
        cos, sin = rotary_tables(L, cfg.head_dim, dev, dtype)
        caches = [(torch.empty(B, cfg.heads, L, cfg.head_dim, device=dev, dtype=dtype),
                   torch.empty(B, cfg.heads, L, cfg.head_dim, device=dev, dtype=dtype))
                  for _ in self.blocks]
        out = torch.empty(B, len(levels), dtype=torch.int64, device=dev)
        x, start = self.embed(prefix_rows), 0
        for i, level in enumerate(levels):
            for block, (ck, cv) in zip(self.blocks, caches):
                x = block(x, start, ck, cv, cos, sin)
            start += x.shape[1]
            h = self.norm(x[:, -1])
            logits = F.linear(h, self.heads[level]).float() / temperature
            code = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
            out[:, i] = code
            x = self.embed(self.level_rows(level, code))[:, None]
        return out


class AudioLMAcoustic:
    """Coarse + fine AudioLM acoustic stages at a SoundStorm preset's width and depth."""

    def __init__(self, config: ModelConfig, coarse_levels: Optional[int] = None,
                 window_s: float = 3.0, max_seconds: float = 30.0, seed: int = 0):
        # AudioLM models the first 4 of SoundStream's 12 levels in its coarse stage.
        coarse_levels = coarse_levels or max(1, config.num_quantizers // 3)
        if not 1 <= coarse_levels < config.num_quantizers:
            raise ValueError(f"coarse_levels must be in 1..{config.num_quantizers - 1}, "
                             f"got {coarse_levels}")
        self.config = config
        self.coarse_levels = coarse_levels
        self.window = max(1, round(window_s * config.frame_rate))
        frames = math.ceil(max_seconds * config.frame_rate)
        semantic = math.ceil(max_seconds * config.semantic_rate)
        torch.manual_seed(seed)
        self.coarse = ARStage(config, semantic + frames * coarse_levels).eval()
        self.fine = ARStage(config, self.window * config.num_quantizers).eval()

    def to(self, *args, **kwargs) -> "AudioLMAcoustic":
        self.coarse.to(*args, **kwargs)
        self.fine.to(*args, **kwargs)
        return self

    def forward_passes(self, num_frames: int) -> int:
        """Sequential decoder passes: one per generated token (the first pass of each stage
        and window also consumes its prefix)."""
        return num_frames * self.config.num_quantizers

    @torch.no_grad()
    def generate(self, semantic: torch.Tensor, seed: int = 0,
                 progress: Optional[callable] = None) -> torch.Tensor:
        """semantic [B, S] -> codec tokens [B, T, Q], T = floor(S * frame_rate / semantic_rate)."""
        cfg = self.config
        B, S = semantic.shape
        T = cfg.frames_for(S)
        Q, Qc = cfg.num_quantizers, self.coarse_levels
        g = torch.Generator(device=semantic.device).manual_seed(seed)
        coarse_levels = [q for _ in range(T) for q in range(Qc)]
        coarse = self.coarse.run(semantic, coarse_levels, g).view(B, T, Qc)
        if progress:
            progress("coarse stage done")
        tokens = torch.empty(B, T, Q, dtype=torch.int64, device=semantic.device)
        tokens[:, :, :Qc] = coarse
        for start in range(0, T, self.window):
            w = coarse[:, start:start + self.window]              # [B, W, Qc]
            n = w.shape[1]
            prefix = self.fine.level_rows(torch.arange(Qc, device=w.device), w).reshape(B, -1)
            fine_levels = [q for _ in range(n) for q in range(Qc, Q)]
            fine = self.fine.run(prefix, fine_levels, g).view(B, n, Q - Qc)
            tokens[:, start:start + n, Qc:] = fine
            if progress:
                progress(f"fine window {start // self.window + 1}/{math.ceil(T / self.window)}")
        return tokens
