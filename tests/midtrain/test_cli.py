"""The `midtrain` command line: train / show / config, exit code 2 on bad input."""

import json
import os
import subprocess
import sys

import pytest

from diagnostics.runs import load_run
from midtrain.cli import main
from midtrain.config import default_config, dumps_toml, load_toml
from tests.midtrain.conftest import micro_config


def _write_cfg(path, cfg):
    path.write_text(dumps_toml(cfg))
    return str(path)


def test_default_recipe_learns_every_domain(tmp_path, capsys):
    """The default recipe (tiny preset), shortened to 80 steps: every domain's val
    loss falls to at most 0.65 of its step-0 value (the full 400-step default run
    reaches ~0.3; tests/midtrain/test_cli.py::test_full_default_run checks 0.6)."""
    rc = main(["train", "--steps", "80", "--out", str(tmp_path / "r"), "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation loss" in out and "tokens/s" in out and str(tmp_path / "r") in out
    run = load_run(tmp_path / "r")
    m = run.metrics
    for d in ("prose", "code", "math"):
        s = m[f"val/{d}/loss"].dropna()
        assert s.iloc[-1] <= 0.65 * s.iloc[0], (d, s.iloc[0], s.iloc[-1])
    assert run.checkpoints()


@pytest.mark.slow
def test_full_default_run(tmp_path, monkeypatch):
    """`midtrain train` with no arguments (about 2-5 minutes on 2 cores)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--quiet"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    m = load_run(run_dir).metrics
    for d in ("prose", "code", "math"):
        s = m[f"val/{d}/loss"].dropna()
        assert s.iloc[-1] <= 0.6 * s.iloc[0]


def test_config_dump_roundtrips(tmp_path, capsys):
    f = tmp_path / "d.toml"
    assert main(["config", "--dump", str(f)]) == 0
    assert load_toml(f).to_dict() == default_config().to_dict()
    assert main(["config", "--dump", str(f)]) == 2  # never overwrites without --force
    assert main(["config", "--dump", str(f), "--force"]) == 0
    assert main(["config"]) == 0
    assert "[[phases]]" in capsys.readouterr().out


def test_train_from_config_file_then_show(tmp_path, capsys):
    cfgf = _write_cfg(tmp_path / "c.toml", micro_config(steps=(3, 2, 1)))
    out = str(tmp_path / "r")
    assert main(["train", "--config", cfgf, "--out", out, "--quiet", "--until", "4"]) == 0
    assert load_run(out).info["status"] == "stopped"
    assert main(["train", "--out", out, "--resume", "--quiet"]) == 0  # resumes with the run's own config
    assert load_run(out).info["status"] == "finished"
    capsys.readouterr()
    assert main(["show", out]) == 0
    text = capsys.readouterr().out
    assert "long_context" in text and "validation loss" in text and "checkpoints" in text
    # branch from step 5 with the parent's config (no --config)
    assert main(["train", "--from", out, "--step", "5", "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert load_run(tmp_path / "b").parent["step"] == 5


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "--config", "missing.toml"], "does not exist"),
        (["train", "--preset", "huge", "--out", "X"], "valid presets"),
        (["train", "--steps", "2", "--out", "X"], "fewer than the 3 phases"),
        (["show", "nowhere"], "nowhere"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("midtrain: error:") and needle in err
    assert not (tmp_path / "X").exists()


def test_bad_config_key_and_data_path(tmp_path, capsys):
    f = tmp_path / "bad.toml"
    f.write_text('[model]\npreset = "tiny"\nlayers = 3\n')
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "layers" in capsys.readouterr().err
    f.write_text(f'[data]\npath = "{tmp_path / "no_such_dir"}"\n')
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    assert "no_such_dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    f.write_text(f'[data]\npath = "{tmp_path / "empty"}"\n')
    assert main(["train", "--config", str(f), "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()


def test_help_on_every_command():
    for cmd in ([], ["train"], ["show"], ["config"]):
        r = subprocess.run([sys.executable, "-m", "midtrain.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: midtrain" in r.stdout
