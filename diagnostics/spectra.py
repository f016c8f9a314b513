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

Metrics (references and equations in docs/representation.md):

    matrix_entropy    S_alpha = log(sum_i lambda_i^alpha) / (1 - alpha)      Giraldo, Rao & Principe 2014
    effective_rank    exp(-sum p_i log p_i), p from singular values        Roy & Vetterli 2007; RankMe 2023
    alpha_req         lambda_i ~ i^-alpha, least squares in log-log          Agrawal et al. 2022
    twonn_dimension   mu = r2/r1 ~ Pareto(d): -log(1 - F(mu)) = d log mu     Facco et al. 2017
    mutual_information I(A;B) = S(A) + S(B) - S(A,B), Hadamard joint Gram    Giraldo 2014; Yu et al. 2019/2020
    readout_loss      logit-lens cross-entropy through the model's own final norm + head
    fit_linear_probe  held-out cross-entropy of a small softmax probe

Quick tour (CPU, well under a second):

    import torch
    from diagnostics.spectra import matrix_entropy, effective_rank, alpha_req, twonn_dimension
    Z = torch.randn(1000, 64) @ torch.randn(64, 256)      # 1000 tokens, rank-64 features
    matrix_entropy(Z), effective_rank(Z), alpha_req(Z), twonn_dimension(Z)

All natural logs: entropies are in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "eigenspectrum",
    "renyi_entropy",
    "matrix_entropy",
    "effective_rank",
    "alpha_req",
    "twonn_dimension",
    "kernel_gram",
    "gram_entropy",
    "joint_gram_entropy",
    "mutual_information",
    "mutual_information_xt",
    "mutual_information_ty",
    "information_plane",
    "readout_loss",
    "ProbeResult",
    "fit_linear_probe",
    "representation_metrics",
]

_EPS64 = float(np.finfo(np.float64).eps)


# ----------------------------------------------------------------------------------------------------
# input handling and the shared eigenspectrum

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
    if not torch.isfinite(Z).all():
        raise ValueError("representation contains NaN or Inf")
    return Z


def _preprocess(Z: torch.Tensor, center: bool, normalize_rows: bool) -> torch.Tensor:
    # Order matters: rows are scaled to the unit sphere first (cosine geometry), then the
    # columns are centred so that Z^T Z is N times the covariance of the (normalised) tokens.
    if normalize_rows:
        norms = Z.norm(dim=1, keepdim=True)
        Z = Z / torch.where(norms > 0, norms, torch.ones_like(norms))
    if center:
        Z = Z - Z.mean(dim=0, keepdim=True)
    return Z


def _psd_eigvals(M: torch.Tensor) -> np.ndarray:
    """Eigenvalues of a symmetric PSD matrix, float64, descending, numerical zeros set to exactly 0.

    float64 eigvalsh of a low-rank PSD matrix returns the zero eigenvalues as +-(n * eps * lambda_max)
    noise; the same tolerance as numpy.linalg.matrix_rank zeroes them so that a rank-k matrix has
    exactly k positive eigenvalues (DESIGN.md section 8, "Eigen-solvers").
    """
    M = 0.5 * (M + M.T)  # exact symmetry; eigvalsh reads one triangle only
    lam = torch.linalg.eigvalsh(M).cpu().numpy()[::-1].copy()  # descending
    lam_max = lam[0] if lam.size else 0.0
    tol = max(M.shape[0], 1) * _EPS64 * max(lam_max, 0.0)
    lam[lam <= tol] = 0.0
    return lam


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
# TwoNN intrinsic dimension

def _two_nearest(X: torch.Tensor, chunk: int = 1024, n_candidates: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Distances to the first and second nearest neighbour of every row of X (N, D), no self-matches.

    Candidates come from the fast matrix-product form |x|^2 + |y|^2 - 2 x.y in chunks of rows; their
    distances are then recomputed exactly as |x - y| so that close pairs do not suffer cancellation.
    Memory is O(chunk * N).
    """
    N = X.shape[0]
    k = min(n_candidates, N - 1)
    sq = (X * X).sum(dim=1)  # (N,)
    r1 = torch.empty(N, dtype=X.dtype, device=X.device)
    r2 = torch.empty(N, dtype=X.dtype, device=X.device)
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        d2 = sq[s:e, None] + sq[None, :] - 2.0 * (X[s:e] @ X.T)  # (c, N)
        d2[torch.arange(e - s), torch.arange(s, e)] = float("inf")  # exclude self
        idx = d2.topk(k, dim=1, largest=False).indices  # (c, k)
        exact = (X[idx] - X[s:e, None, :]).norm(dim=-1)  # (c, k, D) -> (c, k)
        two = exact.topk(2, dim=1, largest=False).values  # (c, 2) ascending
        r1[s:e], r2[s:e] = two[:, 0], two[:, 1]
    return r1, r2


def twonn_dimension(
    X: Any,
    discard_fraction: float = 0.1,
    estimator: str = "regression",
    return_details: bool = False,
) -> float | tuple[float, dict]:
    """TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140).

    For each point, mu = r2 / r1 (second / first nearest-neighbour distance). On a locally uniform
    d-dimensional manifold mu is Pareto: F(mu) = 1 - mu^-d, so -log(1 - F(mu)) = d log mu (eq. 3-5).
    Steps, as in the paper and dadapy/scikit-dimension:
      1. exact duplicate rows are removed (a zero r1 makes mu infinite; DESIGN.md section 8);
      2. mu is sorted, F_emp(mu_(i)) = i / N;
      3. the largest discard_fraction of the mu (outliers, boundary points) are dropped;
      4. estimator="regression": d = least-squares slope *through the origin* of -log(1 - F_emp) on
         log mu; estimator="mle": d = (N - 1) / sum_i log mu_i over all points (the unbiased Pareto
         MLE, as in dadapy; no discarding).
    Distances are Euclidean, computed in float64 on X's device in row chunks (N = 5000 takes well under
    a second on a CPU). Returns d, or (d, details) with the number of points used and removed.
    """
    Xt = _as_matrix64(X)
    N0 = Xt.shape[0]
    Xt = torch.unique(Xt, dim=0)  # drop exact duplicates
    N = Xt.shape[0]
    if N < 3:
        raise ValueError(f"TwoNN needs at least 3 distinct points, got {N}")
    r1, r2 = _two_nearest(Xt)
    log_mu = torch.log(r2 / r1).cpu().numpy()  # r1 > 0 after de-duplication
    log_mu.sort()
    if estimator == "mle":
        d = (N - 1) / float(log_mu.sum())
        n_used = N
    elif estimator == "regression":
        if not 0.0 <= discard_fraction < 1.0:
            raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
        n_used = min(int(N * (1.0 - discard_fraction)), N - 1)  # F = 1 at i = N: log(0)
        x = log_mu[:n_used]
        y = -np.log1p(-np.arange(1, n_used + 1, dtype=np.float64) / N)
        d = float((x * y).sum() / (x * x).sum())
    else:
        raise ValueError(f"estimator must be 'regression' or 'mle', got {estimator!r}")
    if return_details:
        return d, {"n_points": N, "n_duplicates_removed": N0 - N, "n_used": n_used}
    return d


# ----------------------------------------------------------------------------------------------------
# information plane: matrix-based mutual information

def _is_label_vector(x: torch.Tensor) -> bool:
    return x.ndim == 1 and not torch.is_floating_point(x) and not torch.is_complex(x)


def kernel_gram(X: Any, kernel: str = "auto", bandwidth: str | float = "median") -> torch.Tensor:
    """(N, N) float64 kernel Gram matrix of the rows of X, for the matrix-based entropies below.

    kernel:
      "gaussian"  K_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)) with sigma from `bandwidth`:
                  "median"     sigma = median pairwise distance over i < j (the median heuristic,
                               Gretton et al. 2012); scales with the data, no tuning.
                  "silverman"  sigma = s (4 / (D + 2))^(1/(D+4)) N^(-1/(D+4)), s^2 = mean feature variance
                               (Silverman 1986 normal-reference rule, used by Yu et al. 2020); in high D it
                               is much smaller than typical distances, so K -> I and entropies -> log N.
                  a float      sigma itself.
      "onehot"    K_ij = 1[y_i == y_j] for integer labels y (N,) -- the linear kernel on one-hot vectors.
      "linear"    K = X X^T.
      "auto"      "onehot" for a 1-d integer tensor/array, else "gaussian".
    A constant variable (all distances 0) gets the all-ones Gram, whose entropy is 0.
    """
    Xt = _as_tensor(X)
    if kernel == "auto":
        kernel = "onehot" if _is_label_vector(Xt) else "gaussian"
    if kernel == "onehot":
        y = Xt.reshape(-1)
        return (y[:, None] == y[None, :]).to(torch.float64)
    Xm = _as_matrix64(Xt)  # (N, D)
    if kernel == "linear":
        return Xm @ Xm.T
    if kernel != "gaussian":
        raise ValueError(f"kernel must be 'gaussian', 'onehot', 'linear' or 'auto', got {kernel!r}")
    N, D = Xm.shape
    sq = (Xm * Xm).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * Xm @ Xm.T).clamp_min(0.0)  # squared distances, not Gram
    d2.fill_diagonal_(0.0)
    if isinstance(bandwidth, str):
        if bandwidth == "median":
            iu = torch.triu_indices(N, N, offset=1, device=Xm.device)
            dist = d2[iu[0], iu[1]].sqrt()
            sigma = float(dist.median()) if dist.numel() else 0.0
            if sigma == 0.0 and dist.numel() and float(dist.max()) > 0:
                sigma = float(dist[dist > 0].median())  # more than half the pairs are duplicates
        elif bandwidth == "silverman":
            s = float(Xm.var(dim=0, unbiased=True).mean().sqrt()) if N > 1 else 0.0
            sigma = s * (4.0 / (D + 2.0)) ** (1.0 / (D + 4.0)) * N ** (-1.0 / (D + 4.0))
        else:
            raise ValueError(f"bandwidth must be 'median', 'silverman' or a float, got {bandwidth!r}")
    else:
        sigma = float(bandwidth)
    if sigma <= 0.0:
        return torch.ones(N, N, dtype=torch.float64, device=Xm.device)  # constant variable
    return torch.exp(-d2 / (2.0 * sigma**2))


def _normalise_gram(K: torch.Tensor) -> torch.Tensor:
    """A_ij = K_ij / sqrt(K_ii K_jj) / N (Giraldo et al. 2014, eq. 9): unit diagonal, trace 1."""
    K = _as_tensor(K).to(torch.float64)
    d = K.diagonal().clone()
    d = torch.where(d > 0, d, torch.ones_like(d))
    return K / torch.sqrt(d[:, None] * d[None, :]) / K.shape[0]


def gram_entropy(K: Any, alpha: float = 1.01) -> float:
    """Matrix-based Renyi alpha-entropy (nats) of a kernel Gram matrix K (N, N), Giraldo 2014 eq. 6.

    K is first normalised to unit diagonal and trace 1 (eq. 9); the entropy is that of its eigenvalues.
    """
    return renyi_entropy(_psd_eigvals(_normalise_gram(K)), alpha)


def joint_gram_entropy(*grams: Any, alpha: float = 1.01) -> float:
    """Joint entropy S(A, B, ...) from the trace-normalised Hadamard product of the normalised Grams.

    Giraldo et al. 2014 eq. 10 (Yu et al. 2019 eq. 6 for more than two variables):
    S_alpha(A_1 o A_2 o ... / tr(A_1 o A_2 o ...)). Satisfies S(A, B) >= max(S(A), S(B)).
    """
    H = _normalise_gram(grams[0])
    for K in grams[1:]:
        H = H * _normalise_gram(K)  # Hadamard product: the product kernel on the pair (a, b)
    return renyi_entropy(_psd_eigvals(H / H.trace()), alpha)


def mutual_information(
    A: Any,
    B: Any,
    alpha: float = 1.01,
    kernel_a: str = "auto",
    kernel_b: str = "auto",
    bandwidth_a: str | float = "median",
    bandwidth_b: str | float = "median",
) -> float:
    """Matrix-based mutual information I(A; B) = S(A) + S(B) - S(A, B) (Giraldo 2014 eq. 11; Yu et al. 2019).

    A, B: (N, ...) samples paired by row (N tokens), or (N,) integer labels (one-hot kernel).
    alpha = 1.01 follows Yu et al. (close to Shannon but with a smooth spectrum functional).

    What it means: a kernel-based, sample-level dependence proxy between the two Gram matrices,
    in nats, >= 0 up to estimation noise, bounded by min(S(A), S(B)) <= log N. It is NOT the Shannon
    mutual information of the continuous variables (that is infinite for a deterministic network;
    Saxe et al. 2018): its value depends on the kernel and bandwidth, and whether a layer shows
    "compression" (falling I(X;T)) depends on this estimator and on the nonlinearity (Saxe et al. 2018).
    Compare it across steps for a fixed layer, probe set, kernel and bandwidth rule, not across setups.
    For one-hot labels I(Y; Y) = S(Y) exactly; for Gaussian kernels I(X; X) = 2 S_sigma(X) -
    S_{sigma/sqrt 2}(X) <= S(X), because the Hadamard square of a Gaussian Gram is a narrower Gaussian.
    """
    Ka = kernel_gram(A, kernel_a, bandwidth_a)
    Kb = kernel_gram(B, kernel_b, bandwidth_b)
    if Ka.shape != Kb.shape:
        raise ValueError(f"A and B must have the same number of rows, got {Ka.shape[0]} and {Kb.shape[0]}")
    return gram_entropy(Ka, alpha) + gram_entropy(Kb, alpha) - joint_gram_entropy(Ka, Kb, alpha=alpha)


def mutual_information_xt(X: Any, T: Any, alpha: float = 1.01, bandwidth: str | float = "median") -> float:
    """I(X; T) between the input representation X (e.g. token embeddings) and a layer's T, Gaussian kernels."""
    return mutual_information(X, T, alpha, "gaussian", "gaussian", bandwidth, bandwidth)


def mutual_information_ty(T: Any, Y: Any, alpha: float = 1.01, bandwidth: str | float = "median") -> float:
    """I(T; Y) between a layer's T (Gaussian kernel) and next-token ids Y (N,) (one-hot kernel)."""
    Y = _as_tensor(Y).reshape(-1)
    return mutual_information(T, Y, alpha, "gaussian", "onehot", bandwidth, "median")


def information_plane(
    X: Any, T: Any, Y: Any, alpha: float = 1.01, bandwidth: str | float = "median"
) -> dict[str, float]:
    """Both information-plane coordinates for one layer, sharing the Gram matrices.

    X: (N, Dx) inputs (e.g. input embeddings of the tokens), T: (N, D) the layer's representation of
    the same tokens, Y: (N,) next-token ids. Returns {"I_XT", "I_TY", "H_X", "H_T", "H_Y"} in nats.
    See mutual_information for what these numbers do and do not mean.
    """
    Kx = kernel_gram(X, "gaussian", bandwidth)
    Kt = kernel_gram(T, "gaussian", bandwidth)
    Ky = kernel_gram(_as_tensor(Y).reshape(-1), "onehot")
    Hx, Ht, Hy = gram_entropy(Kx, alpha), gram_entropy(Kt, alpha), gram_entropy(Ky, alpha)
    return {
        "I_XT": Hx + Ht - joint_gram_entropy(Kx, Kt, alpha=alpha),
        "I_TY": Ht + Hy - joint_gram_entropy(Kt, Ky, alpha=alpha),
        "H_X": Hx,
        "H_T": Ht,
        "H_Y": Hy,
    }


# ----------------------------------------------------------------------------------------------------
# readout: logit lens and linear probe

@torch.no_grad()
def readout_loss(
    hidden: Any,
    targets: Any,
    head_weight: Any,
    norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    head_bias: Any = None,
    ignore_index: int = -1,
    chunk_size: int = 1024,
) -> float:
    """Logit-lens cross-entropy (nats, mean over non-ignored tokens) of reading targets off hidden states.

    logits = norm(hidden) @ head_weight^T (+ head_bias), loss = CE(logits, targets): the loss the model
    would have if this layer's residual stream went straight into its own final norm and unembedding
    (nostalgebraist 2020, "logit lens"). hidden (N, D) (or (..., D)), targets (N,) (or (...)),
    head_weight (V, D); norm is e.g. model.final_norm (None = identity). Logits are computed in float32
    (float64 if hidden is float64) in chunks of rows, so (N, V) never sits in memory at once.
    """
    h = _as_tensor(hidden)
    h = h.reshape(-1, h.shape[-1])  # (N, D)
    y = _as_tensor(targets).reshape(-1).to(device=h.device, dtype=torch.long)  # (N,)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    W = _as_tensor(head_weight).to(device=h.device, dtype=dtype)  # (V, D)
    b = None if head_bias is None else _as_tensor(head_bias).to(device=h.device, dtype=dtype)
    total, count = 0.0, 0
    for s in range(0, h.shape[0], chunk_size):
        hc = h[s : s + chunk_size]
        if norm is not None:
            hc = norm(hc)
        logits = F.linear(hc.to(dtype), W, b)  # (c, V)
        yc = y[s : s + chunk_size]
        total += float(F.cross_entropy(logits, yc, ignore_index=ignore_index, reduction="sum"))
        count += int((yc != ignore_index).sum())
    return total / count if count else float("nan")


@dataclass
class ProbeResult:
    """Outcome of fit_linear_probe; losses in nats."""

    val_loss: float        # held-out cross-entropy, the number to log
    train_loss: float      # cross-entropy on the probe's training split (no weight-decay term)
    val_accuracy: float
    n_train: int
    n_val: int
    n_classes: int         # distinct targets in the probe set (the probe's output size)
    n_features: int        # feature dims after the optional PCA projection

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_linear_probe(
    hidden: Any,
    targets: Any,
    val_fraction: float = 0.25,
    weight_decay: float = 1e-2,
    max_iter: int = 100,
    max_dim: Optional[int] = 256,
    seed: int = 0,
    ignore_index: int = -1,
) -> ProbeResult:
    """Softmax-regression probe predicting targets from hidden states; returns the held-out CE (nats).

    Deliberately small and deterministic (cf. Alain & Bengio 2016, linear classifier probes):
      - tokens with target == ignore_index are dropped; a seeded random split keeps val_fraction held out;
      - features are centred, projected on the top max_dim principal components of the training split
        (None = keep all) and scaled to unit variance, all with training statistics only;
      - classes are the distinct targets of the whole probe set (train + val), so a held-out token whose
        target never occurs in training is still scored (it is just hard): the loss is comparable across
        layers for a fixed probe set, not with the model's full-vocabulary loss;
      - mean CE + weight_decay/2 |W|^2 is minimised by full-batch L-BFGS (strong Wolfe), max_iter
        iterations, in float32 on CPU. Cost ~ max_iter * N * max_dim * n_classes flops.
    The held-out CE depends on weight_decay (on standardised features, 1e-2 was the best of
    1e-3..3e-1 on a synthetic softmax task; 1e-3 overfits badly when n_classes * max_dim ~ N), so
    compare layers and steps at fixed settings; it over-estimates the best linear readout loss.
    """
    h = _as_matrix64(hidden).cpu()
    y = _as_tensor(targets).reshape(-1).cpu().long()
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but targets has {y.shape[0]}")
    keep = y != ignore_index
    h, y = h[keep], y[keep]
    N = h.shape[0]
    n_val = int(round(N * val_fraction))
    if n_val < 1 or N - n_val < 2:
        raise ValueError(f"need at least 2 training and 1 validation token, got N={N}, val_fraction={val_fraction}")
    classes, y = torch.unique(y, return_inverse=True)  # labels -> 0..C-1
    C = classes.numel()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]

    # features from training statistics only (float64), then float32 for the optimiser
    htr = h[tr_idx]
    mean = htr.mean(dim=0, keepdim=True)
    if max_dim is not None and max_dim < h.shape[1]:
        _, _, Vh = torch.linalg.svd(htr - mean, full_matrices=False)
        P = Vh[:max_dim].T  # (D, k)
    else:
        P = torch.eye(h.shape[1], dtype=h.dtype)
    feats = (h - mean) @ P  # (N, k)
    std = feats[tr_idx].std(dim=0, keepdim=True)
    feats = (feats / torch.where(std > 0, std, torch.ones_like(std))).float()
    xtr, ytr, xva, yva = feats[tr_idx], y[tr_idx], feats[val_idx], y[val_idx]

    k = feats.shape[1]
    W = torch.zeros(C, k, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(xtr, W, b), ytr) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits_va = F.linear(xva, W, b)
        val_loss = float(F.cross_entropy(logits_va, yva))
        train_loss = float(F.cross_entropy(F.linear(xtr, W, b), ytr))
        val_acc = float((logits_va.argmax(dim=1) == yva).float().mean())
    return ProbeResult(val_loss, train_loss, val_acc, N - n_val, n_val, C, k)


# ----------------------------------------------------------------------------------------------------
# everything at once (what a probe hook logs per layer)

def representation_metrics(
    Z: Any,
    center: bool = True,
    normalize_rows: bool = False,
    alpha: float = 1.0,
    fit_range: tuple[int, Optional[int]] = (6, 100),
    twonn: bool = True,
) -> dict[str, float]:
    """The per-layer scalars of docs/representation.md from one eigendecomposition (plus TwoNN).

    Keys (log them as repr/<layer>/<key>): entropy, normalized_entropy, effective_rank (singular-value
    RankMe on the same preprocessed Z), alpha_req, alpha_req_r2, twonn_id (on the raw rows of Z).
    """
    lam = _raw_spectrum(Z, center, normalize_rows)
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
    if twonn:
        try:
            out["twonn_id"] = float(twonn_dimension(Z))
        except ValueError:
            out["twonn_id"] = float("nan")
    return out

