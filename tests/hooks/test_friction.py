"""The hook-API friction a new user met (issue 14, item 4); each test failed before its fix.

a. ``domains=`` with names (``["code", "math", ...]``) disabled the DifficultyTracker ("invalid literal
   for int()"): names and indices now both work everywhere domains are accepted, and a bad value is a
   TypeError / ValueError at ``Monitor.on_backward_end`` naming ``domains=``, not a disabled hook.
"""

import numpy as np
import pytest
import torch

from hooks import DifficultyTracker, Hook, Monitor
from hooks.monitor import MemorySink
from tests.diagnostics.test_pegrad import gpt_and_batch


class Seen(Hook):
    name = "seen"

    def __init__(self):
        self.domains = []

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        self.domains.append(domains)


def run_tracker(domains_per_step, domain_names=None, steps=3):
    model, x, y = gpt_and_batch(True, B=4)
    tracker = DifficultyTracker(domain_names=domain_names, stats_every=1)
    mon = Monitor(model, [tracker], sinks=[MemorySink()])
    for step in range(steps):
        with torch.no_grad():
            _, losses = model(x, y, reduction="none")
        mon.on_backward_end(4, losses=losses, ids=torch.arange(4) + 4 * step, domains=domains_per_step)
        rec = mon.on_step_end(step)
    return mon, tracker, rec


def test_domain_names_keep_the_difficulty_tracker_alive():
    mon, tracker, rec = run_tracker(["code", "math", "code", "math"], domain_names=["prose"])
    assert mon.disabled_hooks == []
    assert tracker.domain_names == ["prose", "code", "math"]   # given names first, then first appearance
    assert "difficulty/code/loss" in rec and "difficulty/math/loss" in rec
    assert "difficulty/prose/loss" not in rec                   # nothing trained on it


@pytest.mark.parametrize("as_", ["list", "tensor", "array"])
def test_names_and_indices_give_the_same_metrics(as_):
    idx = [1, 2, 1, 2]
    doms = {"list": idx, "tensor": torch.tensor(idx), "array": np.array(idx)}[as_]
    _, _, by_index = run_tracker(doms, domain_names=["prose", "code", "math"])
    _, _, by_name = run_tracker(["code", "math", "code", "math"], domain_names=["prose"])
    assert by_index.keys() == by_name.keys()
    assert all(by_index[k] == pytest.approx(by_name[k]) for k in by_index if k != "step")


@pytest.mark.parametrize("bad, err, words", [
    ([1.5, 2.0, 1.0, 0.0], TypeError, "1.5"),
    (torch.ones(4), TypeError, "float32 tensor"),
    (torch.ones(2, 2, dtype=torch.long), ValueError, "shape"),
    (["code", 1, "math", 2], TypeError, "mix of names and indices"),
    ([0, -1, 0, 1], ValueError, "negative"),
    ("code", TypeError, "single string"),
    (["code", "math"], ValueError, "2 entries but the micro-batch has 4"),
    ([None, None, None, None], TypeError, "None"),
])
def test_a_bad_domains_value_is_an_error_at_the_call(bad, err, words):
    model, x, y = gpt_and_batch(True, B=4)
    seen, tracker = Seen(), DifficultyTracker()
    mon = Monitor(model, [seen, tracker], sinks=[MemorySink()])
    with torch.no_grad():
        _, losses = model(x, y, reduction="none")
    with pytest.raises(err, match="domains=") as e:
        mon.on_backward_end(4, losses=losses, domains=bad)
    assert words in str(e.value)
    assert seen.domains == [] and mon.disabled_hooks == []      # no hook saw it, none disabled
    mon.on_backward_end(4, losses=losses, domains=["a", "b", "a", "b"])   # the run goes on
    assert seen.domains == [["a", "b", "a", "b"]]


def test_adapters_accept_names_and_refuse_bad_values():
    from hooks.integrations._common import domains_field

    assert domains_field(["code", "math"], 2, "domains") == ["code", "math"]
    assert domains_field(torch.tensor([0, 3]), 2, "domains").tolist() == [0, 3]
    with pytest.raises(TypeError, match="'domain' field"):
        domains_field([0.5, 1.0], 2, "domain")


def test_lightning_batches_with_domain_names():
    pytest.importorskip("lightning.pytorch")
    from hooks.integrations.lightning import MidtrainCallback
    from tests.hooks.integrations.test_lightning import LitGPT, Rows, fit, tiny_gpt

    class NamedRows(Rows):
        def __getitem__(self, i):
            return {"xy": self.data[i], "ids": torch.tensor(i), "domains": ("code", "math")[i % 2]}

    tracker, sink = DifficultyTracker(stats_every=1), MemorySink()
    cb = MidtrainCallback([tracker], sinks=[sink], strict=True)
    fit(LitGPT(tiny_gpt(), lr=0.0), cb, steps=2, dataset=NamedRows())
    assert cb.monitor.disabled_hooks == []
    assert tracker.domain_names == ["code", "math"]
    assert "difficulty/code/loss" in sink.records[-1] and "difficulty/math/loss" in sink.records[-1]
