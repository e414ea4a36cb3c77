"""Triton kernels for the engine's hot path, one op per file, each tested against the
PyTorch reference of the same name in `soundstorm.kernels`.

Every launcher is registered with `torch.library.triton_op` (the kernels inside go
through `wrap_triton`), so `torch.compile` traces through them instead of stopping at an
opaque call.

Where they run: on CUDA tensors, compiled; on CPU tensors only in Triton's interpreter,
which is chosen when this package is imported with `TRITON_INTERPRET=1` in the
environment (that is how the test suite runs them on a machine without a GPU).

Before capturing CUDA graphs, call `prepare_rotary_tables(max_frames, head_dim, device)`
once: attention then reads cached position tables during capture instead of building
them in the graph's memory pool.
"""

from __future__ import annotations

from typing import Optional

import torch

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised where triton is absent
    raise ImportError(
        "the triton backend needs the `triton` package (pip install 'soundstorm[triton]', "
        f"which pins triton==3.7.1): {e}") from e

from soundstorm.kernels.dispatch import Ops
from soundstorm.kernels.triton._launch import INTERPRET, check_device
from soundstorm.kernels.triton.attention import prepare_rotary_tables, rotary_attention
from soundstorm.kernels.triton.conv_module import conv_module
from soundstorm.kernels.triton.embedding import summed_embedding
from soundstorm.kernels.triton.resample import masked_resample
from soundstorm.kernels.triton.residual_norm import residual_norm

TRITON_OPS = Ops(
    name="triton",
    summed_embedding=summed_embedding,
    rotary_attention=rotary_attention,
    conv_module=conv_module,
    masked_resample=masked_resample,
    residual_norm=residual_norm,
    prepare_capture=prepare_rotary_tables,
)


def ops_for(device: Optional[torch.device]) -> Ops:
    """The Triton ops, after checking that they can run on `device` (raises otherwise)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    check_device(torch.device(device), "backend 'triton'")
    return TRITON_OPS


__all__ = ["INTERPRET", "TRITON_OPS", "ops_for", "prepare_rotary_tables", "rotary_attention",
           "conv_module", "summed_embedding", "masked_resample", "residual_norm"]
