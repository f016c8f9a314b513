"""Statistics several instrument families share: one implementation each.

- ``BiasCorrectedEMA``: the debiased exponential moving average of the GNS tracker
  (``diagnostics.gns``) and of the per-domain loss EMAs of ``hooks.DifficultyTracker``;
- ``ols_slope_test`` / ``ols_slope``: a least-squares line with the one-sided t-test of "still
  falling", behind ``diagnostics.difficulty.learnability`` and the post-knot guard of
  ``diagnostics.representation.detect_compression_onset``;
- ``robust_noise_scale``: the per-point noise of a slowly varying curve (schedule-law fits);
- ``pooled_sd``: the within-group standard deviation of replicate groups (the seed noise of probes and
  branches);
- ``moving_block_indices`` / ``block_bootstrap_ratio``: the moving-block bootstrap over consecutive
  steps that the recommendations use for their ranges.

State in Python floats; inputs may be floats, numpy arrays or torch tensors of one element (torch is
never imported here)::

    from diagnostics.stats import BiasCorrectedEMA, ols_slope_test
    ema = BiasCorrectedEMA(0.9)
    ema.update(2.0); ema.update(1.0)
    ema.value                                  # (0.9 * 2 + 1) / 1.9 = 1.4737: no pull towards 0
    b, se, a, p = ols_slope_test([0, 1, 2, 3], [3.0, 2.1, 0.9, 0.1])   # b < 0, p small
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["BiasCorrectedEMA", "ols_slope_test", "ols_slope", "robust_noise_scale", "pooled_sd",
           "moving_block_indices", "block_bootstrap_ratio"]


def _scalar(x: Any) -> float:
    """float of one value: a Python / numpy scalar, a one-element sequence or array, or a one-element
    torch tensor (any device, any grad)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    return float(np.asarray(x, dtype=np.float64).reshape(()))


class BiasCorrectedEMA:
    """EMA with Adam-style debiasing (Kingma & Ba 2015, section 3).

        m_t = decay * m_{t-1} + (1 - decay) * x_t,  m_0 = 0;   value_t = m_t / (1 - decay^t)

    value_t equals the weighted mean of x_1..x_t with weights decay^(t-i) -- exactly, not
    approximately -- so early values are not pulled towards 0. Non-finite inputs are skipped
    (state untouched) and counted in ``n_skipped``. ``value`` is NaN before the first update.
    """

    def __init__(self, decay: float = 0.95):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.biased = 0.0       # m_t
        self.n_updates = 0      # t
        self.n_skipped = 0

    def update(self, x) -> float:
        x = _scalar(x)
        if not math.isfinite(x):
            self.n_skipped += 1
            return self.value
        self.biased = self.decay * self.biased + (1.0 - self.decay) * x
        self.n_updates += 1
        return self.value

    @property
    def value(self) -> float:
        if self.n_updates == 0:
            return float("nan")
        return self.biased / (1.0 - self.decay ** self.n_updates)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "biased": self.biased,
                "n_updates": self.n_updates, "n_skipped": self.n_skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        decay = float(state["decay"])
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.biased = float(state["biased"])
        self.n_updates = int(state["n_updates"])
        self.n_skipped = int(state.get("n_skipped", 0))

    def __repr__(self) -> str:
        return f"BiasCorrectedEMA(decay={self.decay}, value={self.value:.6g}, n={self.n_updates})"


# -----------------------------------------------------------------------------------------------
# least-squares slope and its one-sided test


def ols_slope_test(x, y) -> tuple[float, float, float, float]:
    """Least-squares line y = a + b x with the one-sided t-test of H0 "slope >= 0".

    Returns (b, se(b), a, p): se from the residual variance with n - 2 degrees of freedom;
    p = P(T_{n-2} <= b / se), small when the line significantly falls (the same numbers as
    ``scipy.stats.linregress(x, y, alternative="less")``: slope, stderr, intercept, pvalue).
    The one implementation behind ``ols_slope``, ``learnability`` and the post-knot guard of
    ``diagnostics.representation.detect_compression_onset``. Edge cases:

    - n < 2 or constant x (no slope): all four NaN (linregress raises);
    - n = 2: b and a, se and p NaN (no residual degree of freedom; linregress reports se = 0);
    - a perfect line (zero residual): se = 0 and p = 0 if b < 0 else 1 (the sign decides);
    - NaN or inf in x or y: NaN results (callers drop non-finite points first).
    """
    from scipy.special import stdtr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"ols_slope needs two 1-d arrays of one length, got shapes {x.shape} and {y.shape}.")
    n = len(x)
    nan = float("nan")
    if n < 2:
        return nan, nan, nan, nan
    xm, ym = float(x.mean()), float(y.mean())
    dx, dy = x - xm, y - ym
    sxx = float(dx @ dx)
    if not sxx > 0:  # constant x (or NaN)
        return nan, nan, nan, nan
    b = float(dx @ dy) / sxx
    a = ym - b * xm
    if n < 3:
        return b, nan, a, nan
    resid = dy - b * dx  # centred: no cancellation against a large intercept
    s2 = float(resid @ resid) / (n - 2)
    if not math.isfinite(b) or not math.isfinite(s2):
        return b, nan, a, nan
    se = math.sqrt(s2 / sxx)
    if se > 0:
        p = float(stdtr(n - 2, b / se))
    else:  # a perfect line: the sign decides
        p = 0.0 if b < 0 else 1.0
    return b, se, a, p


def ols_slope(x, y) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: returns (b, se(b), a); se from the residual variance
    with n - 2 degrees of freedom (NaN when n < 3 or x is constant). ``ols_slope_test`` without p."""
    b, se, a, _ = ols_slope_test(x, y)
    return b, se, a


# -----------------------------------------------------------------------------------------------
# noise of a curve and the moving-block bootstrap


def robust_noise_scale(y) -> float:
    """Per-point noise sd of a slowly varying noisy curve: 1.4826 MAD of first differences / sqrt 2
    (differencing removes the trend; the MAD ignores loss spikes)."""
    dy = np.diff(np.asarray(y, dtype=np.float64))
    if len(dy) == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(dy - np.median(dy))) / math.sqrt(2))


def pooled_sd(groups) -> tuple[float, int]:
    """(sd, degrees of freedom) of replicate groups with a common variance: sqrt(sum (n_i - 1) s_i^2 /
    sum (n_i - 1)) over the groups of at least two values (s_i^2 the sample variance, ddof 1); (nan, 0)
    when no group has two."""
    reps = [np.asarray(g, dtype=np.float64) for g in groups if len(g) >= 2]
    dof = sum(len(g) - 1 for g in reps)
    if not dof:
        return math.nan, 0
    return float(math.sqrt(sum(np.var(g, ddof=1) * (len(g) - 1) for g in reps) / dof)), dof


def moving_block_indices(n: int, n_boot: int, rng: np.random.Generator,
                         block: int | None = None) -> tuple[np.ndarray, int]:
    """Row indices (n_boot, n) of moving-block bootstrap replicates and the block length: blocks of
    ``block`` consecutive rows (default ~ n^(1/3), Kuensch 1989 / Hall et al. 1995's order for an
    interval) drawn with replacement until n rows, so neighbouring steps keep their correlation."""
    L = min(int(block) if block else max(1, int(round(n ** (1 / 3)))), n)
    starts = rng.integers(0, n - L + 1, size=(n_boot, -(-n // L)))
    return (starts[:, :, None] + np.arange(L)[None, None, :]).reshape(n_boot, -1)[:, :n], L


def block_bootstrap_ratio(num: np.ndarray, den: np.ndarray, *, n_boot: int = 2000, level: float = 0.9,
                          block: int | None = None, seed: int = 0) -> tuple[float, float, np.ndarray]:
    """Percentile interval of sum(num) / sum(den) under a moving-block bootstrap over the rows.

    Rows are consecutive steps, so neighbours are correlated (the weights change slowly): replicates
    are ``moving_block_indices``. A replicate whose denominator is <= 0 (no signal) counts as +inf.
    Returns (low, high, replicates).
    """
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    n = len(num)
    if n < 2:
        raise ValueError("a bootstrap needs at least 2 rows")
    idx, _ = moving_block_indices(n, n_boot, np.random.default_rng(seed), block)
    cn, cd = num[idx].sum(1), den[idx].sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        reps = np.where(cd > 0, cn / np.where(cd > 0, cd, 1.0), np.inf)
    reps = np.where(np.isnan(reps), np.inf, reps)
    a = (1 - level) / 2
    lo, hi = np.quantile(reps, [a, 1 - a], method="inverted_cdf")  # no interpolation: inf stays inf
    return float(max(lo, 0.0)), float(hi), reps
