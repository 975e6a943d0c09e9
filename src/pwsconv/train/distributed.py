"""Multi-process data-parallel training (torch.distributed), launched by ``torchrun``.

    torchrun --nproc_per_node=4 -m pwsconv.cli train --config cfg.yaml

``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (set by torchrun) select the process; the backend is NCCL on GPUs and gloo on
CPU. ``batch_size`` is the *global* batch: each process takes an equal share of every batch, and DDP averages the
gradients, so a PWS/GN/plain network computes the same update as one process with the whole batch.

BatchNorm is the exception: each process normalizes with the statistics of its own share of the batch, so the update
differs from single-process training (and BN degrades as the per-process batch shrinks). ``sync_bn: true`` converts
BatchNorm to ``nn.SyncBatchNorm``, which all-reduces the statistics every forward (one more communication per BN
layer; torch implements it for CUDA devices only, so it is refused on CPU). PWS normalizes the *filters*, which are identical on every process, so it needs no SyncBN and no
communication beyond DDP's gradient all-reduce.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "all_reduce_sum", "barrier"]


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False   # this process called init_process_group (so it also tears it down)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    v = os.environ.get(name)
    try:
        return int(v) if v not in (None, "") else default
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {v!r}") from None


def setup_distributed(device_type: str) -> DistInfo:
    """Join the process group described by the torchrun environment (no-op for a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", dist.get_rank()), False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, True)


def cleanup_distributed(info: DistInfo, *, synchronize: bool = False) -> None:
    """Tear down the process group this process made. ``synchronize`` (a run that ended normally): wait for every
    process first, so that none destroys its gloo connections while another still uses them (a rank could otherwise
    abort at exit: "terminate called without an active exception")."""
    if info.initialized_here and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
