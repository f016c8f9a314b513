"""Per-domain (per-group-of-examples) unbiased |G_d|^2 and tr(Sigma_d) from per-example Gram blocks.

Examples of domain d in a micro-batch, n of them, i.i.d. from that domain's population: with
``sq = sum_{i in d} |g_i|^2`` and ``tot = |sum_{i in d} g_i|^2`` (``diagnostics.gns.pegram``, eq. 7),

    E[sq]  = n (|G_d|^2 + tr(Sigma_d))
    E[tot] = n^2 |G_d|^2 + n tr(Sigma_d)

so ``tot - sq`` estimates ``n (n - 1) |G_d|^2`` and ``sq - tot / n`` estimates ``(n - 1) tr(Sigma_d)``
without bias. This is McCandlish et al.'s two-batch estimator with B_small = 1 and B_big = n
(``two_batch_estimates(sq / n, tot / n^2, 1, n)`` gives the same two numbers). Over the micro-batches
k of a step the sums are pooled, each estimate a ratio with a fixed denominator, so still unbiased:

    grad_sq_d   = sum_k (tot_k - sq_k) / sum_k n_k (n_k - 1)
    trace_cov_d = sum_k (sq_k - tot_k / n_k) / sum_k (n_k - 1)

(a micro-batch with n_k = 1 adds nothing to either). Undefined (NaN) when no micro-batch has two
examples of the domain.
"""

from __future__ import annotations

import numpy as np


def grouped_estimates(tot, sq, n):
    """(grad_sq, trace_cov), each an array over groups, from per-micro-batch sums.

    ``tot``, ``sq``, ``n``: arrays (K, D) or (D,): per micro-batch k and group d, |S_kd|^2,
    sum_i |g_i|^2 and the number of examples. NaN for a group with no micro-batch of >= 2 examples."""
    tot, sq, n = (np.atleast_2d(np.asarray(v, dtype=np.float64)) for v in (tot, sq, n))
    if not (tot.shape == sq.shape == n.shape):
        raise ValueError(f"tot, sq and n must have one shape, got {tot.shape}, {sq.shape}, {n.shape}")
    if (n < 0).any() or (n != np.round(n)).any():
        raise ValueError("n must hold non-negative integer counts")
    pairs = (n * (n - 1)).sum(0)
    dof = np.clip(n - 1, 0, None).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_n = np.where(n > 0, tot / np.where(n > 0, n, 1.0), 0.0)
        grad_sq = np.where(pairs > 0, (tot - sq).sum(0) / np.where(pairs > 0, pairs, 1.0), np.nan)
        trace_cov = np.where(dof > 0, (sq - per_n).sum(0) / np.where(dof > 0, dof, 1.0), np.nan)
    return grad_sq, trace_cov
