"""Backend "cpp": C++ CPU kernels (csrc/ -> soundstorm.kernels._C) behind the signatures of
the PyTorch references.

The extension works on raw buffers: CPU tensors go in as zero-copy numpy views (after a
conversion only where the dtype or layout asks for one). Masked resampling, the summed
embedding lookup, the residual add with its LayerNorm and the inner part of the
convolution module run in C++, as do the quantisation passes around the int8 linear
layers' products (oneDNN's on prepacked weights), and the rotary embedding in front of attention, whose products
stay in torch's `scaled_dot_product_attention`.

Importing this module raises ImportError when the extension is not built; `get_ops("cpp")`
turns that into a RuntimeError that says why.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from soundstorm.kernels import _C  # noqa: F401  (ImportError when not built)
from soundstorm.kernels import rng
from soundstorm.kernels.attention import rotary_attention_reference, rotary_tables
from soundstorm.kernels.conv_module import conv_module_reference
from soundstorm.kernels.embedding import summed_embedding_reference
from soundstorm.kernels.int8_linear import check_int8_linear_args
from soundstorm.kernels.resample import Scalar
from soundstorm.kernels.residual_norm import residual_norm_reference

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


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _on_cpu(**tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU; {name} is on {t.device}")


def residual_norm(x: torch.Tensor, delta: torch.Tensor, alpha: float, weight: torch.Tensor,
                  bias: torch.Tensor, eps: float = 1e-5):
    """The C++ counterpart of `residual_norm_reference` (same arguments and result, within a
    few ulp: the kernel accumulates the moments in float64). float32 and float64 run in
    C++; other dtypes, a LayerNorm without weight or bias, mixed dtypes, tensors that need
    gradients, and a delta that must be broadcast go to the reference."""
    dtype = x.dtype
    if (dtype not in (torch.float32, torch.float64) or weight is None or bias is None
            or any(t.dtype != dtype for t in (delta, weight, bias))
            or delta.shape != x.shape or x.dim() < 1
            or _needs_grad(x, delta, weight, bias)):
        return residual_norm_reference(x, delta, alpha, weight, bias, eps)
    _on_cpu(x=x, delta=delta, weight=weight, bias=bias)
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype=dtype)
    out = torch.empty(x.shape, dtype=dtype)
    _C.residual_norm(x.detach().contiguous().reshape(-1, D).numpy(),
                     delta.detach().contiguous().reshape(-1, D).numpy(), float(alpha),
                     weight.detach().contiguous().numpy(), bias.detach().contiguous().numpy(),
                     float(eps), y.view(-1, D).numpy(), out.view(-1, D).numpy())
    return y, out


def conv_module(h: torch.Tensor, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                frame_mask: Optional[torch.Tensor], eps: float = 1e-5) -> torch.Tensor:
    """The C++ counterpart of `conv_module_reference` (same arguments and result, within a
    few ulp). float32 runs in C++; other dtypes, tensors that need gradients and a missing
    bias or norm parameter go to the reference."""
    params = (dw_weight, dw_bias, norm_weight, norm_bias)
    if (h.dtype != torch.float32 or any(p is None or p.dtype != torch.float32 for p in params)
            or h.dim() != 3 or dw_weight.dim() != 3 or dw_weight.shape[1] != 1
            or _needs_grad(h, *params)):
        return conv_module_reference(h, dw_weight, dw_bias, norm_weight, norm_bias,
                                     frame_mask, eps)
    _on_cpu(h=h, dw_weight=dw_weight, dw_bias=dw_bias, norm_weight=norm_weight,
            norm_bias=norm_bias, frame_mask=frame_mask)
    B, T, E2 = h.shape
    out = torch.empty(B, T, E2 // 2, dtype=torch.float32)
    mask = None
    if frame_mask is not None:
        mask = frame_mask.detach().to(torch.bool).contiguous().numpy()
    _C.conv_module(h.detach().contiguous().numpy(),
                   dw_weight.detach()[:, 0, :].contiguous().numpy(),
                   dw_bias.detach().contiguous().numpy(),
                   norm_weight.detach().contiguous().numpy(),
                   norm_bias.detach().contiguous().numpy(), mask, float(eps), out.numpy())
    return out


def int8_prepack(weight: torch.Tensor) -> Optional[tuple]:
    """The int8 weight [N, K] packed once for oneDNN's int8 matrix product (with unit
    scales and zero points), or None where torch has no oneDNN (then `int8_linear` uses
    `torch._int_mm`). Packing once saves the repacking `torch._int_mm` does on every call,
    which costs as much as the product itself when the weights are not in cache."""
    if not torch.backends.mkldnn.is_available():
        return None
    N = weight.shape[0]
    return (torch.ops.onednn.qlinear_prepack(weight.contiguous(), None),
            torch.ones(N, dtype=torch.float32), torch.zeros(N, dtype=torch.int64))


def int8_linear(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                bias: Optional[torch.Tensor], packed: Optional[tuple] = None) -> torch.Tensor:
    """The C++ counterpart of `int8_linear_reference` (same arguments and result, bit for
    bit): the per-row quantisation and the rescaling (+ bias) are one C++ pass each around
    the int32 product: oneDNN's on the weight `int8_prepack` packed (its output is the
    sums converted to float32, exactly as the reference converts them), or
    `torch._int_mm` without one."""
    check_int8_linear_args(x, weight, w_scale, bias)
    _on_cpu(x=x, weight=weight, w_scale=w_scale, bias=bias)
    N, K = weight.shape
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, K).contiguous()
    M = x2.shape[0]
    xq = torch.empty(M, K, dtype=torch.int8)
    x_scale = torch.empty(M, dtype=torch.float32)
    _C.quantize_rows(x2.numpy(), xq.numpy(), x_scale.numpy())
    if packed is not None:
        pw, ones, zeros = packed
        acc = torch.ops.onednn.qlinear_pointwise(xq, 1.0, 0, pw, ones, zeros, None, 1.0, 0,
                                                 torch.float32, "none", [], "")
        out = acc                                   # rescaled in place
    else:
        acc = torch._int_mm(xq, weight.t())
        out = torch.empty(M, N, dtype=torch.float32)
    _C.dequantize(acc.numpy(), x_scale.numpy(), w_scale.detach().contiguous().numpy(),
                  None if bias is None else bias.detach().contiguous().numpy(), out.numpy())
    return out.view(*lead, N)


_rotary_cache: dict = {}
_rotary_lock = threading.Lock()


def _rotary_tables(frames: int, head_dim: int) -> tuple:
    """float32 cos, sin [>= frames, head_dim // 2] of `rotary_tables`, kept between calls
    (row t depends only on t, so the tables of the longest sequence so far serve all)."""
    tables = _rotary_cache.get(head_dim)
    if tables is None or tables[0].shape[0] < frames:
        with _rotary_lock:
            tables = _rotary_cache.get(head_dim)
            if tables is None or tables[0].shape[0] < frames:
                longest = max(frames, 0 if tables is None else tables[0].shape[0])
                tables = rotary_tables(longest, head_dim, torch.device("cpu"), torch.float32)
                _rotary_cache[head_dim] = tables
    return tables


def prepare_capture(max_frames: int, head_dim: int, device) -> None:
    if torch.device(device).type == "cpu" and head_dim % 2 == 0:
        _rotary_tables(max_frames, head_dim)


def rotary_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The C++ counterpart of `rotary_attention_reference` (same arguments and result, bit
    for bit): q and k are rotated in one C++ pass each, from their strided views of the
    QKV output into contiguous tensors, with tables kept between calls; the attention
    itself is torch's `scaled_dot_product_attention`, as in the reference. float32 runs
    in C++; other dtypes and tensors that need gradients go to the reference."""
    if (q.dtype != torch.float32 or k.dtype != torch.float32 or q.dim() != 4
            or k.shape != q.shape or q.shape[-1] % 2 or _needs_grad(q, k, v)):
        return rotary_attention_reference(q, k, v, key_mask)
    _on_cpu(q=q, k=k, v=v, key_mask=key_mask)
    cos, sin = _rotary_tables(q.shape[2], q.shape[3])
    qr, kr = torch.empty(q.shape), torch.empty(k.shape)
    _C.rotate(q.detach().numpy(), cos.numpy(), sin.numpy(), qr.numpy())
    _C.rotate(k.detach().numpy(), cos.numpy(), sin.numpy(), kr.numpy())
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)


def ops():
    """The Ops of backend "cpp": the C++ kernels where they are the fastest, the references
    elsewhere."""
    from dataclasses import replace

    from soundstorm.kernels.dispatch import TORCH_OPS
    # residual_norm stays the reference: torch's vectorised add and LayerNorm beat the C++
    # kernel (which accumulates the moments in float64) at these widths, 0.85x on one thread
    # and 0.5x on two at the small preset (bench/bench_cpp.py); the kernel is kept and tested.
    return replace(TORCH_OPS, name="cpp", masked_resample=masked_resample,
                   summed_embedding=summed_embedding, conv_module=conv_module, int8_linear=int8_linear, int8_prepack=int8_prepack,
                   rotary_attention=rotary_attention, prepare_capture=prepare_capture)
