"""Phase detection: when does a layer's representation stop expanding and start compressing?

Representation metrics measured over training (matrix entropy, effective rank, ...) typically rise
while a layer spreads its tokens over more directions ("expansion") and, in some layers and runs,
later fall ("compression"; Li et al. 2025, arXiv 2509.23024, see the RankMe / alpha-ReQ phases of
LLM pre-training). This module finds the turn with a change-point test whose false-alarm rate is
stated and checked by simulation:

    H0  y_i = a + b t_i + e_i                                   one straight line (any slope)
    H1  y_i = a + b1 t_i + c (t_i - tau)_+ + e_i,  b1 > 0 and b2 = b1 + c < 0
        a continuous two-segment ("hinge") line that rises, then falls, with the knot tau at one of
        the measured steps (at least ``min_segment`` points on each side)

    statistic  LR = max over feasible knots of  n log(RSS0 / RSS1(tau))   (0 if no knot is feasible)
    p-value    parametric residual bootstrap under H0: y* = fitted line + resampled, centred,
               df-inflated residuals; p = (1 + #{LR* >= LR}) / (1 + n_boot)

Because the bootstrap replicates the whole procedure (knot search and sign constraint included),
the maximisation over tau is paid for: under a single linear trend with i.i.d. noise the rate of
p <= alpha is about alpha (tests/diagnostics/test_phases.py checks <= alpha + margin over hundreds
of simulated series and several slopes). This is the sup-LR change-point idea of Andrews 1993
(Econometrica 61:821) and the segmented-regression test of Davies 1987 (Biometrika 74:33), calibrated
by bootstrap instead of asymptotics.

A rejection of H0 only says "not one line". A saturating rise (1 - exp(-t)) is not a line either,
so an event also needs a guard: an ordinary least-squares line through the points from the knot on
must itself have a negative slope with a one-sided t-test p <= alpha. For an increasing curve the
OLS slope of any segment is >= 0 (Chebyshev's sum inequality), so a noiseless saturation never
triggers; a noisy flat tail triggers rarely (tests measure it).

Public API:

    detect_compression_onset(steps, values, alpha=0.05) -> dict | None
    detect_phases(metrics_df, metric="entropy") -> list[dict]      # one event per layer at most
    format_event(event) -> "blocks.3.resid_post started compressing at step 1200 (entropy, p=0.005)"

Assumptions (say them when you quote an event): residuals are exchangeable (i.i.d.); strongly
autocorrelated noise (a slowly wandering curve) makes the test anti-conservative; the knot is
placed at a measured step, so its resolution is the probe interval.
"""

from __future__ import annotations

import math
import re
from typing import Any, Iterable, Optional

import numpy as np

from diagnostics.stats import ols_slope_test

__all__ = [
    "COMPRESSION_DIRECTION",
    "detect_compression_onset",
    "detect_phases",
    "format_event",
    "hinge_fit",
]

# +1: the metric rises while the layer expands and falls when it compresses; -1: the opposite
# (alpha-ReQ grows when the spectrum decays faster, i.e. when the representation compresses).
COMPRESSION_DIRECTION: dict[str, int] = {
    "entropy": +1,
    "normalized_entropy": +1,
    "effective_rank": +1,
    "twonn_id": +1,
    "mi_xt": +1,
    "alpha_req": -1,
}


def _clean(steps: Any, values: Any) -> tuple[np.ndarray, np.ndarray]:
    """Finite (step, value) pairs sorted by step; repeated steps keep their last value."""
    x = np.asarray(steps, dtype=np.float64).reshape(-1)
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"steps and values must have the same length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    if x.size:
        last = np.r_[x[1:] != x[:-1], True]  # last occurrence of each step
        x, y = x[last], y[last]
    return x, y


_RESID_ELEMENTS = 1 << 22  # largest (knots, n, B) residual block _hinge_stats builds at once (32 MiB)


def _hinge_stats(t: np.ndarray, Y: np.ndarray, knots: np.ndarray):
    """Fit H0 and every hinge model to the columns of Y at once (normal equations, float64).

    t (n,) in [0, 1]; Y (n, B); knots (K,) indices into t. Returns (lr (K, B), slope_before (K, B),
    slope_after (K, B)).
    """
    n = t.size
    # H0: RSS of the straight line, for every column
    X0 = np.stack([np.ones(n), t], axis=1)  # (n, 2)
    coef0, *_ = np.linalg.lstsq(X0, Y, rcond=None)  # (2, B)
    rss0 = ((Y - X0 @ coef0) ** 2).sum(axis=0)  # (B,)
    # H1: design [1, t, (t - t_k)_+] for each knot k
    hinge = np.clip(t[None, :] - t[knots][:, None], 0.0, None)  # (K, n)
    X = np.stack([np.ones_like(hinge), np.broadcast_to(t, hinge.shape), hinge], axis=2)  # (K, n, 3)
    XtX = np.einsum("kni,knj->kij", X, X)  # (K, 3, 3)
    XtY = np.einsum("kni,nb->kib", X, Y)  # (K, 3, B)
    coef = np.linalg.solve(XtX, XtY)  # (K, 3, B)
    # residuals knot by knot in chunks: a (K, n, B) array would grow with the square of the
    # history (K ~ n knots), hundreds of MB per probed site late in a long run
    step = max(1, _RESID_ELEMENTS // max(1, n * Y.shape[1]))
    rss1 = np.concatenate([
        ((Y[None] - np.einsum("kni,kib->knb", X[a:a + step], coef[a:a + step])) ** 2).sum(axis=1)
        for a in range(0, len(knots), step)
    ]) if len(knots) else np.zeros((0, Y.shape[1]))  # (K, B)
    tiny = 1e-300
    lr = n * (np.log(np.maximum(rss0, tiny))[None, :] - np.log(np.maximum(rss1, tiny)))
    return lr, coef[:, 1, :], coef[:, 1, :] + coef[:, 2, :]


def _sup_lr(t, Y, knots):
    """The constrained sup-LR statistic per column and its knot index (-1 when nothing is feasible)."""
    lr, b1, b2 = _hinge_stats(t, Y, knots)
    feasible = (b1 > 0) & (b2 < 0)
    lr = np.where(feasible, np.maximum(lr, 0.0), -np.inf)
    best = lr.argmax(axis=0)  # (B,)
    stat = lr[best, np.arange(Y.shape[1])]
    none = ~np.isfinite(stat)
    stat = np.where(none, 0.0, stat)
    return stat, np.where(none, -1, best), b1, b2


def hinge_fit(steps: Any, values: Any, knot_step: float) -> dict[str, float]:
    """Least-squares continuous two-segment line with its knot at ``knot_step``.

    Returns {"intercept", "slope_before", "slope_after", "rss"} in the units of steps and values.
    """
    x, y = _clean(steps, values)
    X = np.stack([np.ones_like(x), x, np.clip(x - knot_step, 0.0, None)], axis=1)
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    rss = float(((y - X @ coef) ** 2).sum())
    return {"intercept": float(coef[0]), "slope_before": float(coef[1]),
            "slope_after": float(coef[1] + coef[2]), "rss": rss}


def _post_slope_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """OLS slope of y on x and the one-sided p-value of H0: slope >= 0 (t-test, n - 2 df), by
    ``diagnostics.difficulty.ols_slope_test``. Where the test is undefined (n < 3, constant x) the
    p-value is 1.0, so the guard never passes on it."""
    slope, _, _, p = ols_slope_test(x, y)
    return slope, (1.0 if math.isnan(p) else p)


def detect_compression_onset(
    steps: Any,
    values: Any,
    alpha: float = 0.05,
    *,
    direction: int = +1,
    n_boot: int = 199,
    min_segment: int = 3,
    min_points: int = 8,
    guard: bool = True,
    seed: int = 0,
) -> Optional[dict[str, Any]]:
    """Test for a turn from rising to falling in ``values`` over ``steps``; the event or None.

    steps, values: 1-d sequences (NaNs dropped, sorted by step). direction=+1 looks for rise-then-fall
    (entropy, effective rank); -1 for fall-then-rise (alpha-ReQ) -- the values are negated first.
    Calibration (module docstring): under a single straight line with i.i.d. noise, P(event) <= alpha
    up to bootstrap error. n_boot bootstrap replicates (p-values are multiples of 1/(n_boot + 1), so
    n_boot >= 19/alpha is needed for p <= alpha to be possible); min_segment points at least on each
    side of the knot (the knot counts on both); fewer than min_points measurements -> None.
    guard=True also requires the points from the knot on to have a significantly negative OLS slope.

    Returns {"step", "p_value", "statistic", "slope_before", "slope_after", "post_slope_p",
    "n_points", "direction"} (slopes in value units per step, in the original sign) or None.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if direction not in (1, -1):
        raise ValueError(f"direction must be +1 or -1, got {direction}")
    x, y = _clean(steps, values)
    n = x.size
    min_segment = max(int(min_segment), 2)
    if n < max(min_points, 2 * min_segment, 4):
        return None
    span = x[-1] - x[0]
    ys = direction * y
    scale = float(ys.std())
    if span <= 0 or scale == 0.0:
        return None
    t = (x - x[0]) / span  # (n,) in [0, 1]
    ys = (ys - ys.mean()) / scale  # the statistic is invariant to this affine map
    knots = np.arange(min_segment - 1, n - min_segment)  # >= min_segment points each side (knot in both)
    if knots.size == 0:
        return None

    stat, best, b1, b2 = _sup_lr(t, ys[:, None], knots)
    stat, k = float(stat[0]), int(best[0])
    if k < 0:
        return None  # no knot gives a rise followed by a fall
    knot_idx = int(knots[k])
    post_slope, post_p = _post_slope_p(x[knot_idx:], ys[knot_idx:])
    if guard and post_p > alpha:
        return None  # decided by the observed knot alone: no bootstrap needed

    # parametric residual bootstrap under H0 (one line, the fitted slope)
    X0 = np.stack([np.ones(n), t], axis=1)
    coef0, *_ = np.linalg.lstsq(X0, ys, rcond=None)
    line = X0 @ coef0
    resid = ys - line
    resid = (resid - resid.mean()) * math.sqrt(n / (n - 2))  # centred, df-inflated
    rng = np.random.default_rng(seed)
    Ystar = line[:, None] + resid[rng.integers(0, n, size=(n, n_boot))]  # (n, B)
    stat_star, _, _, _ = _sup_lr(t, Ystar, knots)
    p_value = (1.0 + float((stat_star >= stat - 1e-12).sum())) / (n_boot + 1.0)

    if p_value > alpha:
        return None
    fit = hinge_fit(x, direction * y, float(x[knot_idx]))
    return {
        "step": int(round(x[knot_idx])) if float(x[knot_idx]).is_integer() else float(x[knot_idx]),
        "p_value": p_value,
        "statistic": stat,
        "slope_before": fit["slope_before"] * direction,
        "slope_after": fit["slope_after"] * direction,
        "post_slope_p": post_p,
        "n_points": int(n),
        "direction": direction,
    }


_COLUMN_RE = re.compile(r"^repr/(?P<layer>[^/]+)/(?:(?P<domain>[^/]+)/)?(?P<metric>[^/]+)$")


def format_event(event: dict[str, Any]) -> str:
    """One line for a person: "<layer> started compressing at step S (<metric>, p=...)"."""
    where = event["layer"] + (f" [{event['domain']}]" if event.get("domain") else "")
    return (f"{where} started compressing at step {event['step']} "
            f"({event['metric']} {'falls' if event.get('direction', 1) > 0 else 'rises'} after it, "
            f"p={event['p_value']:.3g})")


def detect_phases(
    metrics_df: Any,
    metric: str = "entropy",
    alpha: float = 0.05,
    *,
    layers: Optional[Iterable[str]] = None,
    domain: Optional[str] = None,
    correction: str = "none",
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """Compression onsets per layer from a run's metrics table (``load_run(path).metrics``).

    metrics_df: a pandas DataFrame with a "step" column and columns ``repr/<layer>/<metric>``
    (``repr/<layer>/<domain>/<metric>`` when ``domain`` is given), NaN where the probe did not run;
    or a dict {column: (steps, values)}. metric: which quantity; its direction comes from
    COMPRESSION_DIRECTION (override with direction=...). correction="bonferroni" tests each layer at
    alpha / n_layers, so the chance of any false event over all layers is <= alpha; "none" (default)
    states the rate per layer. Extra keyword arguments go to detect_compression_onset.

    Returns a list (sorted by step) of {"layer", "domain", "step", "kind": "compression_onset",
    "p_value", "metric", "slope_before", "slope_after", "text"}; "text" is format_event's line.
    """
    if correction not in ("none", "bonferroni"):
        raise ValueError(f"correction must be 'none' or 'bonferroni', got {correction!r}")
    series: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if isinstance(metrics_df, dict):
        items = [(c, metrics_df[c]) for c in metrics_df]
        for col, (s, v) in items:
            series[col] = (np.asarray(s), np.asarray(v))
    else:
        if "step" not in metrics_df.columns:
            raise ValueError("metrics_df needs a 'step' column (diagnostics.load_run(path).metrics has one)")
        steps = metrics_df["step"].to_numpy()
        for col in metrics_df.columns:
            if isinstance(col, str) and col.startswith("repr/"):
                series[col] = (steps, metrics_df[col].to_numpy(dtype=np.float64, na_value=np.nan))
    wanted = None if layers is None else set(layers)
    chosen: list[tuple[str, np.ndarray, np.ndarray]] = []
    for col, (s, v) in series.items():
        m = _COLUMN_RE.match(col)
        if not m or m.group("metric") != metric or m.group("domain") != domain:
            continue
        if wanted is not None and m.group("layer") not in wanted:
            continue
        chosen.append((m.group("layer"), s, v))
    direction = kwargs.pop("direction", COMPRESSION_DIRECTION.get(metric, +1))
    a = alpha / max(len(chosen), 1) if correction == "bonferroni" else alpha
    events = []
    for layer, s, v in chosen:
        ev = detect_compression_onset(s, v, a, direction=direction, **kwargs)
        if ev is None:
            continue
        event = {"layer": layer, "domain": domain, "step": ev["step"], "kind": "compression_onset",
                 "p_value": ev["p_value"], "metric": metric, "slope_before": ev["slope_before"],
                 "slope_after": ev["slope_after"], "direction": direction}
        event["text"] = format_event(event)
        events.append(event)
    events.sort(key=lambda e: (e["step"], e["layer"]))
    return events
