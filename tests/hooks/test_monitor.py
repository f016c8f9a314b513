import pytest
import torch

from hooks.monitor import Hook, MemorySink, Monitor



class Counting(Hook):
    name = "counting"

    def __init__(self, every=1):
        self.every, self.events, self.total = every, [], 0

    def scheduled(self, step):
        return step % self.every == 0

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        self.events.append(("backward", batch_size))

    def on_grads_ready(self):
        self.events.append(("grads",))

    def on_step_end(self, step, scalars):
        self.total += 1
        return {"count/total": self.total}

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, s):
        self.total = s["total"]


class Exploding(Hook):
    name = "exploding"

    def on_grads_ready(self):
        raise RuntimeError("boom")

    def on_step_end(self, step, scalars):
        return {"explode/x": 1.0}


def _loop(monitor, steps=4, micro=2):
    for step in range(steps):
        for _ in range(micro):
            monitor.on_backward_end(3, losses=torch.ones(3))
        monitor.on_grads_ready()
        monitor.on_step_end(step, loss=torch.tensor(1.5), lr=0.1, **{"val/prose/loss": 2.0})


def test_records_one_per_step_with_areas():
    sink = MemorySink()
    _loop(Monitor(None, [Counting()], sinks=[sink]))
    assert [r["step"] for r in sink.records] == [0, 1, 2, 3]
    r = sink.records[0]
    assert r["train/loss"] == 1.5 and r["train/lr"] == 0.1 and r["val/prose/loss"] == 2.0
    assert sink.records[-1]["count/total"] == 4


def test_unscheduled_hook_gets_no_events():
    h = Counting(every=2)
    sink = MemorySink()
    _loop(Monitor(None, [h], sinks=[sink]))
    assert h.total == 2  # steps 0 and 2
    assert len(h.events) == 2 * (2 + 1)
    assert "count/total" not in sink.records[1]


def test_failing_hook_is_disabled_and_training_goes_on():
    sink = MemorySink()
    good = Counting()
    mon = Monitor(None, [Exploding(), good], sinks=[sink])
    with pytest.warns(RuntimeWarning, match="exploding.*disabled"):
        _loop(mon)
    assert "exploding" in mon.disabled
    assert good.total == 4
    assert all("explode/x" not in r for r in sink.records)


def test_strict_mode_raises():
    mon = Monitor(None, [Exploding()], sinks=[MemorySink()], strict=True)
    with pytest.raises(RuntimeError, match="boom"):
        _loop(mon)


def test_state_dict_roundtrip():
    h = Counting()
    mon = Monitor(None, [h], sinks=[MemorySink()])
    _loop(mon, steps=3)
    h2 = Counting()
    Monitor(None, [h2], sinks=[MemorySink()]).load_state_dict(mon.state_dict())
    assert h2.total == 3


def test_run_dir_sink_writes_metrics(tmp_path):
    from diagnostics.runs import load_run

    mon = Monitor(None, [Counting()], run_dir=str(tmp_path / "r"))
    _loop(mon, steps=3)
    mon.close()
    run = load_run(tmp_path / "r")
    assert list(run.metrics["step"]) == [0, 1, 2]
    assert list(run.metrics["count/total"]) == [1, 2, 3]


def test_disabled_monitor_writes_nothing():
    sink = MemorySink()
    _loop(Monitor(None, [Counting()], sinks=[sink], enabled=False))
    assert sink.records == []


def test_context_manager_sets_the_run_status(tmp_path):
    import json

    def status(d):
        return json.loads((d / "run.json").read_text())["status"]

    with Monitor(None, [Counting()], run_dir=str(tmp_path / "ok")) as mon:
        _loop(mon, steps=2)
    assert status(tmp_path / "ok") == "finished"
    with pytest.raises(RuntimeError):
        with Monitor(None, [Counting()], run_dir=str(tmp_path / "bad")) as mon:
            _loop(mon, steps=1)
            raise RuntimeError("the user's loop failed")
    assert status(tmp_path / "bad") == "failed"
    mon = Monitor(None, [Counting()], run_dir=str(tmp_path / "stop"))
    _loop(mon, steps=1)
    mon.close(status="stopped")
    assert status(tmp_path / "stop") == "stopped"
    mon = Monitor(None, [Counting()], run_dir=str(tmp_path / "plain"))
    mon.close()
    assert status(tmp_path / "plain") == "running"  # no status given: left as it was
