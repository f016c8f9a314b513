"""Per-domain gradient noise scale for ``hooks.gradient_noise`` (docs/gns.md, "Per-domain GNS").

On a step measured with per-example norms, ``hooks.per_example`` also keeps each micro-batch's
(B, B) Gram matrix of per-example gradients (``PerExampleGradNorms(gram=True)``,
``diagnostics.gns.pegram``). The ``domains`` the loop passes to ``on_backward_end`` then pick each
domain's block: ``|S_d|^2`` (the domain's summed gradient) and ``sum_i |g_i|^2``, from which
``diagnostics.gns.grouped_estimates`` gives unbiased ``|G_d|^2`` and ``tr(Sigma_d)``; one GNSTracker
per domain smooths them as the global one does (ratio of EMAs).

Everything stays on the device during the step (the Grams are B x B); at the step's end, where the
hook syncs anyway, they move to the host once. Kept apart from the global reductions on purpose
(FSDP / DDP work touches those, not this).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from diagnostics.gns import GNSTracker, grouped_estimates
from hooks._common import domain_indices, domain_name


class _DomainGNS:
    """Per-domain trackers, the step's pending (Gram, domains) pairs, and the names registry."""

    def __init__(self, ema: float, domain_names=None):
        self.ema = float(ema)
        self.names: list[str] = list(domain_names) if domain_names is not None else []
        self.trackers: dict[str, GNSTracker] = {}
        self.pending: list[tuple[torch.Tensor, Any]] = []     # (K (B, B), domains (B,)) per forward pass

    def reset(self) -> None:
        self.pending = []

    def add(self, grams: list[torch.Tensor], domains) -> None:
        """One micro-batch: the Grams of its forward passes (in order) and its ``domains`` (names or
        indices, one per example of all those passes)."""
        if domains is None or not grams:
            return
        idx = domain_indices(domains, self.names)
        start = 0
        for K in grams:
            b = K.shape[0]
            self.pending.append((K.detach(), idx[start:start + b]))
            start += b
        if start != len(idx):
            self.pending = []
            raise ValueError(f"domains= has {len(idx)} entries but the per-example norms cover {start} "
                             "examples; per-domain GNS needs one domain per example")

    def step_end(self, factor: float) -> dict[str, float]:
        """Update the trackers from this step's pending blocks; ``factor`` scales the Grams (the
        accumulation^2 / loss-scale^2 of the global estimate). Returns the step's metrics."""
        pending, self.pending = self.pending, []
        if not pending:
            return {}
        doms = [d.cpu().numpy() if isinstance(d, torch.Tensor) else np.asarray(d) for _, d in pending]
        if any(len(d) and d.min() < 0 for d in doms):
            raise ValueError("domains= holds a negative index; domains are indices >= 0 or names")
        D = max((int(d.max()) + 1 for d in doms if len(d)), default=0)
        if D == 0:
            return {}
        K = len(pending)
        tot, sq, n = np.zeros((K, D)), np.zeros((K, D)), np.zeros((K, D))
        for k, ((gram, _), d) in enumerate(zip(pending, doms)):
            g = gram.double().cpu().numpy() * factor
            np.add.at(n[k], d, 1.0)
            np.add.at(sq[k], d, np.diagonal(g))
            onehot = np.eye(D)[d]                      # (B, D)
            tot[k] = np.einsum("id,ij,jd->d", onehot, g, onehot)
        grad_sq, trace_cov = grouped_estimates(tot, sq, n)
        out: dict[str, float] = {}
        for j in range(D):
            if not math.isfinite(grad_sq[j]):           # fewer than two examples of d in any pass
                continue
            name = domain_name(self.names, j)
            tracker = self.trackers.get(name)
            if tracker is None:
                tracker = self.trackers[name] = GNSTracker(self.ema)
            res = tracker.update_estimates(grad_sq[j], trace_cov[j])
            p = f"gns/domain/{name}"
            out.update({f"{p}/b_simple": res.b_simple, f"{p}/grad_sq": res.grad_sq,
                        f"{p}/trace_cov": res.trace_cov,
                        f"{p}/small_sq": float(sq[:, j].sum() / n[:, j].sum()),
                        f"{p}/b_big": float(n[:, j].sum())})
        return out

    def summary(self) -> dict[str, float]:
        return {f"gns/domain/{d}/b_simple": t.result().b_simple for d, t in self.trackers.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "trackers": {d: t.state_dict() for d, t in self.trackers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for d in state.get("names", []):
            if d not in self.names:
                self.names.append(d)
        for d, s in state.get("trackers", {}).items():
            self.trackers.setdefault(d, GNSTracker(self.ema)).load_state_dict(s)
