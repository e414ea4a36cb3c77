"""The one dispatch point: a backend name -> the set of fused-op implementations.

The model and the decoder call ops only through an `Ops` object obtained here, chosen
once when an engine is built. A backend asked for by name that cannot run here raises;
nothing falls back silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from soundstorm.kernels.attention import rotary_attention_reference
from soundstorm.kernels.conv_module import conv_module_reference
from soundstorm.kernels.embedding import summed_embedding_reference
from soundstorm.kernels.int8_linear import int8_linear_reference, no_prepack
from soundstorm.kernels.resample import masked_resample_reference
from soundstorm.kernels.residual_norm import residual_norm_reference

# Backends the project knows of. "auto" picks triton on CUDA, cpp on the CPU when the C++
# extension is built, torch otherwise.
KNOWN_BACKENDS = ("torch", "triton", "cpp")
# Whole-decode engines, not sets of torch ops: Engine(..., backend="xla") builds an XlaEngine.
ENGINE_BACKENDS = ("xla",)


def _nothing_to_prepare(max_frames: int, head_dim: int, device: torch.device) -> None:
    return None


@dataclass(frozen=True)
class Ops:
    """The fused ops of one backend (signatures: see each `*_reference`).

    `prepare_capture(max_frames, head_dim, device)` builds whatever the ops keep between
    calls (e.g. rotary tables) for sequences up to `max_frames`, before CUDA graphs are
    captured: inside a graph the ops then only read it."""
    name: str
    summed_embedding: Callable[..., torch.Tensor]
    rotary_attention: Callable[..., torch.Tensor]
    conv_module: Callable[..., torch.Tensor]
    masked_resample: Callable[..., torch.Tensor]
    residual_norm: Callable[..., tuple] = residual_norm_reference
    # the int8 linear layers of `quantize="int8"` engines (`soundstorm.engine.quantize`):
    # int8_prepack(weight) runs once per layer at load, its result is int8_linear's `packed`
    int8_linear: Callable[..., torch.Tensor] = int8_linear_reference
    int8_prepack: Callable[[torch.Tensor], object] = no_prepack
    prepare_capture: Callable[[int, int, torch.device], object] = _nothing_to_prepare


TORCH_OPS = Ops(
    name="torch",
    summed_embedding=summed_embedding_reference,
    rotary_attention=rotary_attention_reference,
    conv_module=conv_module_reference,
    masked_resample=masked_resample_reference,
)


def _triton_usable(device: Optional[torch.device]) -> bool:
    """Whether the Triton kernels can run on `device` here (without importing them when
    the answer is plainly no)."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return False
    on_cuda = device is not None and torch.device(device).type == "cuda"
    if on_cuda and torch.cuda.is_available():
        return True
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The Triton kernels compute in float32 from these storage dtypes.
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def available_backends(device: Optional[torch.device] = None,
                       dtype: Optional[torch.dtype] = None) -> tuple[str, ...]:
    """Backends that can run on `device` (with weights and activations of `dtype`, if
    given) in this installation, fastest first (on CPU: cpp when the C++ extension is
    built, then torch; the interpreted Triton kernels are far slower, so they come last)."""
    on_cuda = device is not None and torch.device(device).type == "cuda"
    on_cpu = device is None or torch.device(device).type == "cpu"
    backends = ("cpp", "torch") if on_cpu and _cpp_built() else ("torch",)
    if (dtype is None or dtype in TRITON_DTYPES) and _triton_usable(device):
        return ("triton",) + backends if on_cuda else backends + ("triton",)
    return backends


def _cpp_built() -> bool:
    """Whether the C++ extension of backend "cpp" imports here."""
    try:
        from soundstorm.kernels import cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_ops(device: Optional[torch.device]) -> Ops:
    try:
        from soundstorm.kernels import triton as triton_backend
    except ImportError as e:
        raise RuntimeError(f"backend 'triton' is not available: {e}") from e
    return triton_backend.ops_for(device)


def _cpp_ops() -> Ops:
    try:
        from soundstorm.kernels import cpp as cpp_backend
    except ImportError as e:
        raise RuntimeError(f"backend 'cpp' is not available: the C++ extension "
                           f"soundstorm.kernels._C does not import ({e}); reinstall the "
                           f"package on a machine with a C++ compiler") from e
    return cpp_backend.ops()


def get_ops(backend: str = "auto", device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> Ops:
    """Resolve a backend name ("auto" = fastest available on `device` for `dtype`) to
    its ops."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {backend!r}")
    if backend == "auto":
        backend = available_backends(device, dtype)[0]
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        if dtype is not None and dtype not in TRITON_DTYPES:
            raise ValueError(f"backend 'triton' runs float32, float16 and bfloat16 models, "
                             f"got dtype {dtype}; use backend='torch' for {dtype}")
        return _triton_ops(device)
    if backend == "cpp":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"backend 'cpp' runs on the CPU, not on {device}")
        return _cpp_ops()
    if backend in ENGINE_BACKENDS:
        raise ValueError(f"backend {backend!r} runs the whole decode, not torch ops: use "
                         f"Engine(..., backend={backend!r}) (soundstorm.engine.xla.XlaEngine)")
    raise ValueError(f"unknown backend {backend!r}; choose 'auto' or one of "
                     f"{list(KNOWN_BACKENDS + ENGINE_BACKENDS)}")
