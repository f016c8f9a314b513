"""The joint fit of a schedule law to several loss curves: the input checks and the robust solver that
both laws share (``_laws``' annealing law, ``_multi_power``'s multi-power law).

A curve is ``(lrs, steps, losses)``: the LR of every update 0..N-1, the steps at which losses were
logged (the loss at step s is measured after s updates: ``_laws``), the losses. One set of law
parameters describes every curve; an optional integer segment label per loss gives every label other
than the first curve's first one an additive offset (a mixture or sequence-length switch changes what
the loss measures; the same label in two curves is the same offset, e.g. a run and its branches).

A law is an object with
    names                       the parameter names, in order
    lo, hi                      bounds of the scaled parameters
    features(lrs, steps)        the parameter-free part of the law at the steps, LRs divided by ``scale``
    value(p, f), jac(p, f)      the law and its Jacobian at the scaled parameters p
    init(feats, y, O)           a start (law parameters and offsets; ``O`` the offset design)
    natural(p, scale), scaled(params, scale)   parameters in the LR's own units and back
Every law works on LRs divided by the largest LR of the curves (a well-conditioned problem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from diagnostics.stats import robust_noise_scale


@dataclass
class Curve:
    """One checked curve: steps sorted, all >= 1 and within the LRs; ``seg`` one label per loss."""

    lrs: np.ndarray
    steps: np.ndarray
    y: np.ndarray
    seg: np.ndarray


def check_curves(curves, segments=None, *, drop_unusable: bool = False) -> list[Curve]:
    """The curves as ``Curve`` objects, or a ValueError naming the curve and what is wrong with it.

    Losses at steps < 1 (before any update: the power law is infinite there) are dropped.
    drop_unusable: also drop non-finite losses (``fit_annealing_law``'s behaviour) instead of raising.
    """
    curves = list(curves) if curves is not None else []
    if not curves:
        raise ValueError("no curves: give a list of (lrs, steps, losses) triples")
    if segments is not None and len(segments) != len(curves):
        raise ValueError(f"segments needs one label sequence (or None) per curve: {len(segments)} for {len(curves)} curves")
    out = []
    for i, c in enumerate(curves):
        try:
            lrs, steps, y = c
        except (TypeError, ValueError):
            raise ValueError(f"curve {i}: expected a (lrs, steps, losses) triple") from None
        lrs = np.asarray(lrs, dtype=np.float64)
        steps = np.asarray(steps)
        y = np.asarray(y, dtype=np.float64)
        if lrs.ndim != 1 or len(lrs) == 0:
            raise ValueError(f"curve {i}: lrs must be a non-empty 1-D sequence (one learning rate per update)")
        if not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise ValueError(f"curve {i}: lrs must be finite and >= 0")
        if steps.ndim != 1 or y.ndim != 1 or len(steps) != len(y):
            raise ValueError(f"curve {i}: steps and losses differ in length ({len(steps)} vs {len(y)})")
        if len(steps) and not np.all(np.isfinite(steps.astype(np.float64))):
            raise ValueError(f"curve {i}: steps must be finite integers")
        steps = steps.astype(np.int64)
        seg_i = None if segments is None or segments[i] is None else np.asarray(segments[i], dtype=np.int64)
        seg_i = np.zeros(len(y), dtype=np.int64) if seg_i is None else seg_i
        if seg_i.shape != y.shape:
            raise ValueError(f"curve {i}: segments needs one label per loss")
        keep = steps >= 1
        if drop_unusable:
            keep &= np.isfinite(y)
        elif not np.all(np.isfinite(y[keep])):
            raise ValueError(f"curve {i}: losses must be finite ({int(np.sum(~np.isfinite(y[keep])))} are not)")
        steps, y, seg_i = steps[keep], y[keep], seg_i[keep]
        if len(steps) == 0 and not drop_unusable:
            raise ValueError(f"curve {i}: no losses at steps >= 1")
        if len(steps) and steps.max() > len(lrs):
            raise ValueError(f"curve {i}: a loss at step {int(steps.max())} needs the LRs of {int(steps.max())} "
                             f"updates; got {len(lrs)}")
        order = np.argsort(steps, kind="stable")
        out.append(Curve(lrs, steps[order], y[order], seg_i[order]))
    return out


def pooled_noise(curves: list[Curve]) -> float:
    """Per-point noise of the losses: the robust scale of each curve pooled in quadrature, weighted by points."""
    n = np.array([len(c.y) for c in curves], dtype=np.float64)
    s = np.array([robust_noise_scale(c.y) for c in curves])
    return float(np.sqrt(np.sum(n * s ** 2) / n.sum())) if n.sum() > 0 else 0.0


def offset_design(curves: list[Curve], labels: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(labels with an offset, the 0/1 design matrix over the concatenated losses): every label but the
    first curve's first one, unless ``labels`` are given (a label not among them gets no offset)."""
    seg = np.concatenate([c.seg for c in curves])
    if labels is None:
        labels = [int(s) for s in dict.fromkeys(seg.tolist())][1:]
    O = np.stack([(seg == lab).astype(np.float64) for lab in labels], 1) if labels else np.zeros((len(seg), 0))
    return list(labels), O


@dataclass
class Solution:
    """The law's scaled parameters, the offsets, and the fit at the concatenated points."""

    p: np.ndarray
    offsets: dict[int, float]
    scale: float
    fitted: np.ndarray
    residuals: np.ndarray
    noise: float
    rmse: float
    r2: float
    n_points: int
    sizes: list[int]          # points per curve, in order (split residuals / fitted with np.split)


def fit_inputs(law, curves: list[Curve], *, scale: float | None = None, feats=None, noise: float | None = None):
    """What every joint fit of ``law`` to ``curves`` starts from: (offset labels, offset design, losses, LR
    scale, law features per curve, pooled noise); the given scale / feats / noise are reused (a bootstrap).
    Raises ValueError for too few losses or LRs that are all 0."""
    labels, O = offset_design(curves)
    y = np.concatenate([c.y for c in curves])
    n_par = len(law.names) + len(labels)
    if len(y) < n_par + 2:
        raise ValueError(f"{len(y)} usable losses; the fit of {n_par} parameters needs at least {n_par + 2}")
    if scale is None:
        scale = max(float(c.lrs.max()) for c in curves)
    if scale <= 0:
        raise ValueError("all learning rates are 0")
    if feats is None:
        feats = [law.features(c.lrs / scale, c.steps) for c in curves]
    if noise is None:
        noise = pooled_noise(curves)
    return labels, O, y, scale, feats, noise


def joint_fit(law, curves: list[Curve], *, robust: bool = True, x0: dict | None = None, max_nfev: int = 500,
              scale: float | None = None, noise: float | None = None, feats=None) -> Solution:
    """Fit one set of ``law`` parameters and the segment offsets to all ``curves`` (``check_curves``).

    robust: Huber loss with threshold 1.345 x the pooled robust noise scale (95% efficiency under
    Gaussian noise; loss spikes are down-weighted); else plain least squares.
    x0: a start in the LR's own units (``law.names``; offsets start at 0) instead of ``law.init``.
    feats / scale / noise: reuse them from an earlier fit to the same curves and LRs (a bootstrap).
    """
    labels, O, y, scale, feats, noise = fit_inputs(law, curves, scale=scale, feats=feats, noise=noise)
    k = len(law.names)

    def model(p):
        return np.concatenate([law.value(p[:k], f) for f in feats]) + O @ p[k:]

    def resid(p):
        return model(p) - y

    def jac(p):
        return np.column_stack([np.vstack([law.jac(p[:k], f) for f in feats]), O])

    init = np.r_[law.scaled(x0, scale), np.zeros(len(labels))] if x0 is not None else law.init(feats, y, O)
    lo = np.r_[law.lo, np.full(len(labels), -np.inf)]
    hi = np.r_[law.hi, np.full(len(labels), np.inf)]
    init = np.clip(init, lo + 1e-12 * np.isfinite(lo), hi - 1e-9)
    from scipy.optimize import least_squares  # here: importing diagnostics.schedule (midtrain.config does) stays light

    use_huber = robust and noise > 0
    sol = least_squares(resid, init, jac=jac, bounds=(lo, hi), loss="huber" if use_huber else "linear",
                        f_scale=1.345 * noise if use_huber else 1.0, method="trf", x_scale="jac",
                        xtol=1e-10, ftol=1e-10, gtol=1e-10, max_nfev=max_nfev)
    p = sol.x
    fitted = model(p)
    r = fitted - y
    ss = float(np.sum((y - y.mean()) ** 2))
    return Solution(p=p[:k], offsets={lab: float(v) for lab, v in zip(labels, p[k:])}, scale=scale, fitted=fitted,
                    residuals=r, noise=noise, rmse=float(np.sqrt(np.mean(r ** 2))),
                    r2=1 - float(np.sum(r ** 2)) / ss if ss > 0 else math.nan, n_points=len(y),
                    sizes=[len(c.y) for c in curves])


def profile_linear(columns, y: np.ndarray, O: np.ndarray, nonneg: tuple[int, ...]) -> tuple[float, np.ndarray]:
    """Linear least squares of y on ``columns`` and the offsets O; the coefficients at ``nonneg`` are
    clipped at 0 (a start, not a fit). Returns (SSE, coefficients)."""
    X = np.column_stack([*columns, O])
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    for i in nonneg:
        coef[i] = max(coef[i], 0.0)
    return float(np.sum((X @ coef - y) ** 2)), coef
