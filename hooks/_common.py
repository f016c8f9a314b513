"""What every hook repeats, in one place.

- ``warn_once``: warn about a condition once per hook (``DifficultyTracker``,
  ``PerExampleGradNorms``, ``GradientNoiseScale`` and both framework adapters keep their own
  record of what they said and pass it in);
- ``first_tensor``: the first tensor of a model's (or a module's) output or of a batch
  (``RepresentationProbe``'s site outputs, the Hugging Face and Lightning adapters);
- ``unwrap_ddp`` / ``unwrap``: the plain module behind ``torch.compile`` and DDP / DataParallel
  (``RepresentationProbe``, ``GradientNoiseScale``, which also needs the DDP wrapper for its
  communication hook);
- ``run_writer``: the run writer behind the Monitor's run-store sink, where hooks save arrays
  (``DifficultyTracker``, ``RepresentationProbe``).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.nn as nn


def warn_once(seen: set | list, key: Any, message: str, category: type[Warning] = RuntimeWarning,
              stacklevel: int = 1) -> bool:
    """Warn ``message`` unless ``key`` is in ``seen`` already, then remember ``key`` there.

    ``seen``: a set, or a list (keys in the order they were first warned about, e.g. a hook's
    ``notices``). ``stacklevel`` counts as for ``warnings.warn`` called where ``warn_once`` is
    called. Returns whether it warned."""
    if key in seen:
        return False
    if isinstance(seen, list):
        seen.append(key)
    else:
        seen.add(key)
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    return True


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor in ``obj``, depth-first: ``obj`` itself, else the first one found among a
    tuple's or list's items, a dict's values (a Hugging Face ``ModelOutput`` is a dict of its
    fields that are set) or ``obj.to_tuple()``; None when there is none."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        obj = list(obj.values())
    elif hasattr(obj, "to_tuple"):
        obj = obj.to_tuple()
    if isinstance(obj, (list, tuple)):
        for x in obj:
            t = first_tensor(x)
            if t is not None:
                return t
    return None


def unwrap_ddp(model: nn.Module) -> tuple[nn.Module, Optional[nn.Module]]:
    """(the plain module behind torch.compile (``_orig_mod``) and DDP / DataParallel (``module``),
    the outermost DistributedDataParallel wrapper met on the way or None)."""
    ddp = None
    for _ in range(4):
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            if ddp is None and isinstance(model, nn.parallel.DistributedDataParallel):
                ddp = model
            model = model.module
        else:
            break
    return model, ddp


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (``_orig_mod``) and DDP / DataParallel (``module``)."""
    return unwrap_ddp(model)[0]


def run_writer(monitor) -> Any:
    """The run writer (a ``diagnostics.runs.RunWriter``) of the Monitor's run-store sink: the
    ``writer`` of its first sink that has one able to ``save_array``; None when there is none
    (no Monitor, or sinks that keep no run directory)."""
    for sink in getattr(monitor, "sinks", []):
        writer = getattr(sink, "writer", None)
        if hasattr(writer, "save_array"):
            return writer
    return None
