"""Curriculum difficulty: per-example tables, data maps, forgetting, EL2N, learnability, power laws.

Pure math on numpy arrays (and, for the logit-level scores, torch tensors); no model, no loop,
so the same code runs inside ``hooks.DifficultyTracker`` and offline on a saved table or a
run's metrics. Definitions and the papers they come from are in docs/difficulty.md. The
streaming state (``ExampleTable``, ``IdIndex``, ``RingSeries``) lives in the sibling module
``_table``; both are public through ``diagnostics.difficulty``. The least-squares slope test is
``diagnostics.stats.ols_slope_test`` and the per-domain loss EMAs ``diagnostics.stats.BiasCorrectedEMA``,
shared with the other instrument families.

    Data Maps     Swayamdipta et al. 2020, "Dataset Cartography" (arXiv 2009.10795), sec. 2:
                  confidence = mean over visits of p(y*|x), variability = std over visits,
                  correctness = fraction of visits predicted correctly. For a language model
                  p(y*|x) is the per-token geometric-mean likelihood of the sequence, exp(-loss).
    Forgetting    Toneva et al. 2019, "An Empirical Study of Example Forgetting" (arXiv 1812.05159),
                  sec. 3: an event is a transition learned -> not learned between two visits.
                  "Learned" here: per-token loss below a stated threshold (``learned_loss``).
    EL2N          Paul et al. 2021, "Deep Learning on a Data Diet" (arXiv 2107.07075), eq. 2:
                  E || softmax(f(x)) - onehot(y) ||_2, here averaged over a sequence's tokens.
    RHO-LOSS      Mindermann et al. 2022 (arXiv 2206.07137), eq. 3: reducible loss =
                  training loss - irreducible (reference-model) loss.
    Learnability  slope of loss against log tokens over a recent window (OLS, with standard
                  error and a one-sided t-test for "still decreasing"); a power law
                  L(t) = E + A t^-alpha (Kaplan et al. 2020, arXiv 2001.08361; Hoffmann et al.
                  2022, arXiv 2203.15556 eq. 2) has dL/dlog t = -alpha (L - E).

Quick tour (well under a second on a CPU)::

    import numpy as np
    from diagnostics.difficulty import ExampleTable, learnability, fit_power_law
    tab = ExampleTable(learned_loss=1.0)
    tab.update(ids=np.array([7, 8, 7]), losses=np.array([2.0, 0.5, 0.8]), domains=np.array([0, 1, 0]))
    tab.to_arrays()["loss_mean"]                 # [1.4, 0.5]  (id 7 was visited twice)
    t = np.geomspace(1e6, 1e9, 200); L = 2.0 + 50 * t ** -0.3
    fit_power_law(t, L).alpha                    # 0.3
    learnability(t, L).slope_log_tokens          # -alpha * (L - E) over the window
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from diagnostics.stats import ols_slope, ols_slope_test

__all__ = [
    "data_map_regions", "REGIONS", "roc_auc",
    "Learnability", "learnability", "PowerLawFit", "fit_power_law", "local_exponent",
    "sequence_scores", "reducible_loss", "domain_curves",
]

# -----------------------------------------------------------------------------
# data maps and ranking

REGIONS = ("easy", "ambiguous", "hard")


def data_map_regions(confidence, variability, confidence_threshold: float | None = None,
                     variability_threshold: float | None = None) -> np.ndarray:
    """Data-map regions (Swayamdipta et al. 2020, sec. 2.1, fig. 1): 0 easy, 1 ambiguous, 2 hard.

    ambiguous: variability >= ``variability_threshold`` (default: above the 2/3 quantile, i.e.
    the top third, as in the paper's 33% subsets); among the rest, easy-to-learn if confidence >=
    ``confidence_threshold`` (default: the median confidence of the rest), else hard-to-learn.
    Pass absolute thresholds to compare maps across runs."""
    conf, var = np.asarray(confidence, dtype=np.float64), np.asarray(variability, dtype=np.float64)
    if conf.shape != var.shape:
        raise ValueError(f"confidence {conf.shape} and variability {var.shape} must have one shape.")
    out = np.zeros(conf.shape, dtype=np.int8)
    if conf.size == 0:
        return out
    if variability_threshold is None:
        amb = var > np.quantile(var, 2 / 3)  # strict: ties at the quantile (e.g. many zeros) stay out
    else:
        amb = var >= variability_threshold
    rest = ~amb
    ct = confidence_threshold
    if ct is None:
        ct = np.median(conf[rest]) if rest.any() else 0.5
    out[amb] = 1
    out[rest & (conf < ct)] = 2
    return out


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / (n1 n0),
    ties counted half). 1.0: every positive scores above every negative."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc needs both positive and negative labels.")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    r = (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]  # 1-based ranks, ties averaged
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# -----------------------------------------------------------------------------
# learnability: slopes, the diminishing-returns test, power laws


@dataclass
class Learnability:
    """Rate of loss decrease of one domain over a recent window (see ``learnability``)."""

    slope_per_token: float  # dL/dt, nats per token
    slope_per_token_se: float
    slope_log_tokens: float  # dL/dln t, nats per e-fold of tokens
    slope_log_tokens_se: float
    t_stat: float  # slope_log_tokens / se
    p_value: float  # one-sided P(T <= t) under H0: slope >= 0 (no decrease)
    diminishing: bool  # decrease not significant at ``level`` (diminishing returns)
    level: float
    n: int
    defined: bool

    @property
    def value(self) -> float:
        """Learnability = -dL/dln t (positive while the domain is still being learned)."""
        return -self.slope_log_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "value": self.value}


def learnability(tokens, losses, window: int | None = None, level: float = 0.05, min_points: int = 8) -> Learnability:
    """Slopes of loss against tokens and against ln(tokens) over the last ``window`` points.

    Least squares with standard errors (``ols_slope``). Diminishing returns: the one-sided
    t-test of H0 "slope >= 0" is not rejected at ``level`` (p >= level), i.e. the data give
    no significant evidence that more tokens still lower the loss. The test treats the points
    as independent: feed raw per-step losses, not an EMA (smoothing correlates residuals
    and shrinks the standard error).

    For L = E + A t^-alpha the log slope is -alpha (L - E) (``local_exponent`` inverts it)."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape:
        raise ValueError(f"tokens {t.shape} and losses {y.shape} must have one shape.")
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    if window is not None:
        t, y = t[-window:], y[-window:]
    n = len(t)
    nan = float("nan")
    if n < max(3, min_points) or np.ptp(t) <= 0:
        return Learnability(nan, nan, nan, nan, nan, nan, False, level, n, False)
    b, se, _ = ols_slope(t, y)
    bl, sel, _, p = ols_slope_test(np.log(t), y)
    if sel > 0:
        ts = bl / sel
    else:  # a perfect line: the sign decides (p is 0 or 1)
        ts = -math.inf if bl < 0 else (math.inf if bl > 0 else 0.0)
    return Learnability(b, se, bl, sel, ts, p, bool(p >= level), level, n, True)


@dataclass
class PowerLawFit:
    """L(t) = E + A t^-alpha (Kaplan et al. 2020 eq. 1.x form; Hoffmann et al. 2022 eq. 2)."""

    E: float
    A: float
    alpha: float
    alpha_se: float
    rmse: float
    n: int

    def predict(self, tokens) -> np.ndarray:
        return self.E + self.A * np.asarray(tokens, dtype=np.float64) ** -self.alpha


def fit_power_law(tokens, losses, alpha_bounds: tuple[float, float] = (1e-3, 3.0)) -> PowerLawFit:
    """Least-squares fit of L = E + A t^-alpha with E, A >= 0.

    Variable projection: for fixed alpha the model is linear in (E, A), solved by non-negative
    least squares; the residual is then minimised over alpha (a log-spaced grid, then a bounded
    scalar search). alpha_se comes from the Gauss-Newton covariance at the optimum."""
    from scipy.optimize import minimize_scalar, nnls

    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    n = len(t)
    if n < 4 or np.ptp(t) <= 0:
        raise ValueError(f"fit_power_law needs at least 4 points with distinct positive tokens, got {n}.")
    t0 = float(t.min())
    u = t / t0  # >= 1: keeps u^-alpha in (0, 1] for every alpha

    def solve(alpha):
        X = np.stack([np.ones(n), u ** -alpha], axis=1)  # (n, 2)
        coef, rnorm = nnls(X, y)
        return coef, rnorm ** 2

    grid = np.geomspace(*alpha_bounds, 120)
    rss = np.array([solve(a)[1] for a in grid])
    i = int(np.argmin(rss))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda a: solve(a)[1], bounds=(lo, hi), method="bounded", options={"xatol": 1e-8})
    alpha = float(res.x) if res.fun <= rss[i] else float(grid[i])
    (E, A1), r = solve(alpha)
    # Gauss-Newton covariance of (E, A1, alpha): J = [1, u^-a, -A1 ln(u) u^-a]
    ua = u ** -alpha
    J = np.stack([np.ones(n), ua, -A1 * np.log(u) * ua], axis=1)
    dof = max(n - 3, 1)
    try:
        cov = np.linalg.inv(J.T @ J) * (r / dof)
        alpha_se = float(math.sqrt(max(cov[2, 2], 0.0)))
    except np.linalg.LinAlgError:
        alpha_se = float("nan")
    return PowerLawFit(float(E), float(A1 * t0 ** alpha), alpha, alpha_se, float(math.sqrt(r / n)), n)


def local_exponent(tokens, losses, E: float) -> tuple[float, float]:
    """Local power-law exponent -dln(L - E)/dln t by least squares, with its standard error.
    Points with L <= E are dropped."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > E)
    b, se, _ = ols_slope(np.log(t[ok]), np.log(y[ok] - E))
    return -b, se


# -----------------------------------------------------------------------------
# logit-level scores (torch) and offline helpers


def sequence_scores(logits, targets, ignore_index: int = -100, el2n: bool = True):
    """Per-sequence mean token loss and EL2N from logits (torch).

    logits (B, T, V), targets (B, T) long; tokens with target == ignore_index are left out.
    loss_b = mean_t -log p(y_t); el2n_b = mean_t || softmax(z_t) - onehot(y_t) ||_2
    (Paul et al. 2021 eq. 2), using ||p - e_y||^2 = sum_v p_v^2 - 2 p_y + 1.
    Returns (loss (B,), el2n (B,) or None, n_tokens (B,)), float32; a sequence without
    targets gets loss 0 and el2n 0."""
    import torch

    B, T, V = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid = targets != ignore_index  # (B, T)
    tgt = torch.where(valid, targets, torch.zeros_like(targets))
    logp_y = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T)
    w = valid.float()
    n_tok = w.sum(-1)  # (B,)
    denom = n_tok.clamp(min=1)
    loss = -(logp_y * w).sum(-1) / denom  # (B,)
    out_el2n = None
    if el2n:
        p = logp.exp()
        sq = (p * p).sum(-1) - 2 * logp_y.exp() + 1  # (B, T)
        out_el2n = (sq.clamp(min=0).sqrt() * w).sum(-1) / denom
    return loss, out_el2n, n_tok


def reducible_loss(loss, reference_loss):
    """RHO-LOSS reducible loss (Mindermann et al. 2022, eq. 3): training loss minus the
    irreducible loss a reference model reaches on the same example."""
    return np.asarray(loss, dtype=np.float64) - np.asarray(reference_loss, dtype=np.float64)


def domain_curves(metrics, domain: str):
    """Loss curves of one domain from a run's metrics DataFrame (``Run.metrics``): columns
    step, tokens (train/tokens), train_ema (difficulty/<d>/loss), probe (difficulty/<d>/probe_loss),
    val (val/<d>/loss), learnability; rows where any of them is present.

    Within a row, probe and val measure the same parameters: those before step ``step``'s optimizer
    update (``midtrain.loop`` evaluates before the update; ``hooks.DifficultyTracker`` scores its probe
    set at the step's start). train_ema averages the losses of the forward passes of steps up to
    ``step``, each taken on its own step's pre-update parameters. ``tokens`` is train/tokens of the
    record, which counts step ``step``'s batch: the measured parameters had seen ``tokens`` minus
    that batch. (Runs written before this alignment logged probe_loss one update later, after step
    ``step``'s update.)"""
    import pandas as pd

    cols = {"tokens": "train/tokens", "train_ema": f"difficulty/{domain}/loss",
            "probe": f"difficulty/{domain}/probe_loss", "val": f"val/{domain}/loss",
            "learnability": f"difficulty/{domain}/learnability"}
    out = pd.DataFrame({"step": metrics["step"]})
    for k, c in cols.items():
        out[k] = metrics[c] if c in metrics.columns else np.nan
    keep = out[["train_ema", "probe", "val"]].notna().any(axis=1)
    return out[keep].reset_index(drop=True)
