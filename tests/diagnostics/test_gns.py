"""Ground-truth tests for diagnostics.gns (McCandlish et al. 2018, arXiv 1812.06162).

Sampling convention used throughout: batches are drawn WITH replacement from a finite population of
N per-example gradients g_i, so the examples of a batch are i.i.d. and

    G = mean_i g_i,    Sigma = (1/N) sum_i (g_i - G)(g_i - G)^T      (population covariance, 1/N)
    E|G_B|^2 = |G|^2 + tr(Sigma) / B.
"""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from diagnostics.gns import (
    BiasCorrectedEMA,
    GNSResult,
    GNSTracker,
    b_simple_from_estimates,
    critical_batch_size,
    examples_needed,
    fit_steps_examples,
    recompute_b_simple,
    steps_needed,
    two_batch_estimates,
    unbiased_grad_sq,
    unbiased_trace_cov,
)


def population_stats(per_example):
    """Exact |G|^2 and tr(Sigma) (1/N normalisation: sampling with replacement)."""
    G = per_example.mean(0)                                   # (D,)
    centered = per_example - G                                # (N, D)
    trace_cov = (centered ** 2).sum(1).mean()                 # tr of (1/N) sum c c^T
    return float(G @ G), float(trace_cov)


def draw_micro_batches(rng, per_example, n_steps, n_micro, b_micro):
    """Gradient-accumulation measurements: small = mean_k |g_micro_k|^2, big = |mean_k g_micro_k|^2."""
    N = len(per_example)
    idx = rng.integers(0, N, size=(n_steps, n_micro, b_micro))     # with replacement
    micro = per_example[idx].mean(2)                              # (n_steps, n_micro, D)
    small_sq = (micro ** 2).sum(-1).mean(1)                       # (n_steps,)
    big_sq = (micro.mean(1) ** 2).sum(-1)                         # (n_steps,)
    return small_sq, big_sq


# ----------------------------------------------------------------------------------------------
# (1) unbiasedness by Monte Carlo

@pytest.mark.parametrize("n_micro,b_micro", [(4, 2), (2, 5)])
def test_two_batch_estimators_unbiased_monte_carlo(n_micro, b_micro):
    rng = np.random.default_rng(0)
    N, D, M = 40, 6, 40_000
    per_example = rng.normal(size=(N, D)) * rng.uniform(0.5, 2.0, size=D) + 0.7   # nonzero mean
    true_g2, true_tr = population_stats(per_example)

    small_sq, big_sq = draw_micro_batches(rng, per_example, M, n_micro, b_micro)
    b_small, b_big = b_micro, b_micro * n_micro
    grad_sq = unbiased_grad_sq(small_sq, big_sq, b_small, b_big)
    trace_cov = unbiased_trace_cov(small_sq, big_sq, b_small, b_big)

    for est, truth in [(grad_sq, true_g2), (trace_cov, true_tr)]:
        se = est.std(ddof=1) / math.sqrt(M)
        assert abs(est.mean() - truth) < 4 * se, (est.mean(), truth, se)

    # the test has power: the naive estimate mean|G_small|^2 is off by tr(Sigma)/B_small
    naive = small_sq
    assert abs(naive.mean() - true_g2) > 20 * naive.std(ddof=1) / math.sqrt(M)


def test_independent_batches_unbiased():
    """small and big batches drawn independently (e.g. two different data-parallel groupings)."""
    rng = np.random.default_rng(1)
    N, D, M, bs, bb = 30, 4, 40_000, 3, 11
    per_example = rng.normal(size=(N, D)) + np.array([1.0, -0.5, 0.2, 0.0])
    true_g2, true_tr = population_stats(per_example)
    small = per_example[rng.integers(0, N, size=(M, bs))].mean(1)
    big = per_example[rng.integers(0, N, size=(M, bb))].mean(1)
    g, t = two_batch_estimates((small ** 2).sum(1), (big ** 2).sum(1), bs, bb)
    for est, truth in [(g, true_g2), (t, true_tr)]:
        assert abs(est.mean() - truth) < 4 * est.std(ddof=1) / math.sqrt(M)


def test_estimators_exact_on_expectations_and_symmetric():
    # plugging the exact expectations in returns the exact values, for either argument order
    g2, tr = 2.5, 40.0
    for bs, bb in [(4, 32), (32, 4), (1, 7)]:
        s, b = g2 + tr / bs, g2 + tr / bb
        assert unbiased_grad_sq(s, b, bs, bb) == pytest.approx(g2)
        assert unbiased_trace_cov(s, b, bs, bb) == pytest.approx(tr)


def test_input_types_floats_numpy_tensors():
    ref = two_batch_estimates(3.0, 1.5, 4, 16)
    assert all(isinstance(v, float) for v in ref)
    t = two_batch_estimates(torch.tensor(3.0, requires_grad=True), torch.tensor(1.5), torch.tensor(4), 16)
    assert t == pytest.approx(ref)
    arr = two_batch_estimates(np.array([3.0, 3.0]), np.array([1.5, 1.5]), 4, 16)
    assert isinstance(arr[0], np.ndarray) and arr[0] == pytest.approx([ref[0]] * 2)


def test_equal_batch_sizes_raise_with_guidance():
    with pytest.raises(ValueError) as e:
        unbiased_grad_sq(1.0, 0.5, 8, 8)
    msg = str(e.value)
    for needed in ("accumulation", "processes", "per_example"):
        assert needed in msg
    with pytest.raises(ValueError):
        unbiased_trace_cov(np.ones(3), np.ones(3), np.array([2, 4, 4]), np.array([8, 8, 4]))
    with pytest.raises(ValueError):
        GNSTracker().update(1.0, 0.5, 8, 8)
    with pytest.raises(ValueError, match="positive"):
        unbiased_grad_sq(1.0, 0.5, 0, 8)


# ----------------------------------------------------------------------------------------------
# (2) least squares at fixed parameters: EMA B_simple -> tr(Sigma)/|G|^2

def test_tracker_converges_on_least_squares():
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    N, D = 256, 8
    X = torch.randn(N, D, dtype=torch.float64)
    w_star = torch.randn(D, dtype=torch.float64)
    y = X @ w_star + 0.5 * torch.randn(N, dtype=torch.float64)
    w = (w_star + 0.3 * torch.randn(D, dtype=torch.float64)).requires_grad_(True)

    def loss_fn(idx):                                            # mean-reduced, like training
        return 0.5 * ((X[idx] @ w - y[idx]) ** 2).mean()

    # brute-force per-example gradients by autograd, checked against the closed form r_i x_i
    per_example = torch.stack([torch.autograd.grad(loss_fn(torch.tensor([i])), w)[0] for i in range(N)])
    r = (X @ w - y).detach()
    torch.testing.assert_close(per_example, r[:, None] * X)
    # a batch-mean gradient is the mean of its per-example gradients (what the fast path uses)
    idx = torch.tensor([3, 3, 17, 200])
    torch.testing.assert_close(torch.autograd.grad(loss_fn(idx), w)[0], per_example[idx].mean(0))

    per_example = per_example.numpy()
    true_g2, true_tr = population_stats(per_example)
    truth = true_tr / true_g2

    n_micro, b_micro = 8, 8
    small_sq, big_sq = draw_micro_batches(rng, per_example, 4000, n_micro, b_micro)
    tracker = GNSTracker(decay=0.999, tokens_per_example=128)
    for s, b in zip(small_sq, big_sq):
        res = tracker.update(torch.tensor(s), b, b_micro, b_micro * n_micro)
    assert res.defined and res.n_updates == 4000 and res.n_skipped == 0
    assert abs(res.b_simple / truth - 1) < 0.05, (res.b_simple, truth)
    assert abs(res.grad_sq / true_g2 - 1) < 0.05
    assert abs(res.trace_cov / true_tr - 1) < 0.05
    assert res.b_simple_tokens == pytest.approx(128 * res.b_simple)


# ----------------------------------------------------------------------------------------------
# (3) EMA debiasing equals the brute-force weighted average

@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.99])
def test_ema_debiasing_matches_weighted_average(decay):
    x = np.random.default_rng(3).normal(size=60) * 5 + 2
    ema = BiasCorrectedEMA(decay)
    assert math.isnan(ema.value)
    for t in range(1, len(x) + 1):
        v = ema.update(x[t - 1])
        weights = decay ** np.arange(t - 1, -1, -1.0)                 # decay^(t-i), i = 1..t
        assert v == pytest.approx((weights * x[:t]).sum() / weights.sum(), rel=1e-12, abs=1e-12)


def test_ema_first_value_is_unbiased_and_state_roundtrip():
    ema = BiasCorrectedEMA(0.99)
    assert ema.update(7.0) == pytest.approx(7.0)                      # no pull towards 0
    ema.update(torch.tensor(3.0))
    clone = BiasCorrectedEMA(0.5)
    clone.load_state_dict(ema.state_dict())
    assert clone.decay == 0.99
    assert clone.update(1.0) == ema.update(1.0)
    with pytest.raises(ValueError):
        BiasCorrectedEMA(1.0)


def test_tracker_state_roundtrip_continues_identically():
    rng = np.random.default_rng(4)
    a = GNSTracker(decay=0.9, tokens_per_example=64)
    for _ in range(10):
        a.update(2 + rng.random(), 1 + rng.random(), 4, 32)
    b = GNSTracker()
    b.load_state_dict(a.state_dict())
    assert b.decay == 0.9 and b.tokens_per_example == 64
    ra, rb = a.update(2.5, 1.2, 4, 32), b.update(2.5, 1.2, 4, 32)
    assert ra == rb


# ----------------------------------------------------------------------------------------------
# (4) undefined case: NaN + flag, never negative

def test_undefined_when_grad_sq_nonpositive():
    tracker = GNSTracker(decay=0.9)
    r0 = tracker.result()
    assert not r0.defined and math.isnan(r0.b_simple)
    # B_small |G_small|^2 > B_big |G_big|^2  ->  grad_sq estimate < 0
    res = tracker.update(small_sq=10.0, big_sq=1.0, b_small=4, b_big=16)
    assert res.grad_sq < 0 and res.trace_cov > 0
    assert not res.defined and math.isnan(res.b_simple) and "grad_sq" in res.reason
    assert math.isnan(res.to_metrics()["gns/b_simple"])
    # direct estimates: zero signal, and negative noise estimate
    assert math.isnan(GNSTracker().update_estimates(0.0, 5.0).b_simple)
    r = GNSTracker().update_estimates(1.0, -5.0)
    assert not r.defined and math.isnan(r.b_simple)
    b = b_simple_from_estimates(np.array([1.0, 0.0, -1.0, 2.0]), np.array([3.0, 3.0, 3.0, -1.0]))
    assert b[0] == 3.0 and np.isnan(b[1:]).all()
    # once the signal is clearly positive it becomes defined again
    for _ in range(50):
        res = tracker.update(small_sq=3.0, big_sq=2.0, b_small=4, b_big=16)
    assert res.defined and res.b_simple > 0


# ----------------------------------------------------------------------------------------------
# (5) non-finite inputs are skipped and counted

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_inputs_skipped_and_counted(bad):
    tracker = GNSTracker(decay=0.9)
    before = tracker.update(3.0, 2.0, 4, 16)
    after = tracker.update(bad, 2.0, 4, 16)
    after = tracker.update(3.0, torch.tensor(bad), 4, 16)
    assert after.n_skipped == 2 and after.n_updates == 1
    assert (after.b_simple, after.grad_sq, after.trace_cov) == (before.b_simple, before.grad_sq,
                                                                before.trace_cov)
    assert tracker.update_estimates(bad, 1.0).n_skipped == 3
    assert tracker.update(3.0, 2.0, bad, 16).n_skipped == 4              # a bad batch size too
    ema = BiasCorrectedEMA(0.9)
    ema.update(1.0), ema.update(bad)
    assert ema.n_skipped == 1 and ema.n_updates == 1 and ema.value == 1.0


def test_metrics_record_names():
    res = GNSTracker(decay=0.5, tokens_per_example=256).update(3.0, 2.0, 4, 16)
    m = res.to_metrics()
    assert set(m) == {"gns/b_simple", "gns/b_simple_tokens", "gns/grad_sq", "gns/trace_cov",
                      "gns/small_sq", "gns/big_sq", "gns/b_small", "gns/b_big"}
    assert all(isinstance(v, float) for v in m.values())
    assert m["gns/b_simple_tokens"] == 256 * m["gns/b_simple"]
    assert isinstance(res, GNSResult)
    m2 = GNSTracker().update_estimates(1.0, 2.0).to_metrics(prefix="gns/attn")
    assert set(m2) == {"gns/attn/b_simple", "gns/attn/grad_sq", "gns/attn/trace_cov"}


# ----------------------------------------------------------------------------------------------
# (6) the S/E trade-off: fit recovers known parameters

def test_steps_examples_model_satisfies_eq_2_11():
    s_min, b_noise = 1000.0, 256.0
    e_min = s_min * b_noise
    B = np.array([8.0, 64, 256, 1024, 8192])
    S, E = steps_needed(B, s_min, b_noise), examples_needed(B, e_min, b_noise)
    np.testing.assert_allclose(E, B * S)
    np.testing.assert_allclose((S / s_min - 1) * (E / e_min - 1), 1.0)
    assert critical_batch_size(s_min, e_min) == b_noise
    assert steps_needed(b_noise, s_min, b_noise) == 2 * s_min           # B = B_crit costs 2x both
    assert examples_needed(b_noise, e_min, b_noise) == 2 * e_min


def test_fit_recovers_parameters_exact_and_noisy():
    s_min, b_noise = 3000.0, 512.0
    B = 2.0 ** np.arange(3, 14)                                           # 8 .. 8192
    S = steps_needed(B, s_min, b_noise)
    fit = fit_steps_examples(S, B * S)
    assert fit.s_min == pytest.approx(s_min, rel=1e-9)
    assert fit.e_min == pytest.approx(s_min * b_noise, rel=1e-9)
    assert fit.b_crit == pytest.approx(b_noise, rel=1e-9) and fit.b_noise == fit.b_crit
    assert fit.rms_residual < 1e-9 and fit.n_points == len(B)
    np.testing.assert_allclose(fit.steps(B), S)

    rng = np.random.default_rng(5)
    S_noisy = S * np.exp(rng.normal(scale=0.02, size=len(B)))            # 2% step-count noise
    fit = fit_steps_examples(S_noisy, B * S_noisy)
    assert fit.s_min == pytest.approx(s_min, rel=0.1)
    assert fit.b_crit == pytest.approx(b_noise, rel=0.1)


def test_fit_rejects_degenerate_data():
    with pytest.raises(ValueError):
        fit_steps_examples([100.0], [1000.0])
    with pytest.raises(ValueError, match="batch size"):
        fit_steps_examples([100.0, 200.0], [1000.0, 2000.0])             # same B = 10 twice


# ----------------------------------------------------------------------------------------------
# (7) offline recomputation equals the online tracker

def _logged_run(rng, n=300):
    """A metrics DataFrame as the run store returns it: GNS measured on some steps only, one overflow."""
    steps = np.arange(n)
    small = 3.0 + rng.gamma(2.0, 0.5, size=n)
    big = 1.0 + rng.gamma(2.0, 0.1, size=n)
    b_small = np.where(steps < 150, 4.0, 8.0)                             # batch-size ramp mid-run
    b_big = 8 * b_small
    measured = steps % 3 == 0
    df = pd.DataFrame({"step": steps, "train/loss": rng.random(n)})
    for name, col in [("small_sq", small), ("big_sq", big), ("b_small", b_small), ("b_big", b_big)]:
        df[f"gns/{name}"] = np.where(measured, col, np.nan)
    df.loc[30, "gns/small_sq"] = np.inf                                   # an overflowing step
    return df


@pytest.mark.parametrize("decay", [0.0, 0.9, 0.99])
def test_offline_recompute_equals_online_tracker(decay):
    df = _logged_run(np.random.default_rng(6))
    off = recompute_b_simple(df, decay=decay, tokens_per_example=32)
    tracker = GNSTracker(decay=decay, tokens_per_example=32)
    online = []
    raw = df[["gns/small_sq", "gns/big_sq", "gns/b_small", "gns/b_big"]].to_numpy()
    for vals in raw:
        if np.isnan(vals).any():                                          # not measured this step
            online.append(tracker.result())
        else:
            online.append(tracker.update(*vals))
    assert tracker.n_skipped == 1
    for col, attr in [("gns/b_simple", "b_simple"), ("gns/grad_sq", "grad_sq"),
                      ("gns/trace_cov", "trace_cov"), ("gns/b_simple_tokens", "b_simple_tokens")]:
        np.testing.assert_allclose(off[col].to_numpy(), [getattr(r, attr) for r in online],
                                   rtol=1e-10, equal_nan=True)
    assert list(off["step"]) == list(df["step"])
    assert (off["gns/defined"].to_numpy() == np.array([r.defined for r in online])).all()


def test_offline_rolling_window_is_ratio_of_sums():
    rng = np.random.default_rng(7)
    n, w = 50, 7
    small, big = 3 + rng.random(n), 1 + rng.random(n)
    out = recompute_b_simple(small_sq=small, big_sq=big, b_small=4, b_big=32, window=w)
    g, t = two_batch_estimates(small, big, 4, 32)
    for i in range(n):
        lo = max(0, i - w + 1)
        assert out["gns/b_simple"].iloc[i] == pytest.approx(t[lo:i + 1].sum() / g[lo:i + 1].sum())
    # window=1 is the per-step ratio; decay=0 is the same thing
    one = recompute_b_simple(small_sq=small, big_sq=big, b_small=4, b_big=32, window=1)
    zero = recompute_b_simple(small_sq=small, big_sq=big, b_small=4, b_big=32, decay=0.0)
    np.testing.assert_allclose(one["gns/b_simple"], t / g)
    np.testing.assert_allclose(zero["gns/b_simple"], t / g)


def test_offline_argument_errors():
    df = _logged_run(np.random.default_rng(8), n=10)
    with pytest.raises(ValueError, match="exactly one"):
        recompute_b_simple(df)
    with pytest.raises(ValueError, match="exactly one"):
        recompute_b_simple(df, decay=0.9, window=5)
    with pytest.raises(ValueError, match="gns/big_sq"):
        recompute_b_simple(df.drop(columns=["gns/big_sq"]), decay=0.9)
    with pytest.raises(ValueError, match="accumulation"):
        recompute_b_simple(small_sq=[2.0], big_sq=[1.0], b_small=[4], b_big=[4], decay=0.9)
