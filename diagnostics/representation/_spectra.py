"""Representation geometry: matrix entropy, effective rank, alpha-ReQ, TwoNN, information plane, readout.

Pure functions on a representation matrix Z of shape (N, D) -- N tokens (rows), D features -- given as
a torch tensor (any dtype/device) or a numpy array. Inputs with more than two dims, e.g. (B, T, D), are
flattened to (B*T, D). Scalars come back as Python floats, spectra as float64 numpy arrays.

The one spectral definition every metric below shares (docs/representation.md):

    Z  -> (optional) rows scaled to unit L2 norm           normalize_rows=True
       -> (optional) columns centred: Z - mean over rows   center=True
    Gram G = Z Z^T (N x N)  and  covariance C = Z^T Z (D x D) have the same nonzero eigenvalues;
    we eigendecompose the smaller one, in float64, with torch.linalg.eigvalsh on Z's device.
    Eigenvalues below n * eps64 * lambda_max (numerical zeros, including tiny negatives) are set to 0.
    The Gram *entries* are never clamped (Skean et al.'s code clips G at 0 before eigvalsh, which
    changes the metric; we do not).
    lambda_i / sum_j lambda_j  is the spectrum of the trace-normalised Gram: a probability vector.

Metrics (references and equations in docs/representation.md; TwoNN, the information plane and the
readout live in the sibling modules _twonn / _infoplane / _readout; all are public through the
family's front door, ``diagnostics.representation``):

    matrix_entropy    S_alpha = log(sum_i lambda_i^alpha) / (1 - alpha)      Giraldo, Rao & Principe 2014
    effective_rank    exp(-sum p_i log p_i), p from singular values        Roy & Vetterli 2007; RankMe 2023
    alpha_req         lambda_i ~ i^-alpha, least squares in log-log          Agrawal et al. 2022
    twonn_dimension   mu = r2/r1 ~ Pareto(d): -log(1 - F(mu)) = d log mu     Facco et al. 2017
    mutual_information I(A;B) = S(A) + S(B) - S(A,B), Hadamard joint Gram    Giraldo 2014; Yu et al. 2019/2020
    readout_loss      logit-lens cross-entropy through the model's own final norm + head
    fit_linear_probe  held-out cross-entropy of a small softmax probe

Quick tour (CPU, well under a second):

    import torch
    from diagnostics.representation import matrix_entropy, effective_rank, alpha_req, twonn_dimension
    Z = torch.randn(1000, 64) @ torch.randn(64, 256)      # 1000 tokens, rank-64 features
    matrix_entropy(Z), effective_rank(Z), alpha_req(Z), twonn_dimension(Z)

All natural logs: entropies are in nats.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from diagnostics.representation._linalg import _as_matrix64, _as_tensor, _psd_eigvals, renyi_entropy
from diagnostics.representation._twonn import twonn_dimension

__all__ = [
    "eigenspectrum",
    "renyi_entropy",
    "matrix_entropy",
    "effective_rank",
    "alpha_req",
    "representation_metrics",
    "grouped_representation_metrics",
]


# ----------------------------------------------------------------------------------------------------
# the shared eigenspectrum

def _preprocess(Z: torch.Tensor, center: bool, normalize_rows: bool) -> torch.Tensor:
    # Order matters: rows are scaled to the unit sphere first (cosine geometry), then the
    # columns are centred so that Z^T Z is N times the covariance of the (normalised) tokens.
    if normalize_rows:
        norms = Z.norm(dim=1, keepdim=True)
        Z = Z / torch.where(norms > 0, norms, torch.ones_like(norms))
    if center:
        Z = Z - Z.mean(dim=0, keepdim=True)
    return Z


def _raw_spectrum(Z: Any, center: bool, normalize_rows: bool, via: str = "auto") -> np.ndarray:
    """Eigenvalues (descending, not normalised, length min(N, D)) of Z Z^T == nonzero ones of Z^T Z."""
    Z = _preprocess(_as_matrix64(Z), center, normalize_rows)  # (N, D)
    N, D = Z.shape
    if via == "auto":
        via = "gram" if N <= D else "covariance"
    if via == "gram":
        lam = _psd_eigvals(Z @ Z.T)  # (N, N)
    elif via == "covariance":
        lam = _psd_eigvals(Z.T @ Z)  # (D, D)
    else:
        raise ValueError(f"via must be 'auto', 'gram' or 'covariance', got {via!r}")
    r = min(N, D)
    if lam.size < r:
        lam = np.concatenate([lam, np.zeros(r - lam.size)])
    return lam[:r]


def eigenspectrum(Z: Any, center: bool = True, normalize_rows: bool = False, via: str = "auto") -> np.ndarray:
    """Eigenvalues of the trace-normalised Gram (equivalently covariance) of Z, sorted descending.

    Z (N, D) -> float64 array of length min(N, D), entries >= 0 summing to 1 (all zeros if Z, after
    preprocessing, is the zero matrix). center subtracts the column means, normalize_rows scales every
    token to unit norm first. via="auto" eigendecomposes the smaller of the N x N Gram and the D x D
    covariance; "gram"/"covariance" force one path (same result; used by the tests).
    """
    lam = _raw_spectrum(Z, center, normalize_rows, via)
    total = lam.sum()
    return lam / total if total > 0 else lam


# ----------------------------------------------------------------------------------------------------
# entropy and effective rank

def matrix_entropy(
    Z: Any,
    alpha: float = 1.0,
    center: bool = True,
    normalize_rows: bool = False,
    normalized: bool = False,
) -> float:
    """Matrix-based Renyi alpha-entropy of a representation (Giraldo, Rao & Principe 2014, eq. 6).

    S_alpha(Z) = 1/(1 - alpha) * log sum_i lambda_i^alpha, lambda = eigenspectrum(Z) (eigenvalues of the
    trace-normalised linear-kernel Gram Z Z^T, summing to 1); alpha = 1 is the von Neumann entropy
    -sum lambda log lambda. Natural log (nats). Ranges from 0 (rank 1) to log min(N, D) (isotropic);
    k equal eigenvalues give log k. Preprocessing: optional row normalisation, then column centring
    (default, so the spectrum is that of the token covariance; with centring N orthonormal rows give
    log(N - 1), without it log N). normalized=True divides by log min(N, D) (Skean et al. 2025).
    Invariant to rotations Z -> Z Q and to scaling Z -> c Z. NaN if Z is zero after preprocessing.
    """
    lam = eigenspectrum(Z, center=center, normalize_rows=normalize_rows)
    S = renyi_entropy(lam, alpha)
    if normalized:
        n = lam.size  # min(N, D)
        return 0.0 if n <= 1 else S / math.log(n)
    return S


def effective_rank(
    Z: Any,
    spectrum: str = "singular",
    center: bool = False,
    normalize_rows: bool = False,
) -> float:
    """Effective rank exp(H(p)) of Z (Roy & Vetterli 2007, eq. 3; RankMe, Garrido et al. 2023, eq. 1).

    spectrum="singular" (default, the RankMe / Roy-Vetterli definition): p_i = sigma_i / sum_j sigma_j
    with sigma the singular values of Z. spectrum="covariance": p_i = lambda_i / sum lambda_j with
    lambda = sigma^2 the covariance eigenvalues, i.e. exp(matrix_entropy(Z, alpha=1)).
    Both lie in [1, min(N, D)] and equal k for k equal nonzero values; the singular version is larger
    for a decaying spectrum (it weighs the tail more). center defaults to False as in RankMe; pass
    center=True for the covariance of the tokens. NaN if Z is zero.
    """
    lam = _raw_spectrum(Z, center, normalize_rows)
    if spectrum == "singular":
        values = np.sqrt(lam)
    elif spectrum == "covariance":
        values = lam
    else:
        raise ValueError(f"spectrum must be 'singular' or 'covariance', got {spectrum!r}")
    if values.sum() <= 0:
        return float("nan")
    return float(math.exp(renyi_entropy(values / values.sum(), 1.0)))


# ----------------------------------------------------------------------------------------------------
# alpha-ReQ

def alpha_req(
    Z: Any,
    fit_range: tuple[int, Optional[int]] = (6, 100),
    center: bool = True,
    return_r2: bool = False,
) -> float | tuple[float, float]:
    """Power-law decay exponent of the covariance eigenspectrum, lambda_i ~ i^-alpha (Agrawal et al. 2022).

    alpha = -slope of the ordinary least-squares line through (log i, log lambda_i) for the 1-based
    ranks i = a..b (inclusive) of fit_range = (a, b). Default (6, 100) mirrors Agrawal et al.'s
    reference code (skip the first few eigenvalues, fit the body). b=None means the last eigenvalue;
    b is clipped to the number of positive eigenvalues. Larger alpha = faster decay = lower-dimensional,
    more "compressed" representation; alpha ~ 1 is the value Agrawal et al. associate with good
    generalisation. Returns alpha, or (alpha, R^2 of the log-log fit) when return_r2. NaN when fewer
    than 3 positive eigenvalues fall in the range.
    """
    lam = _raw_spectrum(Z, center, normalize_rows=False)
    alpha, r2 = _alpha_from_spectrum(lam, fit_range)
    return (alpha, r2) if return_r2 else alpha


def _alpha_from_spectrum(lam: np.ndarray, fit_range: tuple[int, Optional[int]]) -> tuple[float, float]:
    """(alpha, R^2) of the OLS fit log lambda_i = -alpha log i + c over 1-based ranks fit_range."""
    a, b = fit_range
    n_pos = int((lam > 0).sum())
    b = n_pos if b is None else min(int(b), n_pos)
    a = max(int(a), 1)
    if b - a + 1 < 3:
        return float("nan"), float("nan")
    x = np.log(np.arange(a, b + 1, dtype=np.float64))
    y = np.log(lam[a - 1 : b])
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else float("nan")
    return float(-slope), r2



# ----------------------------------------------------------------------------------------------------
# everything at once (what a probe hook logs per layer)

def _spectral_metrics(lam: np.ndarray, alpha: float, fit_range: tuple[int, Optional[int]]) -> dict[str, float]:
    """entropy, normalized_entropy, effective_rank, alpha_req, alpha_req_r2 of a raw spectrum."""
    total = lam.sum()
    out: dict[str, float] = {}
    if total > 0:
        p = lam / total
        S = renyi_entropy(p, alpha)
        sv = np.sqrt(lam)
        out["entropy"] = S
        out["normalized_entropy"] = S / math.log(lam.size) if lam.size > 1 else 0.0
        out["effective_rank"] = float(math.exp(renyi_entropy(sv / sv.sum(), 1.0)))
    else:
        out.update(entropy=float("nan"), normalized_entropy=float("nan"), effective_rank=float("nan"))
    out["alpha_req"], out["alpha_req_r2"] = _alpha_from_spectrum(lam, fit_range)
    return out


def _twonn_or_nan(Z: torch.Tensor) -> float:
    try:
        return float(twonn_dimension(Z))
    except ValueError:
        return float("nan")


def representation_metrics(
    Z: Any,
    center: bool = True,
    normalize_rows: bool = False,
    alpha: float = 1.0,
    fit_range: tuple[int, Optional[int]] = (6, 100),
    twonn: bool = True,
    return_spectrum: bool = False,
) -> dict[str, float] | tuple[dict[str, float], np.ndarray]:
    """The per-layer scalars of docs/representation.md from one eigendecomposition (plus TwoNN).

    Keys (log them as repr/<layer>/<key>): entropy, normalized_entropy, effective_rank (singular-value
    RankMe on the same preprocessed Z), alpha_req, alpha_req_r2, twonn_id (on the raw rows of Z).
    return_spectrum=True also returns that eigendecomposition's ``eigenspectrum(Z, center,
    normalize_rows)`` (no second one to save it).
    """
    Z = _as_matrix64(Z)  # once: the spectrum and TwoNN share the float64 copy
    lam = _raw_spectrum(Z, center, normalize_rows)
    out = _spectral_metrics(lam, alpha, fit_range)
    if twonn:
        out["twonn_id"] = _twonn_or_nan(Z)
    if return_spectrum:
        total = lam.sum()
        return out, (lam / total if total > 0 else lam)
    return out


def grouped_representation_metrics(
    Z: Any,
    groups: Any,
    alpha: float = 1.0,
    fit_range: tuple[int, Optional[int]] = (6, 100),
    twonn: bool = True,
) -> tuple[dict[str, float], np.ndarray, dict[int, dict[str, float]]]:
    """representation_metrics of Z and of each group of its rows (e.g. the domains of a probe batch).

    groups: (N,) integer group of each row. Returns (metrics of all of Z, its eigenspectrum,
    {group: metrics of Z[groups == group]} for groups of >= 3 rows, without TwoNN), centred, equal to
    calling representation_metrics on each. When every group has more rows than Z has columns, the
    pooled covariance comes from the groups' by the law of total covariance,
    C = sum_g C_g + sum_g n_g (m_g - m)(m_g - m)^T (a sum of PSD terms: no cancellation), saving its
    N x D x D product; otherwise each is computed on its own.
    """
    Z = _as_matrix64(Z)
    g = _as_tensor(groups).reshape(-1).to(Z.device)
    if g.numel() != Z.shape[0]:
        raise ValueError(f"groups has {g.numel()} entries but Z has {Z.shape[0]} rows")
    N, D = Z.shape
    ids, counts = torch.unique(g, return_counts=True)
    ids, counts = ids.tolist(), counts.tolist()
    per: dict[int, dict[str, float]] = {}
    if not all(n > D for n in counts):
        pooled, spectrum = representation_metrics(Z, alpha=alpha, fit_range=fit_range, twonn=twonn,
                                                  return_spectrum=True)
        for i, n in zip(ids, counts):
            if n >= 3:
                per[i] = representation_metrics(Z[g == i], alpha=alpha, fit_range=fit_range, twonn=False)
        return pooled, spectrum, per
    m = Z.mean(dim=0)
    C = torch.zeros(D, D, dtype=Z.dtype, device=Z.device)
    for i, n in zip(ids, counts):
        Zi = Z[g == i]
        mi = Zi.mean(dim=0)
        Zi = Zi - mi
        Ci = Zi.T @ Zi  # (D, D) scatter of the group about its own mean
        per[i] = _spectral_metrics(_psd_eigvals(Ci), alpha, fit_range)
        dm = mi - m
        C += Ci + n * torch.outer(dm, dm)
    lam = _psd_eigvals(C)
    pooled = _spectral_metrics(lam, alpha, fit_range)
    if twonn:
        pooled["twonn_id"] = _twonn_or_nan(Z)
    total = lam.sum()
    return pooled, (lam / total if total > 0 else lam), per
