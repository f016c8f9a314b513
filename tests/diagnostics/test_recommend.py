"""diagnostics.recommend.batch_size_recommendation: the batch-size recommendation against a problem with a
known noise scale, its bootstrap range's coverage, the clear errors, and the CLI end to end (a real run,
the written config branched and trained)."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from diagnostics.recommend import (Recommendation, RecommendationError, batch_size_recommendation,
                                   block_bootstrap_ratio)

D, TRACE, GRAD_SQ = 50, 40.0, 1.0  # per-example gradients g_i = G + e_i, |G|^2 = 1, tr(Sigma) = 40


def synthetic_metrics(steps=120, b_small=4, accum=8, seed=0, drift=0.0):
    """What the GNS hook logs in microbatch mode on a problem whose B_noise is exactly TRACE / GRAD_SQ
    (x (1 + drift) by the end: tr(Sigma) may grow along the steps)."""
    rng = np.random.default_rng(seed)
    G = np.zeros(D)
    G[0] = math.sqrt(GRAD_SQ)
    rows = []
    for s in range(steps):
        trace = TRACE * (1 + drift * s / max(1, steps - 1))
        ex = G + rng.normal(scale=math.sqrt(trace / D), size=(b_small * accum, D))
        micro = ex.reshape(accum, b_small, D).mean(1)
        rows.append({"step": s, "gns/small_sq": float((micro ** 2).sum(1).mean()),
                     "gns/big_sq": float((ex.mean(0) ** 2).sum()), "gns/b_small": float(b_small),
                     "gns/b_big": float(b_small * accum), "train/seq_len": 64.0})
    return pd.DataFrame(rows)


def test_estimate_matches_the_known_noise_scale_and_renders():
    rec = batch_size_recommendation(synthetic_metrics(steps=400), window=400)
    truth = TRACE / GRAD_SQ
    assert rec.estimate == pytest.approx(truth, rel=0.1)
    assert rec.low < truth < rec.high and rec.low > 0
    assert rec.value % 4 == 0 and abs(rec.value - rec.estimate) <= 2  # a runnable multiple of the micro-batch
    assert rec.evidence["B_simple (tokens)"] == pytest.approx(rec.estimate * 64)
    text = rec.to_text()
    assert "batch_size" in text and "Merrill" in text and "tokens" in text
    back = json.loads(rec.to_json())
    assert back["name"] == "batch_size" and back["value"] == rec.value and back["assumptions"]
    assert rec.patch == {}  # a bare DataFrame: no phases to patch


def test_bootstrap_range_covers_the_truth_at_its_level():
    """Over 40 independent synthetic runs the 80% range holds the true B_noise in 65-95% of them
    (binomial sd ~6%), so it is neither a point nor a wide band."""
    truth = TRACE / GRAD_SQ
    hits, widths = 0, []
    for seed in range(40):
        rec = batch_size_recommendation(synthetic_metrics(steps=60, seed=seed), window=60, level=0.8,
                                        n_boot=400, seed=seed)
        hits += rec.low <= truth <= rec.high
        widths.append((rec.high - rec.low) / truth)
    assert 26 <= hits <= 38, hits
    assert 0.05 < np.median(widths) < 1.5


def test_block_bootstrap_basics():
    num, den = np.full(10, 3.0), np.full(10, 1.5)
    lo, hi, reps = block_bootstrap_ratio(num, den, n_boot=50)
    assert lo == hi == 2.0 and reps.shape == (50,)
    lo, hi, _ = block_bootstrap_ratio(np.ones(6), np.array([1, -5, 1, -5, 1, 1.0]), n_boot=200, level=0.9)
    assert hi == math.inf  # replicates without signal: unbounded above


def test_rising_noise_scale_is_reported():
    rec = batch_size_recommendation(synthetic_metrics(steps=300, drift=3.0), window=300)
    assert "rising" in rec.would_change[0]


def test_clear_errors():
    df = synthetic_metrics(steps=20)
    with pytest.raises(RecommendationError, match="GradientNoiseScale"):
        batch_size_recommendation(df.drop(columns=["gns/big_sq"]))
    with pytest.raises(RecommendationError, match="at least 8"):
        batch_size_recommendation(df.iloc[:5])
    noisy = df.assign(**{"gns/big_sq": df["gns/small_sq"] * 2})  # |G|^2 estimates all negative
    with pytest.raises(RecommendationError, match="not defined"):
        batch_size_recommendation(noisy)
    with pytest.raises(RecommendationError, match="built-in loop"):
        batch_size_recommendation(df, phase="pretrain")


def test_cli_end_to_end(tmp_path, capsys):
    """A real run: `midtrain recommend` prints the recommendation, saves recommendations.json, writes a
    config with the patch, and that config branches the run from a checkpoint and trains."""
    from diagnostics.runs import load_run
    from midtrain.cli import main
    from midtrain.config import dumps_toml, load_toml
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(12, 2, 2), checkpoint_every=6, eval_every=100)
    cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(path), "--out", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    # --decay-phase: the decay fraction inside one phase (without it lr_decay is the anneal start, test_probes.py)
    assert main(["recommend", str(run_dir), "--phase", "pretrain", "--decay-phase", "long_context",
                 "--write-config", str(tmp_path / "rec.toml")]) == 0
    out = capsys.readouterr().out
    assert "batch_size:" in out and "lr_decay:" in out and "rec.toml" in out
    saved = json.loads((run_dir / "recommendations.json").read_text())
    rec, dec = [r for r in saved["recommendations"] if r["name"] != "batch_schedule"]
    assert rec["name"] == "batch_size" and rec["value"] >= 1 and rec["patch"]["phases"]["pretrain"]
    assert dec["name"] == "lr_decay" and 0 < dec["value"] <= 1
    assert "data_switch" in saved["not_available"] and set(saved["not_available"]) <= {"data_switch", "batch_schedule",
                                                                                      "mixture", "long_context"}
    new = load_toml(tmp_path / "rec.toml")  # every patch applied
    pre = next(p for p in new.phases if p.name == "pretrain")
    assert pre.batch_size == rec["value"] and pre.grad_accum == rec["patch"]["phases"]["pretrain"]["grad_accum"]
    assert next(p for p in new.phases if p.name == "long_context").decay_fraction == dec["value"]
    assert main(["train", "--from", str(run_dir), "--step", "6", "--config", str(tmp_path / "rec.toml"),
                 "--out", str(tmp_path / "branch"), "--quiet", "--until", "8"]) == 0
    b = load_run(tmp_path / "branch")
    assert b.parent["step"] == 6 and set(b.metrics.dropna(subset=["train/loss"])["train/batch_size"]) == {rec["value"]}
    assert main(["recommend", str(tmp_path / "nothing")]) != 0  # not a run: a clear message, no traceback
    # one recommendation that cannot be made is reported with its reason; the other still prints and saves
    assert main(["recommend", str(run_dir), "--phase", "pretrain", "--decay-phase", "nope"]) == 0
    out = capsys.readouterr().out
    assert "batch_size:" in out and "lr_decay: not available: no phase 'nope'" in out
    saved = json.loads((run_dir / "recommendations.json").read_text())
    assert [r["name"] for r in saved["recommendations"]] == ["batch_size"] and "lr_decay" in saved["not_available"]
    assert isinstance(Recommendation, type)
