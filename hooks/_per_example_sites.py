"""The modules ``hooks.per_example`` understands, and its per-call bookkeeping.

``module_kind`` classifies a module (Linear, Embedding, LayerNorm, RMSNorm, or a custom norm with
the same contract); ``_Site`` is one handled module, ``_Call`` one forward call of it whose stored
input waits for the output's gradient, ``_Group`` the contributions of every call that uses one
parameter in one forward pass; ``_BookkeptLinear`` the autograd Function of ``bookkeeping=True``.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from diagnostics.gns import pegrad

# ----------------------------------------------------------------------------------------------
# which modules we understand


def _norm_eps(m: nn.Module):
    for attr in ("eps", "variance_epsilon"):
        if isinstance(getattr(m, attr, None), (int, float)):
            return float(getattr(m, attr))
    return None


def _conv1d_class(t: type):
    """The Hugging Face ``transformers`` ``Conv1D`` class in ``t``'s MRO, by name and module (never
    imported here), or None. GPT-2 / GPT stores its Linear layers in it: y = x W + b, W (in, out)."""
    return next((c for c in t.__mro__ if c.__name__ == "Conv1D"
                 and c.__module__.split(".")[0] == "transformers"), None)


def module_kind(m: nn.Module) -> tuple[str | None, str]:
    """("linear" | "conv1d" | "embedding" | "layernorm" | "rmsnorm" | None, reason when None).

    "conv1d" is ``transformers``' Conv1D (GPT-2): a Linear with its weight stored transposed, (in, out);
    its per-example weight gradients are the Linear's transposed, with the same norms and Grams.
    Subclasses count only when they keep the parent's ``forward`` (so y = x W^T + b still holds).
    Custom norms match by class name "RMSNorm" / "LayerNorm" or by having ``.weight`` and ``.eps``
    and no other parameter; their output is checked once against xhat * weight (+ bias).
    """
    t = type(m)
    if isinstance(m, nn.Linear):
        return ("linear", "") if t.forward is nn.Linear.forward else (None, f"{t.__name__} overrides nn.Linear.forward")
    conv1d = _conv1d_class(t)
    if conv1d is not None:
        if t.forward is not conv1d.forward:
            return None, f"{t.__name__} overrides Conv1D.forward"
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        names = {n for n, _ in m.named_parameters(recurse=False)}
        if not (isinstance(w, nn.Parameter) and w.dim() == 2 and names <= {"weight", "bias"}
                and (b is None or tuple(b.shape) == (w.shape[1],))):
            return None, f"{t.__name__}: not the Conv1D layout (weight (in, out), bias (out,))"
        return "conv1d", ""
    if isinstance(m, nn.Embedding):
        if t.forward is not nn.Embedding.forward:
            return None, f"{t.__name__} overrides nn.Embedding.forward"
        if m.scale_grad_by_freq:
            return None, "nn.Embedding(scale_grad_by_freq=True) scales by batch-wide counts"
        return "embedding", ""
    if isinstance(m, nn.LayerNorm):
        return ("layernorm", "") if t.forward is nn.LayerNorm.forward else (None, f"{t.__name__} overrides forward")
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return ("rmsnorm", "") if t.forward is nn.RMSNorm.forward else (None, f"{t.__name__} overrides forward")
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
        return None, f"{t.__name__} is not supported (batch statistics couple examples / other normalisation)"
    names = {n for n, _ in m.named_parameters(recurse=False)}
    name = t.__name__
    if isinstance(getattr(m, "weight", None), nn.Parameter) and _norm_eps(m) is not None:
        if "LayerNorm" in name and names <= {"weight", "bias"}:
            return "layernorm", ""
        if names == {"weight"}:
            return "rmsnorm", ""
    return None, f"{name} (no per-example rule for this module type)"


_BUILTIN = tuple(c for c in (nn.Linear, nn.Embedding, nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c)


class _Unsupported(Exception):
    pass


class _Site:
    """A module we handle: what to store and which parameters (roles) it feeds."""

    def __init__(self, name, module, kind, roles):
        self.name, self.module, self.kind, self.roles = name, module, kind, roles  # roles: [(role, pid)]
        self.feature_dims = module.weight.dim() if kind in ("layernorm", "rmsnorm") else 1
        self.verify = kind in ("layernorm", "rmsnorm") and not isinstance(module, _BUILTIN)
        self.called = False
        # norms: y = xhat * w (+ b) exactly (builtin, or checked by _verify_norm), so the gain's
        # gradient can come from the output (pegrad.norm_gain_grads_from_output)
        self.plain = kind in ("layernorm", "rmsnorm") and not self.verify
        self.gain_ok = (None, False)  # (weight._version, usable) cache of _gain_ok

    def eps(self, x):
        e = _norm_eps(self.module)
        return torch.finfo(x.dtype).eps if e is None else e

    def normalize(self, x):
        f = pegrad.rms_normalize if self.kind == "rmsnorm" else pegrad.layer_normalize
        return f(x, self.eps(x), self.feature_dims)


class _Call:
    """One forward call of a site; holds its stored input until the output's gradient arrives."""

    def __init__(self, site, pass_id, saved, out=None):
        self.site, self.pass_id, self.saved = site, pass_id, saved
        # a norm's output y (no copy: the next layer keeps it anyway), with its version: used
        # only if nothing modified it in place by the time its gradient arrives
        self.out, self.out_version = out, (out._version if out is not None else None)
        self.bookkept = None  # pid of a weight whose gradient _BookkeptLinear forms (per_example.py)
        self.weight_done = False


class _Group:
    """Contributions of every call that uses one parameter in one forward pass."""

    def __init__(self):
        self.calls, self.arrived, self.kinds = 0, 0, []
        self.vec = None  # (B, F) summed per-example gradients of a 1-d style parameter
        self.lin, self.emb = [], []  # buffered (A, G) / (ids, G) when a matrix is used twice
        self.emb_calls = []  # weak refs to embedding calls: a tied head computes its rows at their ids
        self.partial = None  # (||H_b||^2, H_b[ids]) of a tied head, waiting for the embedding

    def tensors(self):
        out = [t for pair in self.lin + self.emb for t in pair]
        return out + ([t for t in self.partial if t is not None] if self.partial is not None else [])


class _BookkeptLinear(torch.autograd.Function):
    """Wraps a Linear's output (already computed by the module, passed in detached, not recomputed)
    so that its backward forms the weight gradient through ``PerExampleGradNorms`` (sum of the
    per-example gradients, whose norms it keeps) and the input / bias gradients as autograd does."""

    @staticmethod
    def forward(ctx, y, x, weight, bias, owner, call):
        ctx.save_for_backward(x, weight)
        ctx.owner, ctx.call = owner, call
        # y (detached, no history) is returned itself, re-rooted here: marked dirty, not a view,
        # so later in-place ops on the Linear's output stay allowed, and nothing is copied
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[1]:
            gx = g @ w
        if ctx.needs_input_grad[2]:
            gw = ctx.owner._bookkept_weight_grad(ctx.call, x, g)
        if ctx.needs_input_grad[3]:
            gb = g.reshape(-1, g.shape[-1]).sum(0)
        return None, gx, gw, gb, None, None
