"""Processes and devices of the built-in loop: the device a config asks for, the process group under
``torchrun``, the wrapper the loop runs forward and backward (DDP), and reductions over ranks.

Under ``torchrun`` the loop runs DDP (gloo on CPU, NCCL on GPU): each optimizer step's global batch is
split into contiguous per-rank shards, gradients are synchronised only on the last micro-batch
(``no_sync`` before), and only rank 0 writes the run directory.
"""

from __future__ import annotations

import os

import torch

from midtrain.config import ConfigError, TrainConfig


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was asked for but CUDA is not available on this machine; use device = \"cpu\" or \"auto\".")
    return dev


def set_up_processes(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device) of this process: under torchrun, each rank on its own GPU."""
    rank, world, local_rank = dist_info()
    device = resolve_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return rank, world, device


def dist_info() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("MIDTRAIN_DIST_BACKEND", "") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))


def forward_model(model, cfg: TrainConfig, device: torch.device, world: int):
    """What the loop runs forward and backward: the model, compiled if asked (CUDA only), in DDP under torchrun."""
    fwd_model = torch.compile(model) if (cfg.compile and device.type == "cuda") else model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None)
    return fwd_model


def mean_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # AVG is NCCL-only: SUM then divide
    return x / world
