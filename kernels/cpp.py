"""Backend "cpp": C++ CPU kernels (csrc/ -> soundstorm.kernels._C) behind the signatures of
the PyTorch references.

The extension works on raw buffers: CPU tensors go in as zero-copy numpy views (after a
conversion only where the dtype or layout asks for one). So far masked resampling and the
summed embedding lookup run in C++; `ops()` takes every other op from the references.

Importing this module raises ImportError when the extension is not built; `get_ops("cpp")`
turns that into a RuntimeError that says why.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from soundstorm.kernels import _C  # noqa: F401  (ImportError when not built)
from soundstorm.kernels import rng
from soundstorm.kernels.embedding import summed_embedding_reference
from soundstorm.kernels.resample import Scalar

_GUMBEL_BITS = 23
_gumbel_table: Optional[torch.Tensor] = None
_gumbel_max = float("inf")
_gumbel_lock = threading.Lock()


def gumbel_table() -> torch.Tensor:
    """float32 [2**23]: rng.to_gumbel of every hash, indexed by its top 23 bits (the only
    bits to_gumbel reads). Computed once, by the reference's own float32 logarithm, so the
    C++ noise equals the reference's bit for bit on every CPU."""
    global _gumbel_table, _gumbel_max
    if _gumbel_table is None:
        with _gumbel_lock:
            if _gumbel_table is None:
                table = torch.empty(1 << _GUMBEL_BITS, dtype=torch.float32)
                step = 1 << 20
                for start in range(0, 1 << _GUMBEL_BITS, step):
                    top = torch.arange(start, start + step, dtype=torch.int64)
                    table[start:start + step] = rng.to_gumbel(top << (32 - _GUMBEL_BITS))
                # the largest value bounds the noise (the kernel skips lookups with it)
                _gumbel_max = float(table.max())
                _gumbel_table = table
    return _gumbel_table


def _row_values(value: Scalar, batch: int, dtype: torch.dtype, name: str):
    v = torch.as_tensor(value, dtype=dtype)
    if v.device.type != "cpu":
        raise ValueError(f"backend 'cpp' runs on the CPU; {name} is on {v.device}")
    if v.dim() > 1 or (v.dim() == 1 and v.shape[0] not in (1, batch)):
        raise ValueError(f"{name} must be one value or one per row ({batch}), "
                         f"got shape {tuple(v.shape)}")
    return v.expand(batch).contiguous().numpy()


def masked_resample(logits: torch.Tensor, tokens: torch.Tensor, eligible: torch.Tensor,
                    num_keep: Optional[torch.Tensor], seeds: torch.Tensor, level: Scalar,
                    iteration: Scalar, temperature: Scalar, noise_scale: Scalar,
                    sample: Scalar, any_sample: Optional[bool] = None,
                    any_noise: Optional[bool] = None) -> torch.Tensor:
    """The C++ counterpart of `masked_resample_reference` (same arguments and result; see
    its docstring). Logits of other float dtypes are converted to float32 first."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, C], got shape {tuple(logits.shape)}")
    for name, t in (("logits", logits), ("tokens", tokens), ("eligible", eligible),
                    ("seeds", seeds)):
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU; {name} is on {t.device}")
    B = logits.shape[0]
    if any_sample is None:
        any_sample = isinstance(sample, torch.Tensor) or bool(sample)
    if any_noise is None:
        any_noise = isinstance(noise_scale, torch.Tensor) or noise_scale != 0.0
    out = tokens.to(torch.int64, copy=True).contiguous()
    keep = None
    if num_keep is not None:
        keep = num_keep.to(torch.int64).contiguous().numpy()
    with torch.no_grad():
        _C.masked_resample(
            logits.detach().to(torch.float32).contiguous().numpy(),
            out.numpy(),
            eligible.to(torch.bool).contiguous().numpy(),
            keep,
            seeds.to(torch.int64).contiguous().numpy(),
            _row_values(level, B, torch.int64, "level"),
            _row_values(iteration, B, torch.int64, "iteration"),
            _row_values(temperature, B, torch.float32, "temperature"),
            _row_values(noise_scale, B, torch.float32, "noise_scale"),
            _row_values(sample, B, torch.bool, "sample"),
            bool(any_sample), bool(any_noise), gumbel_table().numpy(), _gumbel_max)
    return out


def summed_embedding(semantic: torch.Tensor, tokens: torch.Tensor,
                     semantic_table: torch.Tensor, acoustic_table: torch.Tensor,
                     rate_num: int, rate_den: int) -> torch.Tensor:
    """The C++ counterpart of `summed_embedding_reference` (same arguments and result, bit
    for bit). float32 and float64 tables run in C++; float16 and bfloat16 ones, which numpy
    cannot hold, and tables that need gradients go to the reference."""
    dtype = semantic_table.dtype
    if (dtype not in (torch.float32, torch.float64) or acoustic_table.dtype != dtype
            or torch.is_grad_enabled() and (semantic_table.requires_grad
                                           or acoustic_table.requires_grad)):
        return summed_embedding_reference(semantic, tokens, semantic_table, acoustic_table,
                                          rate_num, rate_den)
    for name, t in (("semantic", semantic), ("tokens", tokens),
                    ("semantic_table", semantic_table), ("acoustic_table", acoustic_table)):
        if t.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU; {name} is on {t.device}")
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be [B, T, Q], got shape {tuple(tokens.shape)}")
    B, T, _ = tokens.shape
    out = torch.empty(B, T, semantic_table.shape[-1], dtype=dtype)
    _C.summed_embedding(semantic.to(torch.int64).contiguous().numpy(),
                        tokens.to(torch.int64).contiguous().numpy(),
                        semantic_table.detach().contiguous().numpy(),
                        acoustic_table.detach().contiguous().numpy(),
                        int(rate_num), int(rate_den), out.numpy())
    return out


def ops():
    """The Ops of backend "cpp": the C++ kernels where they exist, the references elsewhere."""
    from dataclasses import replace

    from soundstorm.kernels.dispatch import TORCH_OPS
    return replace(TORCH_OPS, name="cpp", masked_resample=masked_resample,
                   summed_embedding=summed_embedding)
