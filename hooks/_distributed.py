"""What the hooks need under sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``).

- ``is_sharded``: whether a model (or one of its modules) is an FSDP2 module; the Monitor detects
  ``sharded`` with it.
- ``local_sq_norms``: per-parameter squared norms of this rank's part of each gradient (a DTensor's
  local shard; a plain tensor whole): summed over the ranks they are the norms of the full gradients.
- ``reduce_small_big``: the one all-reduce of a GNS measurement: the mean over ranks of the local
  micro-batch (or per-example) norms, and, sharded, the sum over ranks of the shards' norms of ``.grad``.
- ``UnshardedGradHooks``: ``Tensor.register_hook`` on the parameters FSDP2 all-gathers for a forward and
  backward (``GradientNoiseScale`` micro-batch mode): they see this rank's local, not yet reduced
  gradient of each backward, as the hooks on ordinary parameters do. FSDP2 swaps the unsharded
  parameters into their modules before each forward (one object per parameter, reused after the first
  all-gather), so a forward pre-hook finds them there and hooks each once.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from hooks._common import norm_dtype


def is_sharded(model) -> bool:
    """True when ``model`` or one of its modules is an FSDP2 module (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return False
    return model is not None and any(isinstance(m, FSDPModule) for m in model.modules())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def local_sq_norms(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """Squared norms (float32) of this rank's part of each gradient: a DTensor's local shard."""
    locs = [_local(g) for g in grads]
    return [torch.linalg.vector_norm(g, dtype=norm_dtype([g])).float().square() for g in locs]


def reduce_small_big(small: torch.Tensor, big: torch.Tensor, world: int, sharded: bool, group=None):
    """(mean over ranks of ``small``, ``big`` summed over ranks when ``sharded`` else as it is), with
    one all-reduce (SUM: AVG is NCCL-only)."""
    import torch.distributed as dist

    if not sharded:
        small = small.contiguous()
        dist.all_reduce(small, group=group)
        return small / world, big
    both = torch.stack([small / world, big])
    dist.all_reduce(both, group=group)
    return both[0], both[1]


class UnshardedGradHooks:
    """``make_hook(i)`` registered (once) on the unsharded parameter of every trainable parameter whose
    name is in ``index`` (name -> i), as FSDP2 puts it into its module before a forward."""

    def __init__(self, model: nn.Module, index: dict[str, int], make_hook: Callable[[int], Callable]):
        self.index, self.make_hook = index, make_hook
        self._seen: set[int] = set()
        self._grad_handles: list = []
        self._pre_handles: list = []
        for mod_name, mod in model.named_modules():
            names = [n for n, _ in mod.named_parameters(recurse=False)]
            if names:
                prefix = f"{mod_name}." if mod_name else ""
                self._pre_handles.append(mod.register_forward_pre_hook(self._pre_hook(prefix)))

    def _pre_hook(self, prefix: str):
        def pre(module, args):
            for n, p in module._parameters.items():
                if p is None or not p.requires_grad or hasattr(p, "to_local") or id(p) in self._seen:
                    continue  # a DTensor is a shard: not the parameter the backward sees
                i = self.index.get(prefix + n)
                if i is not None:
                    self._seen.add(id(p))
                    self._grad_handles.append(p.register_hook(self.make_hook(i)))
            return None

        return pre

    def remove(self) -> None:
        for h in self._pre_handles + self._grad_handles:
            h.remove()
        self._pre_handles, self._grad_handles, self._seen = [], [], set()
