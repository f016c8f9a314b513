"""The one batch answer from the noise scale and the branches (diagnostics.recommend.combined_batch_recommendation):
the documented rule on constructed evidence."""

import math
from types import SimpleNamespace

import pytest

from diagnostics.recommend import Recommendation, RecommendationError, combined_batch_recommendation


def rec(name, value, estimate, phase, seq_len, branch_step=None):
    return Recommendation(name=name, value=value, unit="sequences per optimizer step", low=estimate * 0.8,
                          high=estimate * 1.2, level=0.9, estimate=estimate, summary=f"{name} says {value}",
                          evidence={"phase": phase, "seq_len": seq_len}, assumptions=[f"{name} assumption"],
                          patch={"phases": {phase: {"batch_size": value}}} if name == "batch_size" else {},
                          branch_step=branch_step)


def parent():
    phases = [{"name": "pretrain", "steps": 240, "lr": 3e-3, "final_lr": 0.0, "batch_size": 16, "grad_accum": 2,
               "seq_len": 128},
              {"name": "midtrain", "steps": 120, "lr": 3e-3, "final_lr": 3e-4, "batch_size": 16, "grad_accum": 2,
               "seq_len": 128},
              {"name": "long_context", "steps": 40, "lr": 3e-4, "final_lr": 3e-5, "batch_size": 8, "grad_accum": 2,
               "seq_len": 256}]
    return SimpleNamespace(metrics=None, config={"phases": phases},
                           info={"phase_starts": [0, 240, 360], "phase_names": [p["name"] for p in phases],
                                 "total_steps": 400})


def test_same_phase_follows_the_branches_and_patches_the_tested_branch():
    gns = rec("batch_size", 8, 7.0, "midtrain", 128)
    br = rec("critical_batch_size", 64, 60.0, "midtrain", 128, branch_step=300)
    one = combined_batch_recommendation(parent(), gns, br)
    assert one.name == "batch_size" and one.value == 64 and one.estimate == 60.0
    assert one.evidence["phase"] == "midtrain" and one.evidence["seq_len"] == 128
    assert one.evidence["follows"].startswith("the branches")
    assert "win" in one.evidence["why"] and "Merrill" in one.evidence["why"] and "disagree" in one.evidence["why"]
    assert one.evidence["B_crit / B_simple"] == pytest.approx(60 / 7)
    # the patch: from step 300 (60 steps into midtrain) batch 64 keeps the tokens, LR x sqrt(4) = 2, exactly
    p = one.patch["phases"]
    assert set(p) == {"midtrain"}                      # pretrain is before the branch point, long_context other seq
    assert p["midtrain"]["lr"] == 6e-3 and p["midtrain"]["final_lr"] == 6e-4
    assert p["midtrain"]["steps"] == 60 + 60 * 16 // 64 and p["midtrain"]["batch_size"] == 64
    assert one.branch_step == 300 and "--step 300" in one.check
    agree = combined_batch_recommendation(parent(), rec("batch_size", 48, 40.0, "midtrain", 128), br)
    assert "agree within 2x" in agree.evidence["why"]


def test_different_phases_says_so():
    gns = rec("batch_size", 32, 30.0, "long_context", 256)
    br = rec("critical_batch_size", 8, 9.5, "midtrain", 128, branch_step=240)
    one = combined_batch_recommendation(parent(), gns, br)
    why = one.evidence["why"]
    assert one.value == 8 and "different phases" in why
    assert "phase 'long_context' at seq_len 256" in why and "phase 'midtrain' at seq_len 128" in why
    assert "lower bound" in why and "midtrain sweep" in why
    assert one.summary.startswith("follows the branches: 8 sequences for phase 'midtrain' at seq_len 128")
    p = one.patch["phases"]["midtrain"]
    assert p["lr"] == pytest.approx(3e-3 * math.sqrt(0.5), rel=1e-15) and p["steps"] == 240


def test_one_side_missing_and_both_missing():
    gns = rec("batch_size", 16, 14.0, "pretrain", 128)
    one = combined_batch_recommendation(parent(), gns, "fewer than 2 branches reached the target")
    assert one.value == 16 and one.patch == gns.patch and one.evidence["follows"] == "the gradient noise scale"
    assert "fewer than 2 branches" in one.evidence["why"] and "phase 'pretrain' at seq_len 128" in one.summary
    br = rec("critical_batch_size", 24, 22.0, "pretrain", 128, branch_step=200)
    one = combined_batch_recommendation(parent(), "no GNS columns", br)
    assert one.value == 24 and "no GNS columns" in one.evidence["why"]
    with pytest.raises(RecommendationError, match="no GNS columns.*too few branches"):
        combined_batch_recommendation(parent(), "no GNS columns", "too few branches")
    # a parent without a config of the built-in loop: the answer without a patch
    bare = combined_batch_recommendation(SimpleNamespace(metrics=None, config={}, info={}), gns, br)
    assert bare.patch == {} and bare.branch_step is None and bare.value == 24
