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
    x = F.glu(h, dim=-1)
    if frame_mask is not None:
        x = x * frame_mask[..., None].to(x.dtype)
    # Depthwise convolution as K shifted multiply-adds in the [B, T, E] layout: on CPU
    # this is about twice as fast as conv1d, which needs the channels-first transpose
    # both ways, and it computes the same sums.
    K, T = dw_weight.shape[-1], x.shape[1]
    padded = F.pad(x, (0, 0, K // 2, K // 2))
    taps = dw_weight[:, 0, :].t()                                   # [K, E]
    y = torch.addcmul(dw_bias, padded[:, 0:T], taps[0])
    for k in range(1, K):
        y.addcmul_(padded[:, k:k + T], taps[k])
    y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    return F.silu(y, inplace=True)
