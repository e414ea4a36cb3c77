"""The Conformer convolution module's inner part (reference:
`soundstorm.kernels.conv_module`): GLU, padding zeroed, depthwise convolution (K taps),
LayerNorm over channels, swish - everything between the two pointwise projections,
which stay matmuls.

One program per tile of BLOCK_T frames holds all E channels of those frames in
registers: for each tap it reads the two GLU halves of the shifted frames (neighbouring
tiles' halo rows come from cache), gates them, zeroes padding, accumulates the tap, then
normalises each frame and applies swish before a single store.

Shapes: h [B, T, 2E] (channels contiguous), dw_weight [E, 1, K], dw_bias [E],
norm_weight / norm_bias [E], frame_mask bool [B, T] or None; fp32/fp16/bf16, computed in
float32. Returns [B, T, E] in h's dtype.

Memory traffic (paper preset, 30 s, B = 1, bf16, E = 2048; `bench/op_costs.py`): the
kernel reads h (12.3 MB) and writes the output (6.1 MB) once: 18.4 MB per layer. The
reference's GLU, pad, five multiply-adds, LayerNorm and swish each make a full pass:
141.3 MB, 122.9 MB (1.47 GB per forward pass) more; with padding, its mask pass adds
12.3 MB.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from soundstorm.kernels.triton._launch import check_device, check_float, launch_device, next_pow2


@triton.jit
def _conv_module_kernel(h_ptr, w_ptr, bias_ptr, norm_w_ptr, norm_b_ptr, mask_ptr, out_ptr,
                        T, E, stride_hb, stride_ht, stride_we, stride_wk, stride_mb,
                        stride_ob, stride_ot, eps,
                        K: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    e_ok = offs_e < E
    acc = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    acc += tl.load(bias_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        src = offs_t + (k - K // 2)
        # Frames outside the sequence and padded frames read as zeros.
        valid = (src >= 0) & (src < T)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + b * stride_mb + src, mask=valid, other=0) != 0)
        lane = valid[:, None] & e_ok[None, :]
        row = h_ptr + b * stride_hb + src.to(tl.int64)[:, None] * stride_ht + offs_e[None, :]
        a = tl.load(row, mask=lane, other=0.0).to(tl.float32)
        g = tl.load(row + E, mask=lane, other=0.0).to(tl.float32)
        tap = tl.load(w_ptr + offs_e * stride_we + k * stride_wk, mask=e_ok, other=0.0)
        acc += a * tl.sigmoid(g) * tap.to(tl.float32)[None, :]
    mean = tl.sum(acc, axis=1) / E
    diff = tl.where(e_ok[None, :], acc - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / E + eps)
    norm_w = tl.load(norm_w_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    norm_b = tl.load(norm_b_ptr + offs_e, mask=e_ok, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * norm_w[None, :] + norm_b[None, :]
    y = y * tl.sigmoid(y)
    out = out_ptr + b * stride_ob + offs_t.to(tl.int64)[:, None] * stride_ot + offs_e[None, :]
    tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & e_ok[None, :])


def conv_config(channels: int, num_frames: int) -> dict:
    """All E channels of a frame in one tile (LayerNorm needs the whole row); about 4096
    float32 accumulators per program (2 frames at the paper's E = 2048: with 4 frames
    ptxas spills registers on sm_80 and sm_90)."""
    block_e = next_pow2(channels)
    block_t = max(1, min(4096 // block_e, next_pow2(num_frames)))
    return dict(BLOCK_E=block_e, BLOCK_T=block_t, num_warps=8 if block_e >= 2048 else 4)


@triton_op("soundstorm::conv_module", mutates_args=())
def conv_module(h: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                frame_mask: Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """Triton version of `conv_module_reference` (same arguments, same result)."""
    check_device(h, "conv_module")
    check_float("h", h)
    if h.ndim != 3 or h.shape[2] % 2:
        raise ValueError(f"h must be [B, T, 2E], got shape {tuple(h.shape)}")
    B, T, two_e = h.shape
    E = two_e // 2
    if dw_weight.ndim != 3 or dw_weight.shape[:2] != (E, 1) or dw_weight.shape[2] % 2 == 0:
        raise ValueError(f"dw_weight must be [E={E}, 1, K] with K odd, got "
                         f"{tuple(dw_weight.shape)}")
    for name, p in (("dw_bias", dw_bias), ("norm_weight", norm_weight),
                    ("norm_bias", norm_bias)):
        if p.shape != (E,):
            raise ValueError(f"{name} must be [E={E}], got {tuple(p.shape)}")
    if frame_mask is not None and (frame_mask.shape != (B, T) or frame_mask.dtype != torch.bool):
        raise ValueError(f"frame_mask must be bool [B, T] = [{B}, {T}] or None, got "
                         f"{frame_mask.dtype} {tuple(frame_mask.shape)}")
    if h.stride(2) != 1:
        h = h.contiguous()
    dw_bias, norm_weight, norm_bias = (p.contiguous()
                                       for p in (dw_bias, norm_weight, norm_bias))
    mask = frame_mask.contiguous() if frame_mask is not None else h.new_empty((1,), dtype=torch.bool)
    out = torch.empty((B, T, E), dtype=h.dtype, device=h.device)
    cfg = conv_config(E, T)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), B)
    with launch_device(out):
        wrap_triton(_conv_module_kernel)[grid](
            h, dw_weight, dw_bias, norm_weight, norm_bias, mask, out,
            T, E, h.stride(0), h.stride(1), dw_weight.stride(0), dw_weight.stride(2),
            mask.stride(0) if frame_mask is not None else 0, out.stride(0), out.stride(1),
            float(eps), K=dw_weight.shape[2], HAS_MASK=frame_mask is not None,
            BLOCK_T=cfg["BLOCK_T"], BLOCK_E=cfg["BLOCK_E"], num_warps=cfg["num_warps"])
    return out
