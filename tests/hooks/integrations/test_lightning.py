"""The Lightning adapter against the plain-loop Monitor (ground truth).

A tiny LightningModule wrapping midtrain's GPT (n_embd 16, 2 layers), trained by a Lightning
Trainer with accumulate_grad_batches=2 and plain SGD; the batches it really fed are recorded and
replayed from the same initial weights through the plain loop of tests/hooks/test_gradient_noise.py.
"""

import copy

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from hooks import GradientNoiseScale, Hook, MemorySink  # noqa: E402
from hooks.integrations.lightning import MidtrainCallback  # noqa: E402
from midtrain.model import GPT, GPTConfig  # noqa: E402
from tests.hooks.integrations import _reference  # noqa: E402
from tests.hooks.integrations._reference import by_step  # noqa: E402

ACCUM, MICRO, T = 2, 4, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_weights=True))


class Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, seed=1, with_ids=False):
        self.data = torch.randint(0, 32, (n, T + 1), generator=torch.Generator().manual_seed(seed))
        self.with_ids = with_ids

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return {"xy": self.data[i], "ids": torch.tensor(i)} if self.with_ids else self.data[i]


class LitGPT(pl.LightningModule):
    def __init__(self, model, lr=0.5):
        super().__init__()
        self.model, self.lr = model, lr
        self.fed, self.pre_clip_sq = [], []

    def training_step(self, batch, batch_idx):
        xy = batch["xy"] if isinstance(batch, dict) else batch
        self.fed.append(xy.clone())
        _, losses = self.model(xy[:, :-1], xy[:, 1:], reduction="none")
        self.midtrain_losses = losses.detach()
        return losses.mean()

    def on_before_optimizer_step(self, optimizer):   # after the callbacks', before clipping
        self.pre_clip_sq.append(sum(float(p.grad.double().pow(2).sum()) for p in self.parameters()
                                    if p.grad is not None))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def fit(module, callback, steps=3, clip=0.0, dataset=None, epochs=-1, **kw):
    trainer = pl.Trainer(max_steps=steps, max_epochs=epochs, accumulate_grad_batches=ACCUM, gradient_clip_val=clip,
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback], **kw)
    loader = torch.utils.data.DataLoader(dataset or Rows(), batch_size=MICRO, shuffle=False)
    trainer.fit(module, loader)
    return trainer


def plain_reference(model, micros, clip, lr=0.5):
    return _reference.plain_reference(model, micros, lambda m, xy: m(xy[:, :-1], xy[:, 1:])[1], accum=ACCUM,
                                      clip=clip, lr=lr, first_step=0)


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_gns_equals_plain_loop_and_is_measured_before_clipping(clip):
    gpt = tiny_gpt()
    init = copy.deepcopy(gpt)
    module, sink = LitGPT(gpt), MemorySink()
    fit(module, MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[sink], strict=True), clip=clip)
    assert len(module.fed) == 3 * ACCUM
    ref = plain_reference(init, module.fed, clip)
    for key in ("gns/small_sq", "gns/big_sq", "gns/b_simple", "train/loss"):
        got, want = by_step(sink.records, key), by_step(ref, key)
        assert sorted(got) == [0, 1, 2] and sorted(want) == [0, 1, 2], key
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-4, nan_ok=True), (key, s)
    big = by_step(sink.records, "gns/big_sq")
    for s, pre in enumerate(module.pre_clip_sq):      # the unclipped accumulated gradient
        assert big[s] == pytest.approx(pre, rel=1e-4)
        if clip:
            assert big[s] > 100 * clip ** 2
    assert set(by_step(sink.records, "gns/b_big").values()) == {MICRO * ACCUM}
    assert by_step(sink.records, "train/lr") == {0: 0.5, 1: 0.5, 2: 0.5}
    assert by_step(sink.records, "train/batch_size") == {0: 8, 1: 8, 2: 8}


class Recorder(Hook):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        self.calls.append((batch_size, losses, ids))


class Boom(Hook):
    name = "boom"

    def on_grads_ready(self):
        raise RuntimeError("boom")


def test_ids_losses_and_a_failing_hook():
    rows = Rows(with_ids=True)
    gpt = tiny_gpt()
    module, rec, sink = LitGPT(gpt, lr=0.0), Recorder(), MemorySink()
    cb = MidtrainCallback([Boom(), rec, GradientNoiseScale(mode="microbatch")], sinks=[sink])
    with pytest.warns(RuntimeWarning, match="boom"):
        trainer = fit(module, cb, steps=2, dataset=rows)
    assert trainer.global_step == 2 and "boom" in cb.monitor.disabled       # training went on
    assert sorted(by_step(sink.records, "gns/big_sq")) == [0, 1]
    assert len(rec.calls) == 2 * ACCUM
    for (n, losses, ids), xy in zip(rec.calls, module.fed):
        assert n == MICRO and torch.equal(rows.data[ids], xy)
        with torch.no_grad():
            want = gpt(xy[:, :-1], xy[:, 1:], reduction="none")[1]
        torch.testing.assert_close(losses, want)


def test_short_last_accumulation_is_not_measured():
    """10 rows, batches of 4: per epoch [4, 4] then [2] -- Lightning scales the short step's loss by
    1/2 all the same, so GNS would be off there: the adapter does not announce its gradients."""
    sink = MemorySink()
    cb = MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[sink], strict=True)
    with pytest.warns(RuntimeWarning, match="short accumulation"):
        fit(LitGPT(tiny_gpt()), cb, steps=-1, epochs=1, dataset=Rows(n=10))
    assert [r["step"] for r in sink.records] == [0, 1]
    assert "gns/big_sq" in sink.records[0] and "gns/big_sq" not in sink.records[1]
    assert sink.records[1]["train/batch_size"] == 2


def test_hook_state_in_lightning_checkpoints(tmp_path):
    gns = GradientNoiseScale(mode="microbatch")
    cb = MidtrainCallback([gns], sinks=[MemorySink()], strict=True)
    trainer = fit(LitGPT(tiny_gpt()), cb, steps=2)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    gns2 = GradientNoiseScale(mode="microbatch")
    cb2 = MidtrainCallback([gns2], sinks=[MemorySink()], strict=True)
    trainer = pl.Trainer(max_steps=3, accumulate_grad_batches=ACCUM, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[cb2])
    trainer.fit(LitGPT(tiny_gpt()), torch.utils.data.DataLoader(Rows(), batch_size=MICRO),
                ckpt_path=tmp_path / "a.ckpt")
    assert gns.n_measured == 2 and gns2.n_measured == 3
