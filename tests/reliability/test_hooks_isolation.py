"""Hooks can never stop training nor hide what happened (issue 11, "Data lost or hidden" 2 and 3).

A hook that returns garbage, edits the record it is handed or raises is disabled with a warning;
the record of every step still reaches the run store; a disabled hook is recorded (run.json's
``disabled_hooks``, ``Monitor.summary``) and shown by ``midtrain show``. Hooks that share a name
(two of one class) are told apart; names the user set twice are refused.
"""

import json
import warnings

import pytest
import torch

from diagnostics.runs import load_run
from hooks.monitor import Hook, MemorySink, Monitor
from tests.hooks.test_monitor import Counting  # name "counting"; on_step_end returns count/total


class Returning(Hook):
    """Returns ``value`` from ``on_step_end`` from step ``at`` on."""

    name = "returning"

    def __init__(self, value, at=1):
        self.value, self.at = value, at

    def on_step_end(self, step, scalars):
        return {"ret/ok": 1.0} if step < self.at else self.value


class EditsRecordThenRaises(Hook):
    name = "editor"

    def on_step_end(self, step, scalars):
        scalars["step"] = "oops"
        scalars["train/loss"] = -1.0
        if step == 3:
            raise RuntimeError("diagnostic bug")
        return {}


class Unnamed(Hook):
    def __init__(self, fail=False):
        self.fail, self.calls = fail, 0

    def on_step_end(self, step, scalars):
        if self.fail:
            raise RuntimeError("unnamed failed")
        self.calls += 1
        return {}


def _loop(monitor, steps=6):
    for step in range(steps):
        monitor.on_backward_end(2, losses=torch.ones(2))
        monitor.on_grads_ready()
        monitor.on_step_end(step, loss=torch.tensor(1.5), lr=0.1)


# ---------------------------------------------------------------------------------------------
# item 2: returned values are checked inside the isolation; the record is the hook's own copy

GARBAGE = {
    "tensor with 3 elements": {"ret/x": torch.ones(3)},
    "empty tensor": {"ret/x": torch.ones(0)},
    "list value": {"ret/x": [1.0, 2.0]},
    "dict value": {"ret/x": {"a": 1}},
    "object value": {"ret/x": object()},
    "not a dict": 3.0,
    "a list": [("ret/x", 1.0)],
    "non-string key": {3: 1.0},
    "sets step": {"step": 99},
}


@pytest.mark.parametrize("value", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_return_disables_the_hook_and_training_goes_on(value):
    sink, good = MemorySink(), Counting()
    mon = Monitor(None, [Returning(value), good], sinks=[sink])
    with pytest.warns(RuntimeWarning, match="'returning'.*on_step_end.*disabled"):
        _loop(mon)
    assert [r["step"] for r in sink.records] == list(range(6))
    assert good.total == 6 and sink.records[-1]["count/total"] == 6
    assert sink.records[0]["ret/ok"] == 1.0
    assert all("ret/x" not in r and "ret/ok" not in r for r in sink.records[1:])
    assert "returning" in mon.disabled


def test_none_value_is_kept_as_not_measured():
    """``None`` is a valid record value (the run store's "not measured"): kept, hook stays live."""
    sink = MemorySink()
    mon = Monitor(None, [Returning({"ret/x": None, "ret/y": torch.tensor(2.0)})], sinks=[sink])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _loop(mon)
    assert len(sink.records) == 6 and not mon.disabled
    assert sink.records[-1]["ret/x"] is None and sink.records[-1]["ret/y"] == 2.0


@pytest.mark.parametrize("value", [{"ret/x": torch.ones(3)}, {"ret/x": None, "step": 1}, "x"])
def test_strict_raises_on_a_bad_return_value(value):
    mon = Monitor(None, [Returning(value)], sinks=[MemorySink()], strict=True)
    with pytest.raises((TypeError, ValueError), match="returning"):
        _loop(mon)


def test_bad_scheduled_summary_and_state_dict_returns_are_isolated():
    class BadScheduled(Hook):
        name = "bad_scheduled"

        def scheduled(self, step):
            return torch.ones(2)  # truth value is ambiguous

    class BadSummary(Hook):
        name = "bad_summary"

        def summary(self):
            return [1, 2]

    class BadState(Hook):
        name = "bad_state"

        def state_dict(self):
            raise RuntimeError("cannot pickle")

    sink, good = MemorySink(), Counting()
    mon = Monitor(None, [BadScheduled(), BadSummary(), BadState(), good], sinks=[sink])
    with pytest.warns(RuntimeWarning):
        _loop(mon)
        state = mon.state_dict()
        summary = mon.summary()
    assert len(sink.records) == 6 and good.total == 6
    assert set(mon.disabled) == {"bad_scheduled", "bad_summary", "bad_state"}
    assert state["hooks"]["counting"] == {"total": 6} and "bad_state" not in state["hooks"]
    assert sorted(d["name"] for d in summary["monitor/disabled_hooks"]) == ["bad_scheduled", "bad_state", "bad_summary"]


def test_a_hook_editing_the_record_then_raising_loses_no_row(tmp_path):
    """The record a hook gets is its own copy: edits never reach the run store or the next hook."""
    seen = []

    class Reader(Hook):
        name = "reader"

        def on_step_end(self, step, scalars):
            seen.append((scalars["step"], scalars["train/loss"]))
            return {}

    mon = Monitor(None, [EditsRecordThenRaises(), Reader()], run_dir=str(tmp_path / "r"))
    with pytest.warns(RuntimeWarning, match="editor"):
        _loop(mon, steps=12)
    mon.close()
    m = load_run(tmp_path / "r").metrics
    assert list(m["step"]) == list(range(12))
    assert list(m["train/loss"]) == [1.5] * 12
    assert seen == [(s, 1.5) for s in range(12)]


# ---------------------------------------------------------------------------------------------
# item 2: a disabled hook is recorded: run.json (through the run writer) or in memory

def test_disabled_hook_is_recorded_in_run_json(tmp_path):
    mon = Monitor(None, [Returning({"ret/x": torch.ones(3)}, at=2), Counting()], run_dir=str(tmp_path / "r"))
    with pytest.warns(RuntimeWarning):
        _loop(mon)
    mon.close(status="finished")
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    [entry] = info["disabled_hooks"]
    assert entry["name"] == "returning" and entry["step"] == 2 and entry["event"] == "on_step_end"
    assert entry["class"] == "Returning" and "3 elements" in entry["reason"]
    assert info["status"] == "finished"
    # a resumed run appends to the list (the earlier segment's entries stay)
    mon = Monitor(None, [EditsRecordThenRaises()], run_dir=str(tmp_path / "r"))
    with pytest.warns(RuntimeWarning):
        _loop(mon)
    mon.close()
    info = json.loads((tmp_path / "r" / "run.json").read_text())
    assert [(d["name"], d["step"]) for d in info["disabled_hooks"]] == [("returning", 2), ("editor", 3)]


def test_disabled_hook_without_a_run_store_is_in_the_summary():
    mon = Monitor(None, [EditsRecordThenRaises(), Counting()], sinks=[MemorySink()])
    assert "monitor/disabled_hooks" not in mon.summary()
    with pytest.warns(RuntimeWarning):
        _loop(mon)
    [entry] = mon.summary()["monitor/disabled_hooks"]
    assert entry["name"] == "editor" and entry["step"] == 3 and "diagnostic bug" in entry["reason"]
    assert mon.disabled_hooks == [entry]


# ---------------------------------------------------------------------------------------------
# item 3: unique names

def test_hooks_of_one_class_get_unique_names_and_separate_fates():
    a, b, c = Counting(), Counting(), Counting()
    mon = Monitor(None, [a, b, c], sinks=[MemorySink()])
    assert [h.name for h in (a, b, c)] == ["counting", "counting_2", "counting_3"]
    b.on_step_end = lambda step, scalars: 1 / 0  # b fails; a and c go on
    with pytest.warns(RuntimeWarning, match="counting_2"):
        _loop(mon)
    assert (a.total, c.total) == (6, 6) and set(mon.disabled) == {"counting_2"}
    state = mon.state_dict()["hooks"]
    assert set(state) == {"counting", "counting_2", "counting_3"}
    fresh = [Counting(), Counting(), Counting()]
    fresh[2].total = 0
    Monitor(None, fresh, sinks=[MemorySink()]).load_state_dict({"hooks": {"counting": {"total": 6},
                                                                          "counting_3": {"total": 4}}})
    assert [h.total for h in fresh] == [6, 0, 4]


def test_default_named_hooks_of_different_classes_are_told_apart():
    ok, bad = Unnamed(), Unnamed(fail=True)
    mon = Monitor(None, [ok, bad], sinks=[MemorySink()])
    assert (ok.name, bad.name) == ("hook", "hook_2")
    with pytest.warns(RuntimeWarning, match="hook_2"):
        _loop(mon)
    assert ok.calls == 6


def test_single_instance_names_are_unchanged():
    from hooks import DifficultyTracker, GradientNoiseScale

    hooks = [GradientNoiseScale(), DifficultyTracker(), Counting(), Unnamed()]
    mon = Monitor(torch.nn.Linear(2, 2), hooks, sinks=[MemorySink()], strict=True)
    assert [h.name for h in hooks] == ["gns", "difficulty", "counting", "hook"]
    assert list(mon.state_dict()["hooks"]) == ["gns", "difficulty", "counting", "hook"]


def test_duplicate_explicit_names_are_refused(tmp_path):
    from hooks import GradientNoiseScale

    with pytest.raises(ValueError, match="'mine'.*GradientNoiseScale.*GradientNoiseScale"):
        Monitor(torch.nn.Linear(2, 2), [GradientNoiseScale(name="mine"), GradientNoiseScale(name="mine")],
                run_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()  # refused before the run store is made
    h = Counting()
    with pytest.raises(ValueError, match="twice"):
        Monitor(None, [h, h], sinks=[MemorySink()])


def test_built_in_loop_refuses_duplicate_names_before_writing(tmp_path):
    """train(hooks=[...]) with two hooks of one explicit name: a ConfigError and no run directory (the
    Monitor is built after the run store, so the loop checks the names first)."""
    from midtrain.config import ConfigError
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    a, b = Counting(), Counting()
    a.name = b.name = "mine"
    with pytest.raises(ConfigError, match="'mine'"):
        train(micro_config(steps=(2, 1, 1)), str(tmp_path / "r"), hooks=[a, b], progress=False)
    assert not (tmp_path / "r").exists()


def test_framework_adapters_refuse_duplicate_names_when_built():
    """The adapters build their Monitor at train start, inside their own isolation: they check first."""
    from hooks import GradientNoiseScale
    from hooks.integrations._common import AdapterBase

    with pytest.raises(ValueError, match="'mine'"):
        AdapterBase([GradientNoiseScale(name="mine"), GradientNoiseScale(name="mine")])
    a, b = Counting(), Counting()
    AdapterBase([a, b])
    assert (a.name, b.name) == ("counting", "counting_2")


def test_two_representation_probes_keep_their_own_state_and_fate(one_thread):
    from hooks.representation import RepresentationProbe
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    ids = torch.randint(0, 256, (2, 16))
    kw = dict(every=1, max_tokens=24, twonn=False, info_plane=False, readout=False, save_spectra=False)
    p0 = RepresentationProbe(ids, layers="blocks.0.resid_post", **kw)
    p1 = RepresentationProbe(ids, layers="blocks.1.resid_post", **kw)
    sink = MemorySink()
    mon = Monitor(model, [p0, p1], sinks=[sink])
    assert (p0.name, p1.name) == ("representation", "representation_2")
    _loop(mon, steps=2)
    state = mon.state_dict()["hooks"]
    assert state["representation"] != state["representation_2"]
    real = p0.on_step_end
    p0.on_step_end = lambda step, scalars: 1 / 0
    with pytest.warns(RuntimeWarning, match="'representation'"):
        mon.on_step_end(2, loss=1.0)
    mon.on_step_end(3, loss=1.0)
    assert "repr/blocks.1.resid_post/entropy" in sink.records[-1]
    assert "repr/blocks.0.resid_post/entropy" not in sink.records[-1]
    assert set(mon.disabled) == {"representation"}
    p0.on_step_end = real
    q0, q1 = (RepresentationProbe(ids, layers=f"blocks.{i}.resid_post", **kw) for i in range(2))
    Monitor(model, [q0, q1], sinks=[MemorySink()]).load_state_dict({"hooks": state})
    assert q0.state_dict() == state["representation"] and q1.state_dict() == state["representation_2"]


def test_two_hooks_of_one_class_save_their_own_arrays(one_thread, tmp_path):
    """Saved arrays follow the unique names too: two probes / two trackers in one run wrote the same
    arrays/repr_spectra_step_N.npz and arrays/difficulty_examples.npz, the second over the first."""
    from diagnostics.runs import load_run
    from hooks.difficulty import DifficultyTracker
    from hooks.representation import RepresentationProbe
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))
    ids = torch.randint(0, 256, (2, 16))
    kw = dict(every=1, max_tokens=24, twonn=False, info_plane=False, readout=False, save_spectra=True)
    probes = [RepresentationProbe(ids, layers=f"blocks.{i}.resid_post", **kw) for i in range(2)]
    trackers = [DifficultyTracker(["a"]), DifficultyTracker(["a"])]
    mon = Monitor(model, probes + trackers, run_dir=tmp_path / "r")
    for step in range(2):
        model.zero_grad()
        loss = model(ids[:, :-1], ids[:, 1:])[1]
        loss.backward()
        mon.on_backward_end(2, losses=torch.tensor([1.0, 2.0]), ids=torch.tensor([0, 1]),
                            domains=torch.tensor([0, 0]))
        mon.on_grads_ready()
        mon.on_step_end(step, loss=loss.item())
    mon.close()
    run = load_run(tmp_path / "r")
    assert set(run.load_array("repr_spectra_step_1")) == {"blocks.0.resid_post"}
    assert set(run.load_array("representation_2_spectra_step_1")) == {"blocks.1.resid_post"}
    assert {"difficulty_examples", "difficulty_2_examples"} <= set(run.arrays())


# ---------------------------------------------------------------------------------------------
# end to end: the built-in loop and `midtrain show`

def test_loop_survives_a_garbage_hook_and_show_reports_it(tmp_path, capsys):
    from midtrain.cli import main
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    class Garbage(Hook):
        name = "garbage"

        def on_step_end(self, step, scalars):
            scalars["step"] = None
            return {"garbage/x": torch.ones(4)} if step >= 2 else {"garbage/x": 1.0}

    cfg = micro_config(steps=(3, 2, 2))
    out = str(tmp_path / "r")
    with pytest.warns(RuntimeWarning, match="garbage"):
        res = train(cfg, out, hooks=[Garbage(), Counting()], progress=False)
    assert res.steps_done == cfg.total_steps() == 7
    run = load_run(out)
    train_steps = run.metrics.dropna(subset=["train/loss"])["step"].tolist()
    assert train_steps == list(range(7))
    assert list(run.metrics.dropna(subset=["count/total"])["count/total"]) == list(range(1, 8))
    assert run.info["status"] == "finished"
    [entry] = run.info["disabled_hooks"]
    assert entry["name"] == "garbage" and entry["step"] == 2 and entry["event"] == "on_step_end"
    capsys.readouterr()
    assert main(["show", out]) == 0
    text = capsys.readouterr().out
    line = [ln for ln in text.splitlines() if "hook garbage" in ln]
    assert len(line) == 1 and "disabled" in line[0] and "step 2" in line[0] and "4 elements" in line[0]
