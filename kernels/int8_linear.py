"""Linear layers in int8: weights quantised per output channel once (at load), activations
per row (token) on every call, products accumulated in int32 by `torch._int_mm`, then
scaled back to float32.

    y[m, n] = float(sum_k xq[m, k] * wq[n, k]) * (x_scale[m] * w_scale[n]) + bias[n]

Symmetric quantisation to [-127, 127] (never -128, so that a negated code stays in
range), rounding half to even as `torch.round`. The int32 sum is exact while
K * 127 * 127 < 2**31 (K < 133,000). float32 matmuls remain the exact path; this one
trades about 1/254 of each row's largest value in rounding for int8 throughput.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

QMAX = 127
# A row of zeros would divide by zero: its largest magnitude is taken as this instead
# (127 / 1e-30 is still finite in float32, and 0 times it is 0).
MIN_AMAX = 1e-30
# Above this inner size the int32 sums could overflow.
MAX_K = (2 ** 31 - 1) // (QMAX * QMAX)


def quantize_weight(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight: float [N, K] -> (int8 [N, K], float32 scale [N]), per output channel."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float [N, K] matrix, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight holds non-finite values; they cannot be quantised")
    amax = w.abs().amax(dim=1).clamp_min(MIN_AMAX)
    q = (w * (QMAX / amax)[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def quantize_rows_reference(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """x: float32 [M, K] -> (int8 [M, K], float32 scale [M]): per row, codes
    round(x * (127 / amax)) and scale amax / 127, amax the row's largest magnitude."""
    amax = x.abs().amax(dim=1).clamp_min(MIN_AMAX)
    q = (x * (QMAX / amax)[:, None]).round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return q, amax / QMAX


def dequantize_reference(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: Optional[torch.Tensor]) -> torch.Tensor:
    """acc: int32 [M, N], x_scale [M], w_scale [N], bias [N] or None -> float32 [M, N]."""
    y = acc.to(torch.float32) * (x_scale[:, None] * w_scale[None, :])
    return y if bias is None else y.add_(bias)


def check_int8_linear_args(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                           bias: Optional[torch.Tensor]) -> None:
    if x.dtype != torch.float32:
        raise ValueError(f"int8_linear takes float32 activations, got x of dtype {x.dtype}")
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    N, K = weight.shape
    if x.dim() < 1 or x.shape[-1] != K:
        raise ValueError(f"x must be [..., K={K}], got shape {tuple(x.shape)}")
    if K > MAX_K:
        raise ValueError(f"int8_linear sums at most {MAX_K} products in int32, got K={K}")
    if w_scale.shape != (N,) or w_scale.dtype != torch.float32:
        raise ValueError(f"w_scale must be float32 [N={N}], got {w_scale.dtype} "
                         f"{tuple(w_scale.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != torch.float32):
        raise ValueError(f"bias must be float32 [N={N}] or None, got {bias.dtype} "
                         f"{tuple(bias.shape)}")


def no_prepack(weight: torch.Tensor) -> None:
    """`Ops.int8_prepack` of backends that multiply the int8 weight as it is."""
    return None


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                          bias: Optional[torch.Tensor], packed: object = None) -> torch.Tensor:
    """
    x:       float32 [..., K]  activations, quantised here per row
    weight:  int8 [N, K]       from `quantize_weight`, w_scale: float32 [N]
    bias:    float32 [N] or None
    packed:  what the backend's `int8_prepack` made of `weight` once, at load (a layout its
             matrix product reads faster); the reference multiplies `weight` itself
    returns  float32 [..., N]
    """
    check_int8_linear_args(x, weight, w_scale, bias)
    lead, K = x.shape[:-1], x.shape[-1]
    xq, x_scale = quantize_rows_reference(x.reshape(-1, K))
    acc = torch._int_mm(xq, weight.t())                 # int32 [M, N], exact
    return dequantize_reference(acc, x_scale, w_scale, bias).view(*lead, weight.shape[0])
