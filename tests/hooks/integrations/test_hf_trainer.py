"""The Hugging Face Trainer adapter against the plain-loop Monitor (ground truth).

A tiny GPT-2 built from a config (no download), trained by ``transformers.Trainer`` with gradient
accumulation 2 and a plain SGD optimizer; the micro-batches the Trainer really fed are recorded,
and the same micro-batches are replayed from the same initial weights through the plain loop of
tests/hooks/test_gradient_noise.py (loss / accum, on_backward_end per micro-batch, on_grads_ready
before clipping). The per-step raw norms gns/small_sq and gns/big_sq must agree to 1e-4.
"""

import copy
import warnings

import pytest
import torch

pytest.importorskip("accelerate")
transformers = pytest.importorskip("transformers")

from hooks import DifficultyTracker, GradientNoiseScale, Hook, MemorySink  # noqa: E402
from hooks.difficulty import per_example_loss  # noqa: E402
from hooks.integrations.hf_trainer import STATE_FILE, MidtrainCallback  # noqa: E402
from tests.hooks.integrations import _reference  # noqa: E402
from tests.hooks.integrations._reference import by_step  # noqa: E402

ACCUM, MICRO, T = 2, 4, 9


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_gpt2(fix_loss_type=True):
    """transformers 5.x: GPT2LMHeadModel's class name maps to no loss type, so the Trainer counts
    unshifted labels in num_items_in_batch (T per row, the model's loss averages T - 1): HF's
    gradients are then (T-1)/T of the mean. ``loss_type = "ForCausalLM"`` makes it count right."""
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    if fix_loss_type:
        model.loss_type = "ForCausalLM"
    return model


class Rows(torch.utils.data.Dataset):
    def __init__(self, data, with_ids=False):
        self.data, self.with_ids = data, with_ids

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        row = {"input_ids": self.data[i], "labels": self.data[i]}
        if self.with_ids:
            row["ids"] = torch.tensor(i)
        return row


def data(n=24, seed=1):
    return torch.randint(0, 32, (n, T), generator=torch.Generator().manual_seed(seed))


def train_hf(model, callback, tmp_path, steps=3, max_grad_norm=0.0, lr=0.5, dataset=None, **kw):
    """Returns the micro-batches (input_ids) the Trainer fed, in order."""
    seen = []
    h = model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"].clone()) if m.training and torch.is_grad_enabled() else None,
        with_kwargs=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = transformers.TrainingArguments(**{
        "output_dir": str(tmp_path / "hf"), "per_device_train_batch_size": MICRO, "gradient_accumulation_steps": ACCUM,
        "max_steps": steps, "max_grad_norm": max_grad_norm, "logging_steps": 1, "report_to": [], "use_cpu": True,
        "save_strategy": "no", "seed": 0, "dataloader_num_workers": 0, "disable_tqdm": True, **kw})
    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset or Rows(data()),
                                   optimizers=(opt, sched), callbacks=[callback])
    trainer.train()
    h.remove()
    return seen, trainer


def plain_reference(model, micros, max_grad_norm, lr=0.5, **gns_kw):
    return _reference.plain_reference(model, micros, lambda m, x: m(input_ids=x, labels=x).loss, accum=ACCUM,
                                      clip=max_grad_norm, lr=lr, first_step=1, **gns_kw)


@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_gns_equals_plain_loop_and_is_measured_before_clipping(tmp_path, max_grad_norm):
    model = tiny_gpt2()
    init = copy.deepcopy(model)
    sink = MemorySink()
    micros, trainer = train_hf(model, MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[sink],
                                                       strict=True), tmp_path, max_grad_norm=max_grad_norm)
    assert len(micros) == 3 * ACCUM and all(len(x) == MICRO for x in micros)
    ref = plain_reference(init, micros, max_grad_norm)
    for key in ("gns/small_sq", "gns/big_sq", "gns/b_simple", "train/loss"):
        got, want = by_step(sink.records, key), by_step(ref, key)
        assert sorted(got) == [1, 2, 3] and sorted(want) == [1, 2, 3], key
        for s in want:
            assert got[s] == pytest.approx(want[s], rel=1e-4, nan_ok=True), (key, s)
    assert set(by_step(sink.records, "gns/b_small").values()) == {MICRO}
    assert set(by_step(sink.records, "gns/b_big").values()) == {MICRO * ACCUM}
    # HF logs the pre-clip norm of the same accumulated gradient: |G_big|^2 = grad_norm^2
    hf_norm = by_step(sink.records, "train/grad_norm")
    big = by_step(sink.records, "gns/big_sq")
    for s in big:
        assert big[s] == pytest.approx(hf_norm[s] ** 2, rel=1e-4)
        if max_grad_norm:   # clipping was active and GNS did not see the clipped gradient
            assert big[s] > 100 * max_grad_norm ** 2
    assert by_step(sink.records, "train/lr") == {1: 0.5, 2: 0.5, 3: 0.5}
    assert by_step(sink.records, "train/batch_size")[1] == MICRO * ACCUM
    # the adapter's model hooks are gone after training
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_miscounted_num_items_is_reported_and_b_simple_unaffected(tmp_path):
    """Without the loss_type fix HF scales every gradient by (T-1)/T: the adapter says so, logs the
    true mean loss, and GNS's ratio is unchanged while its raw norms are those of HF's gradients."""
    model = tiny_gpt2(fix_loss_type=False)
    init = copy.deepcopy(model)
    sink = MemorySink()
    with pytest.warns(RuntimeWarning, match="loss_type"):
        micros, _ = train_hf(model, MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[sink],
                                                     strict=True), tmp_path, lr=0.0)
    ref = plain_reference(init, micros, 0.0, lr=0.0)
    factor = ((T - 1) / T) ** 2      # rows of T tokens: the model averages T - 1 targets, HF divides by T
    for key, f in (("gns/small_sq", factor), ("gns/big_sq", factor), ("gns/b_simple", 1.0), ("train/loss", 1.0)):
        got, want = by_step(sink.records, key), by_step(ref, key)
        for s_ in want:
            assert got[s_] == pytest.approx(want[s_] * f, rel=1e-4), (key, s_)


class Boom(Hook):
    name = "boom"

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        raise RuntimeError("boom")


class BadIds(Rows):
    def __getitem__(self, i):
        return {**super().__getitem__(i), "ids": torch.tensor([i, i])}   # two ids per example


def test_a_failing_hook_or_adapter_never_stops_the_trainer(tmp_path):
    sink = MemorySink()
    cb = MidtrainCallback([Boom(), GradientNoiseScale(mode="microbatch")], sinks=[sink])
    with pytest.warns(RuntimeWarning, match="boom"):
        _, trainer = train_hf(tiny_gpt2(), cb, tmp_path)
    assert trainer.state.global_step == 3
    assert "boom" in cb.monitor.disabled and "gns" not in cb.monitor.disabled
    assert sorted(by_step(sink.records, "gns/big_sq")) == [1, 2, 3]    # the other hook measured on
    # the adapter's own failure (an ids field of the wrong length): warned, adapter off, training on
    bad = BadIds(data(), with_ids=True)
    cb = MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[MemorySink()])
    with pytest.warns(RuntimeWarning, match="adapter failed"):
        _, trainer = train_hf(tiny_gpt2(), cb, tmp_path, dataset=bad, remove_unused_columns=False)
    assert trainer.state.global_step == 3 and cb.error is not None


class Recorder(Hook):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        self.calls.append((batch_size, None if losses is None else losses.clone(), ids))


def test_ids_and_per_example_losses_reach_the_hooks(tmp_path):
    """remove_unused_columns=False keeps the dataset's "ids"; the adapter removes them from the
    model's inputs and hands them, with per-sequence losses from the logits, to on_backward_end."""
    model = tiny_gpt2()
    init = copy.deepcopy(model)
    rec, tracker, sink = Recorder(), DifficultyTracker(stats_every=1), MemorySink()
    rows = data()
    micros, _ = train_hf(model, MidtrainCallback([rec, tracker], sinks=[sink], strict=True), tmp_path,
                         steps=1, lr=0.0, dataset=Rows(rows, with_ids=True), remove_unused_columns=False)
    assert len(rec.calls) == ACCUM
    init.eval()
    for (n, losses, ids), x in zip(rec.calls, micros):
        assert n == MICRO and torch.equal(rows[ids], x)             # the ids name the rows fed
        with torch.no_grad():
            want = per_example_loss(init(input_ids=x).logits, x, shift=True)
        torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    n_ids = len({int(i) for _, _, ids in rec.calls for i in ids})
    assert by_step(sink.records, "difficulty/examples_tracked") == {1: n_ids}


def test_monitor_state_saved_with_checkpoints_and_resumed(tmp_path):
    gns = GradientNoiseScale(mode="microbatch")
    cb = MidtrainCallback([gns], sinks=[MemorySink()], strict=True)
    train_hf(tiny_gpt2(), cb, tmp_path, steps=2, save_strategy="steps", save_steps=2)
    path = tmp_path / "hf" / "checkpoint-2" / STATE_FILE
    assert path.is_file()
    saved = torch.load(path, weights_only=False)
    assert saved["hooks"]["gns"]["n_measured"] == 2
    # resuming from that checkpoint restores the EMAs before the third step
    gns2 = GradientNoiseScale(mode="microbatch")
    cb2 = MidtrainCallback([gns2], sinks=[MemorySink()], strict=True)
    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=MICRO, gradient_accumulation_steps=ACCUM,
        max_steps=3, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(data()),
                                   optimizers=(opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)),
                                   callbacks=[cb2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    assert gns2.n_measured == 3


def test_fp16_grad_scaler_is_wired_and_divided_out():
    """With fp16 the accelerator's GradScaler scales the loss and HF unscales only inside the clip,
    after the adapter read the gradients: the adapter hands the scaler (optimizer.scaler) to GNS
    with grads_unscaled=False. CPU runs get no scaler from HF, so HF's loop is driven by hand here
    with a real GradScaler, against the unscaled plain loop."""
    from types import SimpleNamespace as NS

    model = tiny_gpt2()
    init = copy.deepcopy(model)
    micros = list(data(2 * ACCUM * MICRO).split(MICRO))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gns, sink, gs = GradientNoiseScale(mode="microbatch"), MemorySink(), NS(sync_gradients=False)
    cb = MidtrainCallback([gns], sinks=[sink], strict=True)
    args = NS(output_dir="", gradient_accumulation_steps=ACCUM, world_size=1)
    state = NS(global_step=0, is_world_process_zero=True, num_input_tokens_seen=0)
    with pytest.warns(RuntimeWarning, match="GradScaler"):
        cb.on_train_begin(args, state, None, model=model, optimizer=NS(scaler=scaler, gradient_state=gs))
    assert gns.grad_scale is scaler and gns.grads_unscaled is False
    model.train()
    for step in range(2):
        cb.on_step_begin(args, state, None)
        for k in range(ACCUM):
            gs.sync_gradients = k == ACCUM - 1
            x = micros[step * ACCUM + k]
            scaler.scale(model(input_ids=x, labels=x).loss / ACCUM).backward()
        model.zero_grad(set_to_none=True)     # lr 0: the weights stay the initial ones
        state.global_step += 1
        cb.on_step_end(args, state, None)
    ref = plain_reference(init, micros, 0.0, lr=0.0)
    for key in ("gns/small_sq", "gns/big_sq"):
        got, want = by_step(sink.records, key), by_step(ref, key)
        assert sorted(got) == [1, 2]
        for s in got:
            assert got[s] == pytest.approx(want[s], rel=1e-4), (key, s)
