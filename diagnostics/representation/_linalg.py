"""Shared helpers of the representation diagnostics (spectra, twonn, infoplane, readout).

Input handling (torch tensor or numpy array -> float64 (N, D) tensor), the PSD eigenvalue routine with
its numerical-zero rule, and the Renyi entropy of a probability vector.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_EPS64 = float(np.finfo(np.float64).eps)


def _as_tensor(x: Any) -> torch.Tensor:
    """torch tensor view of x (numpy arrays are wrapped without copying); gradients detached."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    return torch.as_tensor(np.asarray(x))


def _as_matrix64(Z: Any) -> torch.Tensor:
    """(N, D) float64 tensor on Z's device; (..., D) inputs are flattened to (N, D)."""
    Z = _as_tensor(Z)
    if Z.ndim == 1:
        Z = Z[:, None]
    elif Z.ndim > 2:
        Z = Z.reshape(-1, Z.shape[-1])
    if Z.ndim != 2 or Z.shape[0] == 0 or Z.shape[1] == 0:
        raise ValueError(f"expected a non-empty (N, D) matrix, got shape {tuple(Z.shape)}")
    Z = Z.to(torch.float64)
    # a finite sum proves every entry finite (a NaN or Inf would propagate); only an overflowing sum
    # of finite entries needs the elementwise check
    if not bool(torch.isfinite(Z.sum())) and not bool(torch.isfinite(Z).all()):
        raise ValueError("representation contains NaN or Inf")
    return Z


def _zero_tol(lam: np.ndarray, n: int) -> np.ndarray:
    """Set eigenvalues <= n * eps64 * lambda_max (numerical zeros, tiny negatives) to exactly 0."""
    lam_max = float(lam.max()) if lam.size else 0.0
    lam[lam <= max(n, 1) * _EPS64 * max(lam_max, 0.0)] = 0.0
    return lam


def _psd_eigvals(M: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, float64, descending, numerical zeros set to exactly 0.

    float64 eigvalsh of a low-rank PSD matrix returns the zero eigenvalues as +-(n * eps * lambda_max)
    noise; the same tolerance as numpy.linalg.matrix_rank zeroes them so that a rank-k matrix has
    exactly k positive eigenvalues (docs/architecture.md, Known pitfalls, "Eigensolvers").
    """
    M = 0.5 * (M + M.T)  # exact symmetry; eigvalsh reads one triangle only
    lam = torch.linalg.eigvalsh(M).cpu().numpy()[::-1].copy()  # descending
    return _zero_tol(lam, M.shape[0])


def renyi_entropy(p: Any, alpha: float = 1.0) -> float:
    """Renyi alpha-entropy (nats) of a probability vector p (zeros allowed), any alpha > 0 or inf.

    S_alpha = log(sum_i p_i^alpha) / (1 - alpha); alpha = 1 is Shannon's -sum p log p, alpha = inf is
    -log max p. Near alpha = 1 we evaluate sum p^alpha - 1 = sum p (p^(alpha-1) - 1) with expm1 and
    the log with log1p, so the value is continuous (no 0/0 cancellation) as alpha -> 1.
    """
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    if p.size == 0:
        return float("nan")
    p = p / p.sum()
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if math.isinf(alpha):
        return float(-math.log(p.max()))
    logp = np.log(p)
    if alpha == 1.0:
        return float(-(p * logp).sum())
    s_minus_1 = float((p * np.expm1((alpha - 1.0) * logp)).sum())  # sum p^alpha - 1
    return float(math.log1p(s_minus_1) / (1.0 - alpha))
