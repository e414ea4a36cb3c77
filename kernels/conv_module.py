"""The inner part of the Conformer convolution module: everything between its two
pointwise projections (which stay matmuls): GLU, depthwise convolution, LayerNorm over
channels, swish.

LayerNorm stands where the original Conformer has BatchNorm: it normalises each frame on
its own, so a frame's output never depends on batch companions or padding, in training
and in inference alike.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def conv_module_reference(h: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                          norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          frame_mask: Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """
    h:           [B, T, 2E]  output of the first pointwise projection
    dw_weight:   [E, 1, K]   depthwise kernel (K odd, centred), dw_bias: [E]
    norm_weight, norm_bias: [E]
    frame_mask:  bool [B, T] (True = real frame) or None; padded frames are zeroed before
                 the depthwise convolution, so they read as the same zeros that stand
                 beyond the sequence's end.
    returns      [B, T, E]
    """
    a, gate = h.chunk(2, dim=-1)
    x = a * torch.sigmoid(gate)
    if frame_mask is not None:
        x = x * frame_mask[..., None].to(x.dtype)
    K = dw_weight.shape[-1]
    x = F.conv1d(x.transpose(1, 2), dw_weight, dw_bias, padding=K // 2,
                 groups=dw_weight.shape[0]).transpose(1, 2)
    x = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias, eps)
    return F.silu(x)
