"""Data-parallel training under `torchrun`: process group from RANK / WORLD_SIZE / LOCAL_RANK, nccl on CUDA,
gloo on CPU. A plain `python -m mae.cli train` is world size 1 and never touches torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .core.errors import MAEError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # we created the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        message = f"Environment variable {name}={value!r} is not an integer."
        raise MAEError(message, hint="launch with torchrun") from exc


def resolve_device(requested: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """The torch device of `--device` (training and the torch engine): cpu, cuda, cuda:N, or "auto" / None for the
    GPU when there is one, else the CPU. With `local_rank` (a process under torchrun) a GPU without an index is this
    process's; an explicit CUDA device without a GPU, or any other kind of device, is an error."""
    if requested in (None, "", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda") if local_rank is None else torch.device("cuda", local_rank)
    try:
        device = torch.device(requested)
    except RuntimeError as exc:  # not a device string torch knows
        raise MAEError(f"Unknown torch device {requested!r}", hint="use cpu, cuda, cuda:N or auto") from exc
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise MAEError(f"Unknown torch device {requested!r}", hint="use cpu, cuda, cuda:N or auto")
    if not torch.cuda.is_available():
        raise MAEError(f"--device {requested} was asked for, but PyTorch sees no CUDA GPU.", hint="use --device cpu")
    return torch.device("cuda", local_rank) if device.index is None and local_rank is not None else device


def init_distributed(requested_device: str | None = None) -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(requested_device, local_rank)
    if world_size <= 1:
        return DistInfo(0, 1, 0, device, initialized_here=False)
    if not 0 <= rank < world_size:
        raise MAEError(f"RANK {rank} is outside WORLD_SIZE {world_size}.", hint="launch with torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    initialized_here = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world_size)
        initialized_here = True
    return DistInfo(rank, world_size, local_rank, device, initialized_here)


def cleanup(info: DistInfo) -> None:
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    """Sum a few floats over ranks (one small collective); the identity in a single process."""
    if not info.enabled:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not info.enabled:
        return [obj]
    gathered: list[Any] = [None] * info.world_size
    dist.all_gather_object(gathered, obj)
    return gathered
