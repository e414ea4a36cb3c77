"""Bidirectional multi-head attention with rotary position embeddings (Su et al., 2021)
and per-row key lengths. Positions are rotated in float32 whatever the activations'
dtype (bfloat16 under autocast in training), as the Triton kernel rotates them."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ROTARY_BASE = 10000.0


def rotary_tables(num_frames: int, head_dim: int, device: torch.device,
                  dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [T, head_dim // 2], computed in float32 then cast to `dtype`."""
    inv_freq = ROTARY_BASE ** (-torch.arange(0, head_dim, 2, device=device,
                                             dtype=torch.float32) / head_dim)
    angles = torch.arange(num_frames, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, dh]; rotates channel pairs (i, i + dh/2) by the frame's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, dh] (positions 0..T-1 along T) -> x rotated, in x's dtype.

    The rotation runs in float32 with float32 tables (float64 for float64 inputs), and
    its result is rounded to x's dtype once: a bfloat16 or float16 input is rotated as
    the Triton kernel rotates it, not with tables and products rounded to 8 or 11 bits.
    """
    compute = torch.promote_types(x.dtype, torch.float32)
    cos, sin = rotary_tables(x.shape[2], x.shape[3], x.device, compute)
    return apply_rotary(x.to(compute), cos, sin).to(x.dtype)


def rotary_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """
    q, k, v:  [B, H, T, dh]  (positions 0..T-1 along T)
    key_mask: bool [B, T] (True = a real frame) or None when no row is padded
    returns   [B, H, T, dh]
    Every row has at least one real frame, so no query's softmax is empty. q and k are
    rotated in float32 (`rotate`), then attend in their own dtype.
    """
    q, k = rotate(q), rotate(k)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
