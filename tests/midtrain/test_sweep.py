"""midtrain sweep: batch-size branches from a checkpoint, then recommend --branches."""

import json
import os

import pytest

from diagnostics.runs import load_run
from midtrain.cli import main
from midtrain.config import ConfigError, dumps_toml
from midtrain.sweep import _branch_config, _steps_for_tokens, lr_factor, parse_batch_sizes, parse_lr_grid

from .conftest import micro_config


def test_branch_config_keeps_tokens():
    cfg = micro_config(steps=(8, 6, 4))
    b = _branch_config(cfg, 4, 4)  # pretrain: batch 8, accum 2 -> 4, accum 2
    assert [p.batch_size for p in b.phases] == [4, 4, 4]          # long_context (seq 64) keeps its own 4
    assert b.phases[0].grad_accum == 2 and b.phases[0].num_steps() == 4 + 8
    assert b.phases[1].num_steps() == 12 and b.phases[2].num_steps() == 4
    assert b.phase_starts()[0] == 0 and _steps_for_tokens(b, 4, 4 * 8 * 32) == 8
    b3 = _branch_config(cfg, 4, 3)
    assert b3.phases[0].grad_accum == 1 and b3.phases[0].batch_size == 3
    with pytest.raises(ConfigError):
        parse_batch_sizes("8")
    with pytest.raises(ConfigError):
        parse_batch_sizes("8,8")
    with pytest.raises(ConfigError):
        parse_batch_sizes("8,x")


def test_branch_config_of_a_parent_with_probe_checkpoints():
    """A parent kept checkpoints at chosen steps (checkpoint_steps, for anneal/switch probes); a larger batch
    shortens the branch's schedule, and the parent's late checkpoint step was refused as past its end."""
    cfg = micro_config(steps=(8, 6, 4))
    cfg.checkpoint_steps = [16]
    b = _branch_config(cfg, 4, 16)   # batch 8 -> 16: the schedule ends before step 16
    assert b.total_steps() < 16 and b.checkpoint_steps == []


def test_lr_scaling_is_exact():
    cfg = micro_config(steps=(8, 6, 4))
    for b, k in ((32, 4), (2, 0.25), (8, 1)):
        bc = _branch_config(cfg, 4, b)
        assert bc.phases[0].lr == pytest.approx(3e-3 * k ** 0.5, rel=1e-15)
        assert bc.phases[1].lr == pytest.approx(3e-3 * k ** 0.5, rel=1e-15)
        assert bc.phases[1].final_lr == pytest.approx(3e-4 * k ** 0.5, rel=1e-15)
        assert bc.phases[2].lr == 3e-4 and bc.phases[2].batch_size == 4   # other seq_len: untouched
        # the LR the loop runs at the branch step (constant stretch of pretrain) is the parent's x sqrt(k)
        assert bc.lr_at(4) == pytest.approx(cfg.lr_at(4) * k ** 0.5, rel=1e-12)
    none = _branch_config(cfg, 4, 32, lr_scaling="none", lr_multiplier=2.0)
    assert none.phases[0].lr == pytest.approx(6e-3) and none.phases[1].final_lr == pytest.approx(6e-4)
    assert lr_factor(64, 16) == 2.0 and lr_factor(64, 16, "none") == 1.0
    with pytest.raises(ConfigError, match="lr-scaling"):
        lr_factor(64, 16, "linear")
    assert parse_lr_grid(None) == [1.0] and parse_lr_grid("2, 0.5,1") == [0.5, 1.0, 2.0]
    for bad in ("0.5,x", "0,1", "1,1", "-1", ",", "nan,1", "inf"):
        with pytest.raises(ConfigError, match="--lr-grid"):
            parse_lr_grid(bad)


def test_sweep_end_to_end(tmp_path, capsys):
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(micro_config(steps=(8, 6, 4), checkpoint_every=4, eval_every=2)))
    parent = str(tmp_path / "p")
    assert main(["train", "--config", str(cfgf), "--out", parent, "--quiet", "--until", "9"]) == 0
    prefix = str(tmp_path / "sw")
    # refusals: nothing written
    assert main(["sweep", parent, "--step", "3", "--batch-sizes", "4,16", "--out-prefix", prefix]) == 2
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4", "--out-prefix", prefix]) == 2
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--tokens", "10000000",
                 "--out-prefix", prefix]) == 2
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--phase", "nope", "--out-prefix", prefix]) == 2
    assert not os.path.exists(prefix)
    # --phase: the tokens up to the end of a later phase (planned only)
    from midtrain.sweep import plan_sweep
    plans = plan_sweep(parent, 4, [4, 16], phase="midtrain", out_prefix=prefix)
    assert [p.tokens for p in plans] == [(4 * 8 + 6 * 8) * 32] * 2 and [p.steps for p in plans] == [20, 5]
    capsys.readouterr()
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--evals", "4",
                 "--out-prefix", prefix, "--quiet"]) == 0
    for b, n in ((4, 8), (16, 2)):   # the parent's 4 pretrain steps at batch 8: 1024 tokens
        r = load_run(os.path.join(prefix, f"bs{b}"))
        assert r.parent["step"] == 4 and os.path.samefile(r.parent["run"], parent)
        assert r.config["phases"][0]["batch_size"] == b
        # a fair sweep: pretrain (batch 8) and midtrain (batch 8) LRs scaled by sqrt(B / 8); long_context kept
        for q, parent_lr in zip(r.config["phases"], (3e-3, 3e-3, 3e-4)):
            f = (b / 8) ** 0.5 if q["seq_len"] == 32 else 1.0
            assert q["lr"] == pytest.approx(parent_lr * f, rel=1e-12)
        v = r.metrics.dropna(subset=["val/prose/loss"])
        assert v["step"].min() == 4 and v["step"].max() == 4 + n
        # train/tokens at row k counts steps 0..k; the checkpoint at 4 holds the tokens of steps 0..3
        tok = r.metrics.dropna(subset=["train/tokens"])
        assert tok["train/tokens"].max() - load_run(parent).metrics.set_index("step").loc[3, "train/tokens"] >= 1024
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--lr-grid", "0.5,x",
                 "--out-prefix", prefix + "g"]) == 2
    assert not os.path.exists(prefix + "g")
    # an LR grid: one branch per batch and multiplier (planned only)
    grid = plan_sweep(parent, 4, [4, 16], lr_grid=[0.5, 2.0], out_prefix=prefix + "g")
    assert [os.path.basename(p.out) for p in grid] == ["bs4-lr0.5", "bs4-lr2", "bs16-lr0.5", "bs16-lr2"]
    assert [p.config.phases[0].lr for p in grid] == pytest.approx(
        [3e-3 * (b / 8) ** 0.5 * m for b in (4, 16) for m in (0.5, 2.0)])
    # replicates (--seeds): one branch per batch and seed, seed the parent's + K, data order only
    reps = plan_sweep(parent, 4, [4, 16], seeds=[0, 1], out_prefix=prefix + "s")
    assert [os.path.basename(p.out) for p in reps] == ["bs4-seed0", "bs4-seed1", "bs16-seed0", "bs16-seed1"]
    seed = load_run(parent).config["seed"]
    assert [p.config.seed for p in reps] == [seed, seed + 1] * 2 and [p.seed for p in reps] == [0, 1] * 2
    assert reps[0].config.to_dict() == {**reps[1].config.to_dict(), "seed": seed}
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--seeds", "0,x",
                 "--out-prefix", prefix + "s"]) == 2
    assert not os.path.exists(prefix + "s")
    os.makedirs(os.path.join(tmp_path, "sw2", "bs16"))
    open(os.path.join(tmp_path, "sw2", "bs16", "x"), "w").close()
    assert main(["sweep", parent, "--step", "4", "--batch-sizes", "4,16", "--out-prefix", str(tmp_path / "sw2")]) == 2
    assert not os.path.exists(tmp_path / "sw2" / "bs4")
    capsys.readouterr()
    rc = main(["recommend", parent, "--branches", f"{prefix}/bs4", f"{prefix}/bs16", "--json"])
    doc = json.loads(capsys.readouterr().out)
    # the ramp is listed: made, or why not and the command that would make it possible
    sched = [r for r in doc["recommendations"] if r["name"] == "batch_schedule"]
    assert sched or "`midtrain recommend RUN" in doc["not_available"]["batch_schedule"]
    # ONE batch answer (the combined rule), naming the phase and sequence length it holds for
    batch = [r for r in doc["recommendations"] if r["name"] == "batch_size"]
    assert len(batch) + ("batch_size" in doc["not_available"]) == 1
    if batch:
        ev = batch[0]["evidence"]
        assert ev["phase"] == "pretrain" and ev["seq_len"] == 32 and ev["follows"] and ev["why"]
        assert "phase 'pretrain' at seq_len 32" in batch[0]["summary"]
        if ev["follows"].startswith("the branches") and batch[0]["patch"]:
            p0 = batch[0]["patch"]["phases"]["pretrain"]     # the branch the sweep trains at that batch
            assert p0["lr"] == pytest.approx(3e-3 * (p0["batch_size"] / 8) ** 0.5)
    names = [r["name"] for r in doc["recommendations"]] + list(doc["not_available"])
    assert "equal_tokens_batch" in names
    assert "critical_batch_size" in names   # a fit, or a clear reason on these few noisy steps
    if "critical_batch_size" in doc["not_available"]:
        assert "reached validation loss" in doc["not_available"]["critical_batch_size"]
    else:
        rec = next(r for r in doc["recommendations"] if r["name"] == "critical_batch_size")
        assert "batch 4" in rec["evidence"] and "batch 16" in rec["evidence"]
    assert rc in (0, 2)
