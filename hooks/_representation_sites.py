"""RepresentationProbe's activation sites: which modules to hook, and the model's readout head.

``layers`` may be None (``default_sites``), a module name or glob, a list of them, a callable
name -> bool, or a module type / tuple of types. (The probe unwraps torch.compile and DDP first:
``hooks._common.unwrap``.)
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Optional, Sequence, Union

import torch.nn as nn

# The names a model's final normalisation goes by (built-in GPT, GPT-2, LLaMA, OPT / NeoX), in the
# order they are tried: under the block stack's parent for ``default_sites``; at the top level, then
# under ``transformer`` (GPT-2) and ``model`` (LLaMA) for the readout head.
_FINAL_NORM_NAMES = ("final_norm", "ln_f", "norm", "final_layer_norm")

LayerSpec = Union[None, str, Sequence[str], Callable[[str], bool], type, tuple]


def default_sites(model: nn.Module) -> list[str]:
    """Every block's output plus the final norm.

    Built-in GPT: ``blocks.<i>.resid_post`` and ``final_norm``. Otherwise the children of the longest
    ``nn.ModuleList`` (the transformer blocks of HF-like models, e.g. ``transformer.h.<i>``) plus a
    sibling final norm (``_FINAL_NORM_NAMES``: ``final_norm``, ``ln_f``, ``norm``, ...); for an
    ``nn.Sequential`` or anything else, the top-level children.
    """
    if hasattr(model, "activation_sites"):
        sites = [s for s in model.activation_sites() if s.endswith(".resid_post")]
        return sites + (["final_norm"] if hasattr(model, "final_norm") else [])
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        name, ml = max(lists, key=lambda nm: len(nm[1]))
        sites = [f"{name}.{i}" if name else str(i) for i in range(len(ml))]
        norm = _final_norm(model, name.rsplit(".", 1)[0] if "." in name else "")
        return sites + ([norm] if norm is not None else [])
    return [name for name, _ in model.named_children()]


def _final_norm(model: nn.Module, parent: str = "") -> Optional[str]:
    """The full name of the first of ``_FINAL_NORM_NAMES`` that is a module under ``parent``, or None."""
    for norm in _FINAL_NORM_NAMES:
        full = f"{parent}.{norm}" if parent else norm
        try:
            model.get_submodule(full)
        except AttributeError:
            continue
        return full
    return None


def _resolve_sites(model: nn.Module, layers: LayerSpec) -> list[str]:
    named = dict(model.named_modules())
    named.pop("", None)
    if layers is None:
        return default_sites(model)
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        sites = [n for n, m in named.items() if isinstance(m, layers)]
    elif callable(layers):
        sites = [n for n in named if layers(n)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        sites = []
        for p in patterns:
            hits = [p] if p in named else [n for n in named if fnmatch.fnmatchcase(n, p)]
            if not hits:
                some = ", ".join(list(named)[:12])
                raise ValueError(f"no module named or matching {p!r}; modules include: {some}, ...")
            sites += [h for h in hits if h not in sites]
    if not sites:
        raise ValueError(f"layers={layers!r} selects no module of {type(model).__name__}")
    return sites


def _find_readout(model: nn.Module, readout: Any) -> Optional[tuple[Optional[nn.Module], nn.Module]]:
    """(final norm or None, unembedding Linear) of the model, or None when there is no LM head."""
    if isinstance(readout, tuple):
        return readout
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    for parent in ("", "transformer", "model"):
        name = _final_norm(model, parent)
        if name is not None:
            return model.get_submodule(name), head
    return None, head

