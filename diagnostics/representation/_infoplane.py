"""Information plane: matrix-based Renyi entropies and mutual information of kernel Gram matrices.

    from diagnostics.representation import mutual_information, information_plane
    information_plane(X, T, Y)   # X (N, Dx) inputs, T (N, D) a layer, Y (N,) next-token ids

Giraldo, Rao & Principe 2015 (eqs. 6, 9-11) and Yu et al. 2019/2020; what these numbers do and do not
mean is in ``mutual_information``'s docstring and docs/representation.md.

Fast path for label variables (one-hot kernel K_ij = 1[y_i == y_j]): their entropy is the Renyi entropy
of the class frequencies (the normalised one-hot Gram has the eigenvalues n_c / N), and a Hadamard
product A o 1[y_i == y_j] is block diagonal once the rows are sorted by label, so its spectrum is the
union of the spectra of the per-class blocks -- a few small eigendecompositions instead of one N x N.
Both are exact (tests compare them with the dense ``gram_entropy`` / ``joint_gram_entropy``).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from diagnostics.representation._linalg import _as_matrix64, _as_tensor, _psd_eigvals, _zero_tol, renyi_entropy

__all__ = [
    "kernel_gram",
    "gram_entropy",
    "joint_gram_entropy",
    "mutual_information",
    "mutual_information_xt",
    "mutual_information_ty",
    "information_plane",
]


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


# ----------------------------------------------------------------------------------------------------
# label (one-hot) variables: closed-form entropy, block-diagonal joint spectrum

def _label_codes(y: Any) -> torch.Tensor:
    """(N,) labels -> (N,) codes 0..C-1 (CPU long)."""
    y = _as_tensor(y).reshape(-1)
    return torch.unique(y.cpu(), return_inverse=True)[1]


def _label_entropy(codes: torch.Tensor, alpha: float) -> float:
    """Entropy of the normalised one-hot Gram: its eigenvalues are the class frequencies n_c / N."""
    return renyi_entropy(torch.bincount(codes).double().numpy(), alpha)


def _label_hadamard_eigvals(A: torch.Tensor, codes: torch.Tensor) -> np.ndarray:
    """Eigenvalues of A o 1[y_i == y_j] for a symmetric A (N, N): the union of the per-class blocks'.

    Classes of equal size are stacked into one batched eigvalsh; numerical zeros as in _psd_eigvals."""
    N = A.shape[0]
    counts = torch.bincount(codes)
    order = torch.argsort(codes, stable=True).to(A.device)  # rows grouped by class
    starts = torch.cumsum(counts, 0) - counts
    parts = []
    for size in torch.unique(counts).tolist():
        first = starts[counts == size].to(A.device)  # (n_cls,)
        idx = order[first[:, None] + torch.arange(size, device=A.device)]  # (n_cls, size)
        if size == 1:
            parts.append(A[idx[:, 0], idx[:, 0]])
        else:
            B = A[idx[:, :, None], idx[:, None, :]]  # (n_cls, size, size)
            parts.append(torch.linalg.eigvalsh(0.5 * (B + B.mT)).reshape(-1))
    lam = np.sort(torch.cat(parts).cpu().numpy())[::-1].copy()
    return _zero_tol(lam, N)


class _Var:
    """One variable of the information plane: labels (one-hot kernel) or a normalised Gram A."""

    def __init__(self, V: Any, kernel: str, bandwidth: str | float):
        Vt = _as_tensor(V)
        if kernel == "auto":
            kernel = "onehot" if _is_label_vector(Vt) else "gaussian"
        self.codes: Optional[torch.Tensor] = _label_codes(Vt) if kernel == "onehot" else None
        self.A: Optional[torch.Tensor] = None if self.codes is not None else _normalise_gram(kernel_gram(Vt, kernel, bandwidth))
        self.n = int(self.codes.numel() if self.codes is not None else self.A.shape[0])

    def entropy(self, alpha: float) -> float:
        if self.codes is not None:
            return _label_entropy(self.codes, alpha)
        return renyi_entropy(_psd_eigvals(self.A), alpha)

    def joint(self, other: "_Var", alpha: float) -> float:
        """S(self, other), Hadamard product (eq. 10): block diagonal when either is a label variable."""
        if self.n != other.n:
            raise ValueError(f"the variables must have the same number of rows, got {self.n} and {other.n}")
        if self.codes is not None and other.codes is not None:  # product of two label variables
            pair = torch.unique(torch.stack([self.codes, other.codes], 1), dim=0, return_inverse=True)[1]
            return _label_entropy(pair, alpha)
        if other.codes is not None:
            return renyi_entropy(_label_hadamard_eigvals(self.A, other.codes), alpha)
        if self.codes is not None:
            return other.joint(self, alpha)
        H = self.A * other.A
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
    A label variable takes the exact block-diagonal fast path of the module docstring.
    """
    va, vb = _Var(A, kernel_a, bandwidth_a), _Var(B, kernel_b, bandwidth_b)
    joint = va.joint(vb, alpha)  # checks the row counts first
    return va.entropy(alpha) + vb.entropy(alpha) - joint


def mutual_information_xt(X: Any, T: Any, alpha: float = 1.01, bandwidth: str | float = "median") -> float:
    """I(X; T) between the input representation X (e.g. token embeddings) and a layer's T, Gaussian kernels."""
    return mutual_information(X, T, alpha, "gaussian", "gaussian", bandwidth, bandwidth)


def mutual_information_ty(T: Any, Y: Any, alpha: float = 1.01, bandwidth: str | float = "median") -> float:
    """I(T; Y) between a layer's T (Gaussian kernel) and next-token ids Y (N,) (one-hot kernel)."""
    Y = _as_tensor(Y).reshape(-1)
    return mutual_information(T, Y, alpha, "gaussian", "onehot", bandwidth, "median")


def information_plane(
    X: Any,
    T: Any,
    Y: Any,
    alpha: float = 1.01,
    bandwidth: str | float = "median",
    kernel_x: str = "gaussian",
    cache: Optional[dict] = None,
) -> dict[str, float]:
    """Both information-plane coordinates for one layer, sharing the Gram matrices.

    X: (N, Dx) inputs (e.g. input embeddings of the tokens; kernel_x="onehot" or "auto" for (N,) token
    ids), T: (N, D) the layer's representation of the same tokens (Gaussian kernel), Y: (N,) next-token
    ids (one-hot kernel). X or Y may be None: that coordinate is left out. Returns {"I_XT", "I_TY",
    "H_X", "H_T", "H_Y"} in nats. cache: a dict kept by the caller across calls with the *same* X, Y,
    alpha and bandwidth (every layer of one probe): their kernels and entropies are computed once. See
    mutual_information for what these numbers do and do not mean.
    """
    cache = {} if cache is None else cache
    if "x" not in cache:
        cache["x"] = None if X is None else _Var(X, kernel_x, bandwidth)
        cache["y"] = None if Y is None else _Var(_as_tensor(Y).reshape(-1), "onehot", "median")
        cache["H_X"] = None if cache["x"] is None else cache["x"].entropy(alpha)
        cache["H_Y"] = None if cache["y"] is None else cache["y"].entropy(alpha)
    vt = _Var(T, "gaussian", bandwidth)
    Ht = vt.entropy(alpha)
    out = {"H_T": Ht}
    if cache["x"] is not None:
        out["I_XT"] = cache["H_X"] + Ht - vt.joint(cache["x"], alpha)
        out["H_X"] = cache["H_X"]
    if cache["y"] is not None:
        out["I_TY"] = Ht + cache["H_Y"] - vt.joint(cache["y"], alpha)
        out["H_Y"] = cache["H_Y"]
    return out
