"""Imported first by the Triton test modules, before any kernel module: on a machine
without a GPU the kernels run on CPU tensors in Triton's interpreter, which has to be
chosen in the environment before `soundstorm.kernels.triton` is imported. With a GPU
(and TRITON_INTERPRET unset) the same tests run the compiled kernels on CUDA."""

import os

import pytest
import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    DEVICE = torch.device("cuda")
else:
    os.environ["TRITON_INTERPRET"] = "1"
    DEVICE = torch.device("cpu")

# Only now: triton.language decides at import whether its own helpers are interpreted.
pytest.importorskip("triton")

import soundstorm.kernels.triton as triton_backend  # noqa: E402

assert triton_backend.INTERPRET == (DEVICE.type == "cpu"), (
    "soundstorm.kernels.triton was imported before TRITON_INTERPRET was set")

# Per-dtype tolerance of the kernel against the float32 reference, on top of twice the
# error PyTorch itself makes in that dtype (as flash-attention's tests do).
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def assert_close_to_reference(out: torch.Tensor, ref32: torch.Tensor,
                              ref_low: torch.Tensor) -> None:
    """`out` (kernel, any dtype) may be at most twice as far from the float32 reference
    as PyTorch's own result in `out`'s dtype, plus a per-dtype tolerance."""
    assert out.shape == ref32.shape and out.dtype == ref_low.dtype
    err = (out.float() - ref32.float()).abs().max().item()
    torch_err = (ref_low.float() - ref32.float()).abs().max().item()
    assert err <= 2 * torch_err + ATOL[out.dtype], (err, torch_err)
