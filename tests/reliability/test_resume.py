"""Resume reliability (issue 11, "Smaller"): a truncated latest checkpoint falls back to the newest
readable one; one process at a time trains a run directory (a lock file, stale locks taken over);
the summary of a resumed run keeps the run's first evaluation."""

import json
import os
import socket
import subprocess
import sys

import pytest

from diagnostics import runs
from diagnostics.runs import load_run
from midtrain.cli import main
from midtrain.loop import train
from tests.midtrain.conftest import micro_config

LOCK = getattr(runs, "LOCK_FILE", "lock.json")


def _cfg():
    cfg = micro_config(steps=(6, 4, 2))
    cfg.monitor.gns = cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    return cfg


def test_truncated_latest_checkpoint_falls_back_to_the_newest_readable(tmp_path, capsys):
    cfg = _cfg()
    out = tmp_path / "r"
    train(cfg, str(out), until_step=10, progress=False)
    assert [s for s, _ in load_run(out).checkpoints()] == [5, 6, 10]
    latest = out / "checkpoints" / "step_0000010.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # killed mid-copy, a full disk, ...
    with pytest.warns(RuntimeWarning, match=r"step_0000010\.pt.*cannot be read.*Resuming from step 6"):
        res = train(cfg, str(out), resume=True, progress=False)
    assert res.start_step == 6 and res.steps_done == cfg.total_steps()
    steps = load_run(out).metrics.dropna(subset=["train/loss"])["step"]
    assert list(steps) == list(range(cfg.total_steps()))  # each step once
    # every checkpoint unreadable: a clear error, nothing changed
    for _, p in load_run(out).checkpoints():
        p.write_bytes(b"garbage")
    before = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before
