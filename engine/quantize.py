"""Weight quantisation applied to a loaded model from outside (the model stays plain
PyTorch): `quantize_int8` swaps the Conformer's `nn.Linear` layers for `Int8Linear`, whose
weights are int8 per output channel and whose products run through the backend's
`int8_linear` (`soundstorm.kernels.int8_linear`: activations quantised per token on the
fly, int32 accumulation in `torch._int_mm`).

What stays float32: the embeddings, the LayerNorms, the depthwise convolution, attention's
own products (scores and values) and the output heads, whose logits the sampler reads.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from soundstorm.kernels import Ops
from soundstorm.kernels.int8_linear import quantize_weight

# Values of Engine(..., quantize=...): None keeps float matmuls.
QUANTIZE_MODES = ("int8",)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights [N, K], float32 scales [N] and a float32 bias [N];
    forward(x float32 [..., K]) -> float32 [..., N] through the backend's `int8_linear`."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor],
                 ops: Ops):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", bias)
        self.linear_fn = ops.int8_linear
        # the backend's packed copy of the weight (not a buffer: it is not saved or moved)
        self.packed = ops.int8_prepack(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, ops: Ops) -> "Int8Linear":
        weight, scale = quantize_weight(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        return cls(weight, scale, bias, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fn(x, self.weight, self.weight_scale, self.bias, self.packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: nn.Module, ops: Ops) -> int:
    """Replace every `nn.Linear` inside `model` (in place) by an `Int8Linear` running on
    `ops` (`int8_prepack` once per layer, `int8_linear` per call); returns how many were
    replaced. The model must be float32 on the CPU."""
    for p in model.parameters():
        if p.device.type != "cpu" or p.dtype != torch.float32:
            raise ValueError(f"int8 quantisation takes a float32 model on the CPU, got "
                             f"{p.dtype} on {p.device}")
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if isinstance(child, nn.Linear)]
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear.from_linear(child, ops))
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())
