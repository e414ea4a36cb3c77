"""Summed multi-level embedding lookup (paper §3.1).

Each frame's input is the embedding of its semantic id (semantic ids repeated to the codec
frame rate: frame t reads index floor(t * num / den)) plus, for every RVQ level q, the
embedding of token Y[t, q] from level q's table, a MASK token reading the one MASK row that
all levels share. The sequence length stays T whatever Q is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def semantic_frame_index(num_frames: int, rate_num: int, rate_den: int,
                         device: torch.device) -> torch.Tensor:
    """int64 [T]: the semantic index each frame reads, floor(t * rate_num / rate_den)."""
    t = torch.arange(num_frames, device=device, dtype=torch.int64)
    return (t * rate_num) // rate_den


def summed_embedding_reference(semantic: torch.Tensor, tokens: torch.Tensor,
                               semantic_table: torch.Tensor, acoustic_table: torch.Tensor,
                               rate_num: int, rate_den: int) -> torch.Tensor:
    """
    semantic:       int64 [B, S]      semantic ids at the semantic rate
    tokens:         int64 [B, T, Q]   codec ids in [0, C) or C for MASK
    semantic_table: [V, D]
    acoustic_table: [Q * C + 1, D]    level q's code c at row q * C + c, MASK at the last row
    returns         [B, T, D] in the tables' dtype
    """
    B, T, Q = tokens.shape
    mask_row = acoustic_table.shape[0] - 1
    C = mask_row // Q
    sem = semantic[:, semantic_frame_index(T, rate_num, rate_den, semantic.device)]
    offsets = torch.arange(Q, device=tokens.device, dtype=torch.int64) * C
    rows = torch.where(tokens >= C, mask_row, tokens + offsets)
    # embedding_bag sums the Q rows of each frame without materialising [B, T, Q, D].
    acoustic = F.embedding_bag(rows.reshape(B * T, Q), acoustic_table, mode="sum")
    return F.embedding(sem, semantic_table) + acoustic.view(B, T, -1)
