"""Fault injection on the run store (issue 11): write failures of ``metrics.jsonl``, a full disk,
a run directory that refuses new files, gaps in the step sequence, and the messages around them.

Writes are made to fail portably (we run as root, so ``chmod`` blocks nothing): the writer's
metrics file object is wrapped so that its ``write`` raises ``OSError`` while the run is in a given
window of steps, as ``chattr +i`` or a full disk would; one test uses ``chattr +i`` itself where
the file system supports it.
"""

import errno
import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

from diagnostics import runs as runs_mod
from diagnostics.runs import RunDirError, RunDirWarning, RunWriter, load_run
from midtrain.cli import main
from midtrain.config import dumps_toml
from midtrain.loop import train
from tests.midtrain.conftest import micro_config

pytestmark = pytest.mark.usefixtures("one_thread")

_STEP = re.compile(rb'"step": (\d+)')


class Faults:
    """Which writes fail, by the latest step the run store was asked to write (``latest``).

    ``metrics``: (first, last) steps during which appending to metrics.jsonl fails;
    ``checkpoints`` / ``new_files``: from which step a checkpoint write / any new file in the run
    directory (the temp file of every atomic write) fails."""

    def __init__(self, metrics=None, checkpoints=None, new_files=None, err=errno.ENOSPC):
        self.metrics, self.checkpoints, self.new_files, self.err = metrics, checkpoints, new_files, err
        self.latest = -1
        self.failed = 0

    def raise_(self, what):
        self.failed += 1
        raise OSError(self.err, f"{errno.errorcode[self.err]} (injected: {what})")

    def off(self):
        self.metrics = self.checkpoints = self.new_files = None

    def install(self, monkeypatch):
        faults, real_init = self, RunWriter.__init__

        def init(w, *a, **k):
            real_init(w, *a, **k)
            w._file = _FlakyFile(w._file, faults)

        monkeypatch.setattr(RunWriter, "__init__", init)
        import midtrain.checkpoint as ck

        real_ckpt_write, real_mkstemp = ck.atomic_write, runs_mod.atomic_write.__globals__["tempfile"].mkstemp

        def ckpt_write(path, *a, **k):
            if faults.checkpoints is not None and faults.latest >= faults.checkpoints:
                faults.raise_(f"checkpoint {path}")
            return real_ckpt_write(path, *a, **k)

        def mkstemp(*a, **k):
            if faults.new_files is not None and faults.latest >= faults.new_files:
                faults.raise_("new file")
            return real_mkstemp(*a, **k)

        class _Tempfile:  # only the run store's atomic_write sees it
            pass

        tf = _Tempfile()
        tf.mkstemp = mkstemp
        monkeypatch.setattr(ck, "atomic_write", ckpt_write)
        monkeypatch.setitem(runs_mod.atomic_write.__globals__, "tempfile", tf)
        return self


class _FlakyFile:
    """The metrics file, failing as an unwritable file does while the run is in ``faults.metrics``."""

    def __init__(self, f, faults):
        self._f, self._faults = f, faults

    def write(self, data):
        raw = data.encode() if isinstance(data, str) else bytes(data)
        steps = [int(s) for s in _STEP.findall(raw)]
        fl = self._faults
        if steps:
            fl.latest = max(fl.latest, *steps)
        if fl.metrics is not None and fl.metrics[0] <= fl.latest <= fl.metrics[1]:
            fl.raise_("metrics.jsonl")
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)


def tiny_cfg(**kw):
    cfg = micro_config(**kw)
    for hook in ("gns", "representation", "difficulty"):
        setattr(cfg.monitor, hook, {"enabled": False})
    return cfg


def steps_in(path):
    return [json.loads(line)["step"] for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def no_wait(monkeypatch):
    """The run store's retries at the end of a run, without the wait (the faults never end)."""
    monkeypatch.setattr(RunWriter, "close_retry_s", 0.0, raising=False)


# ----------------------------------------------------------------------------- the writer

def test_a_short_write_failure_loses_no_record(tmp_path, monkeypatch):
    faults = Faults(metrics=(3, 5)).install(monkeypatch)
    w = RunWriter.create(tmp_path / "r", {})
    with pytest.warns(RunDirWarning, match="metrics.jsonl"):
        for s in range(10):
            w.log({"step": s, "train/loss": float(s)})
    assert faults.failed >= 3
    w.close(status="finished")
    assert steps_in(tmp_path / "r") == list(range(10))  # every record, in order
    run = load_run(tmp_path / "r")
    assert run.status == "finished" and run.gaps() == []
    assert run.info["metrics_store"]["delayed_records"] == 3 and run.info["metrics_store"]["lost_records"] == 0


def test_a_torn_write_leaves_no_half_line(tmp_path, monkeypatch):
    """A write that stops part-way (a full disk) must not leave half a record before the next one."""
    w = RunWriter.create(tmp_path / "r", {})
    w.log({"step": 0, "x": 1.0})
    real, calls = w._file, {"n": 0}

    class Torn:
        def write(self, data):
            calls["n"] += 1
            if calls["n"] == 1:
                real.write(data[: len(data) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real.write(data)

        def __getattr__(self, name):
            return getattr(real, name)

    w._file = Torn()
    with pytest.warns(RunDirWarning):
        w.log({"step": 1, "x": 2.0})
        w.log({"step": 2, "x": 3.0})
    w.close()
    assert steps_in(tmp_path / "r") == [0, 1, 2]


def test_buffer_overflow_is_counted_and_fails_the_run(tmp_path, monkeypatch, no_wait):
    Faults(metrics=(3, 10**9)).install(monkeypatch)
    w = RunWriter.create(tmp_path / "r", {}, max_pending=2)
    with pytest.warns(RunDirWarning) as got:
        for s in range(8):
            w.log({"step": s})
        w.close(status="finished")
    assert any("lost" in str(m.message) for m in got)
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert info["status"] == "failed"
    assert "metrics.jsonl" in info["error"] and "step 3" in info["error"]
    assert info["metrics_store"]["lost_records"] == 5 and info["metrics_store"]["first_missing_step"] == 3


def test_writes_resume_in_order_after_records_were_lost(tmp_path, monkeypatch):
    faults = Faults(metrics=(3, 6)).install(monkeypatch)
    w = RunWriter.create(tmp_path / "r", {}, max_pending=2)
    with pytest.warns(RunDirWarning):
        for s in range(10):
            w.log({"step": s})
        w.close(status="finished")
    assert faults.failed
    assert steps_in(tmp_path / "r") == [0, 1, 2, 3, 4, 7, 8, 9]  # the buffer kept 3, 4; 5, 6 were lost
    with pytest.warns(RunDirWarning, match="5-6"):
        run = load_run(tmp_path / "r")
    assert run.status == "failed" and run.gaps() == [(5, 6)]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr not installed")
def test_an_immutable_metrics_file_for_a_moment(tmp_path):
    """The issue's reproduction: ``chattr +i metrics.jsonl`` during a run, then ``chattr -i``."""
    w = RunWriter.create(tmp_path / "r", {})
    metrics = tmp_path / "r" / "metrics.jsonl"
    if subprocess.run(["chattr", "+i", str(metrics)], capture_output=True).returncode:
        w.close()
        pytest.skip("this file system does not support chattr +i")
    try:
        with pytest.warns(RunDirWarning):
            for s in range(5):
                w.log({"step": s})
    finally:
        subprocess.run(["chattr", "-i", str(metrics)], check=True)
    with pytest.warns(RunDirWarning, match="5 records that waited in memory were written, none lost"):
        for s in range(5, 8):
            w.log({"step": s})
    w.close(status="finished")
    assert steps_in(tmp_path / "r") == list(range(8))


# ----------------------------------------------------------------------------- gaps

def _run_with_steps(path, steps, **info):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunDirWarning)
        w = RunWriter.create(path, {})
        for s in steps:
            w.log({"step": s, "x": 1.0})
        w.update_info(**info)
        w.close()


def test_gaps_in_a_run_that_logs_every_step(tmp_path):
    # the built-in loop (total_steps in run.json): every step from 0 through steps_done
    _run_with_steps(tmp_path / "a", [0, 1, 2, 5, 6, 9], total_steps=12, steps_done=12, status="finished")
    with pytest.warns(RunDirWarning, match=r"3-4, 7-8, 10-12"):
        run = load_run(tmp_path / "a")
    assert run.gaps() == [(3, 4), (7, 8), (10, 12)]
    # a run that stopped early (failed) expects steps only through its last record
    _run_with_steps(tmp_path / "b", [0, 1, 2], total_steps=12, steps_done=2, status="failed")
    assert load_run(tmp_path / "b").gaps() == []
    # another loop that logs every step: compared step to step
    _run_with_steps(tmp_path / "c", [3, 4, 5, 8, 9, 10, 11])
    with pytest.warns(RunDirWarning, match="6-7"):
        assert load_run(tmp_path / "c").gaps() == [(6, 7)]


def test_no_gaps_in_a_run_that_logs_every_nth_step(tmp_path):
    _run_with_steps(tmp_path / "r", [0, 10, 20, 40, 50, 53])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RunDirWarning)
        assert load_run(tmp_path / "r").gaps() == []


def test_show_reports_gaps_and_lost_records(tmp_path, capsys):
    _run_with_steps(tmp_path / "r", [0, 1, 2, 6, 7], total_steps=8, steps_done=8, status="failed",
                    metrics_store={"delayed_records": 0, "lost_records": 3, "first_missing_step": 3,
                                   "last_error": "OSError: [Errno 28] No space left on device"},
                    error="metrics.jsonl: 3 records could not be written")
    with pytest.warns(RunDirWarning):
        assert main(["show", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "status failed" in out and "3 records could not be written" in out
    assert "missing steps" in out and "3-5" in out


def test_show_notes_a_missing_metrics_file(tmp_path, capsys):
    _run_with_steps(tmp_path / "r", [], total_steps=8, steps_done=8, status="finished")
    (tmp_path / "r" / "metrics.jsonl").unlink()
    with pytest.warns(RunDirWarning, match="metrics.jsonl"):
        assert main(["show", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "metrics.jsonl is missing" in out


# ----------------------------------------------------------------------------- the built-in loop

def test_builtin_run_survives_a_short_write_failure(tmp_path, monkeypatch):
    Faults(metrics=(6, 9)).install(monkeypatch)
    cfg = tiny_cfg()
    with pytest.warns(RunDirWarning, match="metrics.jsonl"):
        train(cfg, str(tmp_path / "r"), progress=False)
    total = cfg.total_steps()
    assert steps_in(tmp_path / "r") == list(range(total + 1))  # every step, the final evaluation too
    run = load_run(tmp_path / "r")
    assert run.status == "finished" and run.gaps() == []
    assert run.info["metrics_store"]["lost_records"] == 0


def test_records_lost_to_a_full_buffer_stop_the_run(tmp_path, monkeypatch):
    Faults(metrics=(7, 10**9)).install(monkeypatch)
    monkeypatch.setattr(RunWriter, "max_pending", 2, raising=False)
    with pytest.warns(RunDirWarning), pytest.raises(OSError, match="step 7"):
        train(tiny_cfg(), str(tmp_path / "r"), progress=False)
    run = load_run(tmp_path / "r")
    assert run.status == "failed" and "metrics.jsonl" in run.info["error"]
    assert run.info["metrics_store"]["first_missing_step"] == 7
    assert run.latest_checkpoint()[0] <= 7  # a resume re-records step 7 on
    assert run.info["steps_done"] < 12  # it stopped, rather than train on without a record


def _reference(tmp_path, cfg):
    train(cfg, str(tmp_path / "reference"), progress=False)
    return load_run(tmp_path / "reference").metrics


def _assert_same_run(tmp_path, out, reference):
    assert sorted(steps_in(out)) == list(range(len(reference)))  # no missing, no duplicate step
    got = load_run(out)
    assert got.status == "finished" and got.gaps() == []
    np.testing.assert_allclose(got.metrics["train/loss"], reference["train/loss"], atol=1e-6, equal_nan=True)


def _train_with_faults(tmp_path, monkeypatch, capsys, faults):
    """An uninterrupted reference run, then `midtrain train` of the same config under ``faults``:
    (reference metrics, run directory, exit status, the one error paragraph)."""
    cfg = tiny_cfg()
    reference = _reference(tmp_path, cfg)
    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(cfg))
    out = tmp_path / "r"
    faults.install(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunDirWarning)  # records waiting in memory are warned about
        rc = main(["train", "--config", str(cfgf), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "During handling" not in err, err
    assert err.count("midtrain: error:") == 1, err
    return reference, out, rc, err.split("midtrain: error:", 1)[1]


def _resume_completes(tmp_path, out, faults, reference):
    faults.off()
    assert main(["train", "--out", str(out), "--resume", "--quiet"]) == 0
    _assert_same_run(tmp_path, out, reference)


def test_cli_permanent_write_failure_exits_4_and_resume_completes(tmp_path, monkeypatch, capsys, no_wait):
    faults = Faults(metrics=(7, 10**9))
    reference, out, rc, msg = _train_with_faults(tmp_path, monkeypatch, capsys, faults)
    assert rc == 4
    assert "metrics.jsonl" in msg and "step 7" in msg and "--resume" in msg
    run = load_run(out)
    assert run.status == "failed" and "step 7" in run.info["error"]
    assert run.latest_checkpoint()[0] <= 7
    _resume_completes(tmp_path, out, faults, reference)
    assert "error" not in load_run(out).info and "metrics_store" not in load_run(out).info


@pytest.mark.parametrize("faults, needle", [
    # a full disk: the checkpoint write fails; run.json (small, written after the temp file is removed) works
    (lambda: Faults(checkpoints=7, err=errno.ENOSPC), "ENOSPC"),
    # a run directory made read-only mid-run: no new file (checkpoint, run.json temp file) can be made;
    # run.json itself is still writable and is rewritten in place
    (lambda: Faults(new_files=7, err=errno.EACCES), "EACCES"),
], ids=["disk-full", "read-only-directory"])
def test_cli_full_disk_or_read_only_directory_exits_4_and_resume_completes(tmp_path, monkeypatch, capsys,
                                                                           faults, needle):
    faults = faults()
    reference, out, rc, msg = _train_with_faults(tmp_path, monkeypatch, capsys, faults)
    assert rc == 4 and needle in msg and "--resume" in msg
    run = load_run(out)
    assert run.status == "failed" and run.latest_checkpoint()[0] == 5
    _resume_completes(tmp_path, out, faults, reference)


# ----------------------------------------------------------------------------- messages

def test_messages_say_what_a_user_can_do(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError) as e:
        load_run(tmp_path / "empty")
    assert "RunWriter" not in str(e.value) and "midtrain train --out" in str(e.value)
    import pandas as pd
    from diagnostics.recommend import RecommendationError, batch_size_recommendation

    df = pd.DataFrame({"step": [0, 1], "gns/small_sq": [1.0, 1.0], "gns/big_sq": [0.5, 0.5],
                       "gns/b_small": [4.0, 4.0], "gns/b_big": [8.0, 8.0]})

    class FakeRun:  # a built-in-loop run with one phase and two measured steps
        metrics = df
        info = {"phase_starts": [0], "phase_names": ["p"], "total_steps": 2}
        config = {"phases": [{"name": "p", "steps": 2, "batch_size": 8, "grad_accum": 1}]}

    with pytest.raises(RecommendationError) as e:
        batch_size_recommendation(FakeRun())
    assert "min_steps" not in str(e.value) and "--window" in str(e.value)


def test_show_into_a_closed_pipe_ends_quietly(tmp_path):
    """``midtrain show RUN | head``: the reader goes away; no BrokenPipeError traceback."""
    _run_with_steps(tmp_path / "r", range(3))
    p = subprocess.Popen([sys.executable, "-m", "midtrain.cli", "show", str(tmp_path / "r")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))})
    p.stdout.close()  # before the command writes anything: every write meets a closed pipe
    err = p.stderr.read().decode()
    p.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    assert p.returncode == 141
