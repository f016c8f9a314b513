"""diagnostics.representation.detect_compression_onset / detect_phases: a known turn is found where it is,
and a straight line with noise raises a false alarm at most alpha (plus Monte-Carlo margin) of the time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from diagnostics.representation import detect_compression_onset, detect_phases, format_event, hinge_fit


def piecewise(steps, knot, rise=1.0, fall=0.8):
    """Rises linearly to `rise` at `knot`, then falls with slope fall * rise / knot."""
    steps = np.asarray(steps, dtype=float)
    return np.where(steps < knot, rise * steps / knot, rise - fall * rise * (steps - knot) / knot)


def test_hinge_fit_recovers_noise_free_slopes():
    x = np.arange(0, 3000, 100.0)
    y = 2.0 + piecewise(x, 1200)
    fit = hinge_fit(x, y, 1200)
    assert fit["slope_before"] == pytest.approx(1 / 1200, rel=1e-9)
    assert fit["slope_after"] == pytest.approx(-0.8 / 1200, rel=1e-9)
    assert fit["rss"] == pytest.approx(0.0, abs=1e-18)


def test_known_turn_is_found_within_tolerance():
    rng = np.random.default_rng(0)
    x = np.arange(0, 3000, 100.0)  # a probe every 100 steps
    found = []
    for seed in range(20):
        y = piecewise(x, 1200) + rng.normal(0, 0.1, x.size)
        ev = detect_compression_onset(x, y, alpha=0.05, seed=seed)
        assert ev is not None, f"seed {seed}: the turn at 1200 was missed"
        assert ev["p_value"] <= 0.05
        assert ev["slope_before"] > 0 > ev["slope_after"]
        found.append(ev["step"])
    found = np.array(found)
    assert np.abs(found - 1200).max() <= 300  # 3 probe intervals
    assert abs(np.median(found) - 1200) <= 100


def test_unsorted_nan_and_log_spaced_steps():
    rng = np.random.default_rng(1)
    x = np.array([0, 1, 2, 4, 8, 16, 32, 64] + list(range(100, 3000, 100)), dtype=float)
    y = piecewise(x, 1500) + rng.normal(0, 0.05, x.size)
    y[5] = np.nan
    perm = rng.permutation(x.size)
    ev = detect_compression_onset(x[perm], y[perm])
    assert ev is not None and abs(ev["step"] - 1500) <= 200


@pytest.mark.parametrize("slope", [0.0, 1.0, -1.0])
def test_false_alarm_rate_under_a_straight_line(slope):
    """Single linear trend + i.i.d. noise: P(event) <= alpha + 3 Monte-Carlo sd."""
    rng = np.random.default_rng(2)
    n_sims, alpha, n = 200, 0.05, 20
    x = np.arange(n) * 50.0
    alarms = 0
    for i in range(n_sims):
        y = slope * np.linspace(0, 1, n) + rng.normal(0, 0.3, n)
        alarms += detect_compression_onset(x, y, alpha=alpha, seed=i) is not None
    margin = 3 * np.sqrt(alpha * (1 - alpha) / n_sims)
    assert alarms / n_sims <= alpha + margin


def test_calibration_without_guard_is_close_to_alpha():
    """The bootstrap test alone (no post-knot slope guard) rejects about alpha of the time: it is
    calibrated, not just conservative."""
    rng = np.random.default_rng(3)
    n_sims, alpha, n = 300, 0.1, 16
    x = np.arange(n, dtype=float)
    alarms = sum(
        detect_compression_onset(x, 0.3 * np.linspace(0, 1, n) + rng.normal(0, 0.3, n), alpha=alpha,
                                 guard=False, seed=i) is not None
        for i in range(n_sims)
    )
    sd = np.sqrt(alpha * (1 - alpha) / n_sims)
    assert alpha - 4 * sd <= alarms / n_sims <= alpha + 3 * sd


def test_saturating_rise_is_not_a_turn():
    rng = np.random.default_rng(4)
    x = np.arange(30) * 100.0
    t = np.linspace(0, 1, 30)
    alarms = 0
    for i, k in enumerate([3, 10, 30] * 20):
        y = 1 - np.exp(-k * t) + rng.normal(0, 0.05, 30)
        alarms += detect_compression_onset(x, y, seed=i) is not None
    assert alarms / 60 <= 0.1
    assert detect_compression_onset(x, 1 - np.exp(-10 * t)) is None  # noise-free: never


def test_direction_minus_one_and_affine_invariance():
    rng = np.random.default_rng(5)
    x = np.arange(0, 3000, 100.0)
    y = piecewise(x, 1800) + rng.normal(0, 0.05, x.size)
    ev = detect_compression_onset(x, y)
    ev_affine = detect_compression_onset(x, 7.0 * y - 3.0)
    assert ev is not None and ev_affine is not None
    assert ev["step"] == ev_affine["step"] and ev["p_value"] == ev_affine["p_value"]
    flipped = detect_compression_onset(x, -y, direction=-1)  # e.g. alpha-ReQ: falls, then rises
    assert flipped is not None and flipped["step"] == ev["step"]
    assert flipped["slope_before"] < 0 < flipped["slope_after"]
    assert detect_compression_onset(x, -y) is None  # fall-then-rise is not expansion-then-compression


def test_post_knot_guard_is_scipy_linregress_on_the_points_from_the_knot():
    """The guard's p-value is the one OLS t-test of diagnostics.difficulty (ols_slope_test): equal to
    scipy.stats.linregress(alternative="less") on the points from the detected knot on, and a guard
    that cannot be computed (too few points after the knot) never passes."""
    from scipy.stats import linregress

    from diagnostics.representation._phases import _post_slope_p

    rng = np.random.default_rng(9)
    x = np.arange(0, 3000, 100.0)
    y = piecewise(x, 1500) + rng.normal(0, 0.05, x.size)
    ev = detect_compression_onset(x, y)
    assert ev is not None
    k = int(np.flatnonzero(x == ev["step"])[0])
    ref = linregress(x[k:], y[k:], alternative="less")
    assert ev["post_slope_p"] == pytest.approx(ref.pvalue, rel=1e-9) and ev["post_slope_p"] <= 0.05
    assert _post_slope_p(np.array([1.0, 2.0]), np.array([2.0, 1.0])) == (-1.0, 1.0)  # n < 3: p = 1
    assert _post_slope_p(np.ones(4), np.arange(4.0))[1] == 1.0  # constant x: p = 1


def test_too_short_or_flat_or_bad_args():
    assert detect_compression_onset([0, 1, 2], [0, 1, 0]) is None
    assert detect_compression_onset(np.arange(20), np.ones(20)) is None
    with pytest.raises(ValueError, match="alpha"):
        detect_compression_onset(np.arange(20), np.arange(20), alpha=0)
    with pytest.raises(ValueError, match="same length"):
        detect_compression_onset(np.arange(20), np.arange(19))


def test_detect_phases_on_a_metrics_table():
    rng = np.random.default_rng(6)
    steps = np.arange(0, 4000, 50)
    probed = steps % 200 == 0  # the probe runs every 200 steps; other rows are NaN
    df = pd.DataFrame({"step": steps, "train/loss": rng.normal(size=steps.size)})
    cols = {
        "blocks.0.resid_post": np.linspace(0, 1, steps.size),  # keeps expanding
        "blocks.3.resid_post": piecewise(steps, 1200),
        "final_norm": piecewise(steps, 2400),
    }
    for layer, v in cols.items():
        noisy = v + rng.normal(0, 0.03, steps.size)
        df[f"repr/{layer}/entropy"] = np.where(probed, noisy, np.nan)
        df[f"repr/{layer}/effective_rank"] = np.where(probed, 10 * noisy, np.nan)
    df["repr/blocks.3.resid_post/prose/entropy"] = np.where(probed, piecewise(steps, 800), np.nan)

    events = detect_phases(df, metric="entropy")
    assert [e["layer"] for e in events] == ["blocks.3.resid_post", "final_norm"]
    assert abs(events[0]["step"] - 1200) <= 200 and abs(events[1]["step"] - 2400) <= 200
    ev = events[0]
    assert ev["kind"] == "compression_onset" and ev["metric"] == "entropy" and ev["p_value"] <= 0.05
    assert ev["text"].startswith(f"blocks.3.resid_post started compressing at step {ev['step']}")
    assert ev["text"] == format_event(ev)

    assert [e["layer"] for e in detect_phases(df, metric="effective_rank", correction="bonferroni")] == [
        "blocks.3.resid_post", "final_norm"]
    assert [e["layer"] for e in detect_phases(df, layers=["final_norm"])] == ["final_norm"]
    dom = detect_phases(df, domain="prose")
    assert len(dom) == 1 and abs(dom[0]["step"] - 800) <= 200 and "[prose]" in dom[0]["text"]
    assert detect_phases(df, metric="twonn_id") == []
    with pytest.raises(ValueError, match="step"):
        detect_phases(df.drop(columns="step"))


def test_detect_phases_alpha_req_uses_the_opposite_direction():
    rng = np.random.default_rng(7)
    steps = np.arange(0, 3000, 100)
    df = pd.DataFrame({"step": steps, "repr/blocks.0.resid_post/alpha_req":
                       2.0 - piecewise(steps, 1500) + rng.normal(0, 0.03, steps.size)})
    (ev,) = detect_phases(df, metric="alpha_req")
    assert abs(ev["step"] - 1500) <= 200 and "alpha_req rises after it" in ev["text"]


def test_hinge_stats_in_knot_chunks_equal_one_block(monkeypatch):
    """The residuals are formed a few knots at a time (bounded memory); the statistics must not change."""
    from diagnostics.representation import _phases as phases

    rng = np.random.default_rng(3)
    n = 60
    t = np.linspace(0.0, 1.0, n)
    Y = rng.normal(size=(n, 7)) + np.minimum(t, 0.5)[:, None]
    knots = np.arange(3, n - 3)
    whole = phases._hinge_stats(t, Y, knots)
    monkeypatch.setattr(phases, "_RESID_ELEMENTS", 5 * n * Y.shape[1])  # 5 knots per chunk, last one short
    chunked = phases._hinge_stats(t, Y, knots)
    for a, b in zip(whole, chunked):
        np.testing.assert_array_equal(a, b)
