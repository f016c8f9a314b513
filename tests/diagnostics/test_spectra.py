"""Ground-truth tests for diagnostics.representation (spectra, TwoNN, information plane): closed forms,
constructed spectra, known manifolds, and slow obvious references (numpy SVD, scipy brute-force
distances, manual cross-entropy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist

from diagnostics.representation import (
    alpha_req,
    effective_rank,
    eigenspectrum,
    fit_linear_probe,
    gram_entropy,
    information_plane,
    joint_gram_entropy,
    kernel_gram,
    matrix_entropy,
    mutual_information,
    mutual_information_ty,
    mutual_information_xt,
    readout_loss,
    renyi_entropy,
    representation_metrics,
    twonn_dimension,
)


# ----------------------------------------------------------------------------------------------------
# helpers: matrices with a prescribed spectrum, manifolds

def orthonormal(rng, n, k):
    """(n, k) matrix with orthonormal columns."""
    q, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return q


def with_singular_values(rng, N, D, sigma, centered=False):
    """Z (N, D) = U diag(sigma) V^T; centered=True makes U's columns orthogonal to the ones vector,
    so that column-centring leaves Z unchanged and the covariance spectrum is exactly sigma^2."""
    k = len(sigma)
    G = rng.standard_normal((N, k))
    if centered:
        G -= G.mean(axis=0)
    U, _ = np.linalg.qr(G)
    V = orthonormal(rng, D, k)
    return U @ np.diag(sigma) @ V.T


def embed(rng, Y, D):
    """Isometric embedding of Y (N, d) into R^D by a random orthonormal map."""
    return Y @ orthonormal(rng, D, Y.shape[1]).T


def sphere(rng, N, d):
    Y = rng.standard_normal((N, d + 1))
    return Y / np.linalg.norm(Y, axis=1, keepdims=True)


def swiss_roll(rng, N):
    t = 1.5 * np.pi * (1 + 2 * rng.uniform(size=N))
    h = 21 * rng.uniform(size=N)
    return np.stack([t * np.cos(t), h, t * np.sin(t)], axis=1)


def reference_entropy(Z, alpha=1.0, center=True):
    """Slow obvious reference: numpy SVD of the (centred) matrix, eigenvalues sigma^2 / sum sigma^2."""
    Z = np.asarray(Z, dtype=np.float64)
    if center:
        Z = Z - Z.mean(axis=0)
    s2 = np.linalg.svd(Z, compute_uv=False) ** 2
    p = s2 / s2.sum()
    p = p[p > 1e-12]
    if alpha == 1.0:
        return float(-(p * np.log(p)).sum())
    return float(np.log((p**alpha).sum()) / (1 - alpha))


# ----------------------------------------------------------------------------------------------------
# eigenspectrum and matrix entropy

@pytest.mark.parametrize("N,D", [(40, 100), (200, 30)])
def test_eigenspectrum_gram_path_equals_covariance_path(N, D):
    rng = np.random.default_rng(0)
    Z = rng.standard_normal((N, D)) @ rng.standard_normal((D, D))
    a = eigenspectrum(Z, via="gram")
    b = eigenspectrum(Z, via="covariance")
    c = eigenspectrum(Z)
    assert a.shape == b.shape == c.shape == (min(N, D),)
    np.testing.assert_allclose(a, b, atol=1e-12)
    np.testing.assert_allclose(a, c, atol=1e-12)
    assert np.all(np.diff(c) <= 0) and np.all(c >= 0) and math.isclose(c.sum(), 1.0)
    # reference: squared singular values of the centred matrix
    Zc = Z - Z.mean(axis=0)
    s2 = np.linalg.svd(Zc, compute_uv=False) ** 2
    np.testing.assert_allclose(c, s2 / s2.sum(), atol=1e-12)


def test_entropy_matches_reference_and_transpose():
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((60, 25)) * np.linspace(0.1, 3, 25)
    for alpha in [0.5, 1.0, 2.0, 3.5]:
        assert matrix_entropy(Z, alpha) == pytest.approx(reference_entropy(Z, alpha), abs=1e-10)
    # without centring Z Z^T and Z^T Z share their spectrum: the N<D and N>D paths agree
    assert matrix_entropy(Z, center=False) == pytest.approx(matrix_entropy(Z.T, center=False), abs=1e-12)


def test_entropy_orthonormal_rows_is_log_n():
    rng = np.random.default_rng(2)
    N, D = 32, 80
    Z = orthonormal(rng, D, N).T  # (N, D) with orthonormal rows
    assert matrix_entropy(Z, center=False) == pytest.approx(math.log(N), abs=1e-12)
    # centring removes the mean direction: N - 1 equal eigenvalues remain
    assert matrix_entropy(Z, center=True) == pytest.approx(math.log(N - 1), abs=1e-12)
    assert matrix_entropy(Z, center=False, normalized=True) == pytest.approx(1.0, abs=1e-12)


def test_entropy_rank_one_is_zero_and_k_equal_is_log_k():
    rng = np.random.default_rng(3)
    u, v = rng.standard_normal(50), rng.standard_normal(30)
    Z = np.outer(u, v)
    for alpha in [0.5, 1.0, 2.0]:
        assert matrix_entropy(Z, alpha, center=False) == pytest.approx(0.0, abs=1e-10)
    for k in [1, 2, 7, 20]:
        Z = with_singular_values(rng, 100, 40, np.full(k, 3.0), centered=True)
        for alpha in [0.5, 1.0, 2.0, float("inf")]:
            assert matrix_entropy(Z, alpha) == pytest.approx(math.log(k), abs=1e-9)


def test_entropy_invariant_to_rotation_and_scaling():
    rng = np.random.default_rng(4)
    Z = rng.standard_normal((70, 20)) @ rng.standard_normal((20, 20))
    Q = orthonormal(rng, 20, 20)
    base = matrix_entropy(Z)
    assert matrix_entropy(Z @ Q) == pytest.approx(base, abs=1e-10)
    assert matrix_entropy(123.0 * Z) == pytest.approx(base, abs=1e-10)
    assert matrix_entropy(Z * 1e-3 + 5.0) == pytest.approx(base, abs=1e-8)  # shift removed by centring


def test_entropy_continuous_in_alpha_and_monotone():
    rng = np.random.default_rng(5)
    Z = rng.standard_normal((50, 30)) * np.geomspace(1, 1e-3, 30)
    s1 = matrix_entropy(Z, 1.0)
    for eps in [1e-3, 1e-6, 1e-9, 1e-12]:
        assert matrix_entropy(Z, 1 + eps) == pytest.approx(s1, abs=10 * eps + 1e-12)
        assert matrix_entropy(Z, 1 - eps) == pytest.approx(s1, abs=10 * eps + 1e-12)
    values = [matrix_entropy(Z, a) for a in [0.25, 0.5, 0.99, 1.0, 1.01, 2.0, 5.0, float("inf")]]
    assert all(x >= y - 1e-12 for x, y in zip(values, values[1:]))  # Renyi entropy decreases in alpha
    p = eigenspectrum(Z)
    assert renyi_entropy(p, 2.0) == pytest.approx(-math.log((p**2).sum()), abs=1e-12)
    with pytest.raises(ValueError):
        matrix_entropy(Z, alpha=0.0)


def test_low_rank_float32_input_is_stable():
    # docs/architecture.md, Known pitfalls: float32 eigensolvers on low-rank Grams return negatives; we work in float64
    g = torch.Generator().manual_seed(0)
    Z = (torch.randn(400, 3, generator=g) @ torch.randn(3, 256, generator=g)).float()
    lam = eigenspectrum(Z)
    assert np.all(lam >= 0) and int((lam > 0).sum()) == 3
    assert matrix_entropy(Z) == pytest.approx(reference_entropy(Z.double().numpy()), abs=1e-9)
    # torch, numpy and (B, T, D) inputs agree
    assert matrix_entropy(Z.numpy()) == pytest.approx(matrix_entropy(Z), abs=1e-12)
    assert matrix_entropy(Z.reshape(8, 50, 256)) == pytest.approx(matrix_entropy(Z), abs=1e-12)


def test_normalize_rows_is_cosine_geometry():
    rng = np.random.default_rng(6)
    Z = rng.standard_normal((40, 16))
    scaled = Z * rng.uniform(0.1, 10, size=(40, 1))  # per-token norms should not matter
    assert matrix_entropy(scaled, normalize_rows=True) == pytest.approx(
        matrix_entropy(Z, normalize_rows=True), abs=1e-10)
    unit = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    assert matrix_entropy(Z, normalize_rows=True) == pytest.approx(reference_entropy(unit), abs=1e-10)


# ----------------------------------------------------------------------------------------------------
# effective rank

def test_effective_rank_known_spectrum():
    rng = np.random.default_rng(7)
    sigma = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    Z = with_singular_values(rng, 80, 30, sigma)
    p = sigma / sigma.sum()
    q = sigma**2 / (sigma**2).sum()
    assert effective_rank(Z) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-10)
    assert effective_rank(Z, spectrum="covariance") == pytest.approx(math.exp(-(q * np.log(q)).sum()), rel=1e-10)
    assert effective_rank(Z, spectrum="covariance") == pytest.approx(math.exp(matrix_entropy(Z, center=False)))
    # RankMe reference: torch singular values
    s = torch.linalg.svdvals(torch.as_tensor(Z)).numpy()
    s = s / s.sum()
    s = s[s > 1e-12]
    assert effective_rank(Z) == pytest.approx(math.exp(-(s * np.log(s)).sum()), rel=1e-9)
    for k in [1, 4, 30]:
        Zk = with_singular_values(rng, 80, 30, np.ones(k))
        assert effective_rank(Zk) == pytest.approx(k, rel=1e-9)
        assert effective_rank(Zk, spectrum="covariance") == pytest.approx(k, rel=1e-9)
    with pytest.raises(ValueError):
        effective_rank(Z, spectrum="eigen")


# ----------------------------------------------------------------------------------------------------
# alpha-ReQ

@pytest.mark.parametrize("alpha", [0.5, 1.0, 1.5, 2.5])
def test_alpha_req_recovers_exact_power_law(alpha):
    rng = np.random.default_rng(8)
    D = 200
    lam = np.arange(1, D + 1, dtype=float) ** -alpha
    Z = with_singular_values(rng, 400, D, np.sqrt(lam), centered=True)  # covariance eigenvalues = lam
    est, r2 = alpha_req(Z, return_r2=True)
    assert est == pytest.approx(alpha, abs=0.05)
    assert r2 > 0.999
    assert alpha_req(Z, fit_range=(1, None)) == pytest.approx(alpha, abs=0.05)


@pytest.mark.parametrize("alpha", [0.8, 1.5])
def test_alpha_req_recovers_sampled_power_law(alpha):
    # Gaussian samples with covariance eigenvalues i^-alpha: the sample spectrum is noisy, the fit isn't
    rng = np.random.default_rng(9)
    D, N = 128, 20000
    scales = np.arange(1, D + 1, dtype=float) ** (-alpha / 2)
    Z = (rng.standard_normal((N, D)) * scales) @ orthonormal(rng, D, D).T
    assert alpha_req(Z, fit_range=(6, 64)) == pytest.approx(alpha, abs=0.05)


def test_alpha_req_too_few_eigenvalues_is_nan():
    Z = np.random.default_rng(0).standard_normal((100, 4))
    assert math.isnan(alpha_req(Z))  # only 4 eigenvalues, default range starts at rank 6


# ----------------------------------------------------------------------------------------------------
# TwoNN

def brute_twonn(X, discard_fraction=0.1):
    """Obvious reference: full scipy distance matrix, Facco et al. 2017 regression through the origin."""
    X = np.unique(np.asarray(X, dtype=np.float64), axis=0)
    N = len(X)
    d = cdist(X, X)
    np.fill_diagonal(d, np.inf)
    d.sort(axis=1)
    mu = np.sort(d[:, 1] / d[:, 0])
    n = int(N * (1 - discard_fraction))
    x = np.log(mu[:n])
    y = -np.log(1 - np.arange(1, n + 1) / N)
    return (x @ y) / (x @ x)


def test_twonn_matches_brute_force_reference():
    rng = np.random.default_rng(10)
    X = embed(rng, rng.standard_normal((600, 4)), 30)
    assert twonn_dimension(X) == pytest.approx(brute_twonn(X), rel=1e-9)


@pytest.mark.parametrize("d,D", [(2, 50), (5, 50), (10, 100)])
def test_twonn_linear_subspace(d, D):
    rng = np.random.default_rng(11 + d)
    X = embed(rng, rng.standard_normal((3000, d)), D)
    assert twonn_dimension(X) == pytest.approx(d, rel=0.1)
    assert twonn_dimension(X, estimator="mle") == pytest.approx(d, rel=0.1)


@pytest.mark.parametrize("d", [2, 5, 8])
def test_twonn_sphere(d):
    rng = np.random.default_rng(20 + d)
    X = embed(rng, sphere(rng, 3000, d), 100)  # S^d in R^(d+1), rotated into R^100
    assert twonn_dimension(X) == pytest.approx(d, rel=0.1)


def test_twonn_swiss_roll():
    rng = np.random.default_rng(30)
    X = embed(rng, swiss_roll(rng, 3000), 50)
    assert twonn_dimension(X) == pytest.approx(2.0, rel=0.1)


def test_twonn_duplicates_and_torch_input():
    rng = np.random.default_rng(31)
    X = embed(rng, rng.standard_normal((2000, 3)), 40)
    dup = np.concatenate([X, X[:500], X[:100]])  # 600 exact duplicates
    d_clean = twonn_dimension(X)
    d_dup, info = twonn_dimension(rng.permutation(dup), return_details=True)
    assert math.isfinite(d_dup) and d_dup == pytest.approx(d_clean, rel=1e-12)
    assert info["n_duplicates_removed"] == 600 and info["n_points"] == 2000
    assert twonn_dimension(torch.as_tensor(X, dtype=torch.float32)) == pytest.approx(d_clean, rel=1e-3)
    with pytest.raises(ValueError):
        twonn_dimension(np.ones((10, 3)))  # a single distinct point


def test_twonn_large_n_runs():
    # N = 5000 in D = 100 must be quick (chunked distances); no wall-clock assertion, just completion
    X = np.random.default_rng(32).standard_normal((5000, 100)).astype(np.float32)
    assert 20 < twonn_dimension(X) < 100


def test_twonn_matches_scikit_dimension():
    skdim = pytest.importorskip("skdim")
    rng = np.random.default_rng(33)
    for d in [3, 7]:
        X = embed(rng, rng.standard_normal((2000, d)), 50)
        ref = skdim.id.TwoNN(discard_fraction=0.1).fit(X).dimension_
        assert twonn_dimension(X) == pytest.approx(ref, rel=0.05)


def test_twonn_matches_dadapy():
    dadapy = pytest.importorskip("dadapy")
    rng = np.random.default_rng(34)
    X = embed(rng, rng.standard_normal((2000, 5)), 50)
    data = dadapy.Data(coordinates=X)
    try:  # the keyword was renamed from fraction to mu_fraction in dadapy 0.3
        ref = data.compute_id_2NN(algorithm="base", mu_fraction=0.9)[0]
    except TypeError:
        ref = data.compute_id_2NN(algorithm="base", fraction=0.9)[0]
    assert twonn_dimension(X) == pytest.approx(ref, rel=0.05)


# ----------------------------------------------------------------------------------------------------
# information plane

def test_onehot_kernel_entropy_and_self_information():
    y = torch.arange(120) % 4  # 4 balanced classes
    K = kernel_gram(y)
    assert gram_entropy(K, alpha=1.0) == pytest.approx(math.log(4), abs=1e-10)
    assert gram_entropy(K, alpha=2.0) == pytest.approx(math.log(4), abs=1e-10)
    # the one-hot Gram is Hadamard-idempotent, so I(Y;Y) = S(Y) exactly
    assert mutual_information(y, y) == pytest.approx(gram_entropy(K), abs=1e-10)
    # factorial design: two independent label variables have I = 0 exactly
    a, b = torch.arange(60) % 2, (torch.arange(60) // 2) % 3
    assert mutual_information(a, b, alpha=1.0) == pytest.approx(0.0, abs=1e-10)


def test_gaussian_self_information_formula_and_bounds():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 5, generator=g, dtype=torch.float64)
    Kx = kernel_gram(X, "gaussian")
    S = gram_entropy(Kx)
    I = mutual_information(X, X)
    # Hadamard square of a Gaussian Gram = Gaussian Gram with sigma / sqrt(2)
    dist = torch.cdist(X, X)
    sigma = float(dist[torch.triu(torch.ones(200, 200, dtype=torch.bool), 1)].median())
    narrow = gram_entropy(kernel_gram(X, "gaussian", bandwidth=sigma / math.sqrt(2)))
    assert I == pytest.approx(2 * S - narrow, abs=1e-10)
    assert 0 < I <= S + 1e-12
    # tiny bandwidth: K -> identity, every entropy -> log N and I(X;X) -> S(X)
    assert mutual_information(X, X, bandwidth_a=1e-3, bandwidth_b=1e-3) == pytest.approx(math.log(200), abs=1e-6)
    assert joint_gram_entropy(Kx, Kx) >= S


def test_mutual_information_properties():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(150, 4, generator=g)
    B = torch.tanh(A @ torch.randn(4, 6, generator=g)) + 0.1 * torch.randn(150, 6, generator=g)
    assert mutual_information(A, B) == pytest.approx(mutual_information(B, A), abs=1e-10)
    assert mutual_information(A, B) > 0
    assert mutual_information_xt(A, torch.ones(150, 3)) == pytest.approx(0.0, abs=1e-10)  # constant T
    assert mutual_information(A.numpy(), B.numpy()) == pytest.approx(mutual_information(A, B), abs=1e-10)
    with pytest.raises(ValueError):
        mutual_information(A, B[:100])


def test_data_processing_inequality_along_a_chain():
    # X -> T1 = f(X) (injective) -> T2 = g(T1) (lossy projection) -> T3 = sign (more lossy)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(400, 10, generator=g, dtype=torch.float64)
    T1 = torch.tanh(X @ torch.randn(10, 20, generator=g, dtype=torch.float64) / 3)
    T2 = T1[:, :2]
    T3 = torch.sign(T1[:, :1])
    Y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0).long()  # labels computed from X
    ixt = [mutual_information_xt(X, T) for T in (T1, T2, T3)]
    ity = [mutual_information_ty(T, Y) for T in (X, T1, T2, T3)]
    assert ixt[0] > ixt[1] > ixt[2] > 0
    assert ity[0] > ity[1] > ity[2] > ity[3] > 0
    plane = information_plane(X, T2, Y)
    assert plane["I_XT"] == pytest.approx(ixt[1], abs=1e-10)
    assert plane["I_TY"] == pytest.approx(ity[2], abs=1e-10)
    assert plane["H_Y"] == pytest.approx(gram_entropy(kernel_gram(Y), 1.01), abs=1e-12)


def test_kernel_bandwidth_rules():
    X = torch.randn(100, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    K_med = kernel_gram(X, "gaussian", "median")
    K_sil = kernel_gram(X, "gaussian", "silverman")
    assert torch.allclose(K_med.diagonal(), torch.ones(100, dtype=torch.float64))
    assert torch.allclose(K_med, K_med.T) and bool((K_med > 0).all())
    assert gram_entropy(K_sil) > gram_entropy(K_med)  # Silverman's sigma is smaller here
    assert torch.allclose(kernel_gram(torch.ones(10, 2)), torch.ones(10, 10, dtype=torch.float64))
    with pytest.raises(ValueError):
        kernel_gram(X, "gaussian", "scott")


# ----------------------------------------------------------------------------------------------------
# readout

def test_readout_loss_equals_manual_cross_entropy():
    g = torch.Generator().manual_seed(4)
    B, T, D, V = 3, 17, 16, 40
    hidden = torch.randn(B, T, D, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[0, :5] = -1
    W = torch.randn(V, D, generator=g)
    bias = torch.randn(V, generator=g)
    norm = torch.nn.RMSNorm(D, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(D, generator=g) + 0.5)
        logits = norm(hidden) @ W.T + bias  # (B, T, V)
        manual = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-1)
        plain = F.cross_entropy(hidden.reshape(-1, D) @ W.T, targets.reshape(-1), ignore_index=-1)
    got = readout_loss(hidden, targets, W, norm=norm, head_bias=bias, chunk_size=7)
    assert got == pytest.approx(float(manual), rel=1e-5)
    assert readout_loss(hidden, targets, W) == pytest.approx(float(plain), rel=1e-5)
    # through a real head module, with gradients enabled outside
    head = torch.nn.Linear(D, V, bias=False)
    out = readout_loss(hidden.requires_grad_(), targets, head.weight)
    assert isinstance(out, float)


def test_linear_probe_prefers_informative_features():
    g = torch.Generator().manual_seed(5)
    N, D, C = 800, 16, 8
    W = torch.randn(C, D, generator=g)
    h = torch.randn(N, D, generator=g)
    y = torch.distributions.Categorical(logits=2 * h @ W.T).sample()
    noise = torch.randn(N, D, generator=g)
    good = fit_linear_probe(h, y, max_iter=30)
    bad = fit_linear_probe(noise, y, max_iter=30)
    assert good.val_loss < bad.val_loss
    assert good.val_accuracy > 0.5
    assert good.n_train + good.n_val == N and good.n_classes == C
    again = fit_linear_probe(h, y, max_iter=30)
    assert again.val_loss == pytest.approx(good.val_loss, rel=1e-6)  # deterministic
    small = fit_linear_probe(h, y, max_iter=30, max_dim=4)
    assert small.n_features == 4
    assert set(good.to_dict()) >= {"val_loss", "train_loss", "val_accuracy"}


# ----------------------------------------------------------------------------------------------------
# one call for the hook

def test_representation_metrics_agree_with_single_functions():
    rng = np.random.default_rng(12)
    Z = embed(rng, rng.standard_normal((800, 6)), 64) * 1.0 + 0.01 * rng.standard_normal((800, 64))
    m = representation_metrics(Z, fit_range=(2, 30))
    assert m["entropy"] == pytest.approx(matrix_entropy(Z), abs=1e-12)
    assert m["normalized_entropy"] == pytest.approx(matrix_entropy(Z, normalized=True), abs=1e-12)
    assert m["effective_rank"] == pytest.approx(effective_rank(Z, center=True), rel=1e-12)
    assert m["alpha_req"] == pytest.approx(alpha_req(Z, fit_range=(2, 30)), abs=1e-12)
    assert m["twonn_id"] == pytest.approx(twonn_dimension(Z), rel=1e-12)
    assert set(m) == {"entropy", "normalized_entropy", "effective_rank", "alpha_req", "alpha_req_r2", "twonn_id"}
