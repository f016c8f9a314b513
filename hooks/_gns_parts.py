"""Parts of ``hooks.gradient_noise``: parameter groups and the per-example (B_small = 1) adapter.

``default_groups`` names a parameter's groups (kind and layer); ``_group_fn`` turns the hook's
``groups=`` argument into a function; ``_PerExample`` accumulates ``hooks.per_example`` norms per
parameter over a step's micro-batches.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

# ----------------------------------------------------------------------------------------------
# parameter groups

_LAYER = re.compile(r"(?:^|\.)(?:blocks|layers|layer|h)\.(\d+)\.")
_EMB = {"wte", "wpe", "lm_head", "unembed", "embed_out"}
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv", "c_attn"}
_MLP = {"c_fc", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def _kind(name: str, module: nn.Module | None) -> str:
    path = name.lower().split(".")[:-1]                   # module path without "weight"/"bias"
    cls = type(module).__name__.lower() if module is not None else ""
    if "norm" in cls or any("norm" in t or t.startswith("ln") for t in path):
        return "norms"          # checked first: "blocks.0.attn_norm" is a norm, not attention
    if isinstance(module, nn.Embedding) or any("emb" in t or t in _EMB for t in path):
        return "embeddings"     # token/position embeddings and the output head (tied or not)
    if any("attn" in t or "attention" in t or t in _ATTN for t in path):
        return "attention"
    if any("mlp" in t or "ffn" in t or "feed_forward" in t or t in _MLP for t in path):
        return "mlp"
    return "other"


def default_groups(name: str, module: nn.Module | None = None) -> list[str]:
    """A parameter's groups: its kind (embeddings | attention | mlp | norms | other) and, inside a
    numbered stack (``blocks.3.``, ``layers.3.``, ``h.3.``), its layer ``blocks.<i>``."""
    out = [_kind(name, module)]
    m = _LAYER.search(name)
    if m:
        out.append(f"blocks.{m.group(1)}")
    return out


def _group_fn(groups) -> Callable[[str, nn.Module | None], Iterable[str]] | None:
    if groups is True:
        return default_groups
    if groups is False or groups is None:
        return None
    if callable(groups):
        return lambda name, module: groups(name)
    if isinstance(groups, Mapping):
        pats = {g: re.compile(p) for g, p in groups.items()}
        return lambda name, module: [g for g, p in pats.items() if p.search(name)]
    raise ValueError(f"groups must be True, False, a callable name -> [group, ...] or a mapping "
                     f"group -> regex, got {type(groups).__name__}")


def _per_example_available() -> bool:
    try:
        return importlib.util.find_spec("hooks.per_example") is not None
    except (ImportError, ValueError):
        return False


def _is_ddp(m) -> bool:
    return hasattr(m, "register_comm_hook") and hasattr(m, "module")


# ----------------------------------------------------------------------------------------------

class _PerExample:
    """B_small = 1 (Gray et al. 2024): per-example |g_i|^2 from hooks.per_example, summed per parameter.

    ``acc[p] = sum_i |g_{i,p}|^2`` over this step's examples, where g_i is example i's gradient of
    (its loss / accum): ``sq_norms(loss_scale="mean")`` undoes each micro-batch's 1/B; the hook
    multiplies by accum^2 once the step's number of backwards is known.
    """

    def __init__(self, model, modules: str, names: list[str], device, bookkeeping: bool = False):
        from hooks.per_example import PerExampleGradNorms

        self.pe = PerExampleGradNorms(model, modules=modules, attach=False, bookkeeping=bookkeeping)
        self.index = {n: i for i, n in enumerate(names)}
        self.device, self.attached, self.broken = device, False, False
        self.reset()

    def attach(self) -> None:
        if not self.broken and not self.attached:
            self.pe.attach()
            self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.pe.detach()
            self.pe.reset()
            self.attached = False

    def reset(self) -> None:
        self.acc: torch.Tensor | None = None
        self.tracked = torch.zeros(len(self.index), device=self.device)     # (P,) 1 = has norms
        self.n_examples = 0

    def harvest(self) -> None:
        """After one micro-batch's backward: add its examples' squared norms, per parameter."""
        res = self.pe.sq_norms(loss_scale="mean", summaries=False)
        names = [n for n in res.params if n in self.index]
        if not names:
            return
        idx = [self.index[n] for n in names]
        # every parameter's (N,) norms: one stack and one sum (N is the same for all)
        sums = torch.stack([res.params[n] for n in names]).sum(1).float().to(self.device)
        vec = torch.zeros(len(self.index), device=self.device).index_copy_(
            0, torch.tensor(idx, device=self.device), sums)
        self.acc = vec if self.acc is None else self.acc + vec
        self.tracked[idx] = 1.0
        self.n_examples += sum(res.batch_sizes)
