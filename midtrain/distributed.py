"""Processes and devices of the built-in loop: the device a config asks for, the process group under
``torchrun``, the wrapper the loop runs forward and backward (DDP, or FSDP2's ``fully_shard``), and
reductions over ranks.

Under ``torchrun`` the loop runs DDP by default (gloo on CPU, NCCL on GPU): each optimizer step's global
batch is split into contiguous per-rank shards, gradients are synchronised only on the last micro-batch
(``no_sync`` before), and only rank 0 writes the run directory. With ``parallelism = "fsdp"`` the model is
sharded instead (``shard_model``: ``fully_shard`` on each transformer block, then on the root, before the
optimizer is built); the data split and the run directory are the same, gradients are reduce-scattered
on the last micro-batch only (``set_requires_gradient_sync(False)`` before, ``grad_sync``), and on CUDA
with bf16 the parameters are all-gathered in bf16 and the gradients reduced in fp32
(``MixedPrecisionPolicy``). Checkpoints of a sharded run are written with torch's distributed checkpoint
(``midtrain.checkpoint``).
"""

from __future__ import annotations

import contextlib
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


def sharded(cfg: TrainConfig, world: int) -> bool:
    """Whether this run shards its model with FSDP2: ``parallelism = "fsdp"`` and several processes."""
    return cfg.parallelism == "fsdp" and world > 1


def shard_model(model, cfg: TrainConfig, device: torch.device, world: int):
    """``fully_shard`` each transformer block, then the root (FSDP2), when the run is sharded; the model
    itself otherwise. In place (the parameters become DTensor shards): build the optimizer after it.
    On CUDA with bf16, parameters are all-gathered in bf16 and gradients reduced in fp32."""
    if not sharded(cfg, world):
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kw = {}
    if device.type == "cuda" and cfg.dtype in ("auto", "bfloat16"):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def grad_sync(fwd_model, sync: bool, world: int):
    """The context of one micro-batch's forward and backward: gradients are reduced over ranks only when
    ``sync`` (the last micro-batch of a step): DDP's ``no_sync`` before it, FSDP2's
    ``set_requires_gradient_sync(False)``."""
    if world <= 1:
        return contextlib.nullcontext()
    if hasattr(fwd_model, "set_requires_gradient_sync"):  # an FSDP2 module
        fwd_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else fwd_model.no_sync()


def forward_model(model, cfg: TrainConfig, device: torch.device, world: int):
    """What the loop runs forward and backward: the model, compiled if asked (CUDA only), in DDP under
    torchrun, or the model itself when it is sharded (``shard_model`` made it an FSDP2 module)."""
    fwd_model = torch.compile(model) if (cfg.compile and device.type == "cuda") else model
    if world > 1 and not sharded(cfg, world):
        from torch.nn.parallel import DistributedDataParallel as DDP

        # no buffer broadcast: the GPT's only buffers are the RoPE cos/sin cache, rebuilt from the config on
        # each rank; a probe on rank 0 at a longer sequence grows it there only, and DDP's broadcast of
        # buffers of different sizes breaks the next forward (gloo: "Received data size doesn't match")
        fwd_model = DDP(fwd_model, device_ids=[device.index] if device.type == "cuda" else None,
                        broadcast_buffers=False)
    return fwd_model


def mean_over_ranks(x: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # AVG is NCCL-only: SUM then divide
    return x / world


def total_norm(x: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: the full value of a DTensor (FSDP2's norms are replicated)."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x
