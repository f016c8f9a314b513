"""Ground truth for the batch-size ramp (diagnostics.recommend.batch_schedule_recommendation): a noise scale
that grows as a known power of the tokens gives the switch points T_k = T0 k^(1/p), the LR x sqrt(k), the
phases split where the LR is constant; bad input gives clear errors."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from diagnostics.recommend import RecommendationError, batch_schedule_recommendation, ramp_points
from midtrain.config import TrainConfig, default_config

B, SEQ, C, P = 16, 128, 2e-4, 1.5


def fake_run(p=P, steps=(1000, 500), checkpoint=500, gns=True):
    cfg = default_config().to_dict()
    cfg["phases"] = cfg["phases"][:2]
    for q, n in zip(cfg["phases"], steps):
        q.update(steps=n, batch_size=B, grad_accum=2, seq_len=SEQ, warmup_steps=0)
    cfg["phases"][0]["decay"] = "constant"
    n = sum(steps)
    tok = (np.arange(n) + 1.0) * B * SEQ                         # train/tokens: steps 0..k
    trace = C * tok ** p                                         # tr(Sigma), |G|^2 = 1: B_simple = C T^p
    df = pd.DataFrame({"step": np.arange(n), "train/tokens": tok})
    if gns:
        bs, bb = 8.0, 16.0
        df["gns/small_sq"], df["gns/big_sq"] = 1 + trace / bs, 1 + trace / bb
        df["gns/b_small"], df["gns/b_big"] = bs, bb
    return SimpleNamespace(metrics=df, config=cfg, path="fake",
                           info={"phase_starts": [0, steps[0]], "phase_names": ["pretrain", "midtrain"],
                                 "total_steps": n},
                           checkpoints=lambda: [(checkpoint, None), (n, None)])


def test_ramp_points_exact():
    assert ramp_points(1.0, 0.5, 100.0, 1000.0) == [(2, 400.0), (3, 900.0)]
    assert ramp_points(1.0, 1.0, 10.0, 35.0) == [(2, 20.0), (3, 30.0)]
    assert ramp_points(1.0, -1.0, 10.0, 1e9) == [] and ramp_points(1.0, 1.0, 10.0, 15.0) == []


def test_known_power_law_gives_the_switch_points_and_the_patch():
    rec = batch_schedule_recommendation(fake_run())
    t0 = 500 * B * SEQ
    assert rec.name == "batch_schedule" and rec.estimate == pytest.approx(P, rel=0.01)
    assert rec.evidence["phase"] == "pretrain" and rec.evidence["seq_len"] == SEQ and rec.branch_step == 500
    # T_2 = T0 2^(1/p): inside pretrain (constant LR) -> split there; T_3 falls in midtrain (it decays) -> moved
    pts = [tuple(float(x) for x in s.split(": ")) for s in rec.evidence["switch points (k: tokens)"].split(", ")]
    assert [k for k, _ in pts] == [k for k in range(2, 10) if k ** (1 / P) < 3]     # budget left: 2 T0
    for k, tk in pts:
        assert tk == pytest.approx(t0 * k ** (1 / P), rel=0.005)
    t2 = pts[0][1]
    assert "midtrain" in rec.evidence["switches moved"]
    phases = rec.patch["phases"]
    assert [q["name"] for q in phases] == ["pretrain", "pretrain.bs32", "midtrain"]
    assert [q["batch_size"] for q in phases] == [16, 32, 32] and rec.value == 32
    lr = default_config().phases[0].lr
    assert phases[0]["lr"] == lr and phases[1]["lr"] == pytest.approx(lr * math.sqrt(2), rel=1e-15)
    assert phases[2]["final_lr"] == pytest.approx(default_config().phases[1].final_lr * math.sqrt(2), rel=1e-15)
    # the split keeps the tokens: pretrain up to T_2 at 16, the rest of pretrain at 32, midtrain at 32
    steps_to_t2 = t2 / (B * SEQ)
    assert phases[0]["steps"] == pytest.approx(steps_to_t2, abs=1)
    tokens = sum(q["steps"] * q["batch_size"] for q in phases) * SEQ
    assert tokens == pytest.approx(1500 * B * SEQ, rel=0.002)
    cfg = TrainConfig.from_dict(fake_run().config).with_patch(rec.patch).validate()
    assert cfg.phase_at(500)[1].name == "pretrain" and cfg.lr_at(cfg.phase_starts()[1]) == pytest.approx(
        lr * math.sqrt(2))


def test_clear_errors():
    with pytest.raises(RecommendationError, match="noise-scale trajectory.*GradientNoiseScale"):
        batch_schedule_recommendation(fake_run(gns=False))
    with pytest.raises(RecommendationError, match="too few points"):
        batch_schedule_recommendation(fake_run(checkpoint=6), from_step=6)
    with pytest.raises(RecommendationError, match="does not rise"):
        batch_schedule_recommendation(fake_run(p=-0.5))
    bare = fake_run()
    bare.info = {}
    with pytest.raises(RecommendationError, match="built-in loop"):
        batch_schedule_recommendation(bare)
