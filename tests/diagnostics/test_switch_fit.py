"""The continuous data-switch step (``diagnostics.recommend._switch_fit.smooth_switch`` and its use by
``data_switch_recommendation``) on switch candidates generated from a known J(s) and r(s)."""

import numpy as np
import pytest

from diagnostics.recommend._switch_fit import smooth_switch

STEPS = np.array([60, 75, 90, 105, 120])           # probes at 0.5 .. 0.875 of a 120-step stable phase + the parent
TOL = 0.01


def J_lin(s):
    return 2.1 + 0.002 * (s - 60)                  # the target loss: an earlier switch is better


def r_lin(s):
    return 0.03 * (120 - s) / 60                   # the earlier domains' rise: 0 at the parent (120), 3% at 60


S_STAR = 120 - TOL * 60 / 0.03                     # r(s*) = 1%: s* = 100, the constrained optimum (not a probe step)


@pytest.mark.parametrize("steps", [STEPS, STEPS[[0, 2, 4]]])          # quadratic (5 steps) and line (3 steps)
def test_noise_free_linear_crossing(steps):
    sm = smooth_switch(steps, J_lin(steps), r_lin(steps), np.ones(len(steps)), 0.01, 0.002, TOL, always_ok=120)
    assert sm.model == ("quadratic" if len(steps) >= 4 else "line")
    assert abs(sm.step - S_STAR) <= 1                        # the grid is integer steps: tolerance 1 step
    assert sm.rise <= TOL and sm.J == pytest.approx(J_lin(sm.step), abs=1e-9)
    assert sm.p_J > 0.99 and sm.p_r > 0.99                   # an exact fit
    assert sm.low <= S_STAR <= sm.high + 1


def test_crossing_moves_with_the_tolerance_and_the_unconstrained_optimum():
    for tol, want in ((0.02, 80), (0.005, 110)):            # s* = 120 - tol * 2000
        sm = smooth_switch(STEPS, J_lin(STEPS), r_lin(STEPS), np.ones(5), 0.01, 0.002, tol, always_ok=120)
        assert abs(sm.step - want) <= 1
    # an interior minimum of J with no binding constraint: the vertex of a quadratic, 83
    J = 1.5 + 1e-4 * (STEPS - 83.0) ** 2
    sm = smooth_switch(STEPS, J, np.zeros(5), np.ones(5), 0.01, 0.002, TOL, always_ok=120)
    assert sm.step == 83 and sm.model == "quadratic"
    # a steep rise (30% at 60): the crossing at 118, next to the parent
    sm = smooth_switch(STEPS, J_lin(STEPS), 10 * r_lin(STEPS), np.ones(5), 0.01, 0.002, TOL, always_ok=120)
    assert abs(sm.step - 118) <= 1
    # the rise is relative to the fitted curve at the parent (zero there by construction)
    assert sm.rise <= TOL and smooth_switch(STEPS, J_lin(STEPS), r_lin(STEPS) + 0.004, np.ones(5), 0.01, 0.002, TOL,
                                            always_ok=120).step == pytest.approx(S_STAR, abs=2)


def test_noisy_estimate_and_range_cover_the_optimum():
    """Replicates (3 per step) with noise sd 0.01 on J and 0.2% on r: the estimate's sd is about 2.4 steps here
    (300 draws: mean error +0.3, 90% range coverage 0.92); over 40 draws every error is within 10 steps (4 sd),
    the mean within 1.5 (4 se), and the 90% bootstrap range holds s* in at least 80% of the draws. The
    goodness-of-fit check refuses a correct model at p < 0.01 per curve (about 2% of draws): at most 3 here."""
    rng = np.random.default_rng(0)
    sig, sig_r, n = 0.01, 0.002, np.full(5, 3)
    hits, errs, refused = 0, [], 0
    for _ in range(40):
        J = J_lin(STEPS) + sig / np.sqrt(n) * rng.standard_normal(5)
        r = r_lin(STEPS) + sig_r / np.sqrt(n) * rng.standard_normal(5)
        sm = smooth_switch(STEPS, J, r, n, sig, sig_r, TOL, always_ok=120, n_boot=200)
        if isinstance(sm, str):
            assert "does not fit" in sm
            refused += 1
            continue
        errs.append(sm.step - S_STAR)
        hits += sm.low <= S_STAR <= sm.high
    assert max(abs(e) for e in errs) <= 10 and abs(np.mean(errs)) <= 1.5
    assert refused <= 3 and hits >= 0.8 * len(errs)


def test_the_model_is_refused_where_it_cannot_be_checked_or_does_not_fit():
    one = np.ones(5)
    assert "too few" in smooth_switch(STEPS[:2], J_lin(STEPS[:2]), r_lin(STEPS[:2]), one[:2], 0.01, 0.002, TOL)
    assert "no noise" in smooth_switch(STEPS, J_lin(STEPS), r_lin(STEPS), one, float("nan"), 0.002, TOL)
    spike = r_lin(STEPS) + np.array([0, 0, 0.03, 0, 0])                  # a 3% spike at 90 with 0.2% noise
    assert "does not fit" in smooth_switch(STEPS, J_lin(STEPS), spike, one, 0.01, 0.002, TOL)
    with pytest.raises(ValueError):
        smooth_switch([60, 60, 90], [1, 1, 1], [0, 0, 0], [1, 1, 1], 0.01, 0.002, TOL)


def test_data_switch_recommends_the_fitted_crossing(tmp_path):
    """Switch probes at 20, 40, 60, 80 of a run switching at 100 with J(s) = 1.5 + 0.002 (s - 20) and the
    prose rise 3% x (100 - s) / 80: the constrained optimum is s* = 73.3, between the probes; the discrete
    rule can only say 80."""
    from diagnostics.recommend import data_switch_recommendation

    from .test_recommend_probes import code_final, switch_cfg, write_switch

    def gain(s):                   # write_switch's target loss is code_final(s) - mix_gain
        return code_final(s) - (1.5 + 0.002 * (s - 20))

    parent = write_switch(tmp_path / "p", switch_cfg(), 100, noise=0.0005, seed=100)
    bs = [write_switch(tmp_path / f"s{s}", switch_cfg(split=s), s, parent={"run": str(parent.path), "step": s},
                       noise=0.0005, seed=s, prose_rise=0.03 * (100 - s) / 80, mix_gain=gain(s)) for s in (20, 40, 60, 80)]
    rec = data_switch_recommendation(parent, bs)
    s_star = 100 - 0.01 * 80 / 0.03
    assert abs(rec.value - s_star) <= 3    # noise sd 0.0005 on J and prose: the crossing's sd is about 0.7 steps
    assert rec.low <= s_star <= rec.high and rec.high - rec.low <= 20
    assert "quadratic" in rec.evidence["model"] and "step 80" in rec.evidence["discrete best probe"]
    assert rec.estimate == pytest.approx(1.5 + 0.002 * (rec.value - 20), abs=0.01)
