"""Loss-vs-LR-schedule laws and their fitting (Tissue et al. 2024; docs/recommendations.md).

The LR-annealing law of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing",
arXiv 2408.11029) describes the whole loss curve of one run as a function of its LR schedule::

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

    S1(s) = sum_{k=1..s} eta_k                          forward area: the LR summed over the s updates
    S2(s) = sum_{k=1..s} m_k,  m_k = lam * m_{k-1} + (eta_{k-1} - eta_k)
                                                        annealing area with momentum

The first term is the usual power law in "how far the weights have travelled"; the second is the
extra drop that annealing buys. ``m_k`` is an exponential moving sum of the LR decreases so far (the
paper's momentum, decay factor ``lam``, 0.999 in the paper): a decrease keeps lowering the loss for a
while after it happened (the delayed effect of annealing). ``lam = 0`` makes S2 the amount annealed
(eta_0 - eta_s); ``lam = 1`` the area between the peak LR and the LR curve. The LR increases of the
initial warmup are not annealing (the paper measures S2 from the peak): they are left out of the
increments; a later LR increase (a re-warmup) counts with its sign and raises the loss.

Step convention of this package: ``train/loss`` at step s is measured BEFORE update s, i.e. after
s updates, so it pairs with the areas after s updates (``lr_areas(lrs)[.][s-1]``); the loss at the
end of a run of N steps is the law after N updates.

    >>> from diagnostics.schedule import fit_annealing_law, lr_schedule
    >>> n = 1000   # a warmup-stable-decay schedule: 50 warmup steps, the last 20% decaying linearly
    >>> lrs = lr_schedule(np.arange(n), n, lr=3e-3, final_lr=3e-4, warmup_steps=50, decay="linear",
    ...                   decay_fraction=0.2)
    >>> fit = fit_annealing_law(lrs, steps, losses)        # doctest: +SKIP  (steps: where losses were logged)
    >>> fit.predict(other_lrs)[-1]                         # doctest: +SKIP  (final loss under another schedule)

The schedule itself (``lr_schedule``, ``phase_lrs``) is the sibling module ``_lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diagnostics.schedule._fit import check_curves, joint_fit, profile_linear

__all__ = ["lr_areas", "lr_decreases", "annealing_law", "AnnealingLawFit", "fit_annealing_law"]


# -- the areas ---------------------------------------------------------------------------------

def lr_decreases(lrs: np.ndarray, ignore_initial_warmup: bool = True) -> np.ndarray:
    """d_k = eta_{k-1} - eta_k (d_1 = 0), with the initial rise (warmup) set to 0: the LR decreases that
    build the annealing area S2 (``lr_areas``)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    d = np.zeros_like(lrs)
    d[1:] = lrs[:-1] - lrs[1:]
    if ignore_initial_warmup and len(lrs) > 1:
        falls = np.flatnonzero(d[1:] > 0)  # the first LR decrease ends the initial non-decreasing run
        w = (falls[0] + 1) if len(falls) else len(lrs)
        d[:w] = 0.0
    return d


def lr_areas(lrs, *, momentum: float = 0.999, ignore_initial_warmup: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(S1, S2) after k = 1..n updates (index k-1) of the LR sequence ``lrs`` (one LR per update).

    momentum: the decay factor lam of the annealing momentum (Tissue et al. eq. for m_k).
    """
    lrs = np.asarray(lrs, dtype=np.float64)
    if lrs.ndim != 1 or len(lrs) == 0:
        raise ValueError("lrs must be a non-empty 1-D sequence (one learning rate per update)")
    if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
        raise ValueError("lrs must be finite and >= 0")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    d = lr_decreases(lrs, ignore_initial_warmup)
    m = _ema_sum(d, momentum)
    return np.cumsum(lrs), np.cumsum(m)


def _ema_sum(d: np.ndarray, lam: float, m0: float = 0.0) -> np.ndarray:
    """m_k = lam m_{k-1} + d_k (m_0 = m0), vectorised (scipy.signal.lfilter)."""
    from scipy.signal import lfilter

    return lfilter([1.0], [1.0, -lam], d, zi=[lam * m0])[0]


def annealing_law(S1, S2, L0: float, A: float, alpha: float, C: float):
    """L = L0 + A S1^(-alpha) - C S2 (Tissue et al. 2024, eq. 1)."""
    return L0 + A * np.power(S1, -alpha) - C * S2


# -- the fit -----------------------------------------------------------------------------------


@dataclass
class AnnealingLawFit:
    """Fitted parameters of the annealing law, in the LR's own units (``lr_areas`` of the raw LRs)."""

    L0: float
    A: float
    alpha: float
    C: float
    momentum: float
    offsets: dict[int, float] = field(default_factory=dict)  # segment label -> additive loss shift
    rmse: float = math.nan              # of the residuals at the fitted points
    noise: float = math.nan             # robust per-point noise scale of the losses (Huber's scale)
    r2: float = math.nan                # 1 - SSE / SS around the mean
    n_points: int = 0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    residuals: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    fitted: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    @property
    def params(self) -> dict[str, float]:
        return {"L0": self.L0, "A": self.A, "alpha": self.alpha, "C": self.C}

    def predict(self, lrs, segment: int | None = None) -> np.ndarray:
        """The loss after k = 1..n updates of the LR sequence ``lrs`` (plus ``segment``'s offset)."""
        S1, S2 = lr_areas(lrs, momentum=self.momentum)
        with np.errstate(divide="ignore"):
            out = annealing_law(S1, S2, self.L0, self.A, self.alpha, self.C)
        return out + (self.offsets.get(segment, 0.0) if segment is not None else 0.0)

    def final_loss(self, lrs, segment: int | None = None) -> float:
        return float(self.predict(lrs, segment)[-1])


class _AnnealingLaw:
    """The annealing law for ``_fit.joint_fit``: scaled parameters (L0, A, alpha, C), features (S1, S2)
    at the logged steps of LRs divided by the scale."""

    names = ("L0", "A", "alpha", "C")
    lo = np.array([0.0, 0.0, 1e-3, 0.0])     # cross-entropy: L0 >= 0
    hi = np.array([np.inf, np.inf, 4.0, np.inf])

    def __init__(self, momentum: float = 0.999):
        self.momentum = momentum

    def features(self, lrs, steps):
        S1, S2 = lr_areas(lrs, momentum=self.momentum)
        x1 = S1[steps - 1]
        return x1, S2[steps - 1], np.log(x1)

    def value(self, p, f):
        return p[0] + p[1] * f[0] ** (-p[2]) - p[3] * f[1]

    def jac(self, p, f):
        pw = f[0] ** (-p[2])
        return np.column_stack([np.ones_like(pw), pw, -p[1] * pw * f[2], -f[1]])

    def init(self, feats, y, O):
        """alpha profiled on a grid: for a fixed alpha the law is linear in L0, A, C and the offsets."""
        x1 = np.concatenate([f[0] for f in feats])
        x2 = np.concatenate([f[1] for f in feats])
        best = None
        for alpha in np.geomspace(0.02, 3.0, 40):
            sse, coef = profile_linear([np.ones_like(x1), x1 ** (-alpha), -x2], y, O, nonneg=(0, 1, 2))
            coef[1] = max(coef[1], 1e-12)
            if best is None or sse < best[0]:
                best = (sse, np.r_[coef[0], coef[1], alpha, coef[2], coef[3:]])
        return best[1]

    def natural(self, p, scale):
        return {"L0": float(p[0]), "A": float(p[1] * scale ** p[2]), "alpha": float(p[2]), "C": float(p[3] / scale)}

    def scaled(self, q, scale):
        return np.array([q["L0"], q["A"] / scale ** q["alpha"], q["alpha"], q["C"] * scale])

    def predict(self, q, lrs, steps):
        S1, S2 = lr_areas(lrs, momentum=self.momentum)
        with np.errstate(divide="ignore"):
            return annealing_law(S1[steps - 1], S2[steps - 1], q["L0"], q["A"], q["alpha"], q["C"])


def fit_annealing_law(lrs, steps, losses, *, momentum: float = 0.999, segments=None,
                      robust: bool = True, x0: dict | None = None, max_nfev: int = 500) -> AnnealingLawFit:
    """Fit L0, A, alpha, C (and one offset per extra segment) to losses logged at ``steps`` of one run
    (several curves at once: ``fit_schedule_law``, whose joint fit this is with one curve).

    lrs: the LR of every update 0..N-1 (N > max(steps) - 1): the areas are cumulative, so the whole
        history is needed, also where no loss was logged.
    steps: the steps at which ``losses`` were measured, before that step's update (so after ``step``
        updates); steps < 1 are dropped (S1 = 0: the power law is infinite there), and so are
        non-finite losses.
    segments: optional integer label per loss (e.g. the phase's data mixture): every label other
        than the first one's gets its own additive offset, for loss-level jumps the LR does not
        cause (a mixture or sequence-length switch changes what the loss measures).
    robust: fit the raw per-step points with a Huber loss whose threshold is 1.345 x the robust
        noise scale (``robust_noise_scale``; 95% efficiency under Gaussian noise): every step keeps
        its exact S1, S2 (window averages would blur the sharp drop of a short cooldown) and loss
        spikes are down-weighted instead of pulling the fit. ``robust=False``: plain least squares.

    The LR areas are scaled by the peak LR inside (a well-conditioned problem); the parameters are
    returned in the LR's own units. alpha is first profiled on a grid (for a fixed alpha the law is
    linear in L0, A, C and the offsets), then all parameters are refined jointly with bounds
    L0 >= 0 (a cross-entropy; without it a near-flat curve drifts to alpha -> 0 with L0 -> -inf),
    A >= 0, C >= 0, 0.001 <= alpha <= 4 (``scipy.optimize.least_squares``, trust-region reflective).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    steps, losses = np.asarray(steps), np.asarray(losses)
    if steps.shape != losses.shape:
        raise ValueError(f"steps and losses differ in length ({len(steps)} vs {len(losses)})")
    curves = check_curves([(lrs, steps, losses)], None if segments is None else [segments], drop_unusable=True)
    sol = joint_fit(_AnnealingLaw(momentum), curves, robust=robust, x0=x0, max_nfev=max_nfev)
    return AnnealingLawFit(**_AnnealingLaw(momentum).natural(sol.p, sol.scale), momentum=momentum,
                           offsets=sol.offsets, rmse=sol.rmse, noise=sol.noise, r2=sol.r2, n_points=sol.n_points,
                           steps=curves[0].steps, residuals=sol.residuals, fitted=sol.fitted)
