"""diagnostics.difficulty against slow, obvious references (loops, dicts, closed forms)."""

import math
import time
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diagnostics.difficulty import (ExampleTable, IdIndex, RingSeries, data_map_regions, domain_curves,
                                    fit_power_law, learnability, local_exponent, ols_slope, ols_slope_test, reducible_loss, roc_auc,
                                    sequence_scores)


def _reference(visits: dict[int, list[float]], thr: float) -> dict[int, dict]:
    """One example at a time, plain Python: the definitions of docs/difficulty.md."""
    out = {}
    for i, v in visits.items():
        v = np.array(v)
        c = np.exp(-v)
        learned = v < thr
        out[i] = dict(visits=len(v), loss_mean=v.mean(), loss_std=v.std(), confidence=c.mean(), variability=c.std(),
                      correctness=learned.mean(), first_loss=v[0], last_loss=v[-1], learned=learned[-1],
                      forgetting_events=int(np.sum(learned[:-1] & ~learned[1:])),
                      forgettable=bool(learned[:-1].any()))
    return out


def _check_table(tab: ExampleTable, visits: dict[int, list[float]]) -> None:
    ref = _reference(visits, tab.learned_loss)
    a = tab.to_arrays()
    assert len(tab) == len(ref) and set(a["id"].tolist()) == set(ref)
    for row, i in enumerate(a["id"].tolist()):
        r = ref[i]
        for k in ("visits", "forgetting_events", "learned"):
            assert a[k][row] == r[k], (k, i)
        for k in ("loss_mean", "loss_std", "confidence", "variability", "correctness"):
            assert a[k][row] == pytest.approx(r[k], rel=1e-9, abs=1e-12), (k, i)
        for k in ("first_loss", "last_loss"):
            assert a[k][row] == pytest.approx(r[k], rel=1e-6), (k, i)
    forgettable = [r for r in ref.values() if r["forgettable"]]
    if forgettable:
        expect = sum(r["forgetting_events"] > 0 for r in forgettable) / len(forgettable)
        assert tab.frac_forgotten == pytest.approx(expect)


def _stream(rng, n_batches=60, n_ids=50, max_batch=40, nan_rate=0.05):
    for _ in range(n_batches):
        b = int(rng.integers(1, max_batch))
        ids = (rng.integers(-n_ids // 5, n_ids, size=b) * 2**40 // 7)  # negative (val-style) ids too
        losses = rng.exponential(1.0, size=b)
        losses[rng.random(b) < nan_rate] = np.nan
        losses[rng.random(b) < nan_rate / 2] = np.inf
        yield ids.astype(np.int64), losses, (ids % 3).astype(np.int64)


def test_streaming_table_equals_full_recomputation():
    rng = np.random.default_rng(0)
    tab = ExampleTable(learned_loss=1.0, capacity=4)  # tiny start: growth and rehashing are exercised
    visits: dict[int, list[float]] = {}
    n_nan = 0
    for ids, losses, doms in _stream(rng):
        st = tab.update(ids, losses, doms)
        n_nan += int((~np.isfinite(losses)).sum())
        assert st.n_nan == int((~np.isfinite(losses)).sum())
        for i, x in zip(ids.tolist(), losses.tolist()):  # duplicates inside a batch count in order
            if math.isfinite(x):
                visits.setdefault(i, []).append(x)
    assert tab.n_nan == n_nan > 0
    assert max(len(v) for v in visits.values()) > 10
    _check_table(tab, visits)
    a = tab.to_arrays()
    assert np.array_equal(a["domain"], a["id"] % 3)


def test_state_dict_round_trip_continues_exactly():
    rng = np.random.default_rng(1)
    batches = list(_stream(rng, n_batches=40))
    whole, part = ExampleTable(), ExampleTable()
    for b in batches:
        whole.update(*b)
    for b in batches[:17]:
        part.update(*b)
    resumed = ExampleTable()
    resumed.load_state_dict(part.state_dict())
    for b in batches[17:]:
        resumed.update(*b)
    a, r = whole.to_arrays(), resumed.to_arrays()
    for k in a:
        np.testing.assert_array_equal(a[k], r[k], err_msg=k)
    assert whole.frac_forgotten == resumed.frac_forgotten and whole.n_nan == resumed.n_nan


def test_id_index_matches_a_dict():
    rng = np.random.default_rng(2)
    idx, ref = IdIndex(4), {}
    for _ in range(30):
        ids = np.unique(rng.integers(-2**62, 2**62, size=int(rng.integers(1, 300))))
        ids = np.concatenate([ids, np.arange(5) * 2**40])  # structured ids collide under naive hashing
        ids = np.unique(ids[~np.isin(ids, list(ref))])
        slots = np.arange(len(ref), len(ref) + len(ids))
        idx.insert(ids, slots)
        ref.update(zip(ids.tolist(), slots.tolist()))
        probe = np.concatenate([ids, rng.integers(-2**62, 2**62, size=50)])
        got = idx.lookup(probe)
        assert got.tolist() == [ref.get(i, -1) for i in probe.tolist()]
    assert idx.size == len(ref) and 2 * idx.size <= len(idx.keys)


def test_bad_input_is_a_clear_value_error():
    tab = ExampleTable()
    with pytest.raises(ValueError, match="one length"):
        tab.update(np.arange(3), np.ones(4))
    with pytest.raises(ValueError, match="one length"):
        tab.update(np.arange(3), np.ones(3), np.zeros(2))
    with pytest.raises(ValueError, match="integers"):
        tab.update(np.array([0.5, 1.5]), np.ones(2))
    with pytest.raises(ValueError, match="learned_loss"):
        ExampleTable(learned_loss=0)
    assert len(tab) == 0


def test_nan_losses_are_skipped_and_counted():
    tab = ExampleTable()
    st = tab.update(np.array([1, 2, 3, 1]), np.array([np.nan, 0.5, np.inf, 2.0]))
    assert (st.n_seen, st.n_nan, st.n_new) == (4, 2, 2)
    a = tab.to_arrays()
    assert dict(zip(a["id"].tolist(), a["visits"].tolist())) == {1: 1, 2: 1}
    assert tab.n_nan == 2 and np.all(np.isfinite(a["loss_mean"]))


def test_bounded_table_keeps_an_exact_hash_sample():
    rng = np.random.default_rng(3)
    tab = ExampleTable(max_examples=2000)
    visits: dict[int, list[float]] = {}
    for _ in range(60):
        ids = rng.integers(0, 12_000, size=500) * 129
        losses = rng.exponential(size=500)
        tab.update(ids, losses)
        for i, x in zip(ids.tolist(), losses.tolist()):
            visits.setdefault(i, []).append(x)
    assert len(tab) <= 2000 and tab.sample_rate < 1
    assert len(tab) >= 0.25 * 12_000 * tab.sample_rate  # a sample, not a handful
    kept = set(tab.to_arrays()["id"].tolist())
    _check_table(tab, {i: visits[i] for i in kept})  # every kept id's statistics are exact
    # the sample is a pure function of the id: all ids in the hash sample that were seen are kept
    in_sample = tab._in_sample(np.array(sorted(visits)))
    assert kept == set(np.array(sorted(visits))[in_sample].tolist())


def test_million_examples_vectorised_and_linear_memory():
    n, batch = 1_000_000, 200_000
    rng = np.random.default_rng(4)
    ids = (rng.permutation(n).astype(np.int64) * 129) + 2 * 2**40
    tracemalloc.start()
    tab = ExampleTable(max_examples=None)
    t0 = time.perf_counter()
    for i in range(0, n, batch):
        tab.update(ids[i:i + batch], rng.exponential(size=batch), np.full(batch, 2))
    t_insert = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):  # revisits: pure lookups + Welford updates
        tab.update(ids[rng.integers(0, n, size=batch)], rng.exponential(size=batch))
    t_update = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"\n1e6 examples: insert {t_insert:.2f}s, 3 x 2e5 revisits {t_update:.2f}s, "
          f"{tab.nbytes / n:.0f} B/example, peak {peak / 2**20:.0f} MiB")
    assert len(tab) == n and tab.to_arrays()["visits"].sum() == n + 3 * batch
    assert tab.nbytes < 200 * n  # O(n): columns (~60 B) + hash cells (12 B, 2-8 per id)
    assert peak < 2.5 * tab.nbytes + 64 * 2**20  # no hidden quadratic or per-id Python objects


def test_data_map_regions():
    conf = np.array([0.9, 0.95, 0.1, 0.05, 0.5, 0.5])
    var = np.array([0.01, 0.02, 0.01, 0.0, 0.4, 0.3])
    r = data_map_regions(conf, var, confidence_threshold=0.37, variability_threshold=0.2)
    assert r.tolist() == [0, 0, 2, 2, 1, 1]
    r = data_map_regions(conf, var)  # relative: top third of variability, then the median confidence
    assert r.tolist() == [0, 0, 2, 2, 1, 1]
    assert data_map_regions(np.ones(4) * 0.9, np.zeros(4)).tolist() == [0, 0, 0, 0]  # no spread: none ambiguous
    var = np.r_[np.zeros(20), 0.3]  # mostly single visits (variability 0): only the spread one is ambiguous
    assert (data_map_regions(np.full(21, 0.5), var) == 1).sum() == 1


def test_roc_auc_equals_pairwise_count():
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(size=80), 1)  # ties
    y = rng.random(80) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]]
    assert roc_auc(s, y) == pytest.approx(np.mean(pairs))
    with pytest.raises(ValueError):
        roc_auc(s, np.ones(80))


def test_ols_slope_and_standard_error_are_calibrated():
    rng = np.random.default_rng(6)
    x = np.linspace(0, 1, 30)
    b, se, a = ols_slope(x, 2 + 3 * x)
    assert (b, a) == (pytest.approx(3), pytest.approx(2)) and se == pytest.approx(0, abs=1e-9)
    slopes, ses = [], []
    for _ in range(2000):
        b, se, _ = ols_slope(x, 1 - 0.5 * x + rng.normal(scale=0.2, size=30))
        slopes.append(b)
        ses.append(se)
    assert np.mean(slopes) == pytest.approx(-0.5, abs=0.02)
    assert np.std(slopes) == pytest.approx(np.mean(ses), rel=0.08)  # the SE is the slope's spread


def test_ols_slope_test_matches_scipy_linregress_and_its_edge_cases():
    """The one OLS slope + one-sided t-test (learnability, the phases guard) against
    scipy.stats.linregress(alternative="less"), to rtol 1e-9 (float64 rounding of the sums; a large
    x offset checks the centring); edge cases where linregress raises or reports se = 0 for n = 2."""
    from scipy.stats import linregress

    rng = np.random.default_rng(11)
    for n, offset, slope in [(3, 0.0, -1.0), (5, 1e6, 0.0), (30, 0.0, 0.5), (30, 1e9, -1e-3), (400, 3.0, -0.01)]:
        x = offset + rng.normal(size=n) * 1e3
        y = 2.0 + slope * (x - offset) + rng.normal(size=n) * 50
        r = linregress(x, y, alternative="less")
        got = ols_slope_test(x, y)
        np.testing.assert_allclose(got, (r.slope, r.stderr, r.intercept, r.pvalue), rtol=1e-9, atol=1e-300,
                                   err_msg=f"n={n}")
        assert ols_slope(x, y) == got[:3]
    nan4 = lambda v: all(math.isnan(u) for u in v)  # noqa: E731
    assert nan4(ols_slope_test([1.0], [2.0])) and nan4(ols_slope_test([], []))  # n < 2
    assert nan4(ols_slope_test([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))  # constant x: linregress raises
    b, se, a, p = ols_slope_test([1.0, 2.0], [3.0, 1.0])  # n = 2: a line, no test
    assert (b, a) == (-2.0, 5.0) and math.isnan(se) and math.isnan(p)
    assert ols_slope_test([0.0, 1.0, 2.0], [3.0, 2.0, 1.0])[1:] == (0.0, 3.0, 0.0)  # perfect fall: p = 0
    assert ols_slope_test([0.0, 1.0, 2.0], [1.0, 1.0, 1.0])[3] == 1.0  # perfect flat line: no decrease
    assert nan4(ols_slope_test([0.0, 1.0, np.nan], [1.0, 2.0, 3.0]))  # NaN x
    b, se, a, p = ols_slope_test([0.0, 1.0, 2.0, 3.0], [1.0, np.nan, 3.0, 4.0])  # NaN y
    assert math.isnan(b) and math.isnan(se) and math.isnan(p)
    with pytest.raises(ValueError, match="1-d arrays of one length"):
        ols_slope_test([1.0, 2.0], [1.0, 2.0, 3.0])


@pytest.mark.parametrize("alpha", [0.08, 0.2, 0.35, 0.6])
def test_power_law_fit_recovers_the_exponent(alpha):
    rng = np.random.default_rng(int(alpha * 100))
    t = np.geomspace(1e6, 1e9, 150)
    E, A = 1.7, 3.0 * 1e6 ** alpha  # L(1e6) = E + 3
    L = E + A * t ** -alpha
    noisy = L * (1 + rng.normal(scale=0.003, size=len(t)))
    fit = fit_power_law(t, noisy)
    assert fit.alpha == pytest.approx(alpha, rel=0.10)
    assert abs(fit.alpha - alpha) < 4 * fit.alpha_se + 1e-3  # the SE is honest
    assert fit.E == pytest.approx(E, rel=0.2)  # E, A and alpha trade off; alpha is the well-determined one
    np.testing.assert_allclose(fit.predict(t), L, rtol=0.01)
    # learnability's log slope on a window follows dL/dln t = -alpha (L - E) ...
    w = slice(60, 90)
    lr = learnability(t[w], L[w])
    mid = math.exp(np.log(t[w]).mean())
    assert lr.slope_log_tokens == pytest.approx(-alpha * A * mid ** -alpha, rel=0.05)
    assert lr.value > 0 and not lr.diminishing
    # ... and inverting it with the fitted E gives the exponent back
    a_loc, _ = local_exponent(t, noisy, fit.E)
    assert a_loc == pytest.approx(alpha, rel=0.10)


def test_learnability_flags_diminishing_returns_at_its_level():
    rng = np.random.default_rng(7)
    t = np.linspace(1e6, 2e6, 100)
    flat = [learnability(t, 3 + rng.normal(scale=0.1, size=100), level=0.05) for _ in range(600)]
    assert all(f.defined for f in flat)
    false_alarm = np.mean([not f.diminishing for f in flat])  # "still decreasing" on a flat curve
    assert 0.02 <= false_alarm <= 0.09  # ~ level (one-sided test)
    falling = learnability(t, 3 - 0.5 * np.log(t / 1e6) + rng.normal(scale=0.05, size=100))
    assert not falling.diminishing and falling.value == pytest.approx(0.5, rel=0.1)
    assert falling.slope_per_token < 0 and falling.p_value < 1e-6
    short = learnability(t[:5], np.ones(5))
    assert not short.defined and math.isnan(short.value)
    w = learnability(t, 3 - 0.5 * np.log(t / 1e6), window=20)
    assert w.n == 20
    with pytest.raises(ValueError):
        learnability(t, np.ones(3))


def test_sequence_scores_match_a_token_loop():
    torch.manual_seed(0)
    B, T, V = 3, 7, 11
    logits = torch.randn(B, T, V) * 3
    y = torch.randint(0, V, (B, T))
    y[0, :3] = -100
    y[2, :] = -100  # a sequence with no targets
    loss, el2n, n_tok = sequence_scores(logits, y, ignore_index=-100)
    for b in range(B):
        keep = y[b] != -100
        assert n_tok[b] == keep.sum()
        if keep.any():
            ref = F.cross_entropy(logits[b][keep], y[b][keep])
            p = logits[b][keep].softmax(-1)
            e = (p - F.one_hot(y[b][keep], V).float()).norm(dim=-1).mean()
            assert loss[b] == pytest.approx(ref.item(), rel=1e-5)
            assert el2n[b] == pytest.approx(e.item(), rel=1e-5)
        else:
            assert loss[b] == 0 and el2n[b] == 0


def test_small_containers():
    r = RingSeries(4)
    for i in range(6):
        r.append(i, 10 * i)
    x, y = r.arrays()
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [20, 30, 40, 50]
    r2 = RingSeries.from_state(r.state_dict())
    r2.append(6, 60)
    assert r2.arrays()[0].tolist() == [3, 4, 5, 6] and r2.total == 7
    assert reducible_loss([2.0, 1.0], [0.5, 1.5]).tolist() == [1.5, -0.5]


def test_domain_curves_from_run_metrics():
    import pandas as pd

    m = pd.DataFrame({"step": [0, 1, 2], "train/tokens": [10, 20, 30], "difficulty/code/loss": [3.0, np.nan, 2.0],
                      "val/code/loss": [np.nan, np.nan, 2.5]})
    c = domain_curves(m, "code")
    assert c["step"].tolist() == [0, 2] and c["val"].tolist()[1] == 2.5 and c["probe"].isna().all()


def test_every_public_name_is_importable_from_diagnostics_difficulty():
    """The streaming state lives in diagnostics.difficulty._table; the public surface is the front door."""
    import diagnostics.difficulty as dd
    import diagnostics.difficulty._table as dt

    for name in dd.__all__:
        assert hasattr(dd, name), name
    for name in dt.__all__:
        assert name in dd.__all__ and getattr(dd, name) is getattr(dt, name), name
