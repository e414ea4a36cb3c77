"""Process-group set-up for `torchrun` launches (one process per GPU, or CPU processes).

`torchrun` sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them
the run is a single process and nothing is initialised. NCCL is used on GPUs, gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an int") from None


def launch_rank() -> int:
    """This process's rank in a torchrun launch (RANK), 0 outside one."""
    return _env_int("RANK", 0)


def resolve_device(device: str, local_rank: int) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when a GPU is visible, else cpu."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device = {device!r} but no CUDA GPU is available here")
        if d.index is None:
            d = torch.device(f"cuda:{local_rank}")
        if d.index >= torch.cuda.device_count():
            raise ValueError(f"device = {d} but only {torch.cuda.device_count()} GPU(s) are visible")
    return d


def setup(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (if any) and pick this rank's device."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"inconsistent launch: RANK={rank}, WORLD_SIZE={world}")
    dev = resolve_device(device, local)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place; a no-op for a single process."""
    if info.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_int(value: int, info: DistInfo) -> int:
    """Rank 0's `value`, returned on every rank (the other ranks' `value` is ignored); a
    no-op for a single process. Every rank must call this.

    It travels as an int64 tensor on this rank's device: the CPU for gloo, the rank's GPU
    for NCCL. Nothing is pickled.
    """
    if not info.distributed:
        return value
    t = torch.tensor([value if info.is_main else 0], dtype=torch.int64, device=info.device)
    dist.broadcast(t, src=0)
    return int(t.item())


def failed_ranks(failed: bool, info: DistInfo) -> List[int]:
    """The ranks that passed failed=True, known to every rank; [] or [0] for a single
    process. Every rank must call this, so that no rank waits for one that gave up."""
    if not info.distributed:
        return [0] if failed else []
    flags = torch.zeros(info.world_size, dtype=torch.int64, device=info.device)
    flags[info.rank] = int(failed)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return [rank for rank, flag in enumerate(flags.tolist()) if flag]


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def teardown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
