"""midtrain validate: plan construction (no training), one end-to-end micro run, bad input."""

import json
import math
import os

import numpy as np
import pytest

from midtrain.cli import main
from midtrain.loop import train
from midtrain.probes import plan_anneal_probes, run_probes
from midtrain.validate import plan_validation

from .conftest import micro_config


def _quiet(cfg):
    cfg.monitor.gns = cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    return cfg


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A micro run: stable 'pretrain' to step 8, decaying 'midtrain' to 14, 'long_context' to 18;
    checkpoints at 5 and 8 (phase end) and later."""
    out = str(tmp_path_factory.mktemp("v") / "run")
    train(_quiet(micro_config()), out)
    run_probes(out, plan_anneal_probes(out, [5], [3]))   # one anneal probe: RUN-probes/anneal5-3, 3 steps
    return out


def _tokens(cfg, lo):
    return sum(cfg.phase_at(k)[1].batch_size * cfg.phase_at(k)[1].seq_len for k in range(lo, cfg.total_steps()))


def test_plans_shapes_switches_and_budget(parent):
    plans, info = plan_validation(parent, 5, ["own", "cosine", "wsd", "switch0", "switch50", "switch80"])
    by = {p.name: p.config for p in plans}
    own = by["own"]
    S, E = 5, 14
    assert info["stretch"] == [S, E] and info["remaining_steps"] == 9
    for c in by.values():  # same total tokens, same steps before S, later phase kept
        assert _tokens(c, 0) == _tokens(own, 0) and c.total_steps() == own.total_steps()
        assert [c.lr_at(k) for k in range(S)] == [own.lr_at(k) for k in range(S)]
        assert [c.lr_at(k) for k in range(E, 18)] == [own.lr_at(k) for k in range(E, 18)]
    peak = 3e-3
    n = E - S   # cosine over the stretch to 10% of peak, the loop's convention p = (t + 1) / n
    want = [0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (t + 1) / n)) for t in range(n)]
    assert np.allclose([by["cosine"].lr_at(k) for k in range(S, E)], want)
    assert by["cosine"].lr_at(E - 1) == pytest.approx(0.1 * peak)
    D = E - round(0.2 * E)       # WSD: 20% of the run's steps to E, 1-sqrt to the decaying phase's final_lr
    nd = E - D
    want = [peak] * (D - S) + [3e-4 + (peak - 3e-4) * (1 - math.sqrt((t + 1) / nd)) for t in range(nd)]
    assert np.allclose([by["wsd"].lr_at(k) for k in range(S, E)], want)
    mix = lambda c, k: c.phase_at(k)[1].mixture  # noqa: E731
    new = own.phases[1].mixture
    assert mix(by["wsd"], D - 1) != new and mix(by["wsd"], D) == new
    for name, f in (("switch0", 0.0), ("switch50", 0.5), ("switch80", 0.8)):
        c, Q = by[name], S + round(f * (E - S))
        assert [c.lr_at(k) for k in range(S, 18)] == pytest.approx([own.lr_at(k) for k in range(S, 18)])
        assert all(mix(c, k) == new for k in range(Q, E))
        assert all(mix(c, k) != new for k in range(S, Q))
    assert by["switch80"].phases[-2].lr_span is not None   # the switch splits the decay, LR unchanged


def test_recommended_and_identical_plans(parent):
    plans, info = plan_validation(parent, 8)
    names = [p.name for p in plans]
    assert "recommended" in names and "recommendations" in info
    assert "switch0" in info.get("dropped", {}) or "switch0" not in names  # at S = 8 = the run's switch
    rec = next(p for p in plans if p.name == "recommended")
    assert any("lr_decay" in x or "anneal" in x for x in rec.notes)
    assert any("data_switch" in x for x in rec.notes) and any("batch_size" in x for x in rec.notes)


def test_bad_input(parent, tmp_path, capsys):
    assert main(["validate", parent, "--step", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint at step" in err and "5" in err
    out = tmp_path / "exists"
    out.mkdir()
    assert main(["validate", parent, "--step", "5", "--out", str(out), "--quiet"]) == 2
    assert os.listdir(out) == []
    assert main(["validate", parent, "--step", "5", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert main(["validate", parent, "--step", "8", "--plans", "own,switch0", "--out", str(tmp_path / "y")]) == 2
    assert "no plan differs" in capsys.readouterr().err and not (tmp_path / "y").exists()
    assert main(["validate", parent, "--step", "5", "--branches", parent, "--out", str(tmp_path / "z")]) == 2
    assert "not a branch of" in capsys.readouterr().err and not (tmp_path / "z").exists()


def test_recommended_from_recommendations_json(parent, tmp_path):
    """lr_decay (start 6, cosine), data_switch (step 7) and batch_size (16) from recommendations.json."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(parent, run)
    recs = [{"name": "lr_decay", "value": 6, "unit": "step (anneal start)",
             "patch": {"phases": {"pretrain": {"steps": 6}, "midtrain": {"steps": 8, "decay": "cosine"}}}},
            {"name": "data_switch", "value": 7, "unit": "step (data switch)", "patch": {}},
            {"name": "batch_size", "value": 16, "unit": "sequences per optimizer step", "patch": {}}]
    with open(os.path.join(run, "recommendations.json"), "w") as f:
        json.dump({"schema": 1, "recommendations": recs, "not_available": {}}, f)
    plans, info = plan_validation(run, 5, ["own", "recommended"])
    assert "recommendations.json" in info["recommendations"]
    own, rec = plans[0].config, plans[1]
    c = rec.config
    assert (rec.decay_start, rec.switch_step) == (6, 7)
    # batch 16 from step 5 on in the re-planned stretch (9 steps at 8 -> 5 at 16), LR x sqrt(2)
    assert c.phase_at(5)[1].batch_size == 16 and c.phase_at(5)[1].lr == pytest.approx(3e-3 * math.sqrt(2))
    tok = lambda cfg, lo, hi: sum(cfg.phase_at(k)[1].batch_size * cfg.phase_at(k)[1].seq_len  # noqa: E731
                                  for k in range(lo, hi))
    E = c.total_steps() - 4
    assert abs(tok(c, 5, E) - tok(own, 5, 14)) <= 16 * 32 * 2     # same tokens up to the rounding of pieces
    assert tok(c, E, c.total_steps()) == tok(own, 14, 18)
    new = own.phases[1].mixture
    lrs = [c.lr_at(k) for k in range(5, E)]
    assert lrs[0] == pytest.approx(3e-3 * math.sqrt(2)) and lrs[-1] == pytest.approx(3e-4 * math.sqrt(2))
    assert all(b <= a + 1e-12 for a, b in zip(lrs, lrs[1:]))        # the anneal decays monotonically to E
    assert c.phase_at(5)[1].mixture != new and c.phase_at(E - 1)[1].mixture == new
    assert any("batch size 16" in x for x in rec.notes)


def test_recommended_mixture_from_recommendations_json(parent, tmp_path):
    """The mixture entry's mixture is the recommended plan's from its switch step on; the others keep the run's."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(parent, run)
    heavy = {"prose": 0.1, "code": 0.45, "math": 0.45}
    recs = [{"name": "data_switch", "value": 7, "unit": "step (data switch)", "patch": {}},
            {"name": "mixture", "value": {"name": "heavy", "weights": heavy}, "unit": "mixture of phase 'midtrain'",
             "patch": {"phases": {"midtrain": {"mixture": heavy}}}}]
    with open(os.path.join(run, "recommendations.json"), "w") as f:
        json.dump({"schema": 1, "recommendations": recs, "not_available": {}}, f)
    plans, _ = plan_validation(run, 5, ["own", "recommended", "switch50"])
    own, rec, sw = plans[0].config, plans[1], plans[2].config
    assert [rec.config.phase_at(k)[1].mixture for k in (6, 7, 13)] == [own.phase_at(0)[1].mixture, heavy, heavy]
    assert sw.phase_at(13)[1].mixture == own.phase_at(13)[1].mixture            # the alternatives keep the run's
    assert rec.config.phases[-1].mixture == own.phases[-1].mixture              # later phases too
    assert any("mixture heavy" in x for x in rec.notes)


def test_recommended_batch_for_other_sequences_is_not_applied(parent, tmp_path):
    """A batch size measured at another sequence length (the last phase's 256 tokens) is not applied to the
    re-planned stretch's shorter sequences: the recommended plan keeps the run's batch and says why."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(parent, run)
    recs = [{"name": "data_switch", "value": 7, "unit": "step (data switch)", "patch": {}},
            {"name": "batch_size", "value": 16, "unit": "sequences per optimizer step", "patch": {},
             "evidence": {"phase": "long_context", "seq_len": 999}}]
    with open(os.path.join(run, "recommendations.json"), "w") as f:
        json.dump({"schema": 1, "recommendations": recs, "not_available": {}}, f)
    plans, _ = plan_validation(run, 5, ["own", "recommended"])
    own, rec = plans[0].config, plans[1]
    assert all(rec.config.phase_at(k)[1].batch_size == own.phase_at(k)[1].batch_size for k in range(5, 14))
    assert any("sequences of 999 tokens" in x for x in rec.notes)


@pytest.mark.parametrize("low,high,want,tied", [(5, 9, 6, True), (6.5, 9, 7, True), (8, 8, 8, True),
                                                (7, 7, 8, False)])
def test_recommended_switch_follows_a_tied_anneal_start(parent, tmp_path, low, high, want, tied):
    """data_switch keeps the run's own switch (step 8, the run's own anneal start) with a range that holds it:
    the switch is tied to the anneal start, so it follows lr_decay's start (6), whose plan anneals on the next
    phase's mixture from its start, but only as far as data_switch's range allows (6.5-9: 7; 8-8: 8). A range
    without the run's own start (7-7) keeps data_switch's step."""
    import shutil

    run = str(tmp_path / "run")
    shutil.copytree(parent, run)
    recs = [{"name": "lr_decay", "value": 6, "unit": "step (anneal start)", "patch": {}},
            {"name": "data_switch", "value": 8, "low": low, "high": high, "unit": "step (data switch)", "patch": {}}]
    with open(os.path.join(run, "recommendations.json"), "w") as f:
        json.dump({"schema": 1, "recommendations": recs, "not_available": {}}, f)
    plans, _ = plan_validation(run, 5, ["own", "recommended"])
    own, rec = plans[0].config, plans[1]
    new = own.phases[1].mixture
    assert (rec.decay_start, rec.switch_step) == (6, want)
    assert rec.config.phase_at(want - 1)[1].mixture != new and rec.config.phase_at(want)[1].mixture == new
    assert any("ties the switch" in x for x in rec.notes) == tied
    assert any("nearest end" in x for x in rec.notes) == (tied and want != 6)


def test_end_to_end(parent, tmp_path, capsys):
    out = str(tmp_path / "val")
    assert main(["validate", parent, "--step", "5", "--plans", "own,cosine,recommended", "--out", out,
                 "--quiet"]) == 0
    doc = json.load(open(os.path.join(out, "validation.json")))
    assert os.path.exists(os.path.join(out, "validation.png"))
    assert sorted(doc["plans"]) == sorted(doc["ranking"]) and doc["seeds"] == [0, 1]
    ranks = sorted(r["rank"] for r in doc["plans"].values())
    assert ranks == list(range(1, len(ranks) + 1))
    assert doc["recommended_rank"] == doc["plans"].get("recommended", {}).get("rank")
    for r in doc["plans"].values():
        assert len(r["runs"]) == 2 and set(r["val"]) == {"prose", "code", "math"}
        assert all(v["std"] >= 0 for v in r["val"].values())
    means = [doc["plans"][n]["objective"]["mean"] for n in doc["ranking"]]
    assert means == sorted(means)
    c = doc["compute"]
    grid = sum(_tokens(micro_config(), 5) for r in doc["plans"].values() for _ in r["runs"])
    assert c["grid_tokens"] == grid and c["probe_branches"] == [parent + "-probes/anneal5-3"]
    assert c["probe_tokens"] == 3 * 8 * 32 and c["probe_over_grid"] == pytest.approx(3 * 8 * 32 / grid)
    seeds = [json.load(open(os.path.join(d, "run.json")))["config"]["seed"] for d in doc["plans"]["own"]["runs"]]
    assert seeds == [0, 1]
    assert "recommended rank" in capsys.readouterr().out
