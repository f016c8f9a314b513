"""diagnostics.recommend.lr_decay_recommendation: on a run whose loss follows the annealing law exactly the
recommendation is the brute-force argmin under the true parameters; clear errors; the CLI end to end on
a real run (both recommendations printed and saved, the config patched, the branch trains)."""

import json

import numpy as np
import pytest

from diagnostics.recommend import RecommendationError, lr_decay_recommendation
from diagnostics.runs import RunWriter, load_run
from midtrain.config import Phase, TrainConfig

TRUE = dict(L0=2.5, A=1.0, alpha=0.35, C=1.5)
LAM = 0.999


def law_reference(lrs):
    """The law after len(lrs) updates by a plain loop over the definitions (initial rise not annealing)."""
    S1 = S2 = m = 0.0
    rising = True
    for k, eta in enumerate(lrs):
        d = 0.0 if k == 0 else lrs[k - 1] - eta
        rising = rising and d <= 0
        m = LAM * m + (0.0 if rising else d)
        S1 += eta
        S2 += m
    return TRUE["L0"] + TRUE["A"] * S1 ** -TRUE["alpha"] - TRUE["C"] * S2


def make_cfg(frac=0.5, shape="linear", cool_steps=100):
    mix = {"prose": 1.0}
    cfg = TrainConfig(phases=[
        Phase(name="pretrain", steps=40, lr=3e-3, warmup_steps=10, mixture=mix),
        Phase(name="cool", steps=cool_steps, lr=3e-3, decay=shape, decay_fraction=frac, final_lr=3e-4, mixture=mix)])
    return cfg.validate()


def write_run(path, cfg, noise=0.0, lr_const=False, seed=0):
    w = RunWriter.create(path, cfg.to_dict())
    w.update_info(total_steps=cfg.total_steps(), phase_starts=cfg.phase_starts(),
                  phase_names=[p.name for p in cfg.phases])
    lrs = [cfg.lr_at(s) if not lr_const else 3e-3 for s in range(cfg.total_steps())]
    rng = np.random.default_rng(seed)
    for s in range(cfg.total_steps()):
        rec = {"step": s, "train/lr": lrs[s]}
        if s >= 1:
            rec["train/loss"] = law_reference(lrs[:s]) + noise * rng.normal()
        w.log(rec)
    w.close("finished")
    return load_run(path)


def test_recommendation_is_the_brute_force_argmin(tmp_path):
    cfg = make_cfg()
    run = write_run(tmp_path / "r", cfg)
    rec = lr_decay_recommendation(run, n_boot=20)
    post = 100
    finals = []
    for k in range(1, post + 1):  # every decay length, schedule from the loop's own Phase.lr_at
        c = cfg.with_patch({"phases": {"cool": {"decay_fraction": k / post}}})
        finals.append(law_reference([c.lr_at(s) for s in range(c.total_steps())]))
    k_best = int(np.argmin(finals)) + 1
    assert 1 < k_best < post  # an interior optimum: the test can fail in both directions
    assert rec.value == pytest.approx(k_best / post)
    assert rec.patch == {"phases": {"cool": {"decay_fraction": rec.value}}}
    assert rec.low <= rec.value <= rec.high and rec.high - rec.low < 0.05  # exact data: a narrow range
    now = law_reference([cfg.lr_at(s) for s in range(cfg.total_steps())])
    assert f"{now:.4g}" in rec.evidence["current schedule"] and f"{min(finals):.4g}" in rec.evidence["recommended schedule"]
    text = rec.to_text()
    assert "lr_decay" in text and "Tissue" in text and "Hägele" in text
    assert json.loads(rec.to_json())["name"] == "lr_decay"


def test_shapes_are_compared(tmp_path):
    cfg = make_cfg()
    run = write_run(tmp_path / "r", cfg)
    rec = lr_decay_recommendation(run, shapes=["linear", "cosine", "1-sqrt"], n_boot=10)
    best = (np.inf, None)
    for shape in ("linear", "cosine", "1-sqrt"):
        for k in range(1, 101):
            c = cfg.with_patch({"phases": {"cool": {"decay_fraction": k / 100, "decay": shape}}})
            v = law_reference([c.lr_at(s) for s in range(c.total_steps())])
            best = min(best, (v, (shape, k / 100)), key=lambda t: t[0])
    shape, frac = best[1]
    assert rec.value == pytest.approx(frac)
    assert rec.patch["phases"]["cool"].get("decay", "linear") == shape


def test_noisy_run_range_covers_the_optimum(tmp_path):
    cfg = make_cfg()
    run = write_run(tmp_path / "r", cfg, noise=0.02)
    rec = lr_decay_recommendation(run, n_boot=100)
    finals = [law_reference([c.lr_at(s) for s in range(c.total_steps())]) for c in
              (cfg.with_patch({"phases": {"cool": {"decay_fraction": k / 100}}}) for k in range(1, 101))]
    truth = (int(np.argmin(finals)) + 1) / 100
    assert rec.low <= truth <= rec.high and rec.low < rec.high


def test_clear_errors(tmp_path):
    run = write_run(tmp_path / "flat", make_cfg(), lr_const=True)
    with pytest.raises(RecommendationError, match="never decreases"):
        lr_decay_recommendation(run)
    run = write_run(tmp_path / "r", make_cfg())
    with pytest.raises(RecommendationError, match="no phase 'x'"):
        lr_decay_recommendation(run, phase="x")
    with pytest.raises(RecommendationError, match="decaying shapes"):
        lr_decay_recommendation(run, shapes=["constant"])
    with pytest.raises(RecommendationError, match="built-in loop"):
        lr_decay_recommendation(run.metrics)
