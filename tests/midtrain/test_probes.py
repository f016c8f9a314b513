"""Anneal and data-switch probes (midtrain/probes.py, `midtrain sweep --anneal-at / --switch-at`), and
checkpoint_steps, the config key that keeps the checkpoints the probes start from."""

import os

import pytest

from diagnostics.runs import load_run
from midtrain.config import ConfigError, TrainConfig, dumps_toml, load_toml

from .conftest import micro_config


@pytest.mark.parametrize("bad", [[0], [3, 3], [2.5], "4", [True], [999]])
def test_checkpoint_steps_validated(bad):
    cfg = micro_config(checkpoint_steps=bad)
    with pytest.raises(ConfigError, match="checkpoint_steps"):
        cfg.validate()


def test_checkpoint_steps_kept_by_the_loop(tmp_path):
    from midtrain.loop import train

    cfg = micro_config(steps=(8, 6, 4), checkpoint_every=100, checkpoint_steps=[3, 7])
    f = tmp_path / "c.toml"
    f.write_text(dumps_toml(cfg))
    assert load_toml(f).checkpoint_steps == [3, 7]
    assert TrainConfig.from_dict(cfg.to_dict()).validate().checkpoint_steps == [3, 7]
    train(cfg, str(tmp_path / "r"), progress=False)
    steps = [s for s, _ in load_run(tmp_path / "r").checkpoints()]
    assert steps == [3, 7, 8, 14, 18]          # the chosen steps, each phase end and the last step


def test_probes_end_to_end(tmp_path, capsys):
    import json

    from midtrain.cli import main

    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(micro_config(steps=(12, 6, 4), checkpoint_every=100, eval_every=2,
                                            checkpoint_steps=[5, 7, 9])))
    parent = str(tmp_path / "p")
    assert main(["train", "--config", str(cfgf), "--out", parent, "--quiet"]) == 0
    prefix = str(tmp_path / "pr")
    capsys.readouterr()
    # refusals: nothing written
    assert main(["sweep", parent, "--anneal-at", "4", "--out-prefix", prefix]) == 2
    assert "5, 7, 9, 12" in capsys.readouterr().err                 # the steps with a checkpoint
    assert main(["sweep", parent, "--anneal-at", "2", "--out-prefix", prefix]) == 2   # no checkpoint, in warmup
    assert main(["sweep", parent, "--switch-at", "12", "--out-prefix", prefix]) == 2  # the parent's own switch
    assert main(["sweep", parent, "--mixtures", "x=1,2", "--out-prefix", prefix]) == 2  # 3 domains
    assert main(["sweep", parent, "--mixtures", "x=web:1", "--out-prefix", prefix]) == 2
    assert not os.path.exists(prefix)
    assert main(["sweep", parent, "--anneal-at", "5,9", "--anneal-steps", "4,6", "--out-prefix", prefix, "--quiet"]) == 0
    assert main(["sweep", parent, "--anneal-at", "5", "--anneal-steps", "4", "--out-prefix", prefix]) == 2  # exists
    assert main(["sweep", parent, "--switch-at", "7,9", "--mixtures", "own=0.2,0.4,0.4", "heavy=0.1,0.45,0.45",
                 "--out-prefix", prefix, "--quiet"]) == 0
    names = sorted(os.listdir(prefix))
    assert names == ["anneal5-4", "anneal5-6", "anneal9-4", "anneal9-6", "switch7-heavy", "switch7-own",
                     "switch9-heavy", "switch9-own"]
    a = load_run(os.path.join(prefix, "anneal9-4"))
    assert a.parent["step"] == 9 and os.path.samefile(a.parent["run"], parent)
    assert [p["steps"] for p in a.config["phases"]] == [9, 4] and a.info["steps_done"] == 13
    sw = load_run(os.path.join(prefix, "switch7-heavy"))
    assert [p["name"] for p in sw.config["phases"]] == ["pretrain", "pretrain@switch", "midtrain"]
    assert sw.config["phases"][1]["mixture"] == {"prose": 0.1, "code": 0.45, "math": 0.45}
    v = sw.metrics.dropna(subset=["val/code/loss"])
    assert v["step"].max() == 18                                   # the end of the switched-to phase
    lrs = sw.metrics.dropna(subset=["train/lr"]).set_index("step")["train/lr"]
    plrs = load_run(parent).metrics.dropna(subset=["train/lr"]).set_index("step")["train/lr"]
    assert all(abs(lrs[k] - plrs[k]) < 1e-12 for k in lrs.index)   # the LR schedule stays
    capsys.readouterr()
    branches = [os.path.join(prefix, n) for n in names]
    assert main(["recommend", parent, "--json", "--branches", *branches]) == 0
    out = json.loads(capsys.readouterr().out)
    made = {r["name"]: r for r in out["recommendations"]}
    assert set(made) | set(out["not_available"]) >= {"batch_size", "lr_decay", "data_switch"}
    for name, why in out["not_available"].items():
        assert why                                                  # each says why
    assert "data_switch" in made and made["data_switch"]["value"] in (7, 9, 12)
    assert "lr_decay" in made and "jointly" in made["lr_decay"]["summary"]
    # bad input: exit 2, nothing changed
    before = os.path.getmtime(os.path.join(parent, "recommendations.json"))
    assert main(["recommend", parent, "--budget-tokens", "10", "--branches", *branches]) == 2
    other = str(tmp_path / "o")
    assert main(["train", "--config", str(cfgf), "--out", other, "--quiet", "--until", "5"]) == 0
    assert main(["recommend", other, "--branches", branches[0]]) == 2
    assert os.path.getmtime(os.path.join(parent, "recommendations.json")) == before
    # without probes: each entry made or says why, with the command that would make it possible
    capsys.readouterr()
    assert main(["recommend", parent, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "--switch-at" in out["not_available"]["data_switch"]


def test_replicate_probes_end_to_end(tmp_path, capsys):
    """`midtrain sweep --seeds`: each probe once per seed (the run's seed + K), the parent's own switch and
    anneal as replicates of it; recommend uses the replicates' spread in data_switch, mixture and lr_decay."""
    import json

    from midtrain.cli import main

    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(micro_config(steps=(12, 6, 4), checkpoint_every=100, eval_every=2,
                                            checkpoint_steps=[9])))
    parent = str(tmp_path / "p")
    assert main(["train", "--config", str(cfgf), "--out", parent, "--quiet"]) == 0
    prefix = str(tmp_path / "pr")
    capsys.readouterr()
    for bad in (["--switch-at", "9", "--seeds", "0,0"], ["--switch-at", "9", "--seeds", "-1"],
                ["--rope", "a=base:100", "--step", "9", "--seeds", "0,1"],        # --seeds: probes and batch sweeps
                ["--step", "9", "--switch-at", "12"],                              # --step must be the probes' step
                ["--switch-at", "12", "--seeds", "0"]):                            # the parent's own, seed 0 only
        assert main(["sweep", parent, *bad, "--out-prefix", prefix]) == 2, bad
    assert not os.path.exists(prefix)
    assert main(["sweep", parent, "--switch-at", "9,12", "--anneal-at", "9", "--seeds", "0,1", "--out-prefix", prefix,
                 "--quiet"]) == 0
    assert main(["sweep", parent, "--step", "12", "--mixtures", "heavy=0.1,0.45,0.45", "--seeds", "0,1",
                 "--out-prefix", prefix, "--quiet"]) == 0
    names = sorted(os.listdir(prefix))
    assert names == ["anneal9-6-seed0", "anneal9-6-seed1", "switch12-heavy-seed0", "switch12-heavy-seed1",
                     "switch12-seed1", "switch9-seed0", "switch9-seed1"]
    seeds = {n: load_run(os.path.join(prefix, n)).config["seed"] for n in names}
    assert {n: s - load_run(parent).config["seed"] for n, s in seeds.items()} == {
        n: int(n[-1]) for n in names}
    a, b = (load_run(os.path.join(prefix, f"switch9-seed{k}")).metrics.dropna(subset=["train/loss"]) for k in (0, 1))
    assert a["train/loss"].iloc[-1] != b["train/loss"].iloc[-1]          # another data order
    capsys.readouterr()
    assert main(["recommend", parent, "--json", "--branches", *[os.path.join(prefix, n) for n in names]]) == 0
    out = json.loads(capsys.readouterr().out)
    made = {r["name"]: r for r in out["recommendations"]}
    assert {"data_switch", "mixture", "lr_decay"} <= set(made), out["not_available"]
    assert "pooled spread of the replicates of 3 candidate(s)" in made["data_switch"]["evidence"]["noise"]
    assert made["mixture"]["value"]["name"] in ("heavy", "midtrain (the run's)")
    assert "sd over 2 seeds" in made["mixture"]["evidence"]["mixtures"]
    assert made["lr_decay"]["evidence"]["seed noise"].startswith("sigma ")
    assert made["lr_decay"]["low"] <= made["lr_decay"]["value"] <= made["lr_decay"]["high"]
