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


def _write_lock(out, pid, host=None):
    (out / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}))


def test_a_locked_run_directory_is_refused_naming_the_holder(tmp_path, capsys):
    cfg = _cfg()
    out = tmp_path / "r"
    train(cfg, str(out), until_step=5, progress=False)
    assert not (out / LOCK).exists()  # released on exit
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, holder.pid)
        before = {p: (out / p).read_bytes() for p in ("run.json", "metrics.jsonl")}
        assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert str(holder.pid) in err and socket.gethostname() in err and LOCK in err
        assert before == {p: (out / p).read_bytes() for p in ("run.json", "metrics.jsonl")}
        assert json.loads((out / LOCK).read_text())["pid"] == holder.pid  # the holder keeps it
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_the_lock_is_released_on_failure(tmp_path):
    cfg = _cfg()
    out = tmp_path / "r"
    train(cfg, str(out), until_step=5, progress=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer exists
    _write_lock(out, gone.pid)
    seen = {}

    from hooks.monitor import Hook

    class LockWatcher(Hook):
        name = "lock_watcher"

        def on_step_begin(self, step):
            seen[step] = json.loads((out / LOCK).read_text())

        def on_step_end(self, step, scalars):
            if step == 8:
                raise RuntimeError("boom")
            return {}

    with pytest.warns(UserWarning, match=rf"stale.*{gone.pid}"):
        with pytest.raises(RuntimeError, match="boom"):
            train(cfg, str(out), resume=True, progress=False, hooks=[LockWatcher()], strict_hooks=True)
    assert seen[5]["pid"] == os.getpid() and seen[5]["host"] == socket.gethostname()
    assert not (out / LOCK).exists()  # released on failure too
    res = train(cfg, str(out), resume=True, progress=False)
    assert res.steps_done == cfg.total_steps() and not (out / LOCK).exists()


def test_a_failed_fresh_start_leaves_no_directory_for_the_lock(tmp_path):
    cfg = _cfg()
    cfg.phases[0].mixture = {"nope": 1.0}
    with pytest.raises(Exception):
        train(cfg, str(tmp_path / "new"), progress=False)
    assert not (tmp_path / "new").exists()


def test_resumed_summary_keeps_the_first_evaluation(tmp_path, capsys):
    cfg = _cfg()
    out = tmp_path / "r"
    first = train(cfg, str(out), until_step=6, progress=False)
    assert first.val_start
    res = train(cfg, str(out), resume=True, progress=False)
    assert res.val_start == pytest.approx(first.val_start)
    assert main(["train", "--config", _toml(tmp_path, cfg), "--out", str(tmp_path / "c"), "--quiet",
                 "--until", "6"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "c"), "--resume", "--quiet"]) == 0
    text = capsys.readouterr().out
    table = text.split("validation loss")[1]
    assert "n/a" not in table


def _toml(tmp_path, cfg):
    from midtrain.config import dumps_toml

    p = tmp_path / "c.toml"
    p.write_text(dumps_toml(cfg))
    return str(p)


def test_resume_at_the_switch_to_one_batch_size_keeps_the_noise_scale(tmp_path):
    """GradientNoiseScale in mode auto measures accumulating steps by micro-batches and switches to
    per-example norms one step after the first step with one batch size. Its switch was not in the
    checkpoint, so a run resumed exactly there measured that step when the uninterrupted run did not,
    and every later gns/b_simple differed (found by tests/reliability/test_kill.py)."""
    import numpy as np

    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(6, 4, 2), checkpoint_every=100)   # grad_accum 2, then 1 from step 6
    train(cfg, str(tmp_path / "full"), progress=False)
    train(cfg, str(tmp_path / "split"), until_step=6, progress=False)
    train(cfg, str(tmp_path / "split"), resume=True, progress=False)
    a, b = (load_run(tmp_path / n).metrics.set_index("step")["gns/b_simple"] for n in ("full", "split"))
    np.testing.assert_allclose(b.to_numpy(float), a.to_numpy(float), rtol=0, atol=1e-9, equal_nan=True)
