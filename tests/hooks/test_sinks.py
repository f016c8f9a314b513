"""Sinks: a failing sink never stops training; the wandb mirror (a fake wandb module for the logic,
real wandb in offline mode when installed) receives exactly the run store's records."""

import json
import sys
import types
import warnings

import numpy as np
import pytest

from hooks.monitor import MemorySink, Monitor
from hooks.sinks import WANDB_ID_FILE, WandbSink
from tests.hooks.test_monitor import Counting, _loop


class FlakySink:
    def __init__(self, fail_at):
        self.fail_at, self.records, self.closed = fail_at, [], False

    def log_dict(self, record):
        if record["step"] == self.fail_at:
            raise ConnectionError("network down")
        self.records.append(record)

    def close(self):
        self.closed = True


def test_failing_sink_is_dropped_and_training_goes_on():
    good, flaky = MemorySink(), FlakySink(fail_at=1)
    mon = Monitor(None, [Counting()], sinks=[flaky, good])
    with pytest.warns(RuntimeWarning, match="FlakySink.*network down.*no more records"):
        _loop(mon)
    assert [r["step"] for r in good.records] == [0, 1, 2, 3]  # the other sink lost nothing
    assert [r["step"] for r in flaky.records] == [0] and flaky.closed
    assert mon.failed_sinks == {"FlakySink": "ConnectionError: network down"}
    strict = Monitor(None, [Counting()], sinks=[FlakySink(fail_at=0)], strict=True)
    with pytest.raises(ConnectionError):
        _loop(strict)


class FakeRun:
    def __init__(self, **kw):
        self.kw, self.logged, self.finished = kw, [], False
        self.id = kw.get("id", "abc123")

    def log(self, data, step=None):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.runs = []

    def init(**kw):
        mod.runs.append(FakeRun(**kw))
        return mod.runs[-1]

    mod.init = init
    monkeypatch.setitem(sys.modules, "wandb", mod)
    return mod


def test_wandb_sink_logic(fake_wandb, tmp_path):
    run_dir = tmp_path / "r"
    sink = WandbSink(project="p", run_dir=run_dir, mode="offline", config={"seed": 1}, tags=["a"])
    run = fake_wandb.runs[-1]
    assert run.kw == {"project": "p", "name": "r", "mode": "offline", "config": {"seed": 1},
                      "dir": str(run_dir), "tags": ["a"]}
    sink.log_dict({"step": 0, "train/loss": 2.5, "gns/b_simple": float("nan"), "note": "x", "obj": object()})
    sink.log_dict({"step": 2, "train/loss": 2.0})
    sink.log_dict({"step": 1, "train/loss": 9.9})  # wandb cannot go back: skipped and counted
    sink.log_dict({"val/prose/loss": 3.0})          # no step: wandb's own counter
    assert [s for s, _ in run.logged] == [0, 2, None] and sink.skipped == 1
    first = run.logged[0][1]
    assert first["train/loss"] == 2.5 and np.isnan(first["gns/b_simple"]) and "obj" not in first
    sink.close()
    assert run.finished
    assert json.loads((run_dir / WANDB_ID_FILE).read_text()) == {"id": "abc123", "project": "p"}
    WandbSink(project="p", run_dir=run_dir)  # a resumed run continues the same wandb run
    assert fake_wandb.runs[-1].kw["id"] == "abc123" and fake_wandb.runs[-1].kw["resume"] == "allow"
    (run_dir / WANDB_ID_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="wandb id file"):
        WandbSink(run_dir=run_dir)
    with pytest.raises(ValueError, match="mode"):
        WandbSink(mode="sometimes")
    own = FakeRun()
    WandbSink(run=own).close()
    assert not own.finished  # a run passed in stays open


def test_wandb_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match=r"midtrain\[wandb\]"):
        WandbSink(project="p")


def test_builtin_loop_config_and_cli(fake_wandb, tmp_path):
    from diagnostics.runs import load_run
    from midtrain.cli import main
    from midtrain.config import ConfigError, dumps_toml, load_toml
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(2, 1, 1), checkpoint_every=100, eval_every=100)
    cfg.monitor.gns = cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    cfg.wandb = {"project": "p", "mode": "offline", "tags": ["t"]}
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg))
    assert load_toml(path).wandb == cfg.wandb  # round trip through TOML
    train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    run = fake_wandb.runs[-1]
    m = load_run(tmp_path / "r").metrics
    logged = {s: d for s, d in run.logged if s is not None}
    assert sorted(logged) == sorted(set(m["step"]))  # every step of the run store, mirrored
    assert logged[0]["train/loss"] == pytest.approx(m.set_index("step").loc[0, "train/loss"])
    assert run.finished and run.kw["config"]["wandb"] == cfg.wandb
    for bad, match in [({"projekt": "p"}, "unknown key"), ({"mode": "sometimes"}, "mode"),
                       ({"tags": "a"}, "tags")]:
        cfg.wandb = bad
        with pytest.raises(ConfigError, match=match):
            cfg.validate()

    def refuse(**kw):
        raise RuntimeError("api_key not configured (no-tty)")

    fake_wandb.init = refuse
    cfg.wandb = {"project": "p"}
    with pytest.raises(ConfigError, match="api_key.*offline"):
        train(cfg, str(tmp_path / "r2"), progress=False)
    assert not (tmp_path / "r2" / "run.json").exists()  # nothing trained, the name is still free
    fake_wandb.init = lambda **kw: fake_wandb.runs.append(FakeRun(**kw)) or fake_wandb.runs[-1]
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "r3"), "--quiet",
                 "--wandb", "q", "--wandb-mode", "disabled"]) == 0
    assert fake_wandb.runs[-1].kw["project"] == "q" and fake_wandb.runs[-1].kw["mode"] == "disabled"


def test_real_wandb_offline(tmp_path, monkeypatch):
    """The real package, offline (no API key, no network): the run's files appear under the run
    directory and the history holds the logged steps."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run_dir = tmp_path / "r"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sink = WandbSink(project="midtrain-test", run_dir=run_dir, mode="offline")
        for step in range(3):
            sink.log_dict({"step": step, "train/loss": 3.0 - step, "gns/b_simple": float("nan")})
        run_id = sink.run.id
        sink.close()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and run_id in offline[0].name
    assert json.loads((run_dir / WANDB_ID_FILE).read_text())["id"] == run_id
