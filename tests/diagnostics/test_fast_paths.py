"""Fast paths of the representation diagnostics against their slow, obvious references:
the verified float32 nearest-neighbour search of TwoNN (scipy brute-force distances), the
block-diagonal label path of the information plane (dense N x N Hadamard products), the
information-plane cache, and the spectrum returned by representation_metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from diagnostics.representation._linalg import _as_matrix64
from diagnostics.representation._infoplane import _Var
from diagnostics.representation import (
    eigenspectrum,
    gram_entropy,
    information_plane,
    joint_gram_entropy,
    kernel_gram,
    mutual_information,
    representation_metrics,
    twonn_dimension,
)
from diagnostics.representation._twonn import _two_nearest


def brute_two_nearest(X):
    d = cdist(X, X)
    np.fill_diagonal(d, np.inf)
    d.sort(axis=1)
    return d[:, 0], d[:, 1]


def lm_like(rng, N=600, D=96):
    """Anisotropic cloud with a large common offset and a few huge-norm outlier tokens, as residual
    streams have: the case where |x|^2 + |y|^2 - 2 x.y cancels worst."""
    Z = rng.standard_normal((N, 8)) @ rng.standard_normal((8, D)) + 0.05 * rng.standard_normal((N, D))
    Z += 40.0 * rng.standard_normal(D)  # common mean
    Z[:5] *= 30.0  # outlier tokens
    return Z


def clustered(rng, n_clusters, size, spread, D=20):
    """Tight clusters of `size` points: more near-equidistant neighbours than the candidate list."""
    centres = rng.standard_normal((n_clusters, D))
    return np.repeat(centres, size, axis=0) + spread * rng.standard_normal((n_clusters * size, D))


@pytest.mark.parametrize("case", ["lm_like", "manifold", "clusters_1e-6", "clusters_1e-12"])
def test_two_nearest_equals_brute_force(case):
    rng = np.random.default_rng(50)
    X = {"lm_like": lambda: lm_like(rng),
         "manifold": lambda: rng.standard_normal((800, 3)) @ rng.standard_normal((3, 60)),
         "clusters_1e-6": lambda: clustered(rng, 40, 8, 1e-6),
         "clusters_1e-12": lambda: clustered(rng, 40, 8, 1e-12)}[case]()
    r1, r2, passes = _two_nearest(torch.as_tensor(X))
    b1, b2 = brute_two_nearest(X)
    np.testing.assert_allclose(r1.numpy(), b1, rtol=1e-12)
    np.testing.assert_allclose(r2.numpy(), b2, rtol=1e-12)
    assert sum(passes.values()) == len(X)
    # each pass is exercised where it should be: float32 settles ordinary clouds; clusters tighter
    # than float32 can resolve go to float64; tighter than float64 can resolve, to brute force
    if case in ("lm_like", "manifold"):
        assert passes["float32"] >= 0.99 * len(X)
    elif case == "clusters_1e-6":
        assert passes["float64"] > 0 and passes["brute"] == 0
    else:
        assert passes["brute"] > 0
    s1, s2, slow = _two_nearest(torch.as_tensor(X), fast=False)  # the brute-force pass alone
    assert slow["brute"] == len(X)
    np.testing.assert_allclose(s1.numpy(), b1, rtol=1e-12)


def test_two_nearest_stays_exact_with_reduced_precision_matmuls():
    # TF32 / bfloat16 float32 matmuls widen the rounding bound; the search must notice, not miss neighbours
    rng = np.random.default_rng(51)
    X = lm_like(rng, N=400, D=64)
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        r1, r2, passes = _two_nearest(torch.as_tensor(X))
    finally:
        torch.set_float32_matmul_precision(old)
    b1, b2 = brute_two_nearest(X)
    np.testing.assert_allclose(r1.numpy(), b1, rtol=1e-12)
    np.testing.assert_allclose(r2.numpy(), b2, rtol=1e-12)


def test_twonn_dimension_reports_passes_and_equals_reference_on_lm_like_data():
    rng = np.random.default_rng(52)
    X = lm_like(rng, N=1000, D=128)
    d, info = twonn_dimension(X, return_details=True)
    assert sum(info["search_passes"].values()) == info["n_points"] == 1000
    b1, b2 = brute_two_nearest(X)
    log_mu = np.sort(np.log(b2 / b1))
    n = int(1000 * 0.9)
    y = -np.log1p(-np.arange(1, n + 1) / 1000)
    assert d == pytest.approx((log_mu[:n] @ y) / (log_mu[:n] @ log_mu[:n]), rel=1e-10)


# ----------------------------------------------------------------------------------------------------
# information plane: label variables by blocks, against the dense N x N reference

def dense_mi(A, B, kernel_a, kernel_b, alpha):
    Ka, Kb = kernel_gram(A, kernel_a), kernel_gram(B, kernel_b)
    return gram_entropy(Ka, alpha) + gram_entropy(Kb, alpha) - joint_gram_entropy(Ka, Kb, alpha=alpha)


def labels(rng, N):
    """Skewed labels: one big class, many small ones, several singletons (block sizes 1 .. ~N/4)."""
    y = rng.choice(40, size=N, p=np.r_[0.25, np.full(39, 0.75 / 39)])
    y[:6] = 100 + np.arange(6)  # singletons
    return torch.as_tensor(rng.permutation(y))


@pytest.mark.parametrize("alpha", [1.0, 1.01, 2.0])
def test_label_fast_path_equals_dense_reference(alpha):
    rng = np.random.default_rng(53)
    N = 300
    T = torch.as_tensor(rng.standard_normal((N, 3)) @ rng.standard_normal((3, 16)))
    y, z = labels(rng, N), labels(rng, N)
    assert mutual_information(T, y, alpha) == pytest.approx(dense_mi(T, y, "gaussian", "onehot", alpha), rel=1e-10)
    assert mutual_information(y, T, alpha) == pytest.approx(dense_mi(y, T, "onehot", "gaussian", alpha), rel=1e-10)
    assert mutual_information(y, z, alpha) == pytest.approx(dense_mi(y, z, "onehot", "onehot", alpha), abs=1e-10)
    assert _Var(y, "onehot", "median").entropy(alpha) == pytest.approx(gram_entropy(kernel_gram(y), alpha), rel=1e-12)
    T2 = torch.tanh(T[:, :4])
    assert mutual_information(T, T2, alpha) == pytest.approx(dense_mi(T, T2, "gaussian", "gaussian", alpha), rel=1e-12)


def test_information_plane_cache_onehot_x_and_missing_variables():
    rng = np.random.default_rng(54)
    N = 200
    x, y = labels(rng, N), labels(rng, N)
    Ts = [torch.as_tensor(rng.standard_normal((N, 8))) for _ in range(3)]
    cache: dict = {}
    for T in Ts:  # the cache holds X and Y across layers; each call equals the dense reference
        ip = information_plane(x, T, y, kernel_x="onehot", cache=cache)
        assert ip["I_XT"] == pytest.approx(dense_mi(x, T, "onehot", "gaussian", 1.01), rel=1e-10)
        assert ip["I_TY"] == pytest.approx(dense_mi(T, y, "gaussian", "onehot", 1.01), rel=1e-10)
        assert ip["H_X"] == pytest.approx(gram_entropy(kernel_gram(x)), rel=1e-12)
    only_y = information_plane(None, Ts[0], y)
    assert "I_XT" not in only_y and only_y["I_TY"] == pytest.approx(ip_ty := dense_mi(Ts[0], y, "gaussian", "onehot", 1.01), rel=1e-10)
    assert math.isfinite(ip_ty)
    assert set(information_plane(Ts[1], Ts[0], None)) == {"I_XT", "H_X", "H_T"}


def test_representation_metrics_returns_its_spectrum():
    rng = np.random.default_rng(55)
    Z = rng.standard_normal((300, 40)) @ rng.standard_normal((40, 40))
    m, spec = representation_metrics(Z, twonn=False, return_spectrum=True)
    np.testing.assert_array_equal(spec, eigenspectrum(Z))
    assert m == representation_metrics(Z, twonn=False)


def test_nonfinite_input_check_by_the_sum_and_its_fallback():
    Z = np.random.default_rng(56).standard_normal((50, 6))
    for bad in (np.nan, np.inf, -np.inf):
        Zb = Z.copy()
        Zb[7, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            eigenspectrum(Zb)
    Zb = Z.copy()
    Zb[:, 0] = 1e308  # finite entries whose sum overflows: the elementwise check must clear them
    assert torch.equal(_as_matrix64(Zb), torch.as_tensor(Zb))


def test_readout_per_token_losses_pool_to_the_mean():
    import torch.nn.functional as F

    from diagnostics.representation import readout_loss

    g = torch.Generator().manual_seed(57)
    h, W = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (50,), generator=g)
    y[:7] = -1
    per = readout_loss(h, y, W, reduction="none", chunk_size=16)
    manual = F.cross_entropy(h @ W.T, y, ignore_index=-1, reduction="none").double()
    assert per.shape == (50,) and bool((per[:7] == 0).all())
    torch.testing.assert_close(per, manual, rtol=1e-6, atol=1e-7)
    assert float(per.sum() / (y >= 0).sum()) == pytest.approx(readout_loss(h, y, W), rel=1e-6)
    with pytest.raises(ValueError, match="reduction"):
        readout_loss(h, y, W, reduction="sum")


@pytest.mark.parametrize("case", ["few", "many", "constant_first_column", "ties_not_duplicates"])
def test_drop_duplicates_equals_torch_unique(case):
    from diagnostics.representation._twonn import _drop_duplicates

    rng = np.random.default_rng(58)
    X = rng.standard_normal((500, 6))
    if case == "few":  # the run-by-run path
        X = np.concatenate([X, X[[3, 7, 7, 11]]])
    elif case == "many":  # > 256 runs: torch.unique
        X = np.concatenate([X, X[:300]])
    elif case == "constant_first_column":  # one run of 500: torch.unique
        X[:, 0] = 1.0
        X = np.concatenate([X, X[:5]])
    else:  # equal first entries, different rows: nothing to drop
        X[::2, 0] = X[1::2, 0]
    X = torch.as_tensor(rng.permutation(X))
    got = _drop_duplicates(X)
    torch.testing.assert_close(torch.unique(got, dim=0), torch.unique(X, dim=0), rtol=0, atol=0)
    assert got.shape[0] == torch.unique(X, dim=0).shape[0]


@pytest.mark.parametrize("n_per_group", [120, 30])  # > D: pooled covariance from the groups'; < D: one by one
def test_grouped_metrics_equal_separate_calls(n_per_group):
    from diagnostics.representation import grouped_representation_metrics

    rng = np.random.default_rng(59)
    D = 48
    parts = [rng.standard_normal((n_per_group, 6)) @ rng.standard_normal((6, D)) + 5.0 * rng.standard_normal(D)
             + 0.1 * rng.standard_normal((n_per_group, D)) for _ in range(3)]  # distinct group means
    Z = np.concatenate(parts)
    g = torch.arange(3).repeat_interleave(n_per_group)
    pooled, spec, per = grouped_representation_metrics(Z, g, fit_range=(2, 30))
    ref, ref_spec = representation_metrics(Z, fit_range=(2, 30), return_spectrum=True)
    for k in ref:
        assert pooled[k] == pytest.approx(ref[k], rel=1e-10), k
    np.testing.assert_allclose(spec, ref_spec, rtol=1e-9, atol=1e-15)
    assert set(per) == {0, 1, 2}
    for i in range(3):
        r = representation_metrics(Z[g.numpy() == i], fit_range=(2, 30), twonn=False)
        assert per[i] == pytest.approx(r, rel=1e-12)
