"""Running on several processes with torch.distributed, as torchrun launches them.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK in each process (cdiff.torchrun reads them); without
them the run is one process. Every process trains on its own share of the data (cdiff.train.data) with
DistributedDataParallel averaging the gradients; only rank 0 writes checkpoints and logs.
Backend: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cdiff.torchrun import launch


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _device(choice: str, local_rank: int) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device = 'cuda' but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device: str = "auto") -> World:
    """The process group from torchrun's environment (or a world of one); the device to use."""
    here = launch()
    torch_device = _device(device, here.local_rank)
    if here.world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return World(rank=here.rank, size=here.world_size, device=torch_device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """``module`` in DistributedDataParallel when there are several processes, else itself."""
    if world.size == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(modules, skip: bool):
    """Inside: the backward passes of DDP ``modules`` do not average gradients (accumulation)."""
    if not skip:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for module in modules:
        if hasattr(module, "no_sync"):
            stack.enter_context(module.no_sync())
    return stack


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """The sum (or max) of ``tensor`` over the processes, in place; itself in a world of one."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, world: World):
    """Rank 0's ``value`` in every process (for errors and decisions only rank 0 can make)."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
