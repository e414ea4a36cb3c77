"""Residual add followed by LayerNorm: the seam between the Conformer block's sub-modules
(each sub-module adds its output to the stream, and the next one starts by normalising
the sum)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def residual_norm_reference(x: torch.Tensor, delta: torch.Tensor, alpha: float,
                            weight: torch.Tensor, bias: torch.Tensor,
                            eps: float = 1e-5) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    x, delta:     [B, T, D]  the residual stream and a sub-module's output
    alpha:        scale of delta (1/2 for the Conformer's half feed-forward modules)
    weight, bias: [D]        LayerNorm parameters
    returns       (y, LayerNorm(y)) with y = x + alpha * delta, both [B, T, D] in x's dtype
    """
    y = torch.add(x, delta, alpha=alpha)
    return y, F.layer_norm(y, (y.shape[-1],), weight, bias, eps)
