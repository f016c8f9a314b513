"""Parameter groups: one classifier for every per-group metric.

``GradientNoiseScale`` (``gns/<group>/b_simple``) and ``PerExampleGradNorms.sq_norms``
(``PerExampleSqNorms.groups`` / ``.layers``) both label a parameter with

- its **kind**: ``embeddings`` | ``attention`` | ``mlp`` | ``norms`` | ``head`` | ``other``
  (``param_kind``). A head tied to the token embedding is one parameter and counts as
  ``embeddings``; an untied output projection (``lm_head``, ``embed_out``, ``unembed``, ...,
  outside the block stack) is ``head``.
- its **layer** ``blocks.<i>`` when it sits in a numbered stack ``blocks.<i>.`` / ``block.<i>.`` /
  ``layers.<i>.`` / ``layer.<i>.`` / ``h.<i>.`` (``layer_of``), so the built-in GPT
  (``blocks.3.attn.qkv``), GPT-2 (``transformer.h.3.attn.c_attn``) and LLaMA
  (``model.layers.3.self_attn.q_proj``) get the same names. A stack under an ``encoder`` /
  ``decoder`` module gets that prefix (``encoder.blocks.3``), so the two stacks stay apart.

The kind comes from the modules that own the parameter (``owner_kinds``: a normalisation layer
is a norm, an ``nn.Embedding`` an embedding, whatever its name) and, for the rest, from the name.
Both consumers pass the same owner kinds (``hooks._per_example_sites.module_kind`` of every owner), so they
give one parameter the same labels.
"""

from __future__ import annotations

import re
from typing import Iterable

from torch import nn

KINDS = ("embeddings", "attention", "mlp", "norms", "head", "other")

_STACK = re.compile(r"(?:^|\.)(?:blocks|block|layers|layer|h)\.(\d+)\.")
_NORM_KINDS = {"layernorm", "rmsnorm", "norm"}
_EMB = {"wte", "wpe"}
_HEAD = {"lm_head", "head", "unembed", "embed_out", "output", "output_layer", "classifier", "score"}
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "qkv", "c_attn"}
_MLP = {"c_fc", "fc1", "fc2", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3"}


def owner_kinds(modules: Iterable[nn.Module]) -> frozenset[str]:
    """What the owning modules are: ``module_kind`` (linear | embedding | layernorm | rmsnorm) for
    the modules ``hooks.per_example`` handles, else "norm" (class name with "norm": BatchNorm,
    GroupNorm, ...), "embedding" / "linear" (subclasses it refuses) or "module"."""
    from hooks._per_example_sites import module_kind

    out = set()
    for m in modules:
        k = module_kind(m)[0]
        if k is None:   # a module per-example norms refuse: still say what it is
            k = ("norm" if "norm" in type(m).__name__.lower() else
                 "embedding" if isinstance(m, nn.Embedding) else
                 "linear" if isinstance(m, nn.Linear) else "module")
        out.add(k)
    return frozenset(out)


def _tokens(name: str) -> list[str]:
    parts = name.lower().split(".")
    return parts[:-1] if parts[-1] in ("weight", "bias") else parts   # "pos_embedding" stays


def param_kind(name: str, kinds: Iterable[str] = ()) -> str:
    """embeddings | attention | mlp | norms | head | other, from the owners' kinds and the name.

    ``kinds``: ``owner_kinds`` of the modules holding the parameter (or ``module_kind`` strings);
    empty: the name alone decides.
    """
    kinds = set(kinds)
    if kinds & _NORM_KINDS:
        return "norms"
    if "embedding" in kinds:
        return "embeddings"     # token/position embeddings, and a head tied to them
    toks = _tokens(name)
    if not kinds & {"linear", "conv1d"} and any("norm" in t or t.startswith("ln") for t in toks):
        return "norms"          # by name only when no owner says otherwise ("attn_norm", "ln_1")
    if any(t in _HEAD for t in toks) and not _STACK.search(name):
        return "head"           # an untied output projection (outside the block stack)
    if any("emb" in t or t in _EMB for t in toks):
        return "embeddings"
    if any("attn" in t or "attention" in t or t in _ATTN for t in toks):
        return "attention"
    if any("mlp" in t or "ffn" in t or "feed_forward" in t or "feedforward" in t or t in _MLP
           for t in toks):
        return "mlp"
    return "other"


def layer_of(name: str) -> str | None:
    """``blocks.<i>`` for a parameter in a numbered stack (``[encoder.|decoder.]blocks.<i>`` under
    an encoder / decoder), else None."""
    m = _STACK.search(name)
    if m is None:
        return None
    before = name[:m.start()].lower().split(".")
    side = next((t for t in ("encoder", "decoder") if t in before), None)
    return f"{side}.blocks.{m.group(1)}" if side else f"blocks.{m.group(1)}"


def default_groups(name: str, modules: nn.Module | Iterable[nn.Module] | None = None) -> list[str]:
    """A parameter's groups: its kind (``param_kind``) and, in a numbered stack, its layer
    (``layer_of``). ``modules``: the module (or every module) that owns the parameter."""
    if modules is None:
        kinds: frozenset[str] = frozenset()
    else:
        kinds = owner_kinds([modules] if isinstance(modules, nn.Module) else modules)
    layer = layer_of(name)
    return [param_kind(name, kinds)] + ([layer] if layer else [])
