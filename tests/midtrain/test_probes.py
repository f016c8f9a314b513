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
