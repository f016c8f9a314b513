"""Divergence is called out (issue 11 item 4): a run whose skipped (non-finite-gradient) steps pass
the threshold stops with status ``diverged``, a message naming the step and the likely cause, exit
code 3 and no checkpoint of the diverged state; ``show`` prints the skipped steps; ``recommend``
refuses to fit through a diverged stretch."""

import json
import math

import numpy as np
import pytest
import torch

from diagnostics.runs import RUN_JSON, load_run
from midtrain import cli
from midtrain.cli import main
from midtrain.config import dumps_toml
from midtrain.loop import train
from tests.midtrain.conftest import micro_config


def _lr(cfg, lr):
    for p in cfg.phases:
        p.lr = lr
        p.final_lr = min(p.final_lr, lr)
    return cfg


def _no_hooks(cfg):
    cfg.monitor.gns = cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    return cfg


def _overflow_at(monkeypatch, steps):
    """Non-finite gradient norms at the given steps (the loop clips once per step)."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": -1}

    def clip(params, max_norm, *a, **kw):
        calls["n"] += 1
        norm = real_clip(params, max_norm, *a, **kw)
        return torch.full_like(norm, float("nan")) if calls["n"] in steps else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)


def test_huge_lr_stops_diverged_with_the_step_and_cause(tmp_path):
    cfg = _lr(micro_config(steps=(20, 2, 2), checkpoint_every=2), 1e3)
    res = train(cfg, str(tmp_path / "r"), hooks=[], progress=False)
    run = load_run(tmp_path / "r")
    assert res.status == "diverged" and run.info["status"] == "diverged"
    d = run.info["diverged"]
    assert res.steps_done == d["step"] + 1 < cfg.total_steps()
    assert f"step {d['step']}" in res.message and "learning rate" in res.message
    assert "data" in res.message and "precision" in res.message
    # no checkpoint of a state whose update was skipped; the last good one is named
    skipped = d["skipped_steps"]
    assert len(skipped) > cfg.max_skipped_steps
    ckpts = [s for s, _ in run.checkpoints()]
    assert not any(s - 1 in skipped for s in ckpts)
    good = d["last_good_checkpoint"]
    assert good is None or (good in ckpts and good < d["first_skipped"])


def test_cli_exit_3_and_show_names_the_skips(tmp_path, capsys):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(_no_hooks(_lr(micro_config(steps=(20, 2, 2)), 1e3))))
    out = str(tmp_path / "r")
    assert main(["train", "--config", str(cfgf), "--out", out, "--quiet"]) == 3
    assert getattr(cli, "EXIT_DIVERGED", None) == 3
    err = capsys.readouterr().err
    d = load_run(out).info["diverged"]
    assert "diverged" in err and f"step {d['step']}" in err and "lr" in err
    assert main(["show", out]) == 0
    text = capsys.readouterr().out
    assert "status diverged" in text
    assert f"skipped steps: {len(d['skipped_steps'])}" in text and str(d["first_skipped"]) in text


def test_infinite_lr_never_finishes_quietly(tmp_path, capsys):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(_no_hooks(_lr(micro_config(steps=(20, 2, 2)), 1.0))).replace("lr = 1.0", "lr = inf"))
    rc = main(["train", "--config", str(cfgf), "--out", str(tmp_path / "r"), "--quiet"])
    assert rc in (2, 3)  # refused by validation, or stopped as diverged: never "finished" with exit 0
    if rc == 3:
        assert load_run(tmp_path / "r").info["status"] == "diverged"


def test_threshold_is_configurable_and_show_lists_isolated_skips(tmp_path, monkeypatch, capsys):
    _overflow_at(monkeypatch, {3, 9})
    cfg = micro_config(steps=(6, 4, 2))
    res = train(cfg, str(tmp_path / "ok"), hooks=[], progress=False)  # 2 skips: under the default threshold
    assert res.status == "finished"
    assert main(["show", str(tmp_path / "ok")]) == 0
    assert "skipped steps: 2 (steps 3, 9;" in capsys.readouterr().out

    _overflow_at(monkeypatch, {3, 9})
    cfg = micro_config(steps=(6, 4, 2), max_skipped_steps=1, skip_window=10)
    res = train(cfg, str(tmp_path / "strict"), hooks=[], progress=False)
    assert res.status == "diverged" and res.steps_done == 10
    info = json.loads((tmp_path / "strict" / RUN_JSON).read_text())
    assert info["diverged"]["step"] == 9 and info["diverged"]["skipped_steps"] == [3, 9]
    # no checkpoint after the skipped step; the run keeps its last good one
    assert [s for s, _ in load_run(tmp_path / "strict").checkpoints()] == [5, 6]
    assert info["diverged"]["last_good_checkpoint"] is None  # none before step 3


# -- recommend refuses to fit through a diverged stretch ------------------------------------------

def _lr_run(path, skipped=(), status="finished", diverged=None):
    """A run whose train/loss follows the annealing law (tests/diagnostics/test_recommend_lr.py), with
    the loop's running count of skipped updates; at a skipped step the loss is what a dead model logs."""
    from diagnostics.runs import RunWriter
    from tests.diagnostics.test_recommend_lr import law_reference, make_cfg

    cfg = make_cfg()
    w = RunWriter.create(path, cfg.to_dict())
    w.update_info(total_steps=cfg.total_steps(), phase_starts=cfg.phase_starts(),
                  phase_names=[p.name for p in cfg.phases])
    lrs = [cfg.lr_at(s) for s in range(cfg.total_steps())]
    count = 0
    for s in range(cfg.total_steps()):
        count += s in skipped
        rec = {"step": s, "train/lr": lrs[s], "train/skipped_steps": count}
        if s >= 1:
            rec["train/loss"] = math.log(256) if s in skipped else law_reference(lrs[:s])
        w.log(rec)
    if diverged:
        w.update_info(diverged=diverged)
    w.close(status)
    return load_run(path)


def test_lr_decay_refuses_a_diverged_stretch(tmp_path):
    from diagnostics.recommend import RecommendationError, lr_decay_recommendation

    clean = lr_decay_recommendation(_lr_run(tmp_path / "clean"), n_boot=5)
    one = lr_decay_recommendation(_lr_run(tmp_path / "one", skipped={70}), n_boot=5)  # an isolated skip: dropped
    assert one.value == pytest.approx(clean.value, abs=0.02)
    dead = _lr_run(tmp_path / "dead", skipped=set(range(100, 140)))  # a run that never said it died
    with pytest.raises(RecommendationError, match=r"40 of steps .* skipped for non-finite gradients \(from step 100"):
        lr_decay_recommendation(dead, n_boot=5)
    div = _lr_run(tmp_path / "div", skipped=set(range(120, 132)), status="diverged",
                  diverged={"step": 131, "first_skipped": 120})
    with pytest.raises(RecommendationError, match="diverged at step 131"):
        lr_decay_recommendation(div, n_boot=5)


def test_batch_size_drops_skips_and_refuses_a_diverged_stretch():
    from diagnostics.recommend import RecommendationError, batch_size_recommendation
    from tests.diagnostics.test_recommend import synthetic_metrics

    df = synthetic_metrics(steps=120)
    df["train/skipped_steps"] = 0
    clean = batch_size_recommendation(df)
    one = df.copy()
    one.loc[100:, "train/skipped_steps"] = 1  # step 100 skipped: its measurement is not used
    one.loc[100, "gns/big_sq"] = 1e9
    assert batch_size_recommendation(one).estimate == pytest.approx(
        batch_size_recommendation(df[df["step"] != 100]).estimate)
    assert "60-119 (59 measured)" in batch_size_recommendation(one).evidence["steps"]
    dead = df.copy()
    dead["train/skipped_steps"] = np.clip(np.arange(120) - 89, 0, None)  # steps 90.. skipped
    with pytest.raises(RecommendationError, match="skipped for non-finite gradients"):
        batch_size_recommendation(dead)
    assert clean.estimate > 0


def test_recommend_cli_on_a_diverged_run_explains(tmp_path, capsys):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(_lr(micro_config(steps=(20, 2, 2)), 1e3)))
    out = str(tmp_path / "r")
    assert main(["train", "--config", str(cfgf), "--out", out, "--quiet"]) == 3
    capsys.readouterr()
    assert main(["recommend", out]) == 2
    captured = capsys.readouterr()
    assert "diverged at step" in captured.out + captured.err


def test_a_checkpoint_due_at_a_skipped_update_is_taken_after_the_next_good_one(tmp_path, monkeypatch):
    """No checkpoint holds a state whose last update was skipped, and none is lost for it: the one due
    after step 2 (checkpoint_every = 3) waits for step 3's good update; later ones are on time."""
    _overflow_at(monkeypatch, {2})
    cfg = _no_hooks(micro_config(steps=(6, 4, 2), checkpoint_every=3))
    res = train(cfg, str(tmp_path / "r"), progress=False)
    assert res.status == "finished"
    assert [s for s, _ in load_run(tmp_path / "r").checkpoints()] == [4, 6, 9, 10, 12]
