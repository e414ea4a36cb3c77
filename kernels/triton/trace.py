"""Proof that tracers see the kernels: trace each op with AOTAutograd on fake tensors
(no GPU needed, compiled-kernel mode only) and list the Triton kernels in the graph.

    python -m soundstorm.kernels.triton.trace
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List

import torch

from soundstorm.kernels.triton import (conv_module, masked_resample, residual_norm,
                                       rotary_attention, summed_embedding)


def _cases(mode) -> Dict[str, tuple]:
    """Small example inputs per op, created as fake tensors under `mode`."""
    with mode:
        B, T, H, dh, E, Q, C = 2, 33, 2, 16, 24, 3, 10
        bf = dict(dtype=torch.bfloat16)
        mask = torch.ones(B, T, dtype=torch.bool)
        qkv = torch.randn(B, T, 3, H, dh, **bf).permute(2, 0, 3, 1, 4)
        return {
            "summed_embedding": (summed_embedding, (
                torch.zeros(B, T, dtype=torch.long), torch.zeros(B, T, Q, dtype=torch.long),
                torch.randn(7, 32, **bf), torch.randn(Q * C + 1, 32, **bf), 1, 2)),
            "rotary_attention": (rotary_attention, (qkv[0], qkv[1], qkv[2], mask)),
            "conv_module": (conv_module, (
                torch.randn(B, T, 2 * E, **bf), torch.randn(E, 1, 5, **bf),
                torch.randn(E, **bf), torch.randn(E, **bf), torch.randn(E, **bf), mask, 1e-5)),
            "masked_resample": (masked_resample, (
                torch.randn(B, T, C, **bf), torch.zeros(B, T, dtype=torch.long), mask,
                torch.ones(B, dtype=torch.long), torch.ones(B, dtype=torch.long),
                1, 1, 1.0, 0.5, True)),
            "residual_norm": (residual_norm, (
                torch.randn(B, T, 32, **bf), torch.randn(B, T, 32, **bf), 0.5,
                torch.randn(32, **bf), torch.randn(32, **bf), 1e-5)),
        }


def traced_kernels() -> Dict[str, List[str]]:
    """op name -> names of the Triton kernels in its AOTAutograd forward graph."""
    from torch._functorch.aot_autograd import aot_function
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Without a GPU the mutation analysis cannot lower to TTIR and says so at length;
    # it then assumes every argument may be written, which is safe.
    logging.getLogger("torch._dynamo").addFilter(
        lambda record: "identify_accessed_tensors" not in record.getMessage())
    mode = FakeTensorMode()
    found: Dict[str, List[str]] = {}
    for name, (op, args) in _cases(mode).items():
        graphs: List[torch.fx.GraphModule] = []

        def grab(gm, _inputs, graphs=graphs) -> Callable:
            graphs.append(gm)
            return gm

        with mode:
            aot_function(lambda *a, op=op: op(*a), fw_compiler=grab)(*args)
        kernels = []
        for node in graphs[0].graph.nodes:
            if "triton_kernel_wrapper" in str(node.target):
                kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
                kernels.append(kernel.fn.__name__)
        found[name] = kernels
    return found


if __name__ == "__main__":
    for op, kernels in traced_kernels().items():
        print(f"{op:<18} {', '.join(kernels)}")
