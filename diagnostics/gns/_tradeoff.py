"""The steps / examples trade-off of McCandlish et al. 2018 (arXiv 1812.06162, section 2.3).

Given B_noise (or measured steps and examples at several batch sizes), how many optimisation steps and
training examples a run at batch size B needs to reach a target loss, and the critical batch size
B_crit = E_min / S_min that balances the two. Pure math on floats / arrays, like ``_two_batch``.

    from diagnostics.gns import fit_steps_examples, steps_needed
    fit = fit_steps_examples(steps=[1200, 700, 450], examples=[9600, 11200, 14400])
    fit.b_crit, steps_needed(64, fit.s_min, fit.b_noise)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diagnostics.gns._two_batch import _as_array, _out

__all__ = ["steps_needed", "examples_needed", "critical_batch_size", "TradeoffFit", "fit_steps_examples"]


# ----------------------------------------------------------------------------------------------
# the steps / examples trade-off (McCandlish et al. 2018, section 2.3)
#
#     S = S_min (1 + B_noise / B),   E = B S = E_min (1 + B / B_noise),   E_min = S_min B_noise
#     => (S / S_min - 1)(E / E_min - 1) = 1                                   (eq. 2.11)
#     B_crit = E_min / S_min                                                 (eq. 2.12)
#
# In this model B_crit equals B_noise; the paper's point is that B_simple (measurable) approximates
# B_noise and so predicts B_crit, up to the Hessian/conditioning caveats in docs/gns.md.

def steps_needed(batch_size, s_min, b_noise):
    """S(B) = S_min (1 + B_noise / B): optimisation steps to reach a target loss at batch size B."""
    B, s, bn = _as_array(batch_size), _as_array(s_min), _as_array(b_noise)
    return _out(s * (1.0 + bn / B))


def examples_needed(batch_size, e_min, b_noise):
    """E(B) = E_min (1 + B / B_noise): training examples to reach a target loss at batch size B."""
    B, e, bn = _as_array(batch_size), _as_array(e_min), _as_array(b_noise)
    return _out(e * (1.0 + B / bn))


def critical_batch_size(s_min, e_min):
    """B_crit = E_min / S_min (eq. 2.12): the batch size that costs 2 S_min steps and 2 E_min examples."""
    return _out(_as_array(e_min) / _as_array(s_min))


@dataclass
class TradeoffFit:
    """Result of fit_steps_examples. b_noise == b_crit in the model (both E_min / S_min)."""

    s_min: float
    e_min: float
    b_crit: float
    b_noise: float
    rms_residual: float   # rms of 1 - S_min/S - E_min/E over the points (0 for exact data)
    n_points: int

    def steps(self, batch_size):
        return steps_needed(batch_size, self.s_min, self.b_noise)

    def examples(self, batch_size):
        return examples_needed(batch_size, self.e_min, self.b_noise)


def fit_steps_examples(steps, examples) -> TradeoffFit:
    """Fit (S_min, E_min, B_crit) to measured (S, E) pairs (McCandlish et al. eq. 2.11).

    steps[i], examples[i]: steps and examples a run at batch size B_i needed to reach one common
    target loss (E_i = B_i S_i for a constant batch size). Expanding eq. 2.11,
    (S - S_min)(E - E_min) = S_min E_min  <=>  S_min / S + E_min / E = 1,
    which is LINEAR in (S_min, E_min): ordinary least squares on that, in closed form.
    Needs >= 2 points with different batch sizes; raises ValueError if the fit is degenerate or
    gives a non-positive S_min / E_min (the data do not follow the model).
    """
    S, E = np.atleast_1d(_as_array(steps)), np.atleast_1d(_as_array(examples))
    if S.shape != E.shape or S.ndim != 1:
        raise ValueError(f"steps and examples must be 1-d and the same length, got {S.shape}, {E.shape}")
    if len(S) < 2:
        raise ValueError("fit_steps_examples needs at least 2 (steps, examples) pairs")
    if not (np.all(np.isfinite(S)) and np.all(np.isfinite(E)) and np.all(S > 0) and np.all(E > 0)):
        raise ValueError("steps and examples must be finite and positive")
    A = np.stack([1.0 / S, 1.0 / E], axis=1)                          # (n, 2)
    # rescale columns so the 2x2 normal equations are well conditioned (S ~ 1e3, E ~ 1e6 typical)
    scale = np.linalg.norm(A, axis=0)
    coef, _, rank, _ = np.linalg.lstsq(A / scale, np.ones(len(S)), rcond=None)
    if rank < 2:
        raise ValueError("degenerate (S, E) data: all points have the same batch size E/S; "
                         "measure at least two different batch sizes")
    s_min, e_min = coef / scale
    if not (s_min > 0 and e_min > 0):
        raise ValueError(f"fit gave S_min={s_min:.4g}, E_min={e_min:.4g}: the (S, E) pairs do not "
                         "follow (S/S_min - 1)(E/E_min - 1) = 1 (check they share one target loss)")
    resid = 1.0 - A @ np.array([s_min, e_min])
    b = e_min / s_min
    return TradeoffFit(s_min=float(s_min), e_min=float(e_min), b_crit=float(b), b_noise=float(b),
                       rms_residual=float(np.sqrt(np.mean(resid ** 2))), n_points=len(S))
