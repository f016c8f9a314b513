"""``fit_schedule_law``: one law fitted jointly to several loss curves, the choice between the laws by
leave-one-curve-out prediction, and the prediction with its bootstrap band (docs/recommendations.md).

    >>> fit = fit_schedule_law([(lrs_cos, steps, loss_cos), (lrs_const, steps2, loss_const)],
    ...                        law="auto")                          # doctest: +SKIP
    >>> fit.law, fit.params                                          # doctest: +SKIP
    >>> fit.predict(lrs_wsd)[-1]                                     # doctest: +SKIP  (loss after all updates)
    >>> lo, hi = fit.predict_interval(lrs_wsd, level=0.9)            # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from diagnostics.schedule._fit import Curve, Solution, check_curves, joint_fit
from diagnostics.schedule._laws import _AnnealingLaw
from diagnostics.schedule._luo2025 import luo2025_fit
from diagnostics.schedule._multi_power import _MultiPowerLaw
from diagnostics.stats import moving_block_indices

__all__ = ["LAWS", "PROTOCOLS", "ScheduleLawFit", "fit_schedule_law", "relative_error"]

LAWS = ("annealing", "multi_power")
PROTOCOLS = ("least_squares", "luo2025")


def _law(name: str, momentum: float):
    return _AnnealingLaw(momentum) if name == "annealing" else _MultiPowerLaw()


@dataclass
class ScheduleLawFit:
    """One law's parameters fitted jointly to several curves (``fit_schedule_law``)."""

    law: str                                  # "annealing" or "multi_power"
    params: dict[str, float]                  # in the LR's own units
    offsets: dict[int, float] = field(default_factory=dict)   # segment label -> additive loss shift
    momentum: float = 0.999                   # the annealing law's lam (unused by the multi-power law)
    rmse: float = math.nan
    noise: float = math.nan                   # pooled robust per-point noise of the losses
    r2: float = math.nan
    n_points: int = 0
    residuals: list = field(default_factory=list, repr=False)   # per curve, at its (sorted) steps
    selection: dict = field(default_factory=dict)   # law="auto": how the law was chosen
    _curves: list = field(default_factory=list, repr=False)
    _solution: Solution | None = field(default=None, repr=False)
    _robust: bool = field(default=True, repr=False)
    protocol: str = "least_squares"           # how the multi-power law was fitted (``fit_schedule_law``)
    _boot: dict = field(default_factory=dict, repr=False)

    def _steps(self, lrs, steps):
        n = len(lrs)
        s = np.arange(1, n + 1) if steps is None else np.asarray(steps, dtype=np.int64)
        if len(s) and (s.min() < 1 or s.max() > n):
            raise ValueError(f"steps must be within 1..{n} (the loss after that many updates of lrs)")
        return s

    def _predict_with(self, params, lrs, steps, segment):
        lrs = np.asarray(lrs, dtype=np.float64)
        if lrs.ndim != 1 or len(lrs) == 0 or not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise ValueError("lrs must be a non-empty 1-D sequence of finite learning rates >= 0")
        out = _law(self.law, self.momentum).predict(params, lrs, self._steps(lrs, steps))
        return out + (self.offsets.get(segment, 0.0) if segment is not None else 0.0)

    def predict(self, lrs, segment: int | None = None, steps=None) -> np.ndarray:
        """The loss after k = 1..n updates of the LR sequence ``lrs`` (plus ``segment``'s offset), or
        after ``steps`` updates only. The multi-power law costs O(len(steps) x LR changes): for a long
        smooth decay ask for the steps you need."""
        return self._predict_with(self.params, lrs, steps, segment)

    def final_loss(self, lrs, segment: int | None = None) -> float:
        return float(self.predict(lrs, segment, steps=[len(lrs)])[0])

    def bootstrap_params(self, n_boot: int = 100, seed: int = 0, max_nfev: int = 50) -> list[dict]:
        """Parameter sets refitted to moving-block residual bootstrap replicates of the curves: each curve's
        fitted values plus its residuals resampled in blocks of consecutive logged steps
        (``diagnostics.stats.moving_block_indices``; neighbouring steps keep their correlation), all
        curves at once, warm-started at the fit. Cached per (n_boot, seed)."""
        key = (n_boot, seed, max_nfev)
        if key not in self._boot:
            sol, curves = self._solution, self._curves
            law = _law(self.law, self.momentum)
            feats = [law.features(c.lrs / sol.scale, c.steps) for c in curves]
            fitted = np.split(sol.fitted, np.cumsum(sol.sizes)[:-1])
            rng = np.random.default_rng(seed)
            idx = [moving_block_indices(len(c.y), n_boot, rng)[0] for c in curves]
            reps = []
            for b in range(n_boot):
                boot = [Curve(c.lrs, c.steps, f + r[i[b]], c.seg)
                        for c, f, r, i in zip(curves, fitted, self.residuals, idx)]
                try:
                    if self.law == "multi_power" and self.protocol == "luo2025":   # its stage 2 from the fit
                        s = luo2025_fit(law, boot, x0=self.params, scale=sol.scale, noise=sol.noise, feats=feats)
                    else:
                        s = joint_fit(law, boot, robust=self._robust, x0=self.params, max_nfev=max_nfev,
                                      scale=sol.scale, noise=sol.noise, feats=feats)
                except ValueError:
                    continue
                reps.append((law.natural(s.p, s.scale), s.offsets))
            self._boot[key] = reps
        return self._boot[key]

    def predict_interval(self, lrs, level: float = 0.9, segment: int | None = None, steps=None, *,
                         n_boot: int = 100, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(low, high): the equal-tailed ``level`` percentile band of the predicted loss over the
        ``bootstrap_params`` refits. It is the uncertainty of the fitted law's curve (the expected
        loss) that the noise in the fitted curves leaves, residual misfit included as far as the
        residuals show it; not a band for one run's noisy logged loss, and not for the law being
        wrong about a schedule shape it never saw (``selection``'s leave-one-curve-out errors show
        that)."""
        if not 0 < level < 1:
            raise ValueError(f"level must be in (0, 1), got {level}")
        reps = self.bootstrap_params(n_boot, seed)
        if len(reps) < 2:
            raise ValueError("fewer than 2 bootstrap refits succeeded; no band")
        preds = []
        for params, offs in reps:
            p = self._predict_with(params, lrs, steps, None)
            preds.append(p + (offs.get(segment, 0.0) if segment is not None else 0.0))
        a = (1 - level) / 2
        lo, hi = np.quantile(np.array(preds), [a, 1 - a], axis=0)
        return lo, hi


def _fit_one(name: str, curves: list[Curve], momentum: float, robust: bool, max_nfev: int,
             protocol: str = "least_squares") -> ScheduleLawFit:
    law = _law(name, momentum)
    luo = name == "multi_power" and protocol == "luo2025"
    sol = luo2025_fit(law, curves) if luo else joint_fit(law, curves, robust=robust, max_nfev=max_nfev)
    return ScheduleLawFit(law=name, params=law.natural(sol.p, sol.scale), offsets=sol.offsets, momentum=momentum,
                          rmse=sol.rmse, noise=sol.noise, r2=sol.r2, n_points=sol.n_points,
                          residuals=np.split(sol.residuals, np.cumsum(sol.sizes)[:-1]), _curves=curves,
                          _solution=sol, _robust=robust, protocol="luo2025" if luo else "least_squares")


def relative_error(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|pred - y| / y per point (the multi-power-law paper's PredE averages it, WorstE takes its max)."""
    return np.abs(pred - y) / np.abs(y)


def _leave_one_out(curves: list[Curve], momentum: float, robust: bool, max_nfev: int, protocol: str) -> dict:
    """Each law fitted to all curves but one and its mean relative error on the one left out (its
    segment offsets where the fit has them, else none), for every curve."""
    errs = {name: [] for name in LAWS}
    for i, c in enumerate(curves):
        rest = curves[:i] + curves[i + 1:]
        for name in LAWS:
            try:
                f = _fit_one(name, rest, momentum, robust, max_nfev, protocol)
                pred = f.predict(c.lrs, steps=c.steps) + np.array([f.offsets.get(int(s), 0.0) for s in c.seg])
                errs[name].append(float(np.mean(relative_error(pred, c.y))))
            except (ValueError, np.linalg.LinAlgError):
                errs[name].append(math.nan)
    return errs


def fit_schedule_law(curves, law: str = "auto", *, segments=None, momentum: float = 0.999, robust: bool = True,
                     max_nfev: int = 200, protocol: str = "least_squares") -> ScheduleLawFit:
    """Fit one set of law parameters jointly to several loss curves.

    curves: a list of ``(lrs, steps, losses)``: the LR of every update 0..N-1 of a curve, the steps at
        which its losses were logged (after that many updates; steps < 1 are dropped), the losses.
    law: "annealing" (Tissue et al. 2024: L0, A, alpha, C; ``momentum`` is its lam), "multi_power"
        (Luo et al. 2025: L0, A, alpha, B, C, beta, gamma) or "auto": with >= 2 curves, each law is
        fitted to all curves but one and predicts the one left out, for every curve; the law with the
        smaller mean relative error over the held-out curves (folds where either law could not be
        fitted are left out of both) is fitted to all curves (``selection`` records the errors). With
        one curve there is nothing to hold out: "auto" takes the annealing law (four parameters; one
        schedule cannot identify the multi-power law's seven) and says so in ``selection``.
    segments: optional, per curve, an integer label per loss (or None): every label other than the
        first curve's first one gets an additive offset shared by all curves (mixture or sequence-
        length switches: a run and its branches use the same labels for the same data).
    robust: Huber loss at 1.345 x the pooled robust noise scale (``_fit.joint_fit``); else least squares.
    protocol: how the multi-power law is fitted. "least_squares" (default): the trust-region fit above,
        run to convergence; "luo2025": the authors' own procedure (``_luo2025``: Huber on the log loss,
        a grid start, 200 AdamW steps at most, early-stopped; their published PredE/WorstE come from it).
        The annealing law is always fitted by least squares; with law="auto" the protocol applies to the
        multi-power law in the held-out comparison too.

    Raises ValueError for no curves, a curve that is not a triple, empty or non-finite LRs, steps and
    losses of different lengths, non-finite losses, a loss at a step beyond its LR sequence, too few
    losses for the parameters, an unknown law.
    """
    if law not in (*LAWS, "auto"):
        raise ValueError(f"law must be one of {LAWS + ('auto',)}, got {law!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    cs = check_curves(curves, segments)
    if law != "auto":
        return _fit_one(law, cs, momentum, robust, max_nfev, protocol)
    if len(cs) == 1:
        fit = _fit_one("annealing", cs, momentum, robust, max_nfev)
        fit.selection = {"chosen": "annealing", "reason": "one curve: nothing to hold out; the annealing law "
                         "(4 parameters) is identified by one schedule, the multi-power law (7) is not"}
        return fit
    errs = _leave_one_out(cs, momentum, robust, max_nfev, protocol)
    both = [i for i in range(len(cs)) if all(np.isfinite(errs[n][i]) for n in LAWS)]
    if not both:
        chosen, score = "annealing", {n: math.nan for n in LAWS}
        reason = "no held-out curve could be predicted by both laws; the annealing law (fewer parameters)"
    else:
        score = {n: float(np.mean([errs[n][i] for i in both])) for n in LAWS}
        chosen = min(LAWS, key=lambda n: score[n])
        reason = (f"smaller mean relative error on held-out curves ({len(both)} of {len(cs)} folds): "
                  + ", ".join(f"{n} {100 * score[n]:.3g}%" for n in LAWS))
    fit = _fit_one(chosen, cs, momentum, robust, max_nfev, protocol)
    fit.selection = {"chosen": chosen, "reason": reason, "loo_error": score, "loo_error_per_curve": errs}
    return fit
