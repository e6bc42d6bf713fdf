"""Process-group set-up for one process, `torchrun` on one node, or many nodes through c10d rendezvous.

torchrun exports RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT to
every worker; without them the run is a single process and no process group is
created. CUDA runs use NCCL with one GPU per process (cuda:LOCAL_RANK); CPU
runs use gloo, which is how CI exercises the distributed path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node; picks the GPU."""
    device: torch.device
    """The device this process trains on."""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group of more than one rank exists."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from error


def world_from_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without torchrun."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} must lie in [0, WORLD_SIZE={world_size}): launch with torchrun")
    return rank, world_size, local_rank


def select_device(kind: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK for kind "cuda" (made the current device), the CPU for "cpu"."""
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device='cuda' but CUDA is not available: pass --device cpu (or auto)")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(f"LOCAL_RANK={local_rank} but this node has {count} GPU(s): "
                         f"use torchrun --nproc_per_node={count} or fewer")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device_kind: str, timeout_minutes: float = 30.0) -> DistInfo:
    """Create the process group when launched by torchrun (nccl on CUDA, gloo on CPU) and pick the device.

    A single process (no WORLD_SIZE, or WORLD_SIZE=1) gets no process group.
    `timeout_minutes` bounds how long a collective waits for a stuck rank.
    """
    rank, world_size, local_rank = world_from_env()
    device = select_device(device_kind, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes), **kwargs)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op for one process)."""
    if info.distributed:
        if info.device.type == "cuda":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank, so all ranks start identical."""
    if not info.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


class HostFlagReducer:
    """Agrees on host-side booleans (e.g. "a stop signal arrived") across ranks without touching the GPU.

    Uses a gloo group (a second group beside NCCL on CUDA), so the per-step
    check is a tiny CPU collective, not a device sync. Any rank's True makes
    everyone's result True, so all ranks stop at the same step.
    """

    def __init__(self, info: DistInfo) -> None:
        self._group = None
        if info.distributed:
            self._group = dist.new_group(backend="gloo") if info.device.type == "cuda" else dist.group.WORLD
        self._flag = torch.zeros(1, dtype=torch.int32)

    def any(self, local: bool) -> bool:
        """True when `local` is True on at least one rank (a collective: every rank must call it)."""
        if self._group is None:
            return local
        self._flag.fill_(int(local))
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(self._flag.item())  # a CPU tensor: no device sync


def all_reduce_host(values: list[float], info: DistInfo, op: str = "sum") -> list[float]:
    """Reduce a few host floats over ranks ("sum", "min" or "max") on a CPU/device tensor; for log time only."""
    if not info.distributed:
        return list(values)
    device = info.device if info.device.type == "cuda" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()  # sync (log time only)


def gather_objects(obj: object, info: DistInfo) -> list[object] | None:
    """Every rank's `obj` in rank order on rank 0 (None on other ranks); for checkpoint time only."""
    if not info.distributed:
        return [obj]
    gathered: list[object] | None = [None] * info.world_size if info.is_main else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def broadcast_object(obj: object, info: DistInfo) -> object:
    """Rank 0's `obj` on every rank (one process: `obj`); for start-up decisions every rank must share."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
