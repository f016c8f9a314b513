"""A continuous data-switch step from switch probes at a few discrete steps (docs/recommendations.md,
"Data switch"): the target objective J(s) and the earlier domains' rise r(s) of one mixture's candidates
are modelled as smooth functions of the switch step s, and the recommended step minimises the fitted J
subject to the fitted r(s) <= tolerance, on every integer step between the earliest and the latest probed
step (no extrapolation).

Model: a weighted least-squares polynomial in s, a quadratic with >= 4 distinct steps, a line with 3 (with
fewer the model has no degree of freedom left to be checked, and the discrete rule is used). Each distinct
step is one point: its replicates' mean, weight n / sigma^2 (n replicates, sigma the noise of one run's
value). The model is checked against that noise: a chi-square goodness-of-fit test of the weighted
residuals, for J and for r; below ``p_min`` the data say the model is wrong (a dip or a spike it cannot
follow) and the caller falls back to the discrete rule. The step ``always_ok`` (the run's own switch,
whose rise is zero by the constraint's definition) is feasible, and the fitted rise is taken relative to the
fitted curve there: ``(1 + r(s)) / (1 + r(always_ok)) - 1``, so the reference is estimated from every
candidate instead of resting on the one parent run (whose noise would otherwise shift every rise alike).

Range: a parametric bootstrap: draws of every point around the fitted curves with its standard error
(sigma / sqrt(n)), each refitted and re-solved; the ``level`` percentile interval of the re-solved steps
(widened to hold the estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["SmoothSwitch", "smooth_switch", "solve_on_grid"]


@dataclass
class SmoothSwitch:
    model: str            # "quadratic" or "line"
    step: int             # the recommended switch step
    J: float              # fitted J there
    rise: float           # fitted r there
    low: float            # bootstrap range of the step
    high: float
    p_J: float            # goodness-of-fit p-values
    p_r: float
    lo: int               # the solved range of steps
    hi: int
    n_steps: int          # distinct probed steps
    draws: np.ndarray     # the bootstrap's re-solved steps
    coef_J: np.ndarray    # polynomial coefficients in x = (s - lo) / (hi - lo), highest power first
    coef_r: np.ndarray

    def describe(self) -> str:
        return (f"{self.model} weighted least-squares fit of J and of the earlier domains' rise over the "
                f"{self.n_steps} probed steps {self.lo}-{self.hi} (goodness of fit p = {self.p_J:.2g} for J, "
                f"{self.p_r:.2g} for the rise); minimum of the fitted J with the fitted rise within the tolerance "
                f"at step {self.step}: J {self.J:.4g}, rise {self.rise:+.2%}; range {self.low:.0f}-{self.high:.0f} "
                f"from a parametric bootstrap ({len(self.draws)} draws)")


def _fit(x: np.ndarray, y: np.ndarray, se: np.ndarray, deg: int) -> np.ndarray:
    """Coefficients (deg + 1, ...) of the weighted least-squares polynomial; ``y`` (k,) or (k, draws)."""
    return np.polyfit(x, y, deg, w=1.0 / se)


def _chi2_p(x, y, se, coef) -> float:
    from scipy.stats import chi2

    dof = len(x) - len(coef)
    if dof < 1:
        return math.nan
    res = (y - np.polyval(coef, x)) / se
    return float(chi2.sf(float(np.sum(res ** 2)), dof))


def solve_on_grid(grid: np.ndarray, J: np.ndarray, r: np.ndarray, tolerance: float, ok_always=None) -> np.ndarray:
    """Index (per column of ``J``/``r``, shape (len(grid),) or (len(grid), draws)) of the smallest J among the
    grid points with r <= tolerance (``ok_always``: a boolean mask of grid points feasible anyway); -1 where
    no point is feasible. The first of equal minima (the earliest step)."""
    ok = r <= tolerance
    if ok_always is not None:
        ok = ok | (ok_always if J.ndim == 1 else ok_always[:, None])
    Jm = np.where(ok, J, np.inf)
    idx = np.argmin(Jm, axis=0)
    return np.where(np.any(ok, axis=0), idx, -1)


def _rebase(rg: np.ndarray, always) -> np.ndarray:
    """The fitted rise relative to the fitted value at the ``always`` step (the run's own switch): the reference
    is then the curve through every candidate rather than the one parent run (whose own noise would shift
    every rise alike); zero there by construction. Unchanged without such a step."""
    if always is None or not np.any(always):
        return rg
    ref = rg[np.argmax(always)]
    return (1 + rg) / (1 + ref) - 1


def smooth_switch(steps, J, rise, n, sigma: float, sigma_r: float, tolerance: float, *, always_ok: int | None = None,
                  level: float = 0.9, n_boot: int = 400, p_min: float = 0.01, seed: int = 0) -> SmoothSwitch | str:
    """The continuous switch step of one mixture's candidates: ``steps`` (distinct), their mean objective
    ``J``, mean rise ``rise`` (relative, e.g. 0.01 = 1%) and replicate counts ``n``; ``sigma``/``sigma_r`` the
    noise of one run's J / rise. Returns a SmoothSwitch, or a string saying why the model is not used."""
    s = np.asarray(steps, dtype=np.float64)
    J, rise, n = (np.asarray(v, dtype=np.float64) for v in (J, rise, n))
    k = len(s)
    if len(set(s.tolist())) != k:
        raise ValueError("steps must be distinct (average the replicates first)")
    if k < 3:
        return f"{k} distinct step(s): too few for a fitted model that can be checked (a line needs 3)"
    if not (math.isfinite(sigma) and sigma > 0 and math.isfinite(sigma_r) and sigma_r > 0):
        return "no noise estimate for the objective and the rise: the fit cannot be weighted or checked"
    deg = 2 if k >= 4 else 1
    model = "quadratic" if deg == 2 else "line"
    lo, hi = int(s.min()), int(s.max())
    x = (s - lo) / (hi - lo)
    seJ, ser = sigma / np.sqrt(n), sigma_r / np.sqrt(n)
    cJ, cr = _fit(x, J, seJ, deg), _fit(x, rise, ser, deg)
    pJ, pr = _chi2_p(x, J, seJ, cJ), _chi2_p(x, rise, ser, cr)
    if min(pJ, pr) < p_min:
        return (f"a {model} does not fit the candidates within their noise (goodness of fit p = {pJ:.2g} for J, "
                f"{pr:.2g} for the rise; below {p_min:g})")
    grid = np.arange(lo, hi + 1)
    gx = (grid - lo) / (hi - lo)
    always = (grid == always_ok) if always_ok is not None else None
    Jg, rg = np.polyval(cJ, gx), _rebase(np.polyval(cr, gx), always)
    i = int(solve_on_grid(grid, Jg, rg, tolerance, always))
    if i < 0:
        return f"the fitted rise exceeds {tolerance:.1%} at every step {lo}-{hi}"
    rng = np.random.default_rng(seed)
    fitJ, fitr = np.polyval(cJ, x), np.polyval(cr, x)
    YJ = fitJ[:, None] + seJ[:, None] * rng.standard_normal((k, n_boot))
    Yr = fitr[:, None] + ser[:, None] * rng.standard_normal((k, n_boot))
    bJ, br = _fit(x, YJ, seJ, deg), _fit(x, Yr, ser, deg)
    V = np.vander(gx, deg + 1)                                   # (grid, deg + 1): the polynomial at every step
    idx = solve_on_grid(grid, V @ bJ, _rebase(V @ br, always), tolerance, always)
    draws = grid[idx[idx >= 0]].astype(np.float64)
    a = (1 - level) / 2
    low, high = (np.quantile(draws, [a, 1 - a]) if len(draws) else (grid[i], grid[i]))
    return SmoothSwitch(model, int(grid[i]), float(Jg[i]), float(rg[i]), float(min(low, grid[i])),
                        float(max(high, grid[i])), pJ, pr, lo, hi, k, draws, cJ, cr)
