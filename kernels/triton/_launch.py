"""What every launcher shares: where kernels may run, and dtype helpers."""

from __future__ import annotations

import contextlib

import torch
import triton

# Fixed when this package is imported, as `triton.jit` itself decides then whether a
# kernel is compiled or interpreted (triton.language's own helpers are decided when
# triton is first imported: set TRITON_INTERPRET before importing triton at all).
INTERPRET = bool(triton.knobs.runtime.interpret)


def _check_interpreter_consistency() -> None:
    from triton.runtime.interpreter import InterpretedFunction

    helpers_interpreted = isinstance(triton.language.standard.sigmoid, InterpretedFunction)
    if helpers_interpreted != INTERPRET:
        raise ImportError(
            "TRITON_INTERPRET changed between importing triton and importing "
            "soundstorm.kernels.triton; set it (or unset it) before triton is first imported")


_check_interpreter_consistency()

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_fake(x: torch.Tensor) -> bool:
    """Whether `x` only carries metadata (torch.compile / make_fx tracing)."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return _is_fake(x) or x.device.type == "meta"


def check_device(x, what: str) -> None:
    """Raise unless Triton kernels can run on `x` (a tensor or a device) in this process.
    Fake tensors pass on any device: tracing records the kernels without running them."""
    if isinstance(x, torch.Tensor):
        if is_fake(x):
            if INTERPRET:
                raise RuntimeError(
                    f"{what}: interpreted Triton kernels (TRITON_INTERPRET=1) cannot be "
                    "traced by torch.compile/make_fx; trace with compiled kernels instead")
            return
        x = x.device
    device = x
    if device.type == "cuda":
        if not torch.cuda.is_available() and not INTERPRET:
            raise RuntimeError(f"{what} was asked to run on {device}, but CUDA is not available")
        return
    if device.type == "cpu" and INTERPRET:
        return
    if device.type == "cpu":
        raise RuntimeError(
            f"{what} runs on CUDA tensors, got a tensor on cpu; to run the kernels on CPU "
            "in Triton's interpreter, set TRITON_INTERPRET=1 in the environment before "
            "soundstorm.kernels.triton is imported (slow: for tests)")
    raise RuntimeError(f"{what} runs on CUDA (or CPU under TRITON_INTERPRET=1), got {device}")


def launch_device(x: torch.Tensor):
    """Where a kernel writing `x` must launch: Triton launches on the current device and
    its current stream, so a real CUDA tensor's launch runs under
    `torch.cuda.device(x.device)` (an engine on cuda:1 works whatever the calling thread's
    current device). Nothing to do on CPU (the interpreter) or for fake and meta tensors
    (tracing records the launch without running it)."""
    if x.device.type == "cuda" and not is_fake(x):
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def check_float(name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def dot_in_input_dtype(dtype: torch.dtype) -> bool:
    """Whether a kernel's matrix products take their operands in the input dtype (tensor
    cores) rather than float32. The interpreter computes bfloat16 products wrongly, so
    there they run in float32 on the loaded, upcast values."""
    return not (INTERPRET and dtype == torch.bfloat16)


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))
