"""Per-example gradient squared norms captured during an ordinary backward pass.

The building block of per-example gradient noise scale (Gray et al. 2024, arXiv 2411.00999): one
forward + one backward of the normal training step also yields ||g_i||^2 for every example i, for
every parameter, without per-example gradients in memory. The math lives in ``diagnostics.gns.pegrad``;
this file only gathers its inputs at the right moments:

- a forward hook on each supported module stores what its backward needs (the layer input for
  ``nn.Linear``, the token ids for ``nn.Embedding``, the input to re-normalise for LayerNorm /
  RMSNorm, and also a norm's output y = xhat * w (+ b) when y / w is safe: the gain's gradient
  then comes from y, which the next layer has just read in the backward), detached, no copies,
  and registers a tensor hook on the module's output;
- that tensor hook receives dL/d(output) during backward, computes the per-example squared norms
  right there and drops the stored input, so activations live no longer than autograd's own.

Usage (the events of hooks.monitor's loop are the same)::

    from hooks.per_example import PerExampleGradNorms
    with PerExampleGradNorms(model) as pe:               # or modules="norms" (Gray et al. 2024)
        for micro in micro_batches:
            _, loss = model(micro.x, micro.y)             # mean over the micro-batch
            loss.backward()
            res = pe.sq_norms(loss_scale="mean")          # this micro-batch's examples
            res.total                                     # (B,) ||grad loss_i||^2, all parameters
            res.params["blocks.0.attn.qkv.weight"]        # (B,) one parameter
            res.groups["attention"], res.layers["blocks.0"]

Conventions and limits:

- The batch dimension is dim 0 of every module input. The number of examples of a forward pass
  is dim 0 of the model's first tensor argument; a supported module whose input has another
  dim 0 (tokens flattened to (B*T, D), sequence-first layouts) is reported unsupported.
- ``loss_scale``: the norms are of the gradient that was backpropagated; with ``loss.mean()``
  over B examples each example's gradient carries 1/B (``diagnostics.gns.pegrad.rescale_sq_norms``).
  ``sq_norms(loss_scale="mean")`` undoes it per forward pass, giving ||grad loss_i||^2.
- A parameter shared by several modules (tied embedding / head) or a module called several times
  in one forward is counted once, with its cross terms (pegrad eq. 6).
- Supported: nn.Linear, ``transformers``' Conv1D (GPT-2: a Linear whose weight is stored transposed,
  recognised by class name and module without importing transformers), nn.Embedding, LayerNorm,
  RMSNorm and norms with their contract (``hooks._per_example_sites.module_kind``).
- Modules with parameters of types it cannot handle (nn.Conv1d, BatchNorm, MultiheadAttention's own
  in_proj, ...) are named in one warning, listed in ``.unsupported`` and left out of the totals,
  never miscounted. A parameter that receives a gradient outside its module's forward call
  (``F.linear(x, lin.weight)``) is caught by a hook on the parameter and excluded the same way.
- ``bookkeeping=True`` is the one option that touches the training graph: where a Linear's
  per-example gradients are materialised anyway, its weight gradient becomes their sum
  (``_BookkeptLinear``) and autograd's weight GEMM is skipped; equal up to float rounding.
- One backward per forward, forward and backward while attached, no activation checkpointing.
  Attach before ``torch.compile`` or use the uncompiled ``model._orig_mod`` (docs/architecture.md,
  "Known pitfalls").
"""

from __future__ import annotations

import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn

from diagnostics.gns import pegrad, pegram
from hooks._common import warn_once
from hooks._per_example_groups import layer_of, param_kind
from hooks._per_example_sites import (  # noqa: F401  (module_kind is public here)
    _BookkeptLinear, _Call, _Group, _Site, _Unsupported, module_kind,
)

__all__ = ["PerExampleGradNorms", "PerExampleSqNorms", "module_kind"]


@dataclass
class PerExampleSqNorms:
    """Per-example squared gradient norms of the examples backpropagated since the last reset.

    Examples of successive forward passes (micro-batches) are concatenated in order; their sizes
    are ``batch_sizes``. Every tensor is (N,), N = sum(batch_sizes).
    """

    params: dict[str, torch.Tensor]  # parameter name -> (N,)
    total: torch.Tensor  # (N,) sum over params (unsupported ones left out)
    groups: dict[str, torch.Tensor]  # "embeddings" | "attention" | "mlp" | "norms" | "head" | "other"
    layers: dict[str, torch.Tensor]  # "blocks.3" -> (N,) sum over that layer's params
    batch_sizes: list[int] = field(default_factory=list)
    unsupported: dict[str, str] = field(default_factory=dict)  # module name -> reason
    # gram=True only: per forward pass (order of batch_sizes), parameter name -> (B_k, B_k) Gram
    # <g_i, g_j> of the backpropagated per-example gradients (loss_scale not applied; diagnostics.gns.pegram)
    grams: list[dict[str, torch.Tensor]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------


class PerExampleGradNorms:
    """Exact per-example squared gradient norms of a model's parameters, from one backward.

    Args:
        model: the module trained (its forward marks the start of a micro-batch).
        modules: "all", "norms" (normalisation layers only), an iterable of module names, or a
            callable ``(name, module) -> bool``. Modules sharing a parameter with a selected one are
            always included, so the shared parameter is counted whole.
        method: linear layers, "auto" | "ghost" | "materialize" (``diagnostics.gns.pegrad``).
        bookkeeping: where a Linear's per-example gradients are materialised (the cheaper exact form,
            e.g. short sequences or narrow layers), form its batch weight gradient as their sum
            instead of autograd's own weight GEMM, which then is not run (one GEMM instead of two).
            The weight gradient is the same up to float summation order (per example, then over
            examples; about 1e-7 relative in float32), so training is no longer bit-identical to
            running without the hook: off by default. Float32 / float64 layers only (under autocast
            or in bf16 the layer keeps autograd's gradient); see docs/gns.md, Speed.
        attach: register the hooks now (also done by ``with``; ``detach`` removes them).
        strict: raise instead of warning and excluding when a module cannot be handled at runtime.
        gram: also keep each parameter's (B, B) Gram of per-example gradients per forward pass
            (``PerExampleSqNorms.grams``, ``diagnostics.gns.pegram``): the norm of any sum of
            per-example gradients chosen after the backward, e.g. per domain. Costs more than the
            norms alone (pegram's docstring) and turns ``bookkeeping`` off.
    """

    def __init__(self, model: nn.Module, modules: str | Iterable[str] | Callable = "all", *,
                 method: str = "auto", attach: bool = True, strict: bool = False,
                 max_elements: int = pegrad.DEFAULT_MAX_ELEMENTS, bookkeeping: bool = False,
                 gram: bool = False):
        if method not in ("auto", "ghost", "materialize"):
            raise ValueError(f"method must be 'auto', 'ghost' or 'materialize', got {method!r}")
        self.model, self.method, self.strict, self.max_elements = model, method, strict, max_elements
        self.gram = bool(gram)
        self.bookkeeping = bool(bookkeeping) and not self.gram
        self.unsupported: dict[str, str] = {}
        self._select = self._selector(modules)
        self._handles: list = []
        self._pass = 0
        self._pass_batch: dict[int, int | None] = {}
        self._groups: dict[tuple[int, int], _Group] = {}
        self._results: dict[int, dict[int, torch.Tensor]] = {}
        self._grams: dict[int, dict[int, torch.Tensor]] = {}  # gram=True: pass -> pid -> (B, B)
        self._live_calls: weakref.WeakSet = weakref.WeakSet()
        self._warned: set[str] = set()
        self._build()
        if attach:
            self.attach()

    # -- set-up ------------------------------------------------------------------------------
    @staticmethod
    def _selector(modules):
        if modules == "all":
            return lambda name, m: True
        if modules == "norms":
            return lambda name, m: module_kind(m)[0] in ("layernorm", "rmsnorm")
        if callable(modules):
            return modules
        if isinstance(modules, str):
            raise ValueError(f"modules must be 'all', 'norms', names or a filter, got {modules!r}")
        names = set(modules)
        return lambda name, m: name in names

    def _build(self):
        pid_name = {id(p): n for n, p in self.model.named_parameters()}  # tied: first name only
        owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
        for mname, m in self.model.named_modules():
            for role, p in m.named_parameters(recurse=False):
                owners.setdefault(id(p), []).append((mname, m, role))
        chosen = {mname for mname, m in self.model.named_modules()
                  if any(True for _ in m.parameters(recurse=False)) and self._select(mname, m)}
        tracked = {pid for pid, own in owners.items() if any(mn in chosen for mn, _, _ in own)}
        bad: dict[str, str] = {}
        for pid in tracked:  # every owner of a tracked parameter must be understood
            for mname, m, _ in owners[pid]:
                kind, why = module_kind(m)
                if kind is None:
                    bad[mname or type(m).__name__] = why
        bad_pids = {pid for pid in tracked for mn, m, _ in owners[pid] if module_kind(m)[0] is None}
        keep = tracked - bad_pids
        self._params = {id(p): p for p in self.model.parameters() if id(p) in keep}
        self._names = {pid: pid_name[pid] for pid in self._params}
        self._sites: dict[str, _Site] = {}
        for pid in self._params:
            for mname, m, role in owners[pid]:
                site = self._sites.get(mname) or _Site(mname, m, module_kind(m)[0], [])
                site.roles.append((role, pid))
                self._sites[mname] = site
        self._kinds = {pid: {module_kind(m)[0] for _, m, _ in owners[pid]} for pid in self._params}
        self._owners = {pid: [mn for mn, _, _ in owners[pid]] for pid in self._params}
        self._arrivals = {pid: 0 for pid in self._params}
        self._arrivals_seen = {pid: 0 for pid in self._params}
        if bad:
            self.unsupported.update(bad)
            listing = "; ".join(f"{k}: {v}" for k, v in bad.items())
            warnings.warn(f"PerExampleGradNorms: no per-example gradient norms for {len(bad)} module(s) "
                          f"({listing}); their parameters are left out of the totals (see .unsupported).",
                          RuntimeWarning, stacklevel=3)

    def attach(self) -> "PerExampleGradNorms":
        """Register the forward / tensor hooks (idempotent)."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, with_kwargs=True))
        for site in self._sites.values():
            self._handles.append(site.module.register_forward_hook(self._make_forward_hook(site)))
        for pid, p in self._params.items():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._make_param_hook(pid)))
        return self

    def detach(self) -> None:
        """Remove every hook (results already computed stay readable)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()

    # -- bookkeeping -------------------------------------------------------------------------
    def _warn_once(self, key, msg):
        warn_once(self._warned, key, msg, stacklevel=2)

    def _exclude(self, module_name: str, reason: str, pids=()):
        """Leave a module's parameters out from now on (and every module sharing one), say so once."""
        self.unsupported[module_name] = reason
        todo, done = set(pids), set()
        site = self._sites.pop(module_name, None)
        if site is not None:
            todo |= {pid for _, pid in site.roles}
        while todo:
            pid = todo.pop()
            done.add(pid)
            for owner in self._owners.get(pid, []):
                s = self._sites.pop(owner, None)
                if s is not None:
                    self.unsupported.setdefault(owner, f"shares a parameter with {module_name}")
                    todo |= {q for _, q in s.roles} - done
            self._params.pop(pid, None)
            for key in [k for k in self._groups if k[1] == pid]:
                del self._groups[key]
            for res in list(self._results.values()) + list(self._grams.values()):
                res.pop(pid, None)
        self._warn_once(module_name, f"PerExampleGradNorms: {module_name}: {reason}; its parameters are "
                                     "left out of the totals (see .unsupported).")

    def _fail(self, site: _Site, err: Exception):
        if self.strict:
            raise err
        reason = str(err) if isinstance(err, _Unsupported) else f"{type(err).__name__}: {err}"
        self._exclude(site.name, reason)

    def _new_pass(self, batch_size):
        self._pass += 1
        self._pass_batch[self._pass] = batch_size

    def _on_model_forward(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        first = next((a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)), None)
        self._new_pass(int(first.shape[0]) if first is not None and first.dim() > 0 else None)

    # -- forward: store inputs, hook the output --------------------------------------------------
    def _make_forward_hook(self, site: _Site):
        def hook(module, args, output):
            if site.name not in self._sites or not torch.is_grad_enabled():
                return
            if not (isinstance(output, torch.Tensor) and output.requires_grad):
                return
            try:
                return self._record_call(site, args, output)
            except Exception as e:  # a diagnostic never kills training
                self._fail(site, e)
            return None

        return hook

    def _record_call(self, site, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < (1 if site.kind == "embedding" else 2):
            raise _Unsupported(f"input without a batch dimension ({type(x).__name__})")
        pids = [pid for _, pid in site.roles if self._params[pid].requires_grad]
        if not pids:
            return
        B = int(x.shape[0])
        expected = self._pass_batch.get(self._pass)
        if any(pid in self._results.get(self._pass, {}) for pid in pids):
            self._new_pass(B)  # a new micro-batch without a model-level forward (sub-module loop)
        elif expected is None:
            self._pass_batch[self._pass] = B
        elif B != expected:
            raise _Unsupported(f"input batch dimension {B} != the model's batch size {expected} "
                               "(tokens flattened or sequence-first?)")
        if site.verify and not site.called:
            self._verify_norm(site, x, output)
        site.called = True
        out = output.detach() if (site.plain and output.dtype in (torch.float32, torch.float64)
                                  and output.shape == x.shape and self._gain_ok(site)) else None
        call = _Call(site, self._pass, x.detach(), out)
        for role, pid in site.roles:
            if pid not in pids:
                continue
            grp = self._groups.setdefault((self._pass, pid), _Group())
            kind = "embedding" if site.kind == "embedding" else site.kind if (
                site.kind in ("linear", "conv1d") and role == "weight") else "vector"
            if grp.kinds and (kind == "vector") != (grp.kinds[0] == "vector"):
                raise _Unsupported("parameter used both as a vector (norm gain / bias) and as a matrix")
            if "conv1d" in grp.kinds + [kind] and set(grp.kinds + [kind]) != {"conv1d"}:
                raise _Unsupported("a Conv1D weight (stored transposed) shared with another kind of use")
            grp.calls += 1
            grp.kinds.append(kind)
            if kind == "embedding":
                grp.emb_calls.append(weakref.ref(call))
        self._live_calls.add(call)
        new = None
        if self.bookkeeping and site.kind == "linear":
            pid = next((q for role, q in site.roles if role == "weight" and q in pids), None)
            if pid is not None and self._bookkeep_ok(site, x, output, pid):
                call.bookkept = pid
                bias = getattr(site.module, "bias", None)
                new = output = _BookkeptLinear.apply(output.detach(), x, site.module.weight, bias, self, call)
        output.register_hook(lambda grad, call=call: self._on_output_grad(call, grad))
        return new

    def _bookkeep_ok(self, site, x, output, pid) -> bool:
        """Is this call's weight gradient to be formed from its per-example gradients: float32/64
        throughout, and the per-example gradients materialised anyway (pegrad's cheaper form, or a
        tied head whose (B, V, D) gradients fit, the eq. (6) path)."""
        w = site.module.weight
        if not (x.dtype == output.dtype == w.dtype and w.dtype in (torch.float32, torch.float64)
                and x.dim() >= 2 and w.dim() == 2 and x.shape[-1] == w.shape[1]):
            return False
        B, (d_out, d_in) = int(x.shape[0]), w.shape
        kinds = self._groups[(self._pass, pid)].kinds
        if kinds == ["embedding", "linear"]:
            return B * d_out * d_in <= self.max_elements
        if kinds != ["linear"]:
            return False
        T = x.numel() // max(1, B * d_in)
        method = self.method if self.method != "auto" else pegrad.choose_linear_method(T, d_in, d_out)
        return method == "materialize"

    def _verify_norm(self, site, x, y):
        """Custom norm classes: check once that y = xhat * w (+ b), or xhat * (1 + w) (+ b)."""
        with torch.no_grad():
            xhat = site.normalize(x)
            w = site.module.weight.to(xhat.dtype)
            b = getattr(site.module, "bias", None)
            b = b.to(xhat.dtype) if isinstance(b, torch.Tensor) else 0.0
            yf = y.detach().to(xhat.dtype)
            tol = 1e-3 if y.dtype in (torch.float32, torch.float64) else 3e-2
            scale = yf.norm() + 1e-12
            plain = float((yf - (xhat * w + b)).norm() / scale)
            site.plain = plain <= 1e-5  # exactly xhat * w (+ b), as far as float32 tells
            if min(plain, float((yf - (xhat * (1 + w) + b)).norm() / scale)) > tol:
                raise _Unsupported(f"{type(site.module).__name__} output is not "
                                   f"{site.kind}(x) * weight (+ bias); cannot attribute its gradient")

    def _gain_ok(self, site) -> bool:
        """Can the norm's output stand in for its input: no gain entry too small to divide by.
        Checked again when the gain changed (once per optimizer step), every norm in one check
        (few ops: each costs tens of microseconds here); any tiny entry: all use the input."""
        if site.gain_ok[0] != site.module.weight._version:
            sites = [s for s in self._sites.values() if s.plain]
            ok = False
            try:
                with torch.no_grad():
                    w = torch.cat([s.module.weight.reshape(-1) for s in sites])
                    ok = bool(w.abs().amin() >= torch.finfo(torch.float32).tiny ** 0.5)
            except (RuntimeError, TypeError):   # mixed devices / dtypes: use the inputs
                ok = False
            for s in sites:
                s.gain_ok = (s.module.weight._version, ok)
        return site.gain_ok[1]

    # -- backward: compute right away, free the inputs ---------------------------------------------
    def _on_output_grad(self, call: _Call, grad: torch.Tensor):
        site, saved, out = call.site, call.saved, call.out
        call.saved = call.out = None
        if out is not None and out._version != call.out_version:
            out = None  # modified in place after the forward: use the input
        self._live_calls.discard(call)
        if saved is None:
            for _, pid in site.roles:  # not a bypass: keep the parameter-hook safety net quiet
                if pid in self._arrivals:
                    self._arrivals[pid] += 1
            self._warn_once("twice", "PerExampleGradNorms: a second backward through the same graph; "
                                     "only the first is measured")
            return None
        if site.name not in self._sites:
            return None
        try:
            G = grad.detach()
            for role, pid in site.roles:
                grp = self._groups.get((call.pass_id, pid))
                if grp is None or pid not in self._params or pid == call.bookkept:
                    continue  # a book-kept weight: _BookkeptLinear.backward measures it
                self._arrivals[pid] += 1
                grp.arrived += 1
                self._contribute(call.pass_id, pid, grp, site, role, saved, G, out)
        except Exception as e:
            self._fail(site, e)
        return None

    def _contribute(self, pass_id, pid, grp, site, role, saved, G, out=None):
        if site.kind in ("linear", "conv1d") and role == "weight":   # Conv1D: the transpose, same norms
            if grp.calls == 1:  # the usual case: straight to the formula (it flattens itself)
                return self._store(pass_id, pid, self._linear(saved, G))
            A, Gf = pegrad.flatten_positions(saved), pegrad.flatten_positions(G)
            emb_call = grp.emb_calls[0]() if len(grp.emb_calls) == 1 else None
            if (grp.kinds == ["embedding", "linear"] and grp.partial is None and not grp.emb
                    and emb_call is not None and emb_call.saved is not None and not self.gram):
                # tied head before its embedding (eq. 6). A (B, V, D) table that fits: keep the
                # materialised head gradients H_b and add the embedding's rows into them later
                # (cross term for free); else keep only ||H_b||^2 and H_b at the example's tokens
                if A.shape[0] * Gf.shape[2] * A.shape[2] <= self.max_elements:
                    grp.partial = (None, pegrad.linear_grads(A, Gf))
                else:
                    grp.partial = (self._linear(A, Gf), pegrad.linear_grad_rows(
                        emb_call.saved, A, Gf, max_elements=self.max_elements))
            else:
                grp.lin.append((A, Gf))
        elif site.kind == "embedding":
            ids, Gf = pegrad.flatten_ids(saved), pegrad.flatten_positions(G)
            pad = site.module.padding_idx
            if pad is not None:
                Gf = Gf * (ids != pad).unsqueeze(-1).to(Gf.dtype)
            if grp.calls == 1:
                return self._store(pass_id, pid, self._embedding(ids, Gf, site.module.num_embeddings))
            if grp.partial is not None and grp.calls == 2:  # eq. (6) of diagnostics.gns.pegrad
                head_sq, rows = grp.partial
                grp.partial = None
                if head_sq is None:  # rows = the head's (B, V, D) gradients: add, then square
                    W = pegrad.add_embedding_grads(rows, ids, Gf)
                    return self._store(pass_id, pid, torch.linalg.vector_norm(W.flatten(1), dim=1).square())
                sq = self._embedding(ids, Gf, site.module.num_embeddings)
                return self._store(pass_id, pid, sq + head_sq + 2 * (Gf.to(rows.dtype) * rows).sum((1, 2)))
            grp.emb.append((ids, Gf))
            grp.num_embeddings = site.module.num_embeddings
        else:  # vector: norm gain, norm bias, linear bias -> (B, F) per-example gradient
            if role == "weight" and out is not None:  # from the output y = xhat * w (+ b)
                m = site.module
                b = m.bias.detach() if isinstance(getattr(m, "bias", None), torch.Tensor) else None
                v = pegrad.norm_gain_grads_from_output(out, G, m.weight.detach(), b, site.feature_dims)
            elif role == "weight":
                v = pegrad.norm_gain_grads(saved, G, site.eps(saved), site.kind, site.feature_dims)
            else:
                v = pegrad.bias_grads(G, site.feature_dims)
            grp.vec = v if grp.vec is None else grp.vec + v
        if grp.arrived >= grp.calls:
            self._finalize(pass_id, pid, grp)

    def _bookkept_weight_grad(self, call, x, g):
        """_BookkeptLinear.backward: this call's weight gradient, with its per-example norms taken
        on the way; any failure excludes the module and falls back to the plain gradient."""
        site, pid = call.site, call.bookkept
        grp = self._groups.get((call.pass_id, pid))
        gw = None
        if not call.weight_done and grp is not None and site.name in self._sites and pid in self._params:
            call.weight_done = True
            try:
                self._arrivals[pid] += 1
                grp.arrived += 1
                gw = self._contribute_bookkept(call.pass_id, pid, grp, site, x, g)
            except Exception as e:  # a diagnostic never kills training: the plain gradient below
                gw = None
                self._fail(site, e)
        if gw is None:
            gw = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        return gw

    def _contribute_bookkept(self, pass_id, pid, grp, site, x, g):
        if grp.calls == 1 and grp.kinds == ["linear"]:
            gw, sq = pegrad.linear_weight_grad_and_sq_norms(x, g, max_elements=self.max_elements)
            self._store(pass_id, pid, sq)
            return gw
        emb_call = grp.emb_calls[0]() if len(grp.emb_calls) == 1 else None
        if (grp.kinds == ["embedding", "linear"] and grp.partial is None and not grp.emb
                and emb_call is not None and emb_call.saved is not None):
            H = pegrad.linear_grads(x, g)  # tied head: keep H_b for eq. (6), their sum is dW
            grp.partial = (None, H)
            if grp.arrived >= grp.calls:
                self._finalize(pass_id, pid, grp)
            return H.sum(0)
        self._contribute(pass_id, pid, grp, site, "weight", x, g)  # used twice: the general path
        return None

    def _linear(self, A, G):
        if self.gram:
            return pegram.linear_gram(A, G, max_elements=self.max_elements)
        return pegrad.linear_sq_norms(A, G, method=self.method, max_elements=self.max_elements)

    def _embedding(self, ids, G, V):
        if self.gram:
            return pegram.embedding_gram(ids, G, V, max_elements=self.max_elements)
        return pegrad.embedding_sq_norms(ids, G, V, max_elements=self.max_elements)

    def _finalize(self, pass_id, pid, grp):
        """All of this parameter's contributions in this pass: norm of their sum, eq. (6)."""
        self._groups.pop((pass_id, pid), None)
        sq = None

        def add(t):
            nonlocal sq
            sq = t if sq is None else sq + t.to(sq.dtype)

        if grp.vec is not None:
            add(pegram.vector_gram(grp.vec) if self.gram else grp.vec.pow(2).sum(1))
        if grp.partial is not None:  # tied head whose embedding got no gradient
            head_sq, rows = grp.partial
            add(torch.linalg.vector_norm(rows.flatten(1), dim=1).square() if head_sq is None else head_sq)
        if grp.lin:
            A = torch.cat([a for a, _ in grp.lin], 1)
            Gl = torch.cat([g for _, g in grp.lin], 1)
            add(self._linear(A, Gl))
        if grp.emb:
            ids = torch.cat([i for i, _ in grp.emb], 1)
            Ge = torch.cat([g for _, g in grp.emb], 1)
            add(self._embedding(ids, Ge, grp.num_embeddings))
            if grp.lin and self.gram:
                C = pegram.tied_cross_gram(ids, Ge, A, Gl)
                add(C + C.T)
            elif grp.lin:
                add(2 * pegrad.tied_embedding_head_cross(ids, Ge, A, Gl, max_elements=self.max_elements))
        grp.lin, grp.emb, grp.emb_calls, grp.partial, grp.vec = [], [], [], None, None
        if sq is not None:
            self._store(pass_id, pid, sq)

    def _store(self, pass_id, pid, sq):
        self._groups.pop((pass_id, pid), None)
        sq = sq.detach() if sq.requires_grad else sq
        if sq.dim() == 2:     # gram=True: the (B, B) Gram, whose diagonal is the squared norms
            self._grams.setdefault(pass_id, {})[pid] = sq
            sq = torch.diagonal(sq)
        self._results.setdefault(pass_id, {})[pid] = sq

    # -- safety net: a gradient that bypassed every module we watch -------------------------------
    def _make_param_hook(self, pid):
        def hook(grad):
            if pid in self._params and self._arrivals[pid] == self._arrivals_seen[pid]:
                owner = self._owners[pid][0]
                self._exclude(owner, f"{self._names[pid]} received a gradient that did not pass through "
                                     "the module's own forward (a functional use such as "
                                     "F.linear(x, module.weight), or a forward run before attaching)",
                              pids=[pid])
            self._arrivals_seen[pid] = self._arrivals.get(pid, 0)
            return None

        return hook

    # -- results ---------------------------------------------------------------------------------
    def stored_tensors(self) -> list[torch.Tensor]:
        """Activations held right now (empty after every backward of a normal step)."""
        out = [t for c in list(self._live_calls) for t in (c.saved, c.out) if t is not None]
        for grp in self._groups.values():
            out += grp.tensors()
        return out

    def reset(self) -> None:
        """Drop all results and pending state."""
        self._groups.clear()
        self._results.clear()
        self._grams.clear()
        self._pass_batch = {self._pass: self._pass_batch.get(self._pass)}

    def sq_norms(self, *, loss_scale: float | str = 1.0, reset: bool = True,
                 summaries: bool = True) -> PerExampleSqNorms:
        """Per-example squared gradient norms of every example backpropagated since the last reset.

        ``loss_scale``: each example's weight in the backpropagated loss (``1/B`` for a mean),
        or "mean" for 1/B of each forward pass; the norms are divided by ``loss_scale^2``
        (``diagnostics.gns.pegrad.rescale_sq_norms``), i.e. reported for the per-example loss.
        ``reset``: forget these examples afterwards (the default: one call per micro-batch).
        ``summaries=False``: leave ``total``, ``groups`` and ``layers`` empty (per parameter only;
        what GradientNoiseScale reads, without the per-name grouping on every micro-batch).
        """
        for (p, pid), grp in list(self._groups.items()):
            if grp.arrived > 0:
                self._finalize(p, pid, grp)
        passes = sorted(p for p, res in self._results.items() if res)
        params: dict[str, torch.Tensor] = {}
        sizes = []
        for p in passes:
            res = self._results[p]
            ref = next(iter(res.values()))
            sizes.append(int(ref.shape[0]))
        for pid, name in self._names.items():
            if pid not in self._params:
                continue
            if not self._params[pid].requires_grad and not any(pid in self._results[p] for p in passes):
                continue
            chunks = []
            for p, B in zip(passes, sizes):
                sq = self._results[p].get(pid)
                if sq is None:
                    ref = next(iter(self._results[p].values()))
                    sq = torch.zeros(B, dtype=ref.dtype, device=ref.device)
                scale = (1.0 / B) if loss_scale == "mean" else float(loss_scale)
                chunks.append(sq if scale == 1.0 else pegrad.rescale_sq_norms(sq, scale))  # 1: no op
            if chunks:
                params[name] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        n = sum(sizes)
        groups: dict[str, torch.Tensor] = {}
        layers: dict[str, torch.Tensor] = {}
        total = torch.zeros(n) if not params else sum(params.values()) if summaries else torch.zeros(0)
        pid_of = {name: pid for pid, name in self._names.items()}
        for name, sq in (params.items() if summaries else ()):
            g = param_kind(name, self._kinds[pid_of[name]])   # hooks._per_example_groups, as GNS's groups
            groups[g] = groups[g] + sq if g in groups else sq
            layer = layer_of(name)
            if layer is not None:
                layers[layer] = layers[layer] + sq if layer in layers else sq
        grams = [{name: self._grams[p][pid] for pid, name in self._names.items()
                  if pid in self._params and pid in self._grams.get(p, {})} for p in passes] if self.gram else []
        if reset:
            self._results.clear()
            self._grams.clear()
            for key in [k for k, g in self._groups.items() if k[0] != self._pass]:
                del self._groups[key]  # forward passes that never got a backward
            self._pass_batch = {self._pass: self._pass_batch.get(self._pass)}  # bounded over a run
        return PerExampleSqNorms(params=params, total=total, groups=groups, layers=layers,
                                 batch_sizes=sizes, unsupported=dict(self.unsupported), grams=grams)

