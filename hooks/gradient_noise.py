"""GradientNoiseScale: the gradient noise scale B_simple, measured while training.

McCandlish et al. 2018 (arXiv 1812.06162), Appendix A: with |G_B|^2 the squared norm of a
batch-mean gradient over B examples, E|G_B|^2 = |G|^2 + tr(Sigma)/B. Measuring it at two batch
sizes B_small != B_big gives unbiased |G|^2 and tr(Sigma); B_simple = tr(Sigma)/|G|^2 is the ratio
of their EMAs (diagnostics.gns.GNSTracker). This hook only gathers the two norms at the right
moments; the math lives in diagnostics.gns.

Where the two batch sizes come from (``mode``)::

    microbatch   |g_k|^2 of each micro-batch k of an accumulated step (a Tensor.register_hook on
                 every parameter sees that backward's contribution before it is added to .grad;
                 no gradient copies) vs |.grad|^2 of the accumulated batch.
                 B_small = micro-batch, B_big = accumulated batch (x world size under DDP).
    ddp          each rank's local gradient (a DDP comm hook reads the bucket buffers before the
                 all-reduce) vs the all-reduced .grad. B_small = per-rank batch, B_big = global.
    per_example  per-example |g_i|^2 from hooks.per_example (Gray et al. 2024, arXiv 2411.00999)
                 vs |.grad|^2: B_small = 1, B_big = the batch. Works with one batch size.
    layernorm    the same on the normalisation layers' parameters only (Gray et al. sec. 4).
    auto         per step: microbatch when the step accumulates (>1 backward), else ddp when
                 several processes train (the per-rank gradient, seen by the same tensor hooks),
                 else per_example (fallback="per_example", the default; "none" skips it),
                 else says once what is needed.

Any loop, the Monitor's events (hooks/monitor.py)::

    gns = GradientNoiseScale(mode="microbatch", every=1, ema=0.95)
    monitor = Monitor(model, [gns], run_dir="runs/demo")        # ddp: Monitor(..., ddp_model=ddp)
    for step in range(steps):
        monitor.on_step_begin(step)                  # arms the tensor hooks on measured steps
        for micro in micro_batches:
            (model(micro.x, micro.y)[1] / n_micro).backward()    # loss scaled by 1/accum: undone here
            monitor.on_backward_end(micro.size)      # <- |g_k|^2 of this micro-batch
        monitor.on_grads_ready()                     # <- |G_big|^2 from .grad, BEFORE clipping
        clip_grad_norm_(...); optimizer.step(); optimizer.zero_grad()
        monitor.on_step_end(step, seq_len=T)         # <- EMAs updated, metrics written

Metrics (one record per measured step; docs/gns.md, "Hook modes")::

    gns/b_simple          EMA(trace_cov) / EMA(grad_sq), examples (sequences); NaN when undefined
    gns/b_simple_tokens   gns/b_simple x tokens per example (tokens_per_example= or train/seq_len)
    gns/grad_sq           EMA of the unbiased |G|^2 estimate
    gns/trace_cov         EMA of the unbiased tr(Sigma) estimate
    gns/small_sq          raw |G_small|^2 of this step (mean over micro-batches / ranks)
    gns/big_sq            raw |G_big|^2 of this step
    gns/b_small           examples behind gns/small_sq
    gns/b_big             examples behind gns/big_sq
    gns/skipped           steps skipped so far for non-finite gradients (EMAs untouched)
    gns/<group>/b_simple  the same per parameter group (hooks._per_example_groups): embeddings, attention,
                          mlp, norms, head, other, blocks.<i> (group_details=True adds the
                          group's other quantities)
    gns/domain/<d>/b_simple   per domain d of the examples (the loop's ``domains=``), on steps with
                          per-example norms: EMA(trace_cov) / EMA(grad_sq) of that domain, with
                          .../grad_sq, .../trace_cov (EMAs), .../small_sq (mean |g_i|^2 of the
                          domain's examples this step), .../b_big (its examples this step);
                          hooks._gradient_noise_domains
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from diagnostics.gns import GNSTracker, two_batch_estimates
from hooks._common import norm_dtype, unwrap_ddp, warn_once
from hooks._distributed import UnshardedGradHooks, is_sharded, local_sq_norms, reduce_small_big
from hooks._gradient_noise_domains import _DomainGNS
from hooks._gradient_noise_parts import _PerExample, _group_fn
from hooks._per_example_groups import default_groups
from hooks.monitor import Hook

__all__ = ["GradientNoiseScale", "MODES", "default_groups"]

MODES = ("auto", "microbatch", "ddp", "per_example", "layernorm")

ONE_BATCH_SIZE_MSG = (
    "this step has one batch size only (one backward per step on one process), so the two-batch "
    "GNS estimator has nothing to compare. It needs gradient accumulation (grad_accum >= 2), "
    "several data-parallel processes, or per-example mode (mode='per_example', hooks.per_example). "
    "GNS is not measured on such steps; training is unaffected."
)
PE_TAKEOVER_MSG = (
    "mode 'auto': steps with one batch size only (grad_accum = 1, one process) are measured with "
    "per-example gradient norms (hooks.per_example, B_small = 1). They are attached at the end of "
    "the first such step after accumulating steps, so that one step is not measured; this applies "
    "to every later switch too and is said only once."
)


# ----------------------------------------------------------------------------------------------

class GradientNoiseScale(Hook):
    """Measures B_simple (McCandlish et al. 2018, App. A) overall and per parameter group.

    Args:
        mode: "auto" | "microbatch" | "ddp" | "per_example" | "layernorm" (module docstring).
        every: measure every ``every`` steps (steps ``s % every == 0``); in between the tensor
            hooks only test a flag.
        ema: decay of the bias-corrected EMAs of |G|^2 and tr(Sigma) (one GNSTracker per group).
        groups: True (default groups, see ``default_groups``), False (total only), a callable
            ``name -> [group, ...]`` or a mapping ``group -> regex`` on parameter names.
        group_details: also log each group's grad_sq / trace_cov / raw norms, not just b_simple.
        tokens_per_example: tokens per example for gns/b_simple_tokens; default: the step's
            ``train/seq_len`` scalar (the built-in loop passes ``seq_len``).
        grad_scale: mixed-precision loss scale: a number, a callable returning it, or an object
            with ``get_scale()`` (torch.amp.GradScaler). Squared norms are divided by scale^2.
        grads_unscaled: True when ``scaler.unscale_(optimizer)`` runs before ``on_grads_ready``
            (then .grad is already unscaled; the micro-batch contributions never are).
        ddp_model: the DistributedDataParallel wrapper (mode "ddp"); or pass it to
            ``Monitor(..., ddp_model=...)``, or give the Monitor the DDP module itself.
        world_size: data-parallel processes; default: torch.distributed's world size. Pass 1 when
            processes do not average their gradients (then .grad is local).
        process_group: the data-parallel group (default: the world).
        fallback: what ``auto`` does on steps with one batch size: "per_example" (per-example
            norms, when hooks.per_example supports some module of the model; costs a per-layer
            computation in the backward, see docs/gns.md) or "none" (measure nothing; a
            one-time message).
        bookkeeping: per-example modes: where a Linear's per-example gradients are materialised,
            its batch weight gradient is their sum, so autograd's own weight GEMM is not run
            (``hooks.per_example.PerExampleGradNorms(bookkeeping=True)``): cheaper, but the weight
            gradients then equal those of a run without the hook only up to float rounding
            (~1e-7 relative in float32), not bit for bit. Off by default. Turns per-domain GNS off.
        per_domain: also measure B_simple per domain (``gns/domain/<d>/...``) on steps with
            per-example norms, from the ``domains`` passed to ``on_backward_end`` (indices or
            names). Needs the per-example Gram (``PerExampleGradNorms(gram=True)``; docs/gns.md,
            "Per-domain GNS" for its cost), so it is measured every ``domain_every``-th measured
            step. In ``auto`` mode on accumulating steps (the total measured with micro-batches),
            the per-example hooks are attached for it on those steps, and it is reported when they
            cover every parameter.
        domain_names: names of integer domain indices (default ``domain<i>``); names passed as
            ``domains`` keep their position here, new ones are appended in order of first appearance.
        domain_every: per-domain GNS on measured steps ``(step // every) % domain_every == 0``.
    """

    name = "gns"

    def __init__(self, mode: str = "auto", every: int = 1, ema: float = 0.95, groups=True,
                 group_details: bool = False, tokens_per_example: float | None = None,
                 grad_scale=None, grads_unscaled: bool = False, ddp_model=None,
                 world_size: int | None = None, process_group=None, fallback: str = "per_example",
                 name: str = "gns", bookkeeping: bool = False, per_domain: bool = True,
                 domain_names=None, domain_every: int = 10):
        if mode not in MODES:
            raise ValueError(f"unknown GNS mode {mode!r}; valid modes: {', '.join(MODES)}")
        if fallback not in ("per_example", "none"):
            raise ValueError(f"fallback must be 'per_example' or 'none', got {fallback!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if not isinstance(domain_every, int) or domain_every < 1:
            raise ValueError(f"domain_every must be a positive integer, got {domain_every!r}")
        if not 0.0 <= float(ema) < 1.0:
            raise ValueError(f"ema (the EMA decay) must be in [0, 1), got {ema}")
        self.mode, self.every, self.ema, self.fallback = mode, every, float(ema), fallback
        self.name = name
        self.bookkeeping = bool(bookkeeping)
        self.per_domain, self.domain_every = bool(per_domain) and not self.bookkeeping, domain_every
        self.domains = _DomainGNS(ema, domain_names)
        self._group_fn = _group_fn(groups)
        self.group_details = bool(group_details)
        self.tokens_per_example = None if tokens_per_example is None else float(tokens_per_example)
        self.grad_scale, self.grads_unscaled = grad_scale, bool(grads_unscaled)
        self._ddp_model, self._world_size, self.process_group = ddp_model, world_size, process_group
        self.trackers: dict[str, GNSTracker] = {}      # "total" first, then the groups
        self.n_measured = self.n_skipped = self.n_unmeasured = 0
        self.last_mode: str | None = None
        self.notices: list[str] = []
        self._state_to_load: dict | None = None
        self._resumed_want_pe: bool | None = None   # auto mode's per-example switch, from a checkpoint
        self._handles: list = []
        self._params: list[nn.Parameter] = []
        self._armed = False
        self._comm_enabled = False
        self._pe: _PerExample | None = None
        self._sharded, self._unsharded = False, None   # FSDP2: hooks._distributed
        self._want_pe = mode in ("per_example", "layernorm")
        self._reset()

    # -- attach / detach ---------------------------------------------------------------------
    def attach(self, model, monitor=None) -> None:
        if model is None:
            raise ValueError("GradientNoiseScale needs the model: Monitor(model, [GradientNoiseScale()])")
        model, wrapper = unwrap_ddp(model)   # torch.compile'd / DDP: the parameters are shared
        ddp = self._ddp_model or getattr(monitor, "ddp_model", None) or wrapper
        owners: dict[int, list[nn.Module]] = {}    # every module holding a parameter (ties: all)
        for m in model.modules():
            for p in m.parameters(recurse=False):
                owners.setdefault(id(p), []).append(m)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # ties: once
        if not named:
            raise ValueError("GradientNoiseScale: the model has no trainable parameters")
        self._params = [p for _, p in named]
        self._index = {id(p): i for i, p in enumerate(self._params)}
        self._device = self._params[0].device
        self._multi_device = any(p.device != self._device for p in self._params)
        # membership matrix (G, P): row 0 = every parameter, then one row per group
        names = ["total"]
        rows: list[list[int]] = [list(range(len(named)))]
        if self._group_fn is not None:
            for i, (n, p) in enumerate(named):
                for g in self._group_fn(n, owners.get(id(p), [])):
                    if g not in names:
                        names.append(g)
                        rows.append([])
                    rows[names.index(g)].append(i)
        member = torch.zeros(len(names), len(named), dtype=torch.float32)
        for r, idx in enumerate(rows):
            member[r, idx] = 1.0
        self._member = member.to(self._device)
        self._zero = torch.zeros((), device=self._device)
        self._reset()
        self.trackers = {g: GNSTracker(self.ema) for g in names}
        if self._state_to_load is not None:
            self.load_state_dict(self._state_to_load)
        # FSDP2 (sharded): the backward sees the unsharded parameters; .grad holds this rank's shard
        self._sharded = is_sharded(model) or bool(getattr(monitor, "sharded", False))
        if self._sharded and self.bookkeeping:
            raise ValueError("bookkeeping=True writes the batch weight gradients itself; under FSDP2 (a sharded "
                             "model) FSDP owns them: use bookkeeping=False")
        if self.mode in ("microbatch", "auto") and self._sharded:
            self._unsharded = UnshardedGradHooks(model, {n: i for i, (n, _) in enumerate(named)},
                                                 self._make_grad_hook)
        elif self.mode in ("microbatch", "auto"):
            for i, p in enumerate(self._params):
                self._handles.append(p.register_hook(self._make_grad_hook(i)))
        if self.mode in ("per_example", "layernorm") or (
                self.mode == "auto" and self.fallback == "per_example" and self._world() <= 1):
            self._pe = _PerExample(model, "norms" if self.mode == "layernorm" else "all",
                                   [n for n, _ in named], self._device, bookkeeping=self.bookkeeping,
                                   gram=self.per_domain)
            if not self._pe.n_covered:     # no module of this model has a per-example rule
                what = ("normalisation layer" if self.mode == "layernorm" else "module")
                why = "; ".join(f"{k}: {v}" for k, v in self._pe.pe.unsupported.items()) or "none found"
                self._pe = None
                if self.mode != "auto":
                    raise ValueError(
                        f"mode {self.mode!r}: per-example gradient norms (hooks.per_example) cover "
                        f"no trainable parameter of this model (no supported {what}; unsupported: "
                        f"{why}). Use mode='microbatch' (grad_accum >= 2), 'ddp' or 'auto'.")
            else:
                # auto: from the start, dropped once a step accumulates; a resumed run continues as it was
                self._want_pe = True if self._resumed_want_pe is None else self._resumed_want_pe
        if self.mode == "ddp":
            if self._sharded:
                raise ValueError("mode 'ddp' reads DDP's gradient buckets; this model is sharded (FSDP2): "
                                 "use mode='microbatch' (grad_accum >= 2) or 'auto'")
            if self._world() <= 1:
                raise ValueError("mode 'ddp' needs several processes (torch.distributed initialised "
                                 "with world_size > 1); use 'microbatch' (grad_accum >= 2) or 'auto'")
            if ddp is None:
                raise ValueError("mode 'ddp' needs the DistributedDataParallel wrapper: "
                                 "Monitor(model, hooks, ddp_model=ddp) or GradientNoiseScale(ddp_model=ddp)")
            if getattr(ddp, "_comm_hooks", None):
                raise ValueError("mode 'ddp': this DDP model already has a communication hook "
                                 "(DDP allows one); use mode='microbatch' or 'auto'")
            ddp.register_comm_hook(self.process_group, self._comm_hook)  # once, before any backward
        self._comm_enabled = self.mode == "ddp"
        self._armed = self.every == 1   # every > 1: on_step_begin arms the measured steps
        if self._armed and self._pe is not None and self._pe_on(0):
            self._pe.attach()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._unsharded is not None:
            self._unsharded.remove()
            self._unsharded = None
        self._armed = False
        self._comm_enabled = False   # a DDP comm hook cannot be removed: it keeps all-reducing
        if self._pe is not None:
            self._pe.detach()

    # -- the autograd side: cheap when not armed -------------------------------------------------
    def _make_grad_hook(self, i: int):
        def grad_hook(grad):
            # fires once per backward with this parameter's whole contribution (tied weights:
            # the summed gradient of every use), before it is added to .grad
            if self._armed:
                if grad.is_sparse:
                    grad = grad.coalesce().values()
                flat = grad.reshape(-1)
                if flat.dtype == torch.float32:    # |c|^2 in one kernel (faster than a norm)
                    sq = torch.dot(flat, flat)
                elif flat.dtype == torch.float64:  # kept in float32 like every other norm
                    sq = torch.dot(flat, flat).float()
                else:                              # bf16/fp16: accumulate in float32
                    sq = torch.linalg.vector_norm(flat, dtype=torch.float32).square()
                self._cur[i] = sq.to(self._device) if self._multi_device else sq
                self._cur_any = True
            return None

        return grad_hook

    def _comm_hook(self, state, bucket):
        """DDP comm hook: local squared norms of the bucket, then the usual average all-reduce."""
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if self._armed and self._comm_enabled:
            try:  # the all-reduce below must happen whatever goes wrong here
                grads = bucket.gradients()
                norms = [n.float() for n in torch._foreach_norm(grads, 2, dtype=norm_dtype(grads))]
                for p, n in zip(bucket.parameters(), norms):
                    i = self._index.get(id(p))
                    if i is not None:
                        self._comm[i] = n.to(self._device) if self._multi_device else n
                self._comm_fired = True
            except Exception as e:  # pragma: no cover - defensive
                self._comm_error = f"{type(e).__name__}: {e}"
        return default_hooks.allreduce_hook(state, bucket)  # SUM then / world (AVG is NCCL-only)

    # -- events --------------------------------------------------------------------------------
    def scheduled(self, step: int) -> bool:
        return step % self.every == 0

    def on_step_begin(self, step: int) -> None:
        # Called before the first backward (explicitly) or right after it (the Monitor's implicit
        # arming); in the second case the first micro-batch is not seen: still unbiased.
        self._armed = True
        if self._pe is not None:
            self._pe.pe.gram = self._domain_step(step)   # the per-example Gram only where it is used
            if self._pe_on(step):
                self._pe.attach()   # between backward and forward: safe (its hooks are forward hooks)

    def _domain_step(self, step: int) -> bool:
        return self.per_domain and (step // self.every) % self.domain_every == 0

    def _pe_on(self, step: int) -> bool:
        """Per-example hooks wanted at ``step``: the mode's own choice, or auto mode's per-domain steps."""
        return self._want_pe or (self.mode == "auto" and not self._pe.broken and self._domain_step(step))

    def on_backward_end(self, batch_size: int, losses=None, ids=None, domains=None) -> None:
        self._n_backward += 1           # first: every rank must agree on it (on_grads_ready)
        self._micro_domains = domains   # read by _backward_end (per-domain GNS)
        self._guard(self._backward_end, float(batch_size))

    def _backward_end(self, b: float) -> None:
        domains, self._micro_domains = getattr(self, "_micro_domains", None), None
        self._inv_b_all += 1.0 / b
        if self._cur_any:
            vec = torch.stack([x if x is not None else self._zero for x in self._cur])  # (P,) |c_k|^2
            self._small_acc = vec if self._small_acc is None else self._small_acc + vec
            self._n_recorded += 1
            self._inv_b_rec += 1.0 / b
            self._cur = [None] * len(self._params)
            self._cur_any = False
        if self._pe is not None and self._pe.attached:
            try:
                self._pe.harvest()
            except Exception as e:   # per-example norms failed: say so, fall back to the rest
                self._drop_pe(f"per-example gradient norms failed ({type(e).__name__}: {e})")
                return
            if self._pe.grams and domains is not None:
                try:
                    self.domains.add(self._pe.grams, domains)
                except Exception as e:   # per-domain only: the global estimate goes on
                    self.domains.reset()
                    self._notice(f"per-domain GNS not measured ({type(e).__name__}: {e})")

    def on_grads_ready(self) -> None:
        """Accumulated (all-reduced) gradients in .grad, before clipping: form this step's norms."""
        self._pending = None
        world = self._world()
        kind = self._resolve(world)
        if kind is None and (world <= 1 or self._n_backward == 0):
            return
        mask = None
        try:
            if kind is None or self._failed:
                raise RuntimeError("not measured on this rank")  # under DDP: NaN, join the all-reduce
            if kind == "per_example":   # B_small = 1: mean_i |g_i|^2 (pe undid the 1/B of the mean)
                a = self._n_backward
                small_p = self._pe.acc * (a * a / self._pe.n_examples)
                mask = self._pe.tracked
                b_small, b_big = 1.0, world * a * a / self._inv_b_all
            elif kind == "ddp-comm":
                small_p = torch.stack([x if x is not None else self._zero for x in self._comm]).square()
                b_small = self._n_backward ** 2 / self._inv_b_all  # the rank's batch (mean of micros)
                b_big = world * b_small
                if self._comm_error:
                    small_p = small_p * float("nan")
            else:  # micro-batch contributions c_k = g_k / accum (loss / accum): undo with accum^2
                a, r = self._n_backward, self._n_recorded
                small_p = self._small_acc * (a * a / r)
                b_small = r / self._inv_b_rec                      # harmonic mean of micro sizes
                b_big = world * a * a / self._inv_b_all            # = world * accum * micro
            big_p = self._grad_sq()
            if mask is not None:          # only parameters with per-example norms, both sides
                big_p = big_p * mask
            scale = self._scale()
            if scale != 1.0:
                small_p = small_p / scale ** 2
                if not self.grads_unscaled:
                    big_p = big_p / scale ** 2
            small, big = self._member @ small_p, self._member @ big_p   # (G,), (G,)
        except Exception:
            if world <= 1:
                raise
            # under DDP every rank must join the all-reduce below: measure NaN (skipped) instead
            n = self._member.shape[0]
            small = big = torch.full((n,), float("nan"), device=self._device)
            b_small, b_big = 1.0, 2.0
        if world > 1:  # mean over ranks of the local |G_small|^2 (sharded: and the sum of the shards' |.grad|^2)
            small, big = reduce_small_big(small, big, world, self._sharded, self.process_group)
        if kind is None:
            return
        self.last_mode = {"ddp-comm": "ddp", "ddp-local": "ddp"}.get(kind, kind)
        if self.last_mode == "per_example" and self.mode == "layernorm":
            self.last_mode = "layernorm"
        live = None
        if mask is not None:   # groups with per-example norms; auto: only complete groups, so its
            have = self._member @ mask      # EMAs never mix a subset with the whole group
            live = have > 0 if self.mode != "auto" else have >= self._member.sum(1) - 0.5
        self._pending = (torch.stack([small, big]).detach(), float(b_small), float(b_big), live)

    def on_step_end(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
        return self._guard(self._step_end, step, scalars) or {}

    def _guard(self, fn, *args):
        """Under DDP a hook must never be disabled on one rank only: the others would wait in the
        next all-reduce. There an error becomes a one-time notice and an unmeasured step."""
        if self._world() <= 1:
            return fn(*args)
        try:
            return fn(*args)
        except Exception as e:
            self._failed = True
            self._notice(f"error under DDP, step not measured ({type(e).__name__}: {e})")
            if fn == self._step_end:          # the step is over: start the next one clean
                self._reset()
                self._armed = True
            return None

    def _domain_metrics(self) -> dict[str, float]:
        """This step's per-domain metrics (before ``_reset``): only where the per-example norms cover
        the parameters the global estimate uses (auto mode: all of them)."""
        if not self.domains.pending:
            return {}
        tracked = self._pe.tracked if self._pe is not None else None
        if tracked is None or self._n_backward == 0 or (
                self.mode == "auto" and not bool(tracked.min() > 0)) or self._failed:
            self.domains.reset()
            return {}
        try:
            return self.domains.step_end(float(self._n_backward) ** 2 / self._scale() ** 2)
        except Exception as e:
            self._notice(f"per-domain GNS not measured ({type(e).__name__}: {e})")
            return {}

    def _step_end(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
        dom = self._domain_metrics()
        pending, accumulated = self._pending, self._n_backward > 1 or self._world() > 1
        if self.mode == "auto" and self._pe is not None and self._n_backward:
            self._want_pe = not accumulated   # auto: per-example only while steps have one batch size
        self._reset()
        self._armed = self.every == 1 or self.scheduled(step + 1)
        if self._pe is not None and self._pe.attached and not (self._armed and self._pe_on(step + 1)):
            self._pe.detach()
        if pending is None:
            return dom
        vec, b_small, b_big, live = pending
        small, big = vec.double().cpu().tolist()       # the one host sync, after the step
        live = [True] * len(small) if live is None else live.cpu().tolist()
        tpe = self.tokens_per_example or scalars.get("train/seq_len")
        if not (math.isfinite(small[0]) and math.isfinite(big[0])):
            self.n_skipped += 1                           # NaN/inf gradients: EMAs untouched
            out = self.trackers["total"].result().to_metrics("gns", raw=False)
            out["gns/skipped"] = self.n_skipped
            return {**out, **dom}
        try:  # McCandlish et al. App. A, all groups at once
            grad_sq, trace_cov = two_batch_estimates(small, big, b_small, b_big)
        except ValueError as e:   # b_small == b_big (odd micro-batch sizes): nothing to compare
            self.n_unmeasured += 1
            self._notice(str(e))
            return dom
        out: dict[str, float] = dict(dom)
        for j, (g, tracker) in enumerate(self.trackers.items()):
            if not live[j]:
                continue
            res = tracker.update_estimates(grad_sq[j], trace_cov[j])
            prefix = "gns" if g == "total" else f"gns/{g}"
            if g == "total" or self.group_details:
                out.update(res.to_metrics(prefix, raw=False))
                out.update({f"{prefix}/small_sq": small[j], f"{prefix}/big_sq": big[j],
                            f"{prefix}/b_small": b_small, f"{prefix}/b_big": b_big})
            else:
                out[f"{prefix}/b_simple"] = res.b_simple
            if g == "total" and tpe:
                out["gns/b_simple_tokens"] = res.b_simple * float(tpe)
        self.n_measured += 1
        out["gns/skipped"] = self.n_skipped
        return out

    # -- helpers -------------------------------------------------------------------------------
    def _reset(self) -> None:
        n = len(self._params)
        self._cur: list[torch.Tensor | None] = [None] * n
        self._cur_any = False
        self._comm: list[torch.Tensor | None] = [None] * n
        self._comm_fired, self._comm_error = False, ""
        self._small_acc: torch.Tensor | None = None
        self._n_backward = self._n_recorded = 0
        self._inv_b_all = self._inv_b_rec = 0.0
        self._pending = None
        self._failed = False
        if self._pe is not None:
            self._pe.reset()
        self.domains.reset()

    def _world(self) -> int:
        if self._world_size is not None:
            return int(self._world_size)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.process_group)
        return 1

    def _resolve(self, world: int) -> str | None:
        """Which measurement this step supports; None (with a one-time notice) when none."""
        if self._n_backward == 0:
            return None
        if self.mode == "ddp":
            if self._comm_fired:
                return "ddp-comm"
            self.n_unmeasured += 1
            self._notice("mode 'ddp': the DDP communication hook did not run this step (is the "
                         "model wrapped in the DDP module given to the Monitor, and was the last "
                         "backward outside no_sync?); GNS not measured.")
            return None
        if self._n_recorded >= 1 and self._n_backward > 1:
            return "microbatch"
        if self.mode in ("per_example", "layernorm") or (self._pe is not None and self._pe.n_examples):
            if self._pe is not None and self._pe.n_examples:
                return "per_example"
            self.n_unmeasured += 1
            self._notice(f"mode {self.mode!r}: no per-example gradient norms this step (see the "
                         "PerExampleGradNorms warnings for unsupported modules); GNS not measured.")
            return None
        if self._n_recorded >= 1 and world > 1:
            return "microbatch" if self.mode == "microbatch" else "ddp-local"
        self.n_unmeasured += 1
        if self._pe is not None and not self._pe.broken and self.mode == "auto":
            self._notice(PE_TAKEOVER_MSG)    # once per hook (and run: notices are checkpointed)
            return None
        self._notice(ONE_BATCH_SIZE_MSG if self._n_recorded >= 1 or self._n_backward == 1 else
                     "no micro-batch gradient was seen this step (call monitor.on_step_begin "
                     "before the first backward); GNS not measured.")
        return None

    def _grad_sq(self) -> torch.Tensor:
        """(P,) squared norms of the accumulated .grad (0 for parameters without a gradient)."""
        have = [i for i, p in enumerate(self._params) if p.grad is not None]
        if not have:
            return torch.zeros(len(self._params), device=self._device)
        grads = [self._params[i].grad for i in have]
        if self._sharded:   # this rank's DTensor shards: summed over the ranks in on_grads_ready
            sq = torch.stack([n.to(self._device) for n in local_sq_norms(grads)])
        else:
            try:
                norms = [n.float() for n in torch._foreach_norm(grads, 2, dtype=norm_dtype(grads))]
            except (RuntimeError, TypeError, AttributeError):   # sparse grads, old torch
                norms = [torch.linalg.vector_norm(g.coalesce().values() if g.is_sparse else g,
                                                  dtype=norm_dtype([g])).float() for g in grads]
            if self._multi_device:
                norms = [n.to(self._device) for n in norms]
            sq = torch.stack(norms).square()
        if len(have) == len(self._params):
            return sq
        return torch.zeros(len(self._params), device=self._device).index_copy_(
            0, torch.tensor(have, device=self._device), sq)

    def _scale(self) -> float:
        s = self.grad_scale
        if s is None:
            return 1.0
        if hasattr(s, "get_scale"):
            s = s.get_scale()
        elif callable(s):
            s = s()
        return float(s)

    def _drop_pe(self, why: str) -> None:
        self._pe.broken = True
        self._pe.detach()
        self._want_pe = False
        self._notice(why + "; GNS falls back to the other modes.")

    def _notice(self, msg: str) -> None:
        warn_once(self.notices, msg, f"midtrain GradientNoiseScale: {msg}", stacklevel=3)

    # -- results and state -----------------------------------------------------------------------
    def summary(self) -> dict[str, float]:
        if not self.trackers:
            return {}
        out = self.trackers["total"].result().to_metrics("gns", raw=False)
        for g, t in self.trackers.items():
            if g != "total":
                out[f"gns/{g}/b_simple"] = t.result().b_simple
        out.update(self.domains.summary())
        out.update({"gns/measured": self.n_measured, "gns/skipped": self.n_skipped,
                    "gns/unmeasured": self.n_unmeasured})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "trackers": {g: t.state_dict() for g, t in self.trackers.items()},
                "n_measured": self.n_measured, "n_skipped": self.n_skipped,
                "n_unmeasured": self.n_unmeasured, "notices": list(self.notices),
                "want_pe": self._want_pe, "domains": self.domains.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not self.trackers:       # not attached yet: apply at attach
            self._state_to_load = dict(state)
            return
        self._state_to_load = None
        for g, s in state.get("trackers", {}).items():
            if g in self.trackers:
                self.trackers[g].load_state_dict(s)
        self.n_measured = int(state.get("n_measured", 0))
        self.n_skipped = int(state.get("n_skipped", 0))
        self.n_unmeasured = int(state.get("n_unmeasured", 0))
        self.notices = list(state.get("notices", []))
        self.domains.load_state_dict(state.get("domains", {}))   # older checkpoints: none
        if self.mode == "auto" and "want_pe" in state:  # older checkpoints: auto starts per-example again
            self._resumed_want_pe = self._want_pe = bool(state["want_pe"])
            if self._pe is not None and self._pe.attached and not self._want_pe:
                self._pe.detach()
            elif self._pe is not None and self._armed and self._want_pe and not self._pe.attached:
                self._pe.attach()
