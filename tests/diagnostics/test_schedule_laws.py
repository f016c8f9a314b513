"""diagnostics.schedule (the annealing law, the LR schedule): the areas against their double-sum
definition, the schedule against midtrain's Phase.lr_at, and the fit against losses generated from the
law with known parameters."""

import numpy as np
import pytest

from diagnostics.schedule import DECAY_SHAPES, annealing_law, fit_annealing_law, lr_areas, phase_lrs
from diagnostics.stats import robust_noise_scale

TRUE = dict(L0=2.5, A=1.0, alpha=0.35, C=1.5)


def wsd(n=600, warmup=20, frac=0.2, shape="linear", final=3e-4):
    return phase_lrs(dict(steps=n, lr=3e-3, warmup_steps=warmup, decay=shape, decay_fraction=frac, final_lr=final))


def areas_reference(lrs, lam):
    """S1, S2 by their definitions: S2(s) = sum_{i<=s} sum_{k<=i} (eta_{k-1} - eta_k) lam^(i-k), with the
    increments of the initial LR rise left out."""
    n = len(lrs)
    d = [0.0] + [lrs[k - 1] - lrs[k] for k in range(1, n)]
    k = 1
    while k < n and lrs[k] >= lrs[k - 1]:
        d[k] = 0.0
        k += 1
    S1 = [sum(lrs[: s + 1]) for s in range(n)]
    S2 = [sum(d[j] * lam ** (i - j) for i in range(s + 1) for j in range(i + 1)) for s in range(n)]
    return np.array(S1), np.array(S2)


@pytest.mark.parametrize("lam", [0.0, 0.9, 0.999, 1.0])
def test_areas_match_the_definition(lam):
    lrs = np.r_[wsd(40, warmup=5, frac=0.4), np.full(5, 1e-3), np.linspace(1e-3, 2e-3, 5)]  # with a re-warmup
    S1, S2 = lr_areas(lrs, momentum=lam)
    R1, R2 = areas_reference(lrs, lam)
    np.testing.assert_allclose(S1, R1, rtol=1e-12)
    np.testing.assert_allclose(S2, R2, rtol=1e-9, atol=1e-15)
    if lam == 0.0:  # S2 = the amount annealed so far (from the peak)
        assert S2[44] == pytest.approx(lrs.max() - lrs[44])
    assert S2[:5].max() == 0  # warmup is not annealing


@pytest.mark.parametrize("shape", DECAY_SHAPES)
def test_phase_lrs_is_the_loops_schedule(shape):
    from midtrain.config import Phase

    for frac in (0.03, 0.25, 1.0):
        for warm, n in ((0, 57), (7, 40)):
            ph = Phase(name="x", steps=n, lr=3e-3, warmup_steps=warm, decay=shape, decay_fraction=frac,
                       final_lr=3e-4, mixture={"a": 1.0})
            ref = np.array([ph.lr_at(t) for t in range(n)])
            np.testing.assert_allclose(phase_lrs(vars(ph)), ref, rtol=1e-12, atol=0)


def test_fit_recovers_known_parameters_and_predicts_another_schedule():
    """Losses from the law on a warmup-stable-decay schedule + Gaussian noise (sd 0.02) + 1% spikes of
    +0.5: over 5 seeds the parameters come back within L0 +-0.05, A +-5%, alpha +-5%, C +-10%, and the
    prediction for a cosine schedule (never seen) is within 0.05 of the law at every step after
    warmup, the end included (2.5 noise sd: the cosine's annealing area is ~5x the fitted run's, so
    the error of C is multiplied by it)."""
    lrs = wsd()
    S1, S2 = lr_areas(lrs)
    L = annealing_law(S1, S2, **TRUE)
    cos = wsd(frac=1.0, shape="cosine", final=0.0)
    C1, C2 = lr_areas(cos)
    Lc = annealing_law(C1, C2, **TRUE)
    steps = np.arange(1, 601)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        y = L[steps - 1] + rng.normal(0, 0.02, len(steps))
        y[rng.choice(len(y), 6, replace=False)] += 0.5
        fit = fit_annealing_law(lrs, steps, y)
        assert fit.L0 == pytest.approx(TRUE["L0"], abs=0.05)
        assert fit.A == pytest.approx(TRUE["A"], rel=0.05)
        assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
        assert fit.C == pytest.approx(TRUE["C"], rel=0.1)
        assert fit.noise == pytest.approx(0.02, rel=0.3)
        pc = fit.predict(cos)
        assert np.abs(pc - Lc)[20:].max() < 0.05
        assert abs(fit.final_loss(cos) - Lc[-1]) < 0.05


def test_robust_fit_resists_spikes_that_bias_least_squares():
    lrs = wsd()
    S1, S2 = lr_areas(lrs)
    steps = np.arange(1, 601)
    y = annealing_law(S1, S2, **TRUE)[steps - 1] + np.random.default_rng(1).normal(0, 0.01, 600)
    y[480:600:4] += 1.0  # spikes concentrated in the cooldown
    rob = fit_annealing_law(lrs, steps, y)
    ls = fit_annealing_law(lrs, steps, y, robust=False)
    assert abs(rob.C - TRUE["C"]) < 0.1 * TRUE["C"] < abs(ls.C - TRUE["C"])


def test_segment_offsets_absorb_a_level_shift():
    lrs = wsd()
    S1, S2 = lr_areas(lrs)
    steps = np.arange(1, 601)
    seg = (steps >= 300).astype(int)
    y = annealing_law(S1, S2, **TRUE)[steps - 1] + 0.3 * seg + np.random.default_rng(2).normal(0, 0.01, 600)
    fit = fit_annealing_law(lrs, steps, y, segments=seg)
    assert fit.offsets[1] == pytest.approx(0.3, abs=0.02) and fit.C == pytest.approx(TRUE["C"], rel=0.1)


def test_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        lr_areas([])
    with pytest.raises(ValueError, match=">= 0"):
        lr_areas([1e-3, -1e-3])
    with pytest.raises(ValueError, match="needs the LRs"):
        fit_annealing_law(np.full(5, 1e-3), np.arange(1, 20), np.ones(19))
    with pytest.raises(ValueError, match="at least"):
        fit_annealing_law(np.full(5, 1e-3), np.arange(1, 4), np.ones(3))
    with pytest.raises(ValueError, match="exponential"):
        phase_lrs(dict(steps=10, lr=1e-3, decay="exponential", final_lr=0.0))
    assert robust_noise_scale([1.0]) == 0.0
