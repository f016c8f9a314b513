"""Gradient noise scale (GNS): the unbiased two-batch estimators and their EMA tracking.

Pure math, no model: every function takes floats, numpy arrays or (0-d) torch tensors and returns
Python floats or numpy arrays, so the same code runs inside a training hook and offline on logged data.

Reference: McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training"
(arXiv 1812.06162). Notation follows the paper (the S/E trade-off of section 2.3 is ``_tradeoff``):

    G            true (full-data) gradient
    Sigma        per-example gradient covariance; Cov(G_B) = Sigma / B for a batch of B i.i.d. examples
    |G_B|^2      squared norm of a batch-mean gradient; E|G_B|^2 = |G|^2 + tr(Sigma) / B   (App. A)
    B_simple     tr(Sigma) / |G|^2, the "simple noise scale" (section 2.2)
    S, E         optimisation steps / training examples needed to reach a given loss (section 2.3)

Quick tour (runs on a CPU in well under a second):

    from diagnostics.gns import GNSTracker
    tracker = GNSTracker(decay=0.95, tokens_per_example=1024)
    # per step: mean |g_micro|^2 over micro-batches of size b_small, |g_accumulated|^2 of size b_big
    res = tracker.update(small_sq=2.3, big_sq=1.1, b_small=8, b_big=64)
    res.b_simple, res.defined, res.to_metrics()   # {'gns/b_simple': ..., 'gns/grad_sq': ..., ...}

Metric keys (the public schema, see docs/gns.md):

    gns/b_simple          EMA(trace_cov) / EMA(grad_sq), in examples (NaN when undefined)
    gns/b_simple_tokens   gns/b_simple * tokens_per_example (only when tokens_per_example is set)
    gns/grad_sq           bias-corrected EMA of the unbiased |G|^2 estimate
    gns/trace_cov         bias-corrected EMA of the unbiased tr(Sigma) estimate
    gns/small_sq          raw mean |G_small|^2 of this step
    gns/big_sq            raw |G_big|^2 of this step
    gns/b_small           batch size (examples) behind gns/small_sq
    gns/b_big             batch size (examples) behind gns/big_sq
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Any, Mapping

import numpy as np

from diagnostics.stats import BiasCorrectedEMA

__all__ = [
    "METRIC_KEYS",
    "RAW_KEYS",
    "unbiased_grad_sq",
    "unbiased_trace_cov",
    "two_batch_estimates",
    "b_simple_from_estimates",
    "BiasCorrectedEMA",
    "GNSResult",
    "GNSTracker",
    "recompute_b_simple",
]

# metric names (docs/gns.md has the table)
METRIC_KEYS = ("gns/b_simple", "gns/b_simple_tokens", "gns/grad_sq", "gns/trace_cov")
RAW_KEYS = ("gns/small_sq", "gns/big_sq", "gns/b_small", "gns/b_big")


# ----------------------------------------------------------------------------------------------
# input normalisation: floats, numpy arrays, torch tensors (duck-typed, torch is never imported)

def _as_array(x: Any) -> np.ndarray:
    """float64 numpy view of a float / sequence / numpy array / torch tensor (any device, any grad)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _out(a: np.ndarray):
    """0-d results become Python floats; anything else stays a numpy array."""
    a = np.asarray(a, dtype=np.float64)
    return float(a) if a.ndim == 0 else a


_SAME_BATCH_MSG = (
    "the two-batch GNS estimator needs two DIFFERENT batch sizes, got b_small == b_big == {b}. "
    "Measure |G|^2 at two scales: gradient accumulation (each micro-batch vs the accumulated "
    "batch), several data-parallel processes (each rank's local gradient vs the all-reduced one), "
    "or per-example gradient norms (per_example mode, b_small = 1)."
)


def _check_batch_sizes(b_small: np.ndarray, b_big: np.ndarray) -> None:
    if np.any(~np.isfinite(b_small)) or np.any(~np.isfinite(b_big)):
        raise ValueError(f"batch sizes must be finite, got b_small={b_small}, b_big={b_big}")
    if np.any(b_small <= 0) or np.any(b_big <= 0):
        raise ValueError(f"batch sizes must be positive, got b_small={b_small}, b_big={b_big}")
    same = b_small == b_big
    if np.any(same):
        b = np.broadcast_to(b_small, same.shape)[same].flat[0]
        raise ValueError(_SAME_BATCH_MSG.format(b=b))


# ----------------------------------------------------------------------------------------------
# unbiased two-batch estimators (McCandlish et al. 2018, Appendix A)
#
# For a batch-mean gradient of B i.i.d. examples, E|G_B|^2 = |G|^2 + tr(Sigma)/B. Two batch sizes give
# two linear equations in the two unknowns; solving them gives estimators that are unbiased for any
# pair B_small != B_big. "i.i.d." means sampling WITH replacement from the data distribution; Sigma is
# then the population covariance (normalised by N, not N-1). Averaging |G_small|^2 over several
# small batches (micro-batches, ranks) keeps it unbiased and lowers its variance.

def unbiased_grad_sq(small_sq, big_sq, b_small, b_big):
    """Unbiased |G|^2 = (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small). (App. A)

    small_sq: mean squared norm of gradients of batches of size b_small (one or several batches).
    big_sq:   squared norm of a gradient of a batch of size b_big.
    Vectorised over numpy inputs. Can be negative (it is an estimate): smooth before dividing.
    """
    s, g, bs, bb = (_as_array(v) for v in (small_sq, big_sq, b_small, b_big))
    _check_batch_sizes(bs, bb)
    with np.errstate(invalid="ignore", over="ignore"):   # inf/NaN norms -> NaN, skipped by callers
        return _out((bb * g - bs * s) / (bb - bs))


def unbiased_trace_cov(small_sq, big_sq, b_small, b_big):
    """Unbiased tr(Sigma) = (|G_small|^2 - |G_big|^2) / (1/B_small - 1/B_big). (App. A)

    Sigma is the per-example gradient covariance (examples drawn i.i.d./with replacement).
    """
    s, g, bs, bb = (_as_array(v) for v in (small_sq, big_sq, b_small, b_big))
    _check_batch_sizes(bs, bb)
    with np.errstate(invalid="ignore", over="ignore"):
        return _out((s - g) / (1.0 / bs - 1.0 / bb))


def two_batch_estimates(small_sq, big_sq, b_small, b_big):
    """(grad_sq, trace_cov): both unbiased estimates from one pair of measurements."""
    return (unbiased_grad_sq(small_sq, big_sq, b_small, b_big),
            unbiased_trace_cov(small_sq, big_sq, b_small, b_big))


def b_simple_from_estimates(grad_sq, trace_cov):
    """B_simple = tr(Sigma) / |G|^2 (section 2.2), NaN where it is not defined.

    Undefined (NaN) when grad_sq <= 0 (no measurable signal) or trace_cov < 0 (noise estimate
    below zero): the ratio is then meaningless and is never reported as a negative batch size.
    """
    g, t = _as_array(grad_sq), _as_array(trace_cov)
    ok = (g > 0) & (t >= 0) & np.isfinite(g) & np.isfinite(t)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(ok, t / np.where(ok, g, 1.0), np.nan)
    return _out(b)


# ----------------------------------------------------------------------------------------------
# bias-corrected exponential moving average: diagnostics.stats.BiasCorrectedEMA (imported above,
# public through diagnostics.gns; the difficulty tracker's per-domain loss EMAs use the same class)


# ----------------------------------------------------------------------------------------------
# the tracker: separate EMAs of |G|^2 and tr(Sigma), ratio last (McCandlish et al. App. A: the
# ratio of two noisy estimates is biased, so each is smoothed before dividing)

@dataclass
class GNSResult:
    """One reading of the tracker. ``defined`` is False (and b_simple NaN) when the smoothed |G|^2
    is <= 0, the smoothed tr(Sigma) < 0, or nothing has been accumulated yet; ``reason`` says which."""

    b_simple: float
    grad_sq: float            # EMA of the unbiased |G|^2 estimates
    trace_cov: float          # EMA of the unbiased tr(Sigma) estimates
    defined: bool
    reason: str = ""
    b_simple_tokens: float | None = None
    n_updates: int = 0
    n_skipped: int = 0
    # raw inputs of the latest update() call (NaN when the step was fed estimates directly)
    small_sq: float = float("nan")
    big_sq: float = float("nan")
    b_small: float = float("nan")
    b_big: float = float("nan")

    def to_metrics(self, prefix: str = "gns", raw: bool = True) -> dict[str, float]:
        """Flat ``name -> float`` record with the public metric names (docs/gns.md)."""
        m = {f"{prefix}/b_simple": self.b_simple,
             f"{prefix}/grad_sq": self.grad_sq,
             f"{prefix}/trace_cov": self.trace_cov}
        if self.b_simple_tokens is not None:
            m[f"{prefix}/b_simple_tokens"] = self.b_simple_tokens
        if raw and math.isfinite(self.b_small):
            m.update({f"{prefix}/small_sq": self.small_sq, f"{prefix}/big_sq": self.big_sq,
                      f"{prefix}/b_small": self.b_small, f"{prefix}/b_big": self.b_big})
        return m

    def as_dict(self) -> dict:
        return asdict(self)


class GNSTracker:
    """Online B_simple: separate bias-corrected EMAs of |G|^2 and tr(Sigma), B_simple = ratio.

    decay:               EMA decay shared by both EMAs (0 = no smoothing, last step only).
    tokens_per_example:  if set, also report B_simple in tokens (B counted in examples, e.g.
                         sequences of T tokens -> tokens_per_example = T).

    A step whose estimates are not finite (NaN/inf norms from an overflowing step) is skipped as a
    whole -- both EMAs untouched, so they always average the same steps -- and counted in n_skipped.
    """

    def __init__(self, decay: float = 0.95, tokens_per_example: float | None = None):
        self.grad_sq_ema = BiasCorrectedEMA(decay)
        self.trace_cov_ema = BiasCorrectedEMA(decay)
        self.tokens_per_example = None if tokens_per_example is None else float(tokens_per_example)
        self.n_skipped = 0
        self._last_raw = (float("nan"),) * 4

    @property
    def decay(self) -> float:
        return self.grad_sq_ema.decay

    @property
    def n_updates(self) -> int:
        return self.grad_sq_ema.n_updates

    def update(self, small_sq, big_sq, b_small, b_big) -> GNSResult:
        """Feed one step's raw measurements (see unbiased_grad_sq for their meaning).

        Any non-finite value skips the step (counted); b_small == b_big raises ValueError.
        """
        raw = tuple(float(_as_array(v)) for v in (small_sq, big_sq, b_small, b_big))
        self._last_raw = raw
        if not all(math.isfinite(v) for v in raw):
            return self._accumulate(float("nan"), float("nan"))
        grad_sq, trace_cov = two_batch_estimates(*raw)  # validates the batch sizes
        return self._accumulate(grad_sq, trace_cov)

    def update_estimates(self, grad_sq, trace_cov) -> GNSResult:
        """Feed already-unbiased estimates of |G|^2 and tr(Sigma) (e.g. from per-example norms)."""
        self._last_raw = (float("nan"),) * 4
        return self._accumulate(float(_as_array(grad_sq)), float(_as_array(trace_cov)))

    def _accumulate(self, grad_sq: float, trace_cov: float) -> GNSResult:
        if math.isfinite(grad_sq) and math.isfinite(trace_cov):
            self.grad_sq_ema.update(grad_sq)
            self.trace_cov_ema.update(trace_cov)
        else:
            self.n_skipped += 1
        return self.result()

    def result(self) -> GNSResult:
        g, t = self.grad_sq_ema.value, self.trace_cov_ema.value
        if self.n_updates == 0:
            reason = "no finite measurements yet"
        elif g <= 0:
            reason = "EMA(grad_sq) <= 0: gradient signal below estimator noise"
        elif t < 0:
            reason = "EMA(trace_cov) < 0: noise estimate below zero"
        else:
            reason = ""
        defined = reason == ""
        b = t / g if defined else float("nan")
        tok = None if self.tokens_per_example is None else b * self.tokens_per_example
        small_sq, big_sq, b_small, b_big = self._last_raw
        return GNSResult(b_simple=b, grad_sq=g, trace_cov=t, defined=defined, reason=reason,
                         b_simple_tokens=tok, n_updates=self.n_updates, n_skipped=self.n_skipped,
                         small_sq=small_sq, big_sq=big_sq, b_small=b_small, b_big=b_big)

    def state_dict(self) -> dict:
        return {"grad_sq": self.grad_sq_ema.state_dict(),
                "trace_cov": self.trace_cov_ema.state_dict(),
                "tokens_per_example": self.tokens_per_example,
                "n_skipped": self.n_skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.grad_sq_ema.load_state_dict(state["grad_sq"])
        self.trace_cov_ema.load_state_dict(state["trace_cov"])
        tpe = state.get("tokens_per_example")
        self.tokens_per_example = None if tpe is None else float(tpe)
        self.n_skipped = int(state.get("n_skipped", 0))


# ----------------------------------------------------------------------------------------------
# offline recomputation from logged raw norms

def recompute_b_simple(data=None, *, small_sq=None, big_sq=None, b_small=None, b_big=None,
                       decay: float | None = None, window: int | None = None,
                       tokens_per_example: float | None = None, prefix: str = "gns"):
    """Recompute B_simple from logged raw norms with any smoothing, offline.

    data:   a pandas DataFrame (e.g. ``load_run(path).metrics``) holding the columns
            ``{prefix}/small_sq``, ``{prefix}/big_sq``, ``{prefix}/b_small``, ``{prefix}/b_big``;
            or None and pass the four arrays as keywords.
    decay:  bias-corrected EMA, identical to GNSTracker(decay) fed the same rows in order.
    window: rolling ratio over the last ``window`` valid measurements:
            B_simple = sum(trace_cov_i) / sum(grad_sq_i)  (sum of numerators over sum of denominators,
            i.e. a ratio of means, never a mean of noisy ratios).
    Exactly one of decay / window. Rows with a non-finite raw value (steps where GNS was not
    measured, or an overflow) are skipped: they carry the previous smoothed value forward.

    Returns a pandas DataFrame with the input's index (a ``step`` column copied when present) and
    columns ``{prefix}/grad_sq``, ``{prefix}/trace_cov``, ``{prefix}/b_simple``, ``{prefix}/defined``
    (+ ``{prefix}/b_simple_tokens`` when tokens_per_example is given).
    """
    import pandas as pd
    from scipy.signal import lfilter

    if (decay is None) == (window is None):
        raise ValueError("pass exactly one of decay= (EMA) or window= (rolling ratio)")
    names = ("small_sq", "big_sq", "b_small", "b_big")
    if data is not None:
        missing = [f"{prefix}/{n}" for n in names if f"{prefix}/{n}" not in data.columns]
        if missing:
            raise ValueError(f"recompute_b_simple: columns {missing} not in the DataFrame "
                             f"(have {list(data.columns)}); log the raw norms to recompute")
        cols = [data[f"{prefix}/{n}"].to_numpy(dtype=np.float64) for n in names]
        index = data.index
    else:
        given = (small_sq, big_sq, b_small, b_big)
        if any(v is None for v in given):
            raise ValueError("pass a DataFrame or all four of small_sq, big_sq, b_small, b_big")
        cols = [np.atleast_1d(_as_array(v)) for v in given]
        cols = list(np.broadcast_arrays(*cols))
        index = pd.RangeIndex(len(cols[0]))
    s, g, bs, bb = cols

    valid = np.isfinite(s) & np.isfinite(g) & np.isfinite(bs) & np.isfinite(bb)
    grad_sq = np.full(len(s), np.nan)
    trace_cov = np.full(len(s), np.nan)
    if valid.any():
        grad_sq[valid], trace_cov[valid] = (np.atleast_1d(a) for a in two_batch_estimates(
            s[valid], g[valid], bs[valid], bb[valid]))
    # an overflowing step can give finite raw norms but non-finite estimates: skip it too
    valid &= np.isfinite(grad_sq) & np.isfinite(trace_cov)

    gv, tv = grad_sq[valid], trace_cov[valid]                         # (n_valid,)
    if decay is not None:
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        # m_t = decay m_{t-1} + (1-decay) x_t as a first-order IIR filter, then Adam debiasing
        t = np.arange(1, len(gv) + 1)
        debias = 1.0 - decay ** t
        g_s = lfilter([1.0 - decay], [1.0, -decay], gv) / debias
        t_s = lfilter([1.0 - decay], [1.0, -decay], tv) / debias
    else:
        window = int(window)
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        # rolling sums via cumulative sums; mean = sum / count, so the ratio is the sum ratio
        cg = np.concatenate([[0.0], np.cumsum(gv)])
        ct = np.concatenate([[0.0], np.cumsum(tv)])
        hi = np.arange(1, len(gv) + 1)
        lo = np.maximum(hi - window, 0)
        n = hi - lo
        g_s = (cg[hi] - cg[lo]) / n
        t_s = (ct[hi] - ct[lo]) / n

    # carry the smoothed values forward over skipped rows (NaN before the first valid one)
    pos = np.cumsum(valid) - 1                                        # index into the valid rows
    has = pos >= 0
    g_out = np.full(len(s), np.nan)
    t_out = np.full(len(s), np.nan)
    g_out[has], t_out[has] = g_s[pos[has]], t_s[pos[has]]
    b = np.atleast_1d(b_simple_from_estimates(g_out, t_out))

    out = pd.DataFrame(index=index)
    if data is not None and "step" in data.columns:
        out["step"] = data["step"].to_numpy()
    out[f"{prefix}/grad_sq"] = g_out
    out[f"{prefix}/trace_cov"] = t_out
    out[f"{prefix}/b_simple"] = b
    out[f"{prefix}/defined"] = np.isfinite(b)
    if tokens_per_example is not None:
        out[f"{prefix}/b_simple_tokens"] = b * float(tokens_per_example)
    return out
