"""Ground truth for the branch critical-batch fit (diagnostics.recommend)."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from diagnostics.recommend import RecommendationError, critical_batch_recommendation
from diagnostics.recommend import steps_to_target


def fake_branch(batch, s_min_per_nat, b_noise, *, start=100, l0=4.0, n_evals=12, horizon=None, domains=2):
    """A branch whose loss falls LINEARLY, at rate 1 / (c (1 + b_noise / B)) nats per step, so the steps
    to reach ANY target follow S = S_min (1 + b_noise / B) exactly and linear interpolation is exact."""
    rate = 1.0 / (s_min_per_nat * (1 + b_noise / batch))
    horizon = horizon or int(3.0 / rate)
    steps = np.linspace(start, start + horizon, n_evals).round()
    loss = l0 - rate * (steps - start)
    df = pd.DataFrame({"step": steps})
    for i in range(domains):  # domain losses differ by +-d; their mean is the curve above
        df[f"val/d{i}/loss"] = loss + (i - (domains - 1) / 2) * 0.1
    return SimpleNamespace(path=f"bs{batch}", metrics=df, parent={"run": "p", "step": start},
                           config={"phases": [{"name": "p", "batch_size": batch}]},
                           info={"phase_starts": [0], "phase_names": ["p"], "total_steps": 10**6})


def test_recovers_b_crit_exactly():
    c, b_noise = 40.0, 24.0
    branches = [fake_branch(b, c, b_noise) for b in (4, 8, 16, 32, 64)]
    rec = critical_batch_recommendation(None, branches)
    assert abs(rec.estimate - b_noise) < 1e-6 * b_noise
    assert rec.low == pytest.approx(b_noise, rel=1e-6) and rec.high == pytest.approx(b_noise, rel=1e-6)
    assert rec.value == 24
    assert rec.evidence["fit rms residual of 1 - S_min/S - E_min/E"] < 1e-9
    # default target: the worst best loss; S_min = c * (l0 - target)
    tgt = rec.evidence["target validation loss"]
    assert rec.evidence["S_min (steps)"] == pytest.approx(c * (4.0 - tgt), rel=1e-6)
    # one domain: the same B_crit (curves shifted)
    assert critical_batch_recommendation(None, branches, domain="d0", target=3.5).estimate == pytest.approx(b_noise, rel=1e-6)


def test_noise_widens_range():
    rng = np.random.default_rng(0)
    branches = [fake_branch(b, 40.0, 24.0) for b in (4, 8, 16, 32, 64)]
    for br in branches:
        for c in br.metrics.columns[1:]:
            br.metrics[c] += rng.normal(0, 0.01, len(br.metrics))
        br.metrics.loc[0, br.metrics.columns[1:]] = [3.95, 4.05]
    rec = critical_batch_recommendation(None, branches)
    assert rec.low < rec.high and rec.low <= rec.estimate <= rec.high
    assert 10 < rec.estimate < 60


def test_steps_to_target_interpolates():
    s, l = [0, 10, 20, 30], [4.0, 3.0, 2.5, 2.0]
    assert steps_to_target(s, l, 3.0) == 10
    assert steps_to_target(s, l, 2.75) == pytest.approx(15.0)
    assert steps_to_target(s, l, 3.6) == pytest.approx(4.0)
    assert math.isnan(steps_to_target(s, l, 1.9))
    assert steps_to_target([0, 10, 20], [4.0, 2.0, 3.5], 3.0) == pytest.approx(5.0)  # first crossing


def test_errors():
    one = [fake_branch(8, 40, 24), fake_branch(8, 40, 24)]
    with pytest.raises(RecommendationError, match="2 different batch sizes"):
        critical_batch_recommendation(None, one)
    two = [fake_branch(8, 40, 24), fake_branch(16, 40, 24)]
    with pytest.raises(RecommendationError, match="reached validation loss"):
        critical_batch_recommendation(None, two, target=0.5)   # nobody gets there
    notbranch = fake_branch(8, 40, 24)
    notbranch.parent = None
    with pytest.raises(RecommendationError, match="not a branch"):
        critical_batch_recommendation(None, [notbranch, two[1]])
    other = fake_branch(16, 40, 24, start=50)
    with pytest.raises(RecommendationError, match="different steps"):
        critical_batch_recommendation(None, [two[0], other])


def test_parent_eval_at_branch_point_is_used():
    b = [fake_branch(B, 40.0, 24.0) for B in (8, 32)]
    parent = SimpleNamespace(info={}, config={}, metrics=pd.DataFrame({"step": [0, 100], "val/d0/loss": [9.0, 3.95], "val/d1/loss": [9.0, 4.05]}))
    for br in b:
        br.metrics = br.metrics.iloc[1:].reset_index(drop=True)   # the branch did not evaluate at S
    rec = critical_batch_recommendation(parent, b, target=3.5)
    assert rec.estimate == pytest.approx(24.0, rel=1e-6)
    assert "not available" in str(rec.evidence["parent's gradient noise scale"])


def test_lr_grid_keeps_the_best_branch_per_batch():
    """Several branches per batch (an LR grid): the fit keeps the lowest final loss per batch, so a worse
    LR at one batch (a slower loss) does not move B_crit; the evidence names each branch's LR vs the parent's."""
    c, b_noise = 40.0, 24.0
    branches = []
    for b in (4, 8, 16, 32, 64):
        for mult, slow in ((1.0, 1.0), (2.0, 1.5)):    # the x2 branch falls 1.5x slower: never kept
            br = fake_branch(b, c * slow, b_noise, horizon=int(3.0 * c * (1 + b_noise / b)))
            br.config["phases"][0]["lr"] = 1e-3 * (b / 16) ** 0.5 * mult
            br.path = f"bs{b}-lr{mult:g}"
            branches.append(br)
    parent = SimpleNamespace(path="p", metrics=pd.DataFrame({"step": [0]}), parent=None,
                             config={"phases": [{"name": "p", "batch_size": 16, "lr": 1e-3}]},
                             info={"phase_starts": [0], "phase_names": ["p"], "total_steps": 10**6})
    rec = critical_batch_recommendation(parent, branches)
    assert rec.estimate == pytest.approx(b_noise, rel=1e-6)
    note = rec.evidence["batch 64 LR (vs the parent's)"]
    assert "LR x 2 " in note and "LR x 4 " in note and "kept bs64-lr1" in note
    assert any("scaled per batch" in a for a in rec.assumptions)
    unfair = [fake_branch(b, c, b_noise) for b in (8, 16, 32)]
    for br in unfair:
        br.config["phases"][0]["lr"] = 1e-3
    rec = critical_batch_recommendation(parent, unfair)
    assert any("kept the parent's LR" in a for a in rec.assumptions)


def test_replicates_are_averaged_before_the_fit():
    """Replicates (midtrain sweep --seeds) at +-0.05 around the exact curve average back to it: B_crit exact;
    the minimum over seeds (what keeping the best branch per batch would do) would not be."""
    reps = []
    for b in (4, 8, 16, 32, 64):
        for sign, seed in ((1, 0), (-1, 1)):
            br = fake_branch(b, 40.0, 24.0)
            br.metrics.loc[1:, ["val/d0/loss", "val/d1/loss"]] += sign * 0.05
            br.config["seed"] = seed
            reps.append(br)
    rec = critical_batch_recommendation(None, reps, target=3.0)
    assert rec.estimate == pytest.approx(24.0, rel=1e-6)
    assert "mean of 2" in str(rec.evidence)
