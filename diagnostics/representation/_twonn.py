"""TwoNN intrinsic dimension (Facco et al. 2017) with a verified fast nearest-neighbour search.

    from diagnostics.representation import twonn_dimension
    twonn_dimension(Z)        # Z (N, D): tokens x features, torch tensor or numpy array

The estimator needs, for every point, the distances r1 < r2 to its two nearest neighbours. They are
found in three passes, each of which hands on only the rows it could not *prove* correct:

1. float32 candidate search: the squared distances of the centred rows by one matrix product,
   |x|^2 + |y|^2 - 2 x.y, minus a worst-case rounding bound tau (|x|^2 + |y|^2) with
   tau = (2 D + 16) u32 (Higham's dot-product bound, u32 = 2^-24), give a *lower bound* L_ij of
   every true squared distance. The k smallest L of a row are its candidates; their distances are
   recomputed exactly as |x - y| in float64 and the two smallest kept. The row is verified when the
   (k+1)-th smallest L is >= r2^2: then no other point can be closer than the second neighbour.
   L is symmetric, so only its blocks on and above the diagonal are multiplied.
2. the rows that failed (near-duplicates, points closer than the float32 bound can resolve): the
   same search in float64 (u64 = 2^-53).
3. what is left: exact float64 distances |x - y| to every point.
So r1 and r2 are the exact float64 nearest-neighbour distances, as a brute-force search gives them;
the float32 matrix product only decides where to look (tests: tests/diagnostics/test_spectra.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from diagnostics.representation._linalg import _as_matrix64

__all__ = ["twonn_dimension"]


def _exact_dist(X: torch.Tensor, rows: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """|x_rows[i] - x_idx[i, j]| in X's dtype: (c,) rows, (c, k) column indices -> (c, k)."""
    Y = X.index_select(0, idx.reshape(-1)).view(idx.shape[0], idx.shape[1], X.shape[1])  # (c, k, D)
    Y.sub_(X.index_select(0, rows)[:, None, :])
    return torch.linalg.vector_norm(Y, dim=-1)


def _unit_roundoff(dtype: torch.dtype, device: torch.device) -> float:
    """Unit roundoff of a `dtype` matrix product, allowing for TF32 / bfloat16 float32 matmuls."""
    if dtype == torch.float64:
        return 2.0**-53
    u = {"highest": 2.0**-24, "high": 2.0**-11, "medium": 2.0**-8}.get(torch.get_float32_matmul_precision(), 2.0**-8)
    if device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u = max(u, 2.0**-11)
    return u


def _smallest_rows(Xd, sq, rows, kk, chunk):
    """The kk smallest lower bounds L_ij (j != i) of each of `rows`, by row chunks: (values, indices)."""
    vals, idx = [], []
    for s in range(0, rows.numel(), chunk):
        rr = rows[s : s + chunk]
        L = torch.addmm(sq[None, :], Xd.index_select(0, rr), Xd.T, alpha=-2.0)  # (c, N)
        L.add_(sq.index_select(0, rr)[:, None])
        L[torch.arange(rr.numel(), device=Xd.device), rr] = float("inf")  # not its own neighbour
        v, i = L.topk(kk, dim=1, largest=False)
        vals.append(v)
        idx.append(i)
    return torch.cat(vals), torch.cat(idx)


def _smallest_all(Xd, sq, kk, block):
    """As _smallest_rows for every row, using the symmetry L_ij = L_ji: only the blocks on and above the
    diagonal are multiplied (~55-60 % of the products); each block feeds its rows and its columns."""
    N = Xd.shape[0]
    starts = list(range(0, N, block))
    parts: list[list] = [[] for _ in starts]  # per row block: (values, global indices) pieces
    for bi, s in enumerate(starts):
        e = min(s + block, N)
        for bj in range(bi, len(starts)):
            t = starts[bj]
            f = min(t + block, N)
            L = torch.addmm(sq[None, t:f], Xd[s:e], Xd[t:f].T, alpha=-2.0)  # (e - s, f - t)
            L.add_(sq[s:e, None])
            if bj == bi:
                L.fill_diagonal_(float("inf"))
            v, i = L.topk(min(kk, f - t), dim=1, largest=False)
            parts[bi].append((v, i + t))
            if bj != bi:
                v, i = L.topk(min(kk, e - s), dim=0, largest=False)  # (kk, f - t): the columns' rows
                parts[bj].append((v.T, i.T + s))
    vals, idx = [], []
    for pieces in parts:
        V = torch.cat([p[0] for p in pieces], dim=1)
        I = torch.cat([p[1] for p in pieces], dim=1)
        v, j = V.topk(kk, dim=1, largest=False)
        vals.append(v)
        idx.append(I.gather(1, j))
    return torch.cat(vals), torch.cat(idx)


def _candidate_pass(X, Xc, rows, dtype, k, chunk):
    """One verified candidate search (module docstring, pass 1/2) for `rows` of X.

    Returns (r1, r2, ok): exact float64 distances for every row in `rows`, and which are proven,
    or None when the rounding bound of `dtype` is too loose to prove anything."""
    N, D = X.shape
    tau = (2 * D + 16) * _unit_roundoff(dtype, X.device)
    if tau >= 0.5:
        return None
    Xd = Xc.to(dtype)
    sq = (Xd * Xd).sum(dim=1) * (1.0 - tau)  # (N,) the |x|^2 terms of the lower bound
    kk = min(k + 1, N - 1)
    if rows.numel() == N:
        vals, idx = _smallest_all(Xd, sq, kk, block=max(256, chunk // 2))
    else:
        vals, idx = _smallest_rows(Xd, sq, rows, kk, chunk)
    r1 = torch.empty(rows.numel(), dtype=X.dtype, device=X.device)
    r2 = torch.empty_like(r1)
    for s in range(0, rows.numel(), chunk):  # exact float64 distances to the k candidates
        cand = idx[s : s + chunk, :k]
        two = _exact_dist(X, rows[s : s + chunk], cand).topk(2, dim=1, largest=False).values  # ascending
        r1[s : s + chunk], r2[s : s + chunk] = two[:, 0], two[:, 1]
    if kk > k:
        ok = vals[:, k].to(X.dtype) >= r2**2  # no point outside the candidates can be nearer than r2
    else:
        ok = torch.ones(rows.numel(), dtype=torch.bool, device=X.device)  # every other point was a candidate
    return r1, r2, ok


def _brute_pass(X, rows, chunk_elems=1 << 22):
    """Exact float64 |x - y| from each of `rows` to every point: (r1, r2)."""
    N, D = X.shape
    c = max(1, chunk_elems // (N * D))
    out1, out2 = [], []
    for s in range(0, rows.numel(), c):
        rr = rows[s : s + c]
        d = torch.linalg.vector_norm(X[None, :, :] - X.index_select(0, rr)[:, None, :], dim=-1)  # (c, N)
        d[torch.arange(rr.numel(), device=X.device), rr] = float("inf")
        two = d.topk(2, dim=1, largest=False).values
        out1.append(two[:, 0])
        out2.append(two[:, 1])
    return torch.cat(out1), torch.cat(out2)


def _two_nearest(X: torch.Tensor, k: int = 3, chunk: int = 1024, fast: bool = True):
    """Exact first and second nearest-neighbour distances of every row of X (N, D) float64, distinct rows.

    Returns (r1, r2, passes): passes counts the rows settled by the float32, float64 and brute-force
    pass (module docstring). fast=False goes straight to the brute-force pass (the slow reference).
    """
    N = X.shape[0]
    r1 = torch.empty(N, dtype=X.dtype, device=X.device)
    r2 = torch.empty_like(r1)
    todo = torch.arange(N, device=X.device)
    passes = {"float32": 0, "float64": 0, "brute": 0}
    if fast:
        Xc = X - X.mean(dim=0, keepdim=True)  # centring shrinks |x|^2 and so the rounding bound
        for dtype, name in ((torch.float32, "float32"), (torch.float64, "float64")):
            if todo.numel() == 0:
                break
            res = _candidate_pass(X, Xc, todo, dtype, k, chunk)
            if res is None:
                continue
            a, b, ok = res
            done = todo[ok]
            r1[done], r2[done] = a[ok], b[ok]
            passes[name] = int(done.numel())
            todo = todo[~ok]
    if todo.numel():
        r1[todo], r2[todo] = _brute_pass(X, todo)
        passes["brute"] = int(todo.numel())
    return r1, r2, passes


def _drop_duplicates(X: torch.Tensor) -> torch.Tensor:
    """X without repeated rows (the same set as torch.unique(dim=0); TwoNN does not depend on the order).

    Rows are sorted by their first column only; exact row comparisons are needed just inside runs of
    equal first entries -- cheaper than torch.unique's lexicographic sort of whole rows. Many or long
    runs (a constant first feature, many duplicates) fall back to torch.unique."""
    N = X.shape[0]
    order = torch.argsort(X[:, 0], stable=True)
    first = X[order, 0]
    tie = first[1:] == first[:-1]  # (N - 1,) neighbours in sort order with equal first entries
    if not bool(tie.any()):
        return X
    run_start = torch.ones(N, dtype=torch.bool, device=X.device)
    run_start[1:] = ~tie
    starts = run_start.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=torch.tensor([N], device=X.device))
    if int((lengths > 1).sum()) > 256 or int(lengths.max()) > 64:
        return torch.unique(X, dim=0)
    keep = torch.ones(N, dtype=torch.bool, device=X.device)
    starts = starts.tolist() + [N]
    for a, b in zip(starts[:-1], starts[1:]):
        if b - a < 2:
            continue
        rows = order[a:b]  # a run of equal first entries, in original order (stable sort)
        R = X[rows]
        same = (R[:, None, :] == R[None, :, :]).all(dim=-1)  # (r, r)
        dup = torch.triu(same, diagonal=1).any(dim=0)  # equals an earlier row of the run
        keep[rows[dup]] = False
    return X[keep]


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
      1. exact duplicate rows are removed (a zero r1 makes mu infinite; docs/architecture.md, Known pitfalls);
      2. mu is sorted, F_emp(mu_(i)) = i / N;
      3. the largest discard_fraction of the mu (outliers, boundary points) are dropped;
      4. estimator="regression": d = least-squares slope *through the origin* of -log(1 - F_emp) on
         log mu; estimator="mle": d = (N - 1) / sum_i log mu_i over all points (the unbiased Pareto
         MLE, as in dadapy; no discarding).
    r1 and r2 are exact float64 Euclidean distances, found by the verified float32 candidate search
    of the module docstring, on X's device in row chunks (N = 2048, D = 384: ~0.1 s on one CPU thread).
    Returns d, or (d, details) with the number of points used and removed and the rows settled by
    each search pass.
    """
    if estimator not in ("regression", "mle"):
        raise ValueError(f"estimator must be 'regression' or 'mle', got {estimator!r}")
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    Xt = _as_matrix64(X)
    N0 = Xt.shape[0]
    Xt = _drop_duplicates(Xt)  # exact duplicates (r1 = 0) removed
    N = Xt.shape[0]
    if N < 3:
        raise ValueError(f"TwoNN needs at least 3 distinct points, got {N}")
    r1, r2, passes = _two_nearest(Xt)
    log_mu = torch.log(r2 / r1).cpu().numpy()  # r1 > 0 after de-duplication
    log_mu.sort()
    if estimator == "mle":
        d = (N - 1) / float(log_mu.sum())
        n_used = N
    else:
        n_used = min(int(N * (1.0 - discard_fraction)), N - 1)  # F = 1 at i = N: log(0)
        x = log_mu[:n_used]
        y = -np.log1p(-np.arange(1, n_used + 1, dtype=np.float64) / N)
        d = float((x * y).sum() / (x * x).sum())
    if return_details:
        return d, {"n_points": N, "n_duplicates_removed": N0 - N, "n_used": n_used, "search_passes": passes}
    return d
