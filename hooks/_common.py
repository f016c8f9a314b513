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
  (``DifficultyTracker``, ``RepresentationProbe``);
- ``check_domains`` / ``domain_indices``: the ``domains=`` of ``on_backward_end``, one per example,
  integer indices or names (``Monitor.on_backward_end`` checks it, the framework adapters too; each
  hook that groups by domain maps it through its own ``domain_names``);
- ``norm_dtype``: the dtype gradient norms are taken in (``GradientNoiseScale``, ``hooks._distributed``).
"""

from __future__ import annotations

import numbers
import warnings
from typing import Any, Optional

import numpy as np
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


# -- domains= : integer indices or names, one per example ------------------------------------------

_HELP = ("domains= must hold one domain per example: integer indices >= 0 (a 1-d integer tensor, "
           "array or list) or names (a list / tuple / array of str)")


def check_domains(domains, n: int | None = None, where: str = "domains=") -> None:
    """Raise TypeError / ValueError (naming ``where``) unless ``domains`` is None or one domain per
    example: integer indices >= 0 or names. ``n``: the number of examples, checked when given.
    A tensor's values are checked only on the CPU (elsewhere that would wait for the device:
    its dtype and shape are checked, a negative index is reported by the hook that reads it)."""
    if domains is None:
        return
    help_ = _HELP.replace("domains=", where, 1)
    if isinstance(domains, (str, bytes)):
        raise TypeError(f"{help_}; got the single string {domains!r} (pass a list: [{domains!r}] * B)")
    if isinstance(domains, torch.Tensor):
        if domains.dim() != 1:
            raise ValueError(f"{help_}; got a tensor of shape {tuple(domains.shape)}")
        if domains.dtype == torch.bool or domains.is_floating_point() or domains.is_complex():
            raise TypeError(f"{help_}; got a {str(domains.dtype).replace('torch.', '')} tensor")
        if domains.device.type == "cpu" and domains.numel() and int(domains.min()) < 0:
            raise ValueError(f"{help_}; got a negative index {int(domains.min())}")
        length = domains.shape[0]
    else:
        arr = domains if isinstance(domains, np.ndarray) else None
        if arr is not None and arr.ndim != 1:
            raise ValueError(f"{help_}; got an array of shape {arr.shape}")
        try:
            items = list(domains)
        except TypeError:
            raise TypeError(f"{help_}; got {type(domains).__name__}") from None
        names = [isinstance(x, str) for x in items]
        ints = [isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_)) for x in items]
        if items and not (all(names) or all(ints)):
            bad = [x for x, a, b in zip(items, names, ints) if not (a or b)]
            what = f"{bad[0]!r} ({type(bad[0]).__name__})" if bad else "a mix of names and indices"
            raise TypeError(f"{help_}; got a {type(domains).__name__} holding {what}")
        if items and all(ints) and min(int(x) for x in items) < 0:
            raise ValueError(f"{help_}; got a negative index {min(int(x) for x in items)}")
        length = len(items)
    if n is not None and length != n:
        raise ValueError(f"{where} has {length} entries but the micro-batch has {n} examples; "
                         "pass one domain per example")


def domain_indices(domains, names: list[str]):
    """``domains`` as integer indices into ``names``: a tensor of indices is returned as it is (no
    copy, no device sync), a list / array of indices as an int64 array, names as an int64 array of
    their positions in ``names`` -- a name not there yet is appended (order of first appearance),
    so a hook's ``domain_names`` is its registry. None stays None."""
    if domains is None or isinstance(domains, torch.Tensor):
        return domains
    items = list(domains)
    if items and isinstance(items[0], str):
        pos = {d: i for i, d in enumerate(names)}
        out = np.empty(len(items), dtype=np.int64)
        for k, d in enumerate(items):
            i = pos.get(d)
            if i is None:
                i = pos[d] = len(names)
                names.append(d)
            out[k] = i
        return out
    return np.asarray(items, dtype=np.int64).reshape(-1)


def domain_name(names: list[str], i: int) -> str:
    """The name of domain index ``i`` (``names`` extended with ``domain<k>`` up to it)."""
    while i >= len(names):
        names.append(f"domain{len(names)}")
    return names[i]


def norm_dtype(grads) -> torch.dtype:
    """The dtype to take gradient norms in: float32 (also for bf16/fp16 gradients), float64 when a gradient
    is float64 (a norm may not narrow its input's dtype); callers keep the norms in float32."""
    return torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
