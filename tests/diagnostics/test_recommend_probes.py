"""Anneal start (``anneal_recommendation``, the ``lr_decay`` entry) and data switch
(``data_switch_recommendation``) on synthetic runs and branches whose right answer is known."""

import numpy as np
import pytest

from diagnostics.recommend import (ProbeInputError, RecommendationError, anneal_recommendation, branch_kind,
                                   replicate_seed)
from diagnostics.recommend._anneal import auto_target
from diagnostics.runs import RunWriter, load_run
from diagnostics.schedule import annealing_law, lr_areas
from midtrain.config import Phase, TrainConfig

TRUE = {"L0": 2.0, "A": 0.6, "alpha": 0.5, "C": 0.8}   # an interior optimum (step 106 of 260)
OFFSET = 0.1          # the anneal mixture's loss level above the stable one


def law(lrs):
    s1, s2 = lr_areas(np.asarray(lrs, dtype=np.float64), momentum=0.999)
    return annealing_law(s1, s2, TRUE["L0"], TRUE["A"], TRUE["alpha"], TRUE["C"])


def anneal_cfg(stable=200, cool=60):
    return TrainConfig(phases=[
        Phase(name="pretrain", steps=stable, lr=3e-3, warmup_steps=10, mixture={"prose": 1.0}),
        Phase(name="cool", steps=cool, lr=3e-3, decay="linear", final_lr=3e-4, mixture={"prose": 0.5, "code": 0.5})]
    ).validate()


def write(path, cfg, parent=None, noise=0.0, seed=0, val_every=0, val_noise=0.0):
    w = RunWriter.create(path, cfg.to_dict(), parent=parent)
    w.update_info(total_steps=cfg.total_steps(), phase_starts=cfg.phase_starts(),
                  phase_names=[p.name for p in cfg.phases])
    lrs = np.array([cfg.lr_at(s) for s in range(cfg.total_steps())])
    pred = law(lrs)                                # pred[k-1]: the loss after k updates
    rng = np.random.default_rng(seed)
    first = parent["step"] if parent else 0
    for s in range(first, cfg.total_steps()):
        rec = {"step": s, "train/lr": float(lrs[s])}
        if s >= 1:
            rec["train/loss"] = float(pred[s - 1] + (OFFSET if cfg.phase_at(s)[0] == 1 else 0.0) + noise * rng.normal())
        if val_every and s >= 1 and s % val_every == 0:   # the fixed evaluation set: the law, a level per domain
            rec.update({f"val/{d}/loss": float(pred[s - 1] + off + val_noise * rng.normal())
                        for d, off in (("prose", 0.3), ("code", -0.1))})
        w.log(rec)
    if val_every and cfg.total_steps() % val_every == 0:   # the final evaluation (after the last update)
        w.log({"step": cfg.total_steps(), **{f"val/{d}/loss": float(pred[-1] + off + val_noise * rng.normal())
                                            for d, off in (("prose", 0.3), ("code", -0.1))}})
    w.close("finished")
    return load_run(path)


def probe(tmp_path, parent_run, start, n, **kw):
    cfg = anneal_cfg(stable=start, cool=n)
    return write(tmp_path / f"a{start}-{n}", cfg, parent={"run": str(parent_run.path), "step": start}, **kw)


def true_best(budget_steps, s_lo):
    """Brute force: the true final loss of every anneal start with the budget's remaining steps."""
    finals = {}
    for s in range(s_lo, budget_steps - 1):
        lrs = np.concatenate([[anneal_cfg().lr_at(k) for k in range(min(s, 200))], np.full(max(0, s - 200), 3e-3),
                              [anneal_cfg(stable=s, cool=budget_steps - s).lr_at(k) for k in range(s, budget_steps)]])
        finals[s] = float(law(lrs)[-1])
    return finals


def test_anneal_start_is_the_true_optimum_from_probes(tmp_path):
    parent = write(tmp_path / "p", anneal_cfg())
    branches = [probe(tmp_path, parent, 100, 60), probe(tmp_path, parent, 150, 40), probe(tmp_path, parent, 180, 30)]
    assert [branch_kind(parent, b) for b in branches] == ["anneal"] * 3
    rec = anneal_recommendation(parent, branches, law="annealing", n_boot=10, max_candidates=200)
    finals = true_best(260, 10)
    s_star = min(finals, key=finals.get)
    assert 20 < s_star < 240                          # an interior optimum, not an edge
    assert abs(rec.value - s_star) <= 2
    assert finals[int(rec.value)] - finals[s_star] < 1e-4
    assert rec.low <= rec.value <= rec.high
    assert rec.name == "lr_decay" and rec.patch["phases"]["pretrain"]["steps"] == int(rec.value)
    assert rec.patch["phases"]["cool"]["steps"] == 260 - int(rec.value)
    # another budget moves the optimum with it: the brute force again
    rec2 = anneal_recommendation(parent, branches, law="annealing", budget_tokens=300 * 16 * 128, n_boot=5,
                                 max_candidates=300)
    f2 = {}
    for s in range(10, 298):
        lrs = np.concatenate([np.array([anneal_cfg().lr_at(k) for k in range(min(s, 200))]), np.full(max(0, s - 200), 3e-3),
                              [anneal_cfg(stable=s, cool=300 - s).lr_at(k) for k in range(s, 300)]])
        f2[s] = float(law(lrs)[-1])
    assert f2[int(rec2.value)] - min(f2.values()) < 1e-4


def test_anneal_noisy_range_and_single_run(tmp_path):
    parent = write(tmp_path / "p", anneal_cfg(), noise=0.003, seed=1)
    branches = [probe(tmp_path, parent, s, n, noise=0.003, seed=s) for s, n in ((100, 60), (150, 40), (180, 30))]
    rec = anneal_recommendation(parent, branches, law="annealing", n_boot=30)
    finals = true_best(260, 10)
    assert finals[int(rec.value)] - min(finals.values()) < 0.003    # within the noise sd of one loss
    assert rec.low <= rec.value <= rec.high
    one = anneal_recommendation(parent, [], n_boot=10)              # one-run fit: proposes probes and the command
    assert "--anneal-at" in one.check and "one-run fit" in one.summary


def test_anneal_on_the_validation_loss(tmp_path):
    """target="val": the law fitted to the validation loss of the fixed set (domains weighted by the anneal
    mixture, 0.5/0.5: the law + 0.1) every 10 steps finds the true optimum, where the train loss is so noisy
    (sd 0.05 per step) that its fit does not; the evidence names the target."""
    kw = dict(noise=0.05, val_every=10)
    parent = write(tmp_path / "p", anneal_cfg(), seed=1, **kw)
    branches = [probe(tmp_path, parent, s, n, seed=s, **kw) for s, n in ((100, 60), (150, 40), (180, 30))]
    finals = true_best(260, 10)
    rec = anneal_recommendation(parent, branches, law="annealing", n_boot=5, target="val")
    assert finals[int(rec.value)] - min(finals.values()) < 2e-4
    assert "validation loss" in rec.evidence["predicted final loss"] and "last val losses" in str(rec.evidence)
    pred = float(rec.evidence["predicted final loss"].split()[0])
    assert abs(pred - (finals[int(rec.value)] + 0.1)) < 2e-3        # the objective's level: law + weighted offsets
    assert auto_target(parent, branches) == "val"          # the default ("auto") fits the validation loss here
    assert auto_target(parent, []) == "train"                # no probes: the one-run fit on the train loss
    with pytest.raises(ProbeInputError, match="one of"):
        anneal_recommendation(parent, branches, target="test")
    bare = write(tmp_path / "b", anneal_cfg())                     # no validation columns: a clear error
    with pytest.raises(RecommendationError, match="validation loss of every domain"):
        anneal_recommendation(bare, [], target="val")
    (tmp_path / "bare").mkdir()
    bare_probe = probe(tmp_path / "bare", bare, 100, 60)
    assert auto_target(bare, [bare_probe]) == "train"       # auto falls back to the train loss


def test_anneal_bad_input(tmp_path):
    parent = write(tmp_path / "p", anneal_cfg())
    other = write(tmp_path / "o", anneal_cfg())
    stray = probe(tmp_path, other, 100, 60)
    with pytest.raises(ProbeInputError, match="not a branch"):
        branch_kind(parent, stray)
    with pytest.raises(ProbeInputError, match="does not fit"):
        anneal_recommendation(parent, [], budget_tokens=1000)
    cfg = anneal_cfg()
    cfg.optim.weight_decay = 0.3
    wrong = write(tmp_path / "w", cfg, parent={"run": str(parent.path), "step": 100})
    with pytest.raises(ProbeInputError, match="incompatible"):
        branch_kind(parent, wrong)
    cfg = anneal_cfg()
    cfg.seed += 7                                  # another seed is a replicate, not an incompatible config
    rep = write(tmp_path / "r", cfg, parent={"run": str(parent.path), "step": 100})
    assert branch_kind(parent, rep) == "same" and replicate_seed(parent, rep) == 7
    flat = TrainConfig(phases=[Phase(name="pretrain", steps=50, mixture={"prose": 1.0})]).validate()
    with pytest.raises(RecommendationError, match="decays"):
        anneal_recommendation(write(tmp_path / "f", flat), [])


def switch_cfg(split=None, mix=None):
    """pretrain (prose) 100 steps, then midtrain (code-heavy, decaying) to step 140; a probe splits
    pretrain at ``split`` and switches to ``mix`` there."""
    mid = mix or {"prose": 0.2, "code": 0.8}
    head = [Phase(name="pretrain", steps=split or 100, lr=3e-3, warmup_steps=10, mixture={"prose": 1.0})]
    if split:
        head.append(Phase(name="pretrain@switch", steps=100 - split, lr=3e-3, mixture=mid))
    return TrainConfig(phases=head + [Phase(name="midtrain", steps=40, lr=3e-3, decay="linear", final_lr=3e-4,
                                            mixture=mid)]).validate()


def code_final(s, mix_gain=0.0):
    return 1.5 + 1e-4 * (s - 60) ** 2 - mix_gain       # the true target loss: best switch at step 60


def write_switch(path, cfg, s_switch, parent=None, noise=0.0, seed=0, prose_rise=0.0, mix_gain=0.0):
    w = RunWriter.create(path, cfg.to_dict(), parent=parent)
    w.update_info(total_steps=cfg.total_steps(), phase_starts=cfg.phase_starts(), phase_names=[p.name for p in cfg.phases])
    rng = np.random.default_rng(seed)
    first = parent["step"] if parent else 0
    for s in range(first, 141):
        rec = {"step": s, "train/lr": cfg.lr_at(min(s, 139))}
        if s % 5 == 0 or s == 140:
            tail = (140 - s) / 140
            rec["val/code/loss"] = code_final(s_switch, mix_gain) + 2 * tail + noise * rng.normal()
            rec["val/prose/loss"] = 1.8 * (1 + prose_rise) + tail + noise * rng.normal()
        w.log(rec)
    w.close("finished")
    return load_run(path)


def test_data_switch_known_optimum(tmp_path):
    from diagnostics.recommend import data_switch_recommendation

    parent = write_switch(tmp_path / "p", switch_cfg(), 100)
    bs = [write_switch(tmp_path / f"s{s}", switch_cfg(split=s), s, parent={"run": str(parent.path), "step": s},
                       noise=0.002, seed=s) for s in (20, 40, 60, 80)]
    assert [branch_kind(parent, b) for b in bs] == ["switch"] * 4
    rec = data_switch_recommendation(parent, bs)
    assert rec.name == "data_switch" and rec.value == 60
    assert rec.low <= 60 <= rec.high and rec.high - rec.low <= 40
    assert "code" in rec.evidence["objective"] and "prose" in rec.evidence["objective"]
    # the earlier domain rising more than the tolerance rules a candidate out; a mixture that helps wins
    bad = write_switch(tmp_path / "b60", switch_cfg(split=60), 60, parent={"run": str(parent.path), "step": 60},
                       prose_rise=0.05, mix_gain=0.5)
    good = write_switch(tmp_path / "m40", switch_cfg(split=40, mix={"prose": 0.1, "code": 0.9}), 40,
                        parent={"run": str(parent.path), "step": 40}, mix_gain=0.1)
    rec = data_switch_recommendation(parent, [*bs, bad, good])
    assert rec.value == 40 and rec.summary.count("0.9") == 1
    assert "rejected" in rec.evidence["candidates"]
    assert data_switch_recommendation(parent, [*bs, bad], tolerance=0.1).value == 60   # allowed now: its gain wins
    with pytest.raises(RecommendationError, match="--switch-at"):
        data_switch_recommendation(parent, [])


def switch_probe(tmp_path, parent, s, name=None, mix=None, seed=None, **kw):
    """A switch probe at step ``s`` (the parent's own step 100 with another mixture: no split), written as
    ``switch<s>[-<name>][-seed<k>]`` like `midtrain sweep` names it."""
    cfg = switch_cfg(split=s if s < 100 else None, mix=mix)
    cfg.seed += seed or 0
    label = f"switch{s}" + (f"-{name}" if name else "") + (f"-seed{seed}" if seed is not None else "")
    return write_switch(tmp_path / label, cfg, s, parent={"run": str(parent.path), "step": s}, **kw)


def test_replicates_are_averaged_and_their_spread_is_the_noise(tmp_path):
    from diagnostics.recommend import data_switch_recommendation, switch_table

    parent = write_switch(tmp_path / "p", switch_cfg(), 100)
    offsets = {40: [-0.06, 0.0, 0.03], 60: [0.0, 0.01, 0.02]}   # one lucky seed at 40; 60 is better on average
    bs = [switch_probe(tmp_path, parent, s, seed=k, mix_gain=-off) for s, offs in offsets.items()
          for k, off in enumerate(offs)]
    t = switch_table(parent, bs)
    sd = {s: np.std([code_final(s) + o for o in offs], ddof=1) for s, offs in offsets.items()}
    pooled = np.sqrt(sum(2 * v ** 2 for v in sd.values()) / 4)       # (n - 1) s^2 summed over n - 1 dof
    assert t.sigma == pytest.approx(pooled, rel=1e-9) and "pooled spread" in t.how
    assert {g["step"]: g["n"] for g in t.groups} == {40: 3, 60: 3, 100: 1}
    rec = data_switch_recommendation(parent, bs)
    assert rec.value == 60                                           # the mean, not the luckiest seed (40)
    assert rec.estimate == pytest.approx(code_final(60) + 0.01, abs=1e-9)
    se = pooled / np.sqrt(3)
    assert code_final(40) + 0.01 - rec.estimate < 1.645 * np.sqrt(2) * se   # 40 is within the noise: in the range
    assert (rec.low, rec.high) == (40, 60)
    assert "mean of 3" in rec.evidence["candidates"] and "replicates" in rec.evidence["noise"]


def test_mixture_entry_known_best_and_tolerance(tmp_path):
    from diagnostics.recommend import mixture_recommendation, recommend_run

    parent = write_switch(tmp_path / "p", switch_cfg(), 100)
    rep_cfg = switch_cfg()
    rep_cfg.seed += 1                                                # the parent again with another seed
    rep = write_switch(tmp_path / "own-seed1", rep_cfg, 100, parent={"run": str(parent.path), "step": 100},
                       mix_gain=0.004)
    heavy = {"prose": 0.1, "code": 0.9}
    a = [switch_probe(tmp_path, parent, 100, "heavy", heavy, seed=k, mix_gain=g) for k, g in ((0, 0.1), (1, 0.096))]
    b = [switch_probe(tmp_path, parent, 100, "light", {"prose": 0.3, "code": 0.7}, seed=k, mix_gain=g)
         for k, g in ((0, -0.05), (1, -0.054))]
    c = switch_probe(tmp_path, parent, 100, "extreme", {"prose": 0.0, "code": 1.0}, mix_gain=0.3, prose_rise=0.05)
    rec = mixture_recommendation(parent, [rep, *a, *b, c])
    assert rec.name == "mixture" and rec.value == {"name": "heavy", "weights": heavy}
    assert rec.patch == {"phases": {"midtrain": {"mixture": heavy}}}
    assert rec.estimate == pytest.approx(code_final(100) - 0.098, abs=1e-9)
    assert rec.low < rec.estimate < rec.high
    assert "extreme at step 100 (+5.00%)" in rec.evidence["tolerance"]       # rejected at 1%
    assert "sd over 2 seeds" in rec.evidence["mixtures"] and "seeds added to the run's: [0, 1]" in rec.evidence["noise"]
    assert mixture_recommendation(parent, [rep, *a, *b, c], tolerance=0.1).value["name"] == "extreme"
    assert "heavy 1.562, midtrain (the run's) 1.658, light 1.712" in rec.evidence["at step 100"]
    keep = mixture_recommendation(parent, [rep, *b])                # the run's own is best: nothing to patch
    assert keep.value["name"] == "midtrain (the run's)" and keep.patch == {} and keep.summary.startswith("keep")
    # recommend_run: the mixture entry beside data_switch, which keeps the step; the replicate joins the parent
    recs, na = recommend_run(parent, [rep, *a, *b, c])
    by = {r.name: r for r in recs}
    assert by["mixture"].value["name"] == "heavy" and by["data_switch"].value == 100 and by["data_switch"].patch == {}
    assert "midtrain (the run's): 1.658 (mean of 2" in by["data_switch"].evidence["candidates"]


def test_mixture_without_probes_proposes_from_learnability(tmp_path):
    from diagnostics.recommend import candidate_mixtures, mixture_recommendation

    parent = write_switch(tmp_path / "p", switch_cfg(), 100)
    df_path = parent.path / "metrics.jsonl"
    import json
    with open(df_path, "a") as f:                                   # code still learning, prose done
        f.write(json.dumps({"step": 96, "difficulty/code/learnability": 0.3, "difficulty/prose/learnability": 0.0})
                + "\n")
    parent = load_run(parent.path)
    props, how = candidate_mixtures(parent, {"prose": 0.2, "code": 0.8}, 10, 100)
    assert "learnability" in how
    assert props["upcode"]["code"] > 0.8 and props["learn"]["code"] > 0.8
    assert sum(props["learn"].values()) == pytest.approx(1.0, abs=2e-3)
    with pytest.raises(RecommendationError) as e:
        mixture_recommendation(parent, [])
    msg = str(e.value)
    assert "--step 100 --switch-at 100 --mixtures" in msg and "upcode=" in msg and "still learning" in msg
    one = switch_probe(tmp_path, parent, 60)                         # switch probes without other mixtures
    with pytest.raises(RecommendationError, match="no mixture probes"):
        mixture_recommendation(parent, [one])
