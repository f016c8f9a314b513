"""The multi-power law of Luo et al. 2025 (arXiv 2503.12811; docs/recommendations.md).

"A Multi-Power Law for Loss Curve Prediction Across Learning Rate Schedules" (ICLR 2025) writes the
loss after t updates of an LR schedule eta_1..eta_t as::

    L(t)  = L0 + A (S1(t) + S_W)^(-alpha) - LD(t)
    LD(t) = B sum_{k=1..t} (eta_{k-1} - eta_k) G(eta_k^(-gamma) S_k(t))
    G(x)  = 1 - (C x + 1)^(-beta),     S_k(t) = sum_{tau=k..t} eta_tau

S1(t) + S_W is the LR area of all updates so far, the warmup's included (``lr_areas``' S1). Each LR
decrease eta_{k-1} - eta_k buys a loss drop that grows with the LR area travelled since it (S_k(t),
the update k itself included), measured in units of the lowered LR to the power gamma, and saturates
at B times the decrease (G -> 1): a power law in each decrease's own time since it happened, hence
"multi-power". Seven parameters: L0, A, alpha, B, C, beta, gamma.

Which LR changes count. The paper's law starts at the end of the warmup (eta_0 = the peak) and so
does its LR-schedule optimiser (``optimization.py``: the sum runs over the post-warmup decreases, the
warmup only enters as the area S_W). Its fitting and evaluation code (``src/models.py``
``MPL.forward``, ``src/evaluation.py``), which produced the published parameters and errors, sums
the LR differences over the whole sequence, the warmup's increases included (with the opposite sign:
they add to the loss; ~B x peak once saturated, which L0 mostly absorbs). The default here follows
that code (``ignore_initial_warmup=False``): with it the authors' published parameters reproduce
their published errors exactly (``benchmarks/schedule_laws.py``), and the joint fit converges in
fewer evaluations; ``ignore_initial_warmup=True`` is the paper's formula. A later increase (a
re-warmup) counts with its sign either way. An LR of 0 is floored at 1e-8 x the largest LR (a decay
to 0: eta^-gamma would be infinite). Step convention of this package (``_laws``): the loss at step s
pairs with the law after s updates, i.e. with the LRs ``lrs[0..s-1]``; the authors' code pairs the
loss logged at step s with ``lrs[0..s]`` (one update more: immaterial at these lengths).

Cost. The obvious LD is a double sum, O(T^2) for the loss after every one of T updates. Only the
updates where the LR changes contribute (none on a constant stretch, one at a step change, every
update of a smooth decay), and a fit needs LD only at the logged steps: ``loss_drop`` evaluates
the terms for (logged step, LR change before it) pairs only, vectorised in row blocks, with the
parameter-free part (the areas S_k(t)) computed once per curve (``_MPFeatures``) and reused by every
evaluation of the fit. Its derivatives in C, beta, gamma are closed-form (``_MPFeatures.jac``).
"""

from __future__ import annotations

import numpy as np

from diagnostics.schedule._fit import profile_linear
from diagnostics.schedule._laws import lr_decreases

__all__ = ["loss_drop", "multi_power_law", "MULTI_POWER_PARAMS"]

MULTI_POWER_PARAMS = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
_BLOCK = 1 << 21          # pair-matrix entries per block (16 MiB of float64)
_FLOOR = 1e-8            # LR floor, relative to the largest LR: a decrease to 0 gets G ~ 1, no overflow


def _changes(lrs: np.ndarray, steps: np.ndarray, ignore_initial_warmup: bool = True):
    """For the loss after ``steps`` updates: the updates j (0-based) where the LR changed, their
    decreases d_j = eta_{j-1} - eta_j, their LRs, and for every step the number of changes before it
    and the area before each change (cum[j-1])."""
    d = lr_decreases(lrs, ignore_initial_warmup)
    j = np.flatnonzero(d)
    cum = np.cumsum(lrs)
    before = cum[j] - lrs[j]                          # area of updates 0..j-1
    n_before = np.searchsorted(j, steps, side="left")  # changes j <= step - 1
    return j, d[j], np.maximum(lrs[j], _FLOOR), before, cum, n_before


def _row_blocks(n_before: np.ndarray):
    """Row blocks [r0, r1) of sorted steps whose pair matrix (rows x changes before the last row) has
    at most _BLOCK entries (at least one row)."""
    r0, n = 0, len(n_before)
    while r0 < n:
        r1 = r0 + 1
        while r1 < n and (r1 + 1 - r0) * int(n_before[r1]) <= _BLOCK:
            r1 += 1
        yield r0, r1, int(n_before[r1 - 1])
        r0 = r1


def loss_drop(lrs, steps, C: float, beta: float, gamma: float, *, ignore_initial_warmup: bool = False) -> np.ndarray:
    """LD(t) / B: sum_k (eta_{k-1} - eta_k) G(eta_k^(-gamma) S_k(t)) after t = ``steps`` updates of ``lrs``.

    Exact (no binning): only the updates where the LR changed enter, and only those before each step.
    ``steps`` are counts of updates (1 <= t <= len(lrs)), in any order. ignore_initial_warmup: leave the
    increases of the initial warmup out (the paper's formula; default False: the authors' fitting code).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    s = float(lrs.max())
    if s <= 0:
        return np.zeros(len(np.atleast_1d(steps)))
    # in LRs divided by s: d and S scale with s, x with s^(1-gamma)
    return s * _MultiPowerLaw(ignore_initial_warmup)._drop_at(lrs / s, steps, C * s ** (1 - gamma), beta, gamma)


def multi_power_law(lrs, steps, L0: float, A: float, alpha: float, B: float, C: float, beta: float,
                    gamma: float, *, ignore_initial_warmup: bool = False) -> np.ndarray:
    """L(t) of the multi-power law after t = ``steps`` updates of the LR sequence ``lrs``."""
    q = dict(L0=L0, A=A, alpha=alpha, B=B, C=C, beta=beta, gamma=gamma)
    return _MultiPowerLaw(ignore_initial_warmup).predict(q, lrs, np.asarray(steps, dtype=np.int64))


class _MPFeatures:
    """The parameter-free part of LD for one curve: per row block of the (sorted) ``steps``, the areas
    S_k(t) of the (step t, change k) pairs, 0 where k > t (then x = 0 and G = 0: no mask needed).
    ``store``: keep the blocks for repeated evaluation (a fit); else rebuild them on every call."""

    def __init__(self, lrs: np.ndarray, steps: np.ndarray, ignore_initial_warmup: bool = True, store: bool = True):
        j, d, eta, before, cum, n_before = _changes(lrs, steps, ignore_initial_warmup)
        self.S1 = cum[steps - 1]
        self.n = len(steps)
        self.d, self.log_eta = d, np.log(eta)
        self._args = (cum, steps, before, n_before)
        self._stored = list(self._build()) if store else None
        self._last = None

    def _build(self):
        cum, steps, before, n_before = self._args
        for r0, r1, w in _row_blocks(n_before):
            if w:
                S = cum[steps[r0:r1] - 1, None] - before[None, :w]
                yield r0, r1, w, np.where(np.arange(w)[None, :] < n_before[r0:r1, None], S, 0.0)

    def _blocks(self):
        return self._stored if self._stored is not None else self._build()

    def _terms(self, C, beta, gamma, w, S):
        x = np.exp(-gamma * self.log_eta[:w])[None, :] * S          # eta_k^-gamma S_k(t)
        u = 1.0 + C * x
        lu = np.log(u)
        return x, u, lu, np.exp(-beta * lu)                          # the last: (C x + 1)^-beta = 1 - G

    def drop(self, C: float, beta: float, gamma: float) -> np.ndarray:
        if self._last is not None and self._last[0] == (C, beta, gamma):
            return self._last[1]           # least_squares asks for the value, then the Jacobian at one point
        out = np.zeros(self.n)
        for r0, r1, w, S in self._blocks():
            out[r0:r1] = (1.0 - self._terms(C, beta, gamma, w, S)[3]) @ self.d[:w]
        return out

    def jac(self, C: float, beta: float, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """(LD/B, d(LD/B)/d(C, beta, gamma) as an (n, 3) array)."""
        out, J = np.zeros(self.n), np.zeros((self.n, 3))
        for r0, r1, w, S in self._blocks():
            x, u, lu, p = self._terms(C, beta, gamma, w, S)
            d = self.d[:w]
            q = beta * p / u * x                                      # dG/dC
            out[r0:r1] = (1.0 - p) @ d
            J[r0:r1, 0] = q @ d
            J[r0:r1, 1] = (p * lu) @ d                                # dG/dbeta
            J[r0:r1, 2] = q @ (-C * d * self.log_eta[:w])             # dG/dgamma = dG/dC * C * (-ln eta)
        self._last = ((C, beta, gamma), out)
        return out, J


class _MultiPowerLaw:
    """The multi-power law for ``_fit.joint_fit``: scaled parameters (L0, A, alpha, B, C, beta, gamma)
    for LRs divided by the scale s (A s^-alpha, B s, C s^(1-gamma) in the LR's own units)."""

    names = MULTI_POWER_PARAMS
    lo = np.array([0.0, 0.0, 1e-3, 0.0, 1e-8, 1e-3, 0.0])
    hi = np.array([np.inf, np.inf, 4.0, np.inf, 1e6, 10.0, 3.0])
    # starts of (C, beta, gamma), scaled; for each, alpha is profiled and L0, A, B, offsets solved linearly
    _STARTS = [(c, b, g) for c in (0.01, 0.1, 1.0) for b in (0.3, 0.6, 1.2) for g in (0.3, 0.6)]

    def __init__(self, ignore_initial_warmup: bool = False):
        self.ignore_initial_warmup = ignore_initial_warmup

    def _drop_at(self, lrs, steps, C, beta, gamma):
        """LD/B at ``steps`` (any order) of LRs already divided by their maximum."""
        steps = np.asarray(steps, dtype=np.int64)
        order = np.argsort(steps, kind="stable")
        out = np.empty(len(steps))
        out[order] = _MPFeatures(lrs, steps[order], self.ignore_initial_warmup, store=False).drop(C, beta, gamma)
        return out

    def features(self, lrs, steps):
        return _MPFeatures(lrs, steps, self.ignore_initial_warmup)

    def value(self, p, f):
        L0, A, alpha, B, C, beta, gamma = p
        return L0 + A * f.S1 ** (-alpha) - B * f.drop(C, beta, gamma)

    def jac(self, p, f):
        L0, A, alpha, B, C, beta, gamma = p
        pw = f.S1 ** (-alpha)
        ld, J = f.jac(C, beta, gamma)
        return np.column_stack([np.ones_like(pw), pw, -A * pw * np.log(f.S1), -ld, -B * J])

    def init(self, feats, y, O):
        S1 = np.concatenate([f.S1 for f in feats])
        best = None
        for C, beta, gamma in self._STARTS:
            ld = np.concatenate([f.drop(C, beta, gamma) for f in feats])
            for alpha in np.geomspace(0.05, 2.0, 25):
                sse, coef = profile_linear([np.ones_like(S1), S1 ** (-alpha), -ld], y, O, nonneg=(0, 1, 2))
                if best is None or sse < best[0]:
                    best = (sse, np.r_[coef[0], max(coef[1], 1e-12), alpha, coef[2], C, beta, gamma, coef[3:]])
        return best[1]

    def natural(self, p, scale):
        L0, A, alpha, B, C, beta, gamma = (float(v) for v in p)
        return {"L0": L0, "A": A * scale ** alpha, "alpha": alpha, "B": B / scale, "C": C * scale ** (gamma - 1),
                "beta": beta, "gamma": gamma}

    def scaled(self, q, scale):
        return np.array([q["L0"], q["A"] / scale ** q["alpha"], q["alpha"], q["B"] * scale,
                         q["C"] / scale ** (q["gamma"] - 1), q["beta"], q["gamma"]])

    def predict(self, q, lrs, steps):
        """The law in the LR's own units ``q`` after ``steps`` updates of ``lrs`` (any order)."""
        lrs = np.asarray(lrs, dtype=np.float64)
        s = float(lrs.max())
        if s <= 0:
            raise ValueError("all learning rates are 0")
        p = self.scaled(q, s)
        S1 = np.cumsum(lrs / s)[np.asarray(steps) - 1]
        with np.errstate(divide="ignore"):
            return p[0] + p[1] * S1 ** (-p[2]) - p[3] * self._drop_at(lrs / s, steps, *p[4:])
