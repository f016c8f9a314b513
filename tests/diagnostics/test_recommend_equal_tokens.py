"""Ground truth for the equal-token batch comparison (diagnostics.recommend.equal_tokens_recommendation, Merrill
et al.'s critical batch) and the one batch answer that follows it (combined_batch_recommendation, rule 0)."""

import math
from statistics import NormalDist
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from diagnostics.recommend import (Recommendation, RecommendationError, combined_batch_recommendation,
                                   equal_tokens_recommendation, equal_tokens_table, recommend_run)

START = 240


def parent(lr=3e-3, batch=16, seed=0):
    phases = [{"name": "pretrain", "steps": 240, "lr": lr, "batch_size": batch, "seq_len": 128, "grad_accum": 1},
              {"name": "midtrain", "steps": 120, "lr": lr, "batch_size": batch, "seq_len": 128, "grad_accum": 1}]
    return SimpleNamespace(path="parent", metrics=pd.DataFrame({"step": [0, START]}), parent=None,
                           config={"seed": seed, "phases": phases},
                           info={"phase_starts": [0, 240], "phase_names": ["pretrain", "midtrain"], "total_steps": 360})


def branch(batch, final, *, seed=0, lr_mult=1.0, n_evals=6, noise=None, rng=None):
    """A branch of parent() at ``batch`` whose mean validation loss falls linearly from 3.0 to ``final``
    (plus optional iid noise of sd ``noise`` on the points before the last)."""
    steps = np.linspace(START, START + 120 * 16 // batch, n_evals).round()
    loss = np.linspace(3.0, final, n_evals)
    if noise:
        loss[1:-1] += rng.normal(0, noise, n_evals - 2)
    df = pd.DataFrame({"step": steps, "val/a/loss": loss - 0.1, "val/b/loss": loss + 0.1})
    k = batch / 16
    phases = [{"name": "pretrain", "steps": 240, "lr": 3e-3, "batch_size": 16, "seq_len": 128, "grad_accum": 1},
              {"name": "midtrain", "steps": 120 * 16 // batch, "lr": 3e-3 * math.sqrt(k) * lr_mult,
               "batch_size": batch, "seq_len": 128, "grad_accum": 1}]
    return SimpleNamespace(path=f"bs{batch}-lr{lr_mult:g}-seed{seed}", metrics=df, parent={"run": "parent",
                           "step": START}, config={"seed": seed, "phases": phases},
                           info={"phase_starts": [0, 240], "phase_names": ["pretrain", "midtrain"],
                                 "total_steps": 240 + 120 * 16 // batch})


def flat_then_rising(b, b_star=32, base=2.0, slope=0.1):
    """Final loss at equal tokens: flat up to b_star, then rising by ``slope`` per doubling."""
    return base + slope * max(0.0, math.log2(b / b_star))


def test_replicates_give_the_seed_noise_and_the_largest_batch_within_it():
    d = 0.01   # seeds 0 and 1 end at J -+ d: the pooled sample sd is d sqrt(2) exactly
    runs = [branch(b, flat_then_rising(b) + (-d if s == 0 else d), seed=s) for b in (8, 16, 32, 64, 128) for s in (0, 1)]
    groups, sigma, how, start = equal_tokens_table(parent(), runs)
    assert start == START and "pooled spread" in how
    assert sigma == pytest.approx(d * math.sqrt(2), rel=1e-9)
    assert [g["n"] for g in groups] == [2] * 5 and all(g["seeds"] == [0, 1] for g in groups)
    rec = equal_tokens_recommendation(parent(), runs)
    # margin: z(0.9) * sqrt(2 sigma^2 / 2) = 1.645 * sigma = 0.0233 < 0.1 (the rise one doubling above B* = 32)
    assert rec.name == "equal_tokens_batch" and rec.value == 32
    assert rec.low == 8 and rec.high == 32
    assert rec.evidence["phase"] == "midtrain" and rec.evidence["seq_len"] == 128
    assert "lower bound" not in rec.summary
    # a margin wider than the rise above B* admits 64 too; a relative tolerance does the same
    z = NormalDist().inv_cdf(0.95)
    wide = [branch(b, flat_then_rising(b, slope=0.8 * z * d * math.sqrt(2)) + (-d if s == 0 else d), seed=s)
            for b in (8, 16, 32, 64, 128) for s in (0, 1)]
    assert equal_tokens_recommendation(parent(), wide).value == 64      # 0.8 margin in, 1.6 margin out
    assert equal_tokens_recommendation(parent(), runs, tolerance=0.06).value == 64   # 0.1 < 6% of 1.99 = 0.119


def test_the_walk_stops_at_the_first_batch_outside_the_margin():
    finals = {8: 2.0, 16: 2.0, 32: 2.3, 64: 2.0}   # 64 is as good as the best, but 32 between them is not
    runs = [branch(b, J + (0.005 if s else -0.005), seed=s) for b, J in finals.items() for s in (0, 1)]
    rec = equal_tokens_recommendation(parent(), runs)
    assert rec.value == 16
    # the best batch is the largest swept: a lower bound, and the summary says so
    runs = [branch(b, 3.0 - 0.1 * math.log2(b), seed=s) for b in (8, 16, 32) for s in (0, 1)]
    rec = equal_tokens_recommendation(parent(), runs)
    assert rec.value == 32 and "lower bound" in rec.summary and "smallest" not in rec.summary
    # the best is the smallest swept: the summary says a smaller batch may be better still
    runs = [branch(b, 2.0 + 0.1 * math.log2(b), seed=s) for b in (8, 16, 32) for s in (0, 1)]
    rec = equal_tokens_recommendation(parent(), runs)
    assert rec.value == 8 and "smallest batch swept" in rec.summary


def test_without_replicates_the_scatter_of_the_curves_is_the_noise():
    rng = np.random.default_rng(0)
    runs = [branch(b, flat_then_rising(b), n_evals=40, noise=0.01, rng=rng) for b in (8, 16, 32, 64)]
    groups, sigma, how, _ = equal_tokens_table(parent(), runs)
    assert "scatter" in how
    # robust scale of first differences of a line with iid N(0, 0.01) noise: 0.01 within sampling error
    assert 0.006 < sigma < 0.015
    assert equal_tokens_recommendation(parent(), runs).value == 32


def test_an_lr_grid_keeps_the_best_lr_per_batch():
    runs = [branch(b, flat_then_rising(b) + (0.2 if m != 1.0 else 0.0), lr_mult=m, seed=s)
            for b in (8, 16, 32, 64) for m in (0.5, 1.0) for s in (0, 1)]
    groups, sigma, _, _ = equal_tokens_table(parent(), runs)
    kept = [g for g in groups if g["kept"]]
    # the multiplier is against the parent's LR: sqrt(k) times the grid's 1.0 for the kept ones
    assert [g["lr_mult"] for g in kept] == pytest.approx([math.sqrt(b / 16) for b in (8, 16, 32, 64)])
    assert sigma == pytest.approx(0.0)
    rec = equal_tokens_recommendation(parent(), runs)
    assert rec.value == 32 and "not the best LR" in str(rec.evidence)


def test_errors():
    with pytest.raises(RecommendationError, match=">= 2 batch sizes"):
        equal_tokens_recommendation(parent(), [branch(16, 2.0, seed=0), branch(16, 2.0, seed=1)])


def rec(name, value, estimate, phase, seq_len, branch_step=None):
    return Recommendation(name=name, value=value, unit="sequences per optimizer step", low=estimate * 0.8,
                          high=estimate * 1.2, level=0.9, estimate=estimate, summary=f"{name} says {value}",
                          evidence={"phase": phase, "seq_len": seq_len}, assumptions=[f"{name} assumption"],
                          branch_step=branch_step)


def test_the_one_answer_follows_the_equal_token_comparison():
    equal = rec("equal_tokens_batch", 16, 1.85, "midtrain", 128, branch_step=START)
    bcrit = rec("critical_batch_size", 24, 24.9, "midtrain", 128, branch_step=START)
    gns = rec("batch_size", 52, 52.0, "long_context", 256)
    one = combined_batch_recommendation(parent(), gns, bcrit, equal)
    assert one.name == "batch_size" and one.value == 16
    assert one.evidence["follows"] == "the branches at equal tokens"
    assert "B_crit" in one.evidence["why"] and "24.9" in one.evidence["why"]
    assert "long_context" in one.evidence["why"] and "does not apply" in one.evidence["why"]
    assert one.summary.startswith("follows the branches at equal tokens: 16 sequences for phase 'midtrain' at seq_len 128")
    assert one.patch["phases"]["midtrain"]["batch_size"] == 16 and one.branch_step == START
    # McCandlish unavailable: still follows the equal-token answer and says why B_crit is missing
    one = combined_batch_recommendation(parent(), "no GNS", "fewer than 2 branches reached the target", equal)
    assert one.value == 16 and "not available" in one.evidence["why"]
    # no equal-token answer: the old rule (B_crit)
    assert combined_batch_recommendation(parent(), gns, bcrit, "why not").value == 24


def test_recommend_run_makes_both_entries_and_one_batch_answer():
    d = 0.01
    runs = [branch(b, flat_then_rising(b) + (-d if s == 0 else d), seed=s) for b in (8, 16, 32, 64) for s in (0, 1)]
    recs, why = recommend_run(parent(), runs)
    by = {r.name: r for r in recs}
    assert by["equal_tokens_batch"].value == 32
    # the sweep's branches at the run's own batch (16, same LR: kind "same") are the sweep's point at 16
    assert any(k.startswith("batch 16 ") for k in by["equal_tokens_batch"].evidence)
    assert "batch 16" in by["critical_batch_size"].evidence
    assert by["batch_size"].value == 32 and by["batch_size"].evidence["follows"] == "the branches at equal tokens"
