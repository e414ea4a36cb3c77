"""Summed multi-level embedding lookup (reference: `soundstorm.kernels.embedding`).

One program per tile of frames: for each frame it reads the semantic row (frame t reads
semantic index floor(t * num / den)) and the Q level rows (a MASK token reads the shared
MASK row), sums them in float32 and writes the frame's [D] input once.

Shapes: semantic int64 [B, S], tokens int64 [B, T, Q] (codes in [0, C), C = MASK),
semantic_table [V, D], acoustic_table [Q * C + 1, D] (fp32/fp16/bf16, rows contiguous).
Returns [B, T, D] in the tables' dtype. Ids are clamped into their tables, so a bad id
can never read outside them (the engine rejects bad ids before decoding).

Memory traffic (paper preset, 30 s = 1500 frames, B = 1, bf16; `bench/op_costs.py`):
the kernel reads the (Q + 1) * T gathered rows (39.9 MB) and writes [B, T, D] once
(3.1 MB): 43.2 MB per forward pass. The reference (embedding, embedding_bag, add and
the [B, T, Q] row-index arithmetic) writes and re-reads two more [B, T, D] tensors:
56.3 MB, 13.1 MB more. A per-level loop of Q + 1 lookups and Q adds, the plain way to
write it, would move 147 MB more.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from soundstorm.kernels.triton._launch import check_device, check_float, launch_device, next_pow2


@triton.jit
def _summed_embedding_kernel(semantic_ptr, tokens_ptr, sem_table_ptr, ac_table_ptr, out_ptr,
                             T, S, V, D, C, Q, rate_num, rate_den,
                             stride_sb, stride_ss, stride_tb, stride_tt, stride_tq,
                             stride_sem_row, stride_ac_row,
                             BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = offs_t < T
    lane = t_ok[:, None] & (offs_d < D)[None, :]
    s_idx = (offs_t.to(tl.int64) * rate_num) // rate_den
    s_idx = tl.minimum(s_idx, S - 1)
    sid = tl.load(semantic_ptr + b * stride_sb + s_idx * stride_ss, mask=t_ok, other=0)
    sid = tl.minimum(tl.maximum(sid, 0), V - 1)
    acc = tl.load(sem_table_ptr + sid[:, None] * stride_sem_row + offs_d[None, :],
                  mask=lane, other=0.0).to(tl.float32)
    mask_row = Q * C
    tok_base = tokens_ptr + b * stride_tb + offs_t.to(tl.int64) * stride_tt
    for q in range(Q):
        tok = tl.load(tok_base + q * stride_tq, mask=t_ok, other=0)
        row = tl.where((tok >= C) | (tok < 0), mask_row, q * C + tok)
        acc += tl.load(ac_table_ptr + row[:, None] * stride_ac_row + offs_d[None, :],
                       mask=lane, other=0.0).to(tl.float32)
    out = out_ptr + (b * T + offs_t.to(tl.int64))[:, None] * D + offs_d[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=lane)


def embedding_config(dim: int) -> dict:
    """Tiles of about 4096 values: one frame of the paper's D = 1024 takes a quarter."""
    block_d = min(next_pow2(dim), 4096)
    return dict(BLOCK_D=block_d, BLOCK_F=max(1, 4096 // block_d), num_warps=4)


@triton_op("soundstorm::summed_embedding", mutates_args=())
def summed_embedding(semantic: torch.Tensor, tokens: torch.Tensor,
                     semantic_table: torch.Tensor, acoustic_table: torch.Tensor,
                     rate_num: int, rate_den: int) -> torch.Tensor:
    """Triton version of `summed_embedding_reference` (same arguments, same result)."""
    check_device(tokens, "summed_embedding")
    check_float("semantic_table", semantic_table)
    if tokens.ndim != 3 or semantic.ndim != 2 or semantic.shape[0] != tokens.shape[0]:
        raise ValueError(f"expected semantic [B, S] and tokens [B, T, Q], got "
                         f"{tuple(semantic.shape)} and {tuple(tokens.shape)}")
    if semantic.dtype != torch.int64 or tokens.dtype != torch.int64:
        raise TypeError(f"semantic and tokens must be int64, got {semantic.dtype} and "
                        f"{tokens.dtype}")
    B, T, Q = tokens.shape
    V, D = semantic_table.shape
    if acoustic_table.ndim != 2 or acoustic_table.shape[1] != D or \
            (acoustic_table.shape[0] - 1) % Q or acoustic_table.dtype != semantic_table.dtype:
        raise ValueError(f"acoustic_table must be [Q * C + 1, D={D}] with Q={Q}, dtype "
                         f"{semantic_table.dtype}; got {acoustic_table.dtype} "
                         f"{tuple(acoustic_table.shape)}")
    if rate_num < 1 or rate_den < 1:
        raise ValueError(f"rate_num and rate_den must be >= 1, got {rate_num}, {rate_den}")
    C = (acoustic_table.shape[0] - 1) // Q
    if semantic_table.stride(1) != 1:
        semantic_table = semantic_table.contiguous()
    if acoustic_table.stride(1) != 1:
        acoustic_table = acoustic_table.contiguous()
    out = torch.empty((B, T, D), dtype=semantic_table.dtype, device=tokens.device)
    cfg = embedding_config(D)
    grid = (triton.cdiv(T, cfg["BLOCK_F"]), B, triton.cdiv(D, cfg["BLOCK_D"]))
    with launch_device(out):
        wrap_triton(_summed_embedding_kernel)[grid](
            semantic, tokens, semantic_table, acoustic_table, out,
            T, semantic.shape[1], V, D, C, Q, rate_num, rate_den,
            semantic.stride(0), semantic.stride(1),
            tokens.stride(0), tokens.stride(1), tokens.stride(2),
            semantic_table.stride(0), acoustic_table.stride(0),
            BLOCK_F=cfg["BLOCK_F"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
    return out
