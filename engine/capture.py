"""What may run inside a captured CUDA graph, checked op by op.

A CUDA graph records the kernels a step launches and replays them later with no Python
and no host in the loop. A step is only correct under capture if it never

- waits for the device to hand a value to the host (`.item()`, `bool(t)`, `.tolist()`,
  `nonzero`, `masked_select`, `unique`, ... : all end in `_local_scalar_dense` or a
  data-dependent output shape);
- copies between host and device (a `.cpu()`, a `.to("cuda")` of a host tensor, a
  Python value turned into a device tensor with `torch.tensor`/`torch.as_tensor`): during
  capture such a copy is illegal, and a host tensor read by a kernel would be baked into
  the graph as it was at capture time;
- makes a tensor from Python data (`lift_fresh`), or allocates on another device.

`CaptureGuard` is a `TorchDispatchMode` that raises `CaptureViolation` on the first such
op, naming it. The project's own custom ops (`soundstorm::*`, the Triton launchers) are
opened up: their Python bodies run under the guard too, so a sync hidden in a launcher
is caught as well. Where it shows what:

- on CUDA tensors: everything above, as it would happen under capture;
- on CPU tensors: syncs and tensors made from Python data (`lift_fresh`); a
  host-to-device copy cannot be told from a host op there;
- on the `meta` device: any host tensor a step reads (a constant kept on the CPU, a
  parameter left behind), which on CUDA would be a copy per step.

`check_step_modes(runner, buffers, modes)` runs a runner's step function for each mode
under the guard; the tests run it on CPU and meta engines, `make gpu-check` on CUDA.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

aten = torch.ops.aten

# Ops that synchronise with the host: a value or a shape that depends on device data.
SYNC_OPS = {
    aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.nonzero,
    aten.masked_select, aten._unique, aten._unique2, aten.unique_dim,
    aten.unique_consecutive, aten.unique_dim_consecutive, aten.bincount,
    aten.histc, aten._assert_scalar, aten.allclose,
}
# Ops that turn Python data into a tensor (torch.tensor(...), torch.as_tensor(value)).
HOST_VALUE_OPS = {aten.lift_fresh, aten.lift_fresh_copy}


class CaptureViolation(RuntimeError):
    """An op that a CUDA graph cannot capture (or would capture wrongly) ran in a step."""


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class CaptureGuard(TorchDispatchMode):
    """Raise `CaptureViolation` on any host sync, host/device copy, tensor made from a
    Python value, or tensor on another device than `device`, in the ops run inside it.
    `ops` counts the ops that passed (a check that checked nothing is worth nothing)."""

    # Triton launches inside the project's ops reach the guard as a higher-order op.
    supports_higher_order_operators = True

    def __init__(self, device, what: str = "the captured step"):
        super().__init__()
        self.device = torch.device(device)
        self.what = what
        self.ops = 0

    def _fail(self, func, why: str) -> None:
        raise CaptureViolation(f"{self.what} runs {func}, which {why}; it cannot be captured "
                               "in a CUDA graph")

    def _check_devices(self, func, args, kwargs) -> None:
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and not _same_device(leaf.device, self.device):
                self._fail(func, f"reads a tensor on {leaf.device} (shape "
                           f"{tuple(leaf.shape)}) while the step runs on {self.device}: a "
                           "copy between host and device")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        body = _custom_op_body(func)
        if body is not None:
            with self:                        # its torch ops come back through the guard
                return body(*args, **kwargs)
        if isinstance(func, torch._ops.HigherOrderOperator):
            # A Triton kernel launch: its tensors must be on the device, like any op's.
            self._check_devices(func, args, kwargs)
            self.ops += 1
            if self.device.type == "meta":
                return None                    # nothing to run on metadata
            return func(*args, **kwargs)
        packet = func.overloadpacket
        if packet in SYNC_OPS or func in SYNC_OPS:
            self._fail(func, "waits for the device to return a value or shape to the host")
        if packet in HOST_VALUE_OPS:
            self._fail(func, "makes a tensor from Python data on the host (torch.tensor / "
                       "torch.as_tensor of a Python value), to be copied to the device")
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                   for i in indices):
                self._fail(func, "indexes with a boolean mask (its nonzero() waits for the "
                           "device to return the number of selected elements)")
        self._check_devices(func, args, kwargs)
        target = kwargs.get("device")
        if target is not None and not _same_device(torch.device(target), self.device):
            self._fail(func, f"puts its result on {target}, not on {self.device}")
        self.ops += 1
        return func(*args, **kwargs)


def _custom_op_body(func):
    """The Python function behind one of the project's custom ops, or None."""
    name = getattr(func, "name", None)
    if name is None:
        return None
    name = name().split(".")[0]
    if not name.startswith("soundstorm::"):
        return None
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(name)
    return None if opdef is None else (opdef._abstract_fn or opdef._init_fn)


def check_capture_safe(fn, device, what: Optional[str] = None):
    """Run `fn()` under a `CaptureGuard` for `device`; returns (its result, ops checked)."""
    guard = CaptureGuard(device, what or getattr(fn, "__name__", "the step"))
    with guard:
        result = fn()
    return result, guard.ops


def check_step_modes(runner, buffers, modes: Iterable) -> dict:
    """Run `runner._step(buffers, mode)` for every mode under a `CaptureGuard` on the
    runner's device; raises `CaptureViolation` naming the mode and the op, else returns
    {mode: ops checked}. The step rewrites `buffers.tokens`: use scratch buffers."""
    checked = {}
    with runner.lock, runner.device_guard(), torch.no_grad():
        for mode in modes:
            what = f"the step in mode {mode} of bucket {tuple(buffers.tokens.shape[:2])}"
            _, checked[mode] = check_capture_safe(lambda: runner._step(buffers, mode),
                                                  runner.device, what)
    return checked
