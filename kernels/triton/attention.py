"""Bidirectional flash attention with the rotary embedding applied inside the kernel
(reference: `soundstorm.kernels.attention`).

One program per (block of BLOCK_M queries, batch row, head). It rotates its query block
once, then streams key/value blocks with an online softmax (running max and sum in
float32, exp2 with the scale folded into the queries), rotating each key block as it is
loaded. Rotary pairs are channels (i, i + dh/2); the rotated copy is read as a second,
channel-permuted load of the same cache lines, and the angles come from the reference's
own float32 cos/sin tables ([T, dh/2], L2-resident), so positions are exact. Keys past a
row's last real frame are never loaded; padded keys inside that range are masked.

Shapes: q, k, v [B, H, T, dh] with any strides whose last one is 1 (the model passes
views of its fused QKV projection: no copies), key_mask bool [B, T] or None; fp32 /
fp16 / bf16 with float32 accumulation (fp32 products as three TF32 products, `tf32x3`,
about float32 accuracy on tensor cores; plain IEEE float32 products spill registers).
Returns [B, H, T, dh] laid out as [B, T, H, dh], so the model's
`y.transpose(1, 2).reshape(B, T, D)` is free.

CUDA graphs: the cos/sin tables are cached per (head_dim, device) and never freed once
handed out, so a captured graph may keep reading them; call `prepare_rotary_tables` with
the longest sequence before capturing, so that capture only takes views of them.

Memory traffic (paper preset, 30 s, B = 1, bf16; `bench/op_costs.py`): the kernel
reads q, k, v from the QKV output and writes the output once: 12.3 MB per layer; the
scores never leave the chip. The reference rotates q and k through half-size
multiplies, add/sub and cat (nine passes over a [B, H, T, dh] tensor each), then copies
the output transpose: 73.7 MB even with an ideal flash-style attention inside, 61.4 MB
(737 MB per forward pass) more, and far more when the attention backend materialises
the masked [B, H, T, T] scores (72 MB per layer for one bf16 copy).
"""

from __future__ import annotations

import math
import threading
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from soundstorm.kernels.attention import rotary_tables
from soundstorm.kernels.triton._launch import (check_device, check_float, dot_in_input_dtype,
                                               is_fake, launch_device, next_pow2)


@triton.jit
def _rotate(x_ptr, offs_t, offs_d, rot_d, sign, freq_d, t_ok, d_ok, stride_t,
            cos_ptr, sin_ptr, HALF: tl.constexpr):
    """Load a [rows, D] tile and rotate pairs (i, i + dh/2) by each frame's angle."""
    lane = t_ok[:, None] & d_ok[None, :]
    rows = offs_t.to(tl.int64)[:, None] * stride_t
    x = tl.load(x_ptr + rows + offs_d[None, :], mask=lane, other=0.0).to(tl.float32)
    x_rot = tl.load(x_ptr + rows + rot_d[None, :], mask=lane, other=0.0).to(tl.float32)
    table = offs_t[:, None] * HALF + freq_d[None, :]
    cos = tl.load(cos_ptr + table, mask=lane, other=0.0)
    sin = tl.load(sin_ptr + table, mask=lane, other=0.0)
    return x * cos + sign[None, :] * x_rot * sin


@triton.jit
def _rotary_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cos_ptr, sin_ptr, mask_ptr, len_ptr,
                             stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                             stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
                             stride_mb, H, T, qk_scale,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             HAS_MASK: tl.constexpr, LOW_PRECISION_DOT: tl.constexpr,
                             FP32_INPUTS: tl.constexpr):
    HALF: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    rot_d = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    rot_d = tl.where(d_ok, rot_d, 0)
    sign = tl.where(offs_d < HALF, -1.0, 1.0)
    freq_d = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
    m_ok = offs_m < T

    # qk_scale = log2(e) / sqrt(dh): the softmax below works in base 2.
    q = _rotate(q_ptr + b * stride_qb + h * stride_qh, offs_m, offs_d, rot_d, sign, freq_d,
                m_ok, d_ok, stride_qt, cos_ptr, sin_ptr, HALF) * qk_scale
    if LOW_PRECISION_DOT:
        q = q.to(q_ptr.dtype.element_ty)

    if HAS_MASK:
        kv_len = tl.load(len_ptr + b)
    else:
        kv_len = T
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, kv_len, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < kv_len
        k = _rotate(k_base, offs_n, offs_d, rot_d, sign, freq_d, n_ok, d_ok, stride_kt,
                    cos_ptr, sin_ptr, HALF)
        if LOW_PRECISION_DOT:
            k = k.to(k_ptr.dtype.element_ty)
        if FP32_INPUTS:
            s = tl.dot(q, tl.trans(k), input_precision="tf32x3")
        else:
            s = tl.dot(q, tl.trans(k))
        live = n_ok
        if HAS_MASK:
            live = live & (tl.load(mask_ptr + b * stride_mb + offs_n, mask=n_ok, other=0) != 0)
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A block with every key padded leaves the max at -inf: subtract 0 instead of
        # -inf so that exp2 gives 0 rather than NaN.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n.to(tl.int64)[:, None] * stride_vt + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if LOW_PRECISION_DOT:
            pv = tl.dot(p.to(v_ptr.dtype.element_ty), v)
        elif FP32_INPUTS:
            pv = tl.dot(p, v.to(tl.float32), input_precision="tf32x3")
        else:
            pv = tl.dot(p, v.to(tl.float32))
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    acc = acc / l_i[:, None]
    out = (o_ptr + b * stride_ob + h * stride_oh + offs_m.to(tl.int64)[:, None] * stride_ot
           + offs_d[None, :])
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# One float32 cos/sin pair per (head_dim, device), covering frames 0..capacity-1: every
# call takes views [:T] of it. A longer sequence builds a longer table, but a table once
# handed out is never freed: a captured CUDA graph keeps reading the addresses it saw.
_TABLES: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED: List[Tuple[torch.Tensor, torch.Tensor]] = []
_TABLES_LOCK = threading.Lock()
# Tables grow to a power of two of at least this many frames, so a run of growing
# lengths builds few of them (the retired ones hold less than the live one in all).
MIN_TABLE_FRAMES = 256


def _table_key(head_dim: int, device: torch.device) -> tuple:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return head_dim, device


def prepare_rotary_tables(max_frames: int, head_dim: int,
                          device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Build (or find) the cached float32 cos/sin tables for sequences of up to
    `max_frames` frames with heads of `head_dim` on `device`; returns them as
    [max_frames, head_dim // 2] views.

    Call it before capturing CUDA graphs, with the longest sequence the graphs will see:
    `rotary_attention` then only takes views of the cached tables during capture. A
    table that is first needed during capture is built in the graph's memory pool and
    not cached (correct, but built anew in every capture). On CUDA it waits for the
    tables to be written, so that any stream may read them when it returns.
    """
    if max_frames < 1 or head_dim < 2 or head_dim % 2:
        raise ValueError(f"need max_frames >= 1 and an even head_dim >= 2, got "
                         f"max_frames={max_frames}, head_dim={head_dim}")
    key = _table_key(head_dim, device)
    if key[1].type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("prepare_rotary_tables was called during CUDA graph capture; "
                           "call it before capturing")
    tables = _cached_tables(key, max_frames)
    if key[1].type == "cuda":
        torch.cuda.current_stream(key[1]).synchronize()
    return tables


def _cached_tables(key: tuple, num_frames: int) -> Tuple[torch.Tensor, torch.Tensor]:
    head_dim, device = key
    with _TABLES_LOCK:     # decoding threads may share the cache
        tables = _TABLES.get(key)
        if tables is None or tables[0].shape[0] < num_frames:
            capacity = next_pow2(max(num_frames, MIN_TABLE_FRAMES))
            if tables is not None:
                _RETIRED.append(tables)
            # Row t of a longer table holds the same values as row t of a shorter one.
            tables = rotary_tables(capacity, head_dim, device, torch.float32)
            _TABLES[key] = tables
    cos, sin = tables
    return cos[:num_frames], sin[:num_frames]


def _tables(q: torch.Tensor, T: int, dh: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The reference's float32 cos/sin tables for T frames, [T, dh/2] views of the cached
    ones: every layer of every pass reuses them instead of recomputing them (five small
    launches each)."""
    if is_fake(q):
        return rotary_tables(T, dh, q.device, torch.float32)
    key = _table_key(dh, q.device)
    tables = _TABLES.get(key)
    if q.device.type == "cuda" and torch.cuda.is_current_stream_capturing() and (
            tables is None or tables[0].shape[0] < T):
        # Tensors made during capture belong to the graph's memory pool: not cached.
        return rotary_tables(T, dh, q.device, torch.float32)
    return _cached_tables(key, T)


def attention_config(num_frames: int, head_dim: int, fp32: bool = False) -> dict:
    """128 x 64 query x key tiles (16 x 16 at least: tensor-core products need 16); 64 x 32
    in float32, whose split TF32 products need more registers."""
    block_m = max(16, min(64 if fp32 else 128, next_pow2(num_frames)))
    block_n = max(16, min(32 if fp32 else 64, next_pow2(num_frames)))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
                num_warps=8 if block_m >= 128 else 4, num_stages=2)


@triton_op("soundstorm::rotary_attention", mutates_args=())
def rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Triton version of `rotary_attention_reference` (same arguments, same result)."""
    check_device(q, "rotary_attention")
    check_float("q", q)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must all be [B, H, T, dh], got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, H, T, dh = q.shape
    if dh % 2:
        raise ValueError(f"head dimension must be even for rotary pairs, got {dh}")
    if key_mask is not None and (key_mask.shape != (B, T) or key_mask.dtype != torch.bool):
        raise ValueError(f"key_mask must be bool [B, T] = [{B}, {T}] or None, got "
                         f"{key_mask.dtype} {tuple(key_mask.shape)}")
    q, k, v = (x if x.stride(3) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = _tables(q, T, dh)
    # [B, T, H, dh] memory, returned as the [B, H, T, dh] view.
    out = torch.empty_strided((B, H, T, dh), (T * H * dh, dh, H * dh, 1), dtype=q.dtype,
                              device=q.device)
    if key_mask is not None:
        mask = key_mask.contiguous()
        # One past each row's last real frame: key blocks beyond it are skipped.
        positions = torch.arange(1, T + 1, device=q.device, dtype=torch.int32)
        lengths = torch.where(mask, positions, 0).amax(dim=1).to(torch.int32)
    else:
        mask = lengths = torch.empty((1,), dtype=torch.int32, device=q.device)
    cfg = attention_config(T, dh, fp32=q.dtype == torch.float32)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]), B * H)
    with launch_device(out):
        wrap_triton(_rotary_attention_kernel)[grid](
            q, k, v, out, cos, sin, mask, lengths,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            mask.stride(0) if key_mask is not None else 0, H, T,
            math.log2(math.e) / math.sqrt(dh),
            HEAD_DIM=dh, BLOCK_D=cfg["BLOCK_D"], BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
            HAS_MASK=key_mask is not None, LOW_PRECISION_DOT=q.dtype != torch.float32
            and dot_in_input_dtype(q.dtype), FP32_INPUTS=q.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
