"""DifficultyTracker: ground truth on a constructed corpus, bad input, probes, saving, resume."""

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from diagnostics.difficulty import roc_auc
from diagnostics.runs import load_run
from hooks import DifficultyTracker, MemorySink, Monitor, NullSink, per_example_loss
from midtrain.config import ConfigError, Phase, TrainConfig
from midtrain.data import Corpus, Domain
from midtrain.hookset import build_hooks
from midtrain.loop import train
from midtrain.model import GPT, GPTConfig
from tests.midtrain.conftest import micro_config


def _cycle(n: int, start: int, mult: int, add: int) -> np.ndarray:
    """A deterministic stream: each token is a fixed function of the previous one."""
    out, v = np.empty(n, dtype=np.uint8), start
    for i in range(n):
        out[i] = v
        v = (mult * v + add) % 61 + 1
    return out


def _corpus(seq_len: int = 32) -> Corpus:
    """'pattern' (learnable: a deterministic cycle), 'random' (unlearnable: uniform bytes, big enough that
    chunks are rarely revisited, so nothing can be memorised) and 'later' (trained on only in phase 2)."""
    rng = np.random.default_rng(0)
    c = seq_len + 1
    uniform = lambda n: rng.integers(0, 256, n).astype(np.uint8)  # noqa: E731
    return Corpus({
        "pattern": Domain("pattern", _cycle(64 * c, 1, 5, 3), _cycle(16 * c, 7, 5, 3)),
        "random": Domain("random", uniform(4096 * c), uniform(16 * c)),
        "later": Domain("later", _cycle(64 * c, 2, 7, 11), _cycle(16 * c, 9, 7, 11)),
    })


def _tiny_cfg(steps=(140, 10)) -> TrainConfig:
    cfg = TrainConfig(seed=0, device="cpu", eval_every=50, checkpoint_every=1000, phases=[
        Phase(name="p1", steps=steps[0], lr=3e-3, warmup_steps=10, mixture={"pattern": 0.5, "random": 0.5},
              batch_size=16, seq_len=32),
        Phase(name="p2", steps=steps[1], lr=1e-3, mixture={"pattern": 0.3, "random": 0.3, "later": 0.4},
              batch_size=16, seq_len=32),
    ])
    cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size = 2, 2, 32, 64
    cfg.data.eval_batches, cfg.data.eval_batch_size = 1, 8
    cfg.monitor.difficulty = {"probe_every": 25}
    for name in ("gns", "representation"):  # only the tracker: keep the test about it (and fast)
        if getattr(cfg.monitor, name, None) is not None:
            setattr(cfg.monitor, name, {"enabled": False})
    return cfg


@pytest.fixture
def one_thread():
    """Tiny models train faster on one intra-op thread, and a busy machine (other jobs on its few
    cores) slows multi-threaded CPU kernels by 10x or more through oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_separates_a_learnable_part_from_an_unlearnable_one(tmp_path, one_thread):
    """Default hooks of the built-in loop: the tracker is on, probes every domain from the start."""
    cfg = _tiny_cfg()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, str(tmp_path / "r"), corpus=_corpus(), progress=False, strict_hooks=True)
    run = load_run(tmp_path / "r")
    m = run.metrics.set_index("step")
    a = run.load_array("difficulty_examples")
    names = a["domain_names"].tolist()
    assert names == ["pattern", "random", "later"]
    seen = np.isin(a["domain"], [0, 1])
    easy = a["domain"][seen] == 0
    assert roc_auc(-a["loss_mean"][seen], easy) >= 0.95  # per-example mean loss separates them
    assert roc_auc(a["confidence"][seen], easy) >= 0.95  # so does the data-map confidence

    # learnability at the end of phase 1: the random part is flat, the pattern part still improving
    lr = m.loc[130]
    assert abs(lr["difficulty/random/learnability"]) < 0.05 and lr["difficulty/random/diminishing"] == 1.0
    assert lr["difficulty/pattern/learnability"] > 0.5 and lr["difficulty/pattern/diminishing"] == 0.0
    assert lr["difficulty/pattern/learnability"] > 20 * abs(lr["difficulty/random/learnability"])

    # probe set: every domain from step 0 on, including the one only phase 2 trains on
    assert not math.isnan(m.loc[0, "difficulty/later/probe_loss"])
    assert m["difficulty/later/loss"].first_valid_index() == 140
    end = m.loc[125]
    assert end["difficulty/pattern/frac_learned"] > 0.5 and end["difficulty/random/frac_learned"] == 0.0
    assert end["difficulty/pattern/el2n"] < end["difficulty/random/el2n"]
    assert end["difficulty/pattern/probe_loss"] < 1.0 < end["difficulty/random/probe_loss"]
    assert "difficulty/pattern/reducible_loss" not in m.columns  # no reference model
    assert len(a["probe_loss"]) == 3 * 16 and set(a["probe_domain"].tolist()) == {0, 1, 2}


def test_resume_continues_the_table_exactly(tmp_path, one_thread):
    cfg = micro_config()
    cfg.checkpoint_every = 100
    for name in ("gns", "representation"):
        if getattr(cfg.monitor, name, None) is not None:
            setattr(cfg.monitor, name, {"enabled": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, str(tmp_path / "whole"), progress=False, strict_hooks=True)
        train(cfg, str(tmp_path / "split"), progress=False, strict_hooks=True, until_step=10)
        train(cfg, str(tmp_path / "split"), progress=False, strict_hooks=True, resume=True)
    a, b = (load_run(tmp_path / n).load_array("difficulty_examples") for n in ("whole", "split"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k) if a[k].dtype.kind == "f" \
            else np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    mw, ms = load_run(tmp_path / "whole").metrics, load_run(tmp_path / "split").metrics
    cols = [c for c in mw.columns if c.startswith("difficulty/")]
    np.testing.assert_allclose(ms[cols].to_numpy(float), mw[cols].to_numpy(float), rtol=1e-5)


# -- unit level: a synthetic loss stream, no training ---------------------------------------------


def _stream(steps=30, batch=12, n_ids=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    for s in range(steps):
        ids = torch.randint(0, n_ids, (batch,), generator=g) * 33
        doms = ids % 2
        losses = torch.where(doms == 0, 0.3, 3.0) + 0.5 * torch.rand(batch, generator=g) * math.exp(-s / 10)
        yield s, losses, ids, doms


def _feed(tr, stream, micro=2):
    out = []
    for s, losses, ids, doms in stream:
        for part in range(micro):  # micro-batches of one step
            sl = slice(part * len(ids) // micro, (part + 1) * len(ids) // micro)
            tr.on_backward_end(len(ids) // micro, losses=losses[sl], ids=ids[sl], domains=doms[sl])
        out.append(tr.on_step_end(s, {"train/tokens": (s + 1) * len(ids) * 32}))
    return out


def test_per_example_loss_matches_the_models_reduction():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))
    x = torch.randint(0, 64, (3, 12))
    y = torch.randint(0, 64, (3, 12))
    y[1, :5] = -1
    logits, ref = model(x, y, reduction="none")
    assert torch.allclose(per_example_loss(logits, y, ignore_index=-1), ref, atol=1e-5)
    full = torch.randint(0, 64, (3, 13))  # Hugging Face style: labels are the inputs, shifted inside
    logits, _ = model(full)
    assert torch.allclose(per_example_loss(logits, full, shift=True), per_example_loss(logits[:, :-1], full[:, 1:]))
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        per_example_loss(logits[0], full[0])


def test_mismatched_lengths_are_a_clear_value_error():
    tr = DifficultyTracker()
    with pytest.raises(ValueError, match="ids has length 3 but losses has length 4"):
        tr.on_backward_end(4, losses=torch.ones(4), ids=torch.arange(3), domains=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="domains has length 5"):
        tr.on_backward_end(4, losses=torch.ones(4), ids=torch.arange(4), domains=torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction='none'"):
        tr.on_backward_end(4, losses=torch.ones(4, 8), ids=torch.arange(4))
    strict = Monitor(None, [DifficultyTracker()], sinks=[NullSink()], strict=True)
    with pytest.raises(ValueError, match="one id per example"):
        strict.on_backward_end(4, losses=torch.ones(4), ids=torch.arange(2))
    lenient = Monitor(None, [DifficultyTracker()], sinks=[NullSink()])
    with pytest.warns(RuntimeWarning, match="disabled"):
        lenient.on_backward_end(4, losses=torch.ones(4), ids=torch.arange(2))
    assert "difficulty" in lenient.disabled  # training goes on without it
    with pytest.raises(ValueError, match="probe_every"):
        DifficultyTracker(probe_every=0)
    with pytest.raises(ValueError, match=r"\(N, T\+1\)"):
        DifficultyTracker(probe={"a": torch.zeros(5)})


def test_nan_losses_are_skipped_and_counted():
    tr = DifficultyTracker(domain_names=["a", "b"])
    tr.on_backward_end(4, losses=torch.tensor([1.0, float("nan"), 2.0, float("inf")]), ids=torch.arange(4),
                       domains=torch.tensor([0, 0, 1, 1]))
    m = tr.on_step_end(0, {"train/tokens": 128})
    assert m["difficulty/nan_losses"] == 2 and m["difficulty/examples_tracked"] == 2
    tr.on_backward_end(0, losses=torch.zeros(0), ids=torch.zeros(0, dtype=torch.long))  # an empty micro-batch
    assert tr.on_step_end(10, {"train/tokens": 256})["difficulty/examples_tracked"] == 2 and tr.total_tokens == 256
    assert m["difficulty/a/loss"] == pytest.approx(1.0) and m["difficulty/b/loss"] == pytest.approx(2.0)


def test_ddp_non_zero_rank_is_not_scheduled(monkeypatch):
    """Under DDP only rank 0 keeps the table and scores probes; the other ranks train on."""
    import torch.distributed as dist

    tr = DifficultyTracker(domain_names=["a"], stats_every=1)
    sink = MemorySink()
    mon = Monitor(None, [tr], sinks=[sink], strict=True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    mon.on_backward_end(2, losses=torch.ones(2), ids=torch.arange(2), domains=torch.zeros(2, dtype=torch.long))
    assert not any(k.startswith("difficulty/") for k in mon.on_step_end(0, loss=1.0))
    assert tr.total_tokens == 0
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    mon.on_backward_end(2, losses=torch.ones(2), ids=torch.arange(2), domains=torch.zeros(2, dtype=torch.long))
    assert mon.on_step_end(1, loss=1.0)["difficulty/examples_tracked"] == 2


def test_without_ids_it_tracks_domains_and_says_so_once():
    tr = DifficultyTracker(domain_names=["a", "b"])
    with pytest.warns(UserWarning, match="per domain only"):
        tr.on_backward_end(2, losses=torch.tensor([1.0, 3.0]), domains=torch.tensor([0, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once, not every step
        m = tr.on_step_end(0, {})
        for s in range(1, 31):  # metrics come every stats_every (10) steps
            tr.on_backward_end(2, losses=torch.tensor([1.0, 3.0]) * (1 + 1 / (s + 1)), domains=torch.tensor([0, 1]))
            m = tr.on_step_end(s, {})
    assert m["difficulty/examples_tracked"] == 0 and m["difficulty/b/loss"] > m["difficulty/a/loss"]
    assert tr.token_unit == "examples"  # no tokens given: learnability is per example seen
    assert tr.learnability()["a"].value > 0


def test_queued_steps_equal_per_step_updates():
    """Steps between stats steps stay queued and are applied together: every reported number, the table
    and the state equal a tracker that applies each step at once (stats_every=1), bit for bit --
    including repeated ids across the queued steps, NaN losses, a micro-batch without ids, a state_dict
    taken mid-step and a step without losses."""
    def stream():
        for s, losses, ids, doms in _stream(steps=41, n_ids=30):
            if s == 7:
                losses[3] = float("nan")
            yield s, losses, (None if s == 12 else ids * (2**40 + 1)), doms  # ids beyond float precision

    def feed(tr):
        out = {}
        for s, losses, ids, doms in stream():
            if s != 20:  # step 20 has no per-example losses
                tr.on_backward_end(6, losses=losses[:6], ids=None if ids is None else ids[:6], domains=doms[:6])
                if s == 33:
                    tr.state_dict()  # a checkpoint between micro-batches: the half step stays queued
                tr.on_backward_end(6, losses=losses[6:], ids=None if ids is None else ids[6:], domains=doms[6:])
            out[s] = tr.on_step_end(s, {"train/tokens": (s + 1) * 12 * 32})
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        each = DifficultyTracker(domain_names=["a", "b"], stats_every=1, min_points=3, window=12)
        m_each = feed(each)
        grouped = DifficultyTracker(domain_names=["a", "b"], stats_every=10, min_points=3, window=12)
        m_grouped = feed(grouped)
    assert grouped._pending == [] and len(grouped._steps) == 0  # step 40 flushed
    for s, rec in m_grouped.items():
        assert (s % 10 == 0) == bool(rec), s  # nothing to report in between: nothing computed
        for k, v in rec.items():
            assert v == m_each[s][k] or (math.isnan(v) and math.isnan(m_each[s][k])), (s, k)
        if s % 10 == 0:
            assert rec.keys() == m_each[s].keys(), s
    assert m_grouped[10]["difficulty/nan_losses"] == 1 and m_grouped[40]["difficulty/examples_tracked"] > 20
    a, b = each.arrays(), grouped.arrays()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    sa, sb = each.state_dict(), grouped.state_dict()
    assert sa["ema"] == sb["ema"]
    assert sa["total_tokens"] == sb["total_tokens"] and sa["n_losses"] == sb["n_losses"] == 40 * 12


def test_state_dict_resume_equals_uninterrupted():
    whole = DifficultyTracker(domain_names=["a", "b"], stats_every=1, min_points=3)
    m_whole = _feed(whole, _stream())
    first = DifficultyTracker(domain_names=["a", "b"], stats_every=1, min_points=3)
    _feed(first, (x for x in _stream() if x[0] < 13))
    state = copy.deepcopy(first.state_dict())
    second = DifficultyTracker(domain_names=["a", "b"], stats_every=1, min_points=3)
    second.load_state_dict(state)
    m_split = _feed(second, (x for x in _stream() if x[0] >= 13))
    assert m_split == m_whole[13:]
    a, b = whole.arrays(), second.arrays()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert whole.table.frac_forgotten == second.table.frac_forgotten


class _FormerDomainEMA:
    """The tracker's per-domain EMA before it used diagnostics.stats.BiasCorrectedEMA (the former
    diagnostics.difficulty_table.DomainEMA, verbatim arithmetic): the reference for values and for
    the version-1 checkpoint layout {"decay", "ema", "k"}."""

    def __init__(self, decay):
        self.decay, self.ema, self.k = decay, np.zeros(0), np.zeros(0, dtype=np.int64)

    def update(self, domain_idx, values):
        domain_idx = np.asarray(domain_idx, dtype=np.int64)
        if domain_idx.size and domain_idx.max() + 1 > len(self.ema):
            grow = int(domain_idx.max()) + 1 - len(self.ema)
            self.ema = np.concatenate([self.ema, np.zeros(grow)])
            self.k = np.concatenate([self.k, np.zeros(grow, dtype=np.int64)])
        self.ema[domain_idx] = self.decay * self.ema[domain_idx] + (1 - self.decay) * np.asarray(values)
        self.k[domain_idx] += 1

    def value(self, d):
        return float(self.ema[d] / (1 - self.decay ** self.k[d]))

    def state_dict(self):
        return {"decay": self.decay, "ema": self.ema.copy(), "k": self.k.copy()}


def _former_emas(stream, decay, until=None):
    """Per-step domain means (bincount, as the tracker sums them) through the former EMA."""
    ema, values = _FormerDomainEMA(decay), {}
    for s, losses, ids, doms in stream:
        if until is not None and s >= until:
            break
        x, d = losses.double().numpy(), doms.numpy()
        present = np.flatnonzero(np.bincount(d))
        ema.update(present, (np.bincount(d, weights=x) / np.maximum(np.bincount(d), 1))[present])
        values[s] = {int(i): ema.value(i) for i in present}
    return ema, values


def test_domain_loss_emas_equal_the_former_domain_ema_bit_for_bit():
    stream = list(_stream(steps=30))
    tr = DifficultyTracker(domain_names=["a", "b"], stats_every=1, ema_decay=0.8)
    recs = _feed(tr, stream)
    _, ref = _former_emas(stream, 0.8)
    for s, rec in enumerate(recs):
        assert {k: v for k, v in rec.items() if k.endswith("/loss")} == \
            {f"difficulty/{'ab'[d]}/loss": v for d, v in ref[s].items()}, s


def test_loads_a_version_1_checkpoint_state_and_continues_identically():
    """A checkpoint written before the tracker used BiasCorrectedEMA ("version": 1, "ema" as the
    former DomainEMA's arrays, a never-updated domain with k = 0) resumes to the same numbers."""
    stream = list(_stream(steps=30))
    whole = DifficultyTracker(domain_names=["a", "b", "c"], stats_every=1, min_points=3, ema_decay=0.8)
    m_whole = _feed(whole, stream)
    first = DifficultyTracker(domain_names=["a", "b", "c"], stats_every=1, min_points=3, ema_decay=0.8)
    _feed(first, stream[:13])
    old = copy.deepcopy(first.state_dict())
    former, _ = _former_emas(stream, 0.8, until=13)
    former.update(np.array([2]), np.array([0.0]))  # grow to three domains ...
    former.ema[2], former.k[2] = 0.0, 0  # ... the third never updated, as a version-1 state could hold
    old["version"], old["ema"] = 1, former.state_dict()
    second = DifficultyTracker(domain_names=["a", "b", "c"], stats_every=1, min_points=3, ema_decay=0.5)
    second.load_state_dict(old)
    assert second.ema_decay == 0.8 and sorted(second.ema) == [0, 1]  # the checkpoint's decay, as before
    assert _feed(second, stream[13:]) == m_whole[13:]
    assert second.state_dict()["ema"] == whole.state_dict()["ema"]
    with pytest.raises(ValueError, match="malformed per-domain EMA state"):
        DifficultyTracker().load_state_dict({**old, "ema": {"decay": 0.8, "ema": np.zeros(2), "k": np.zeros(3)}})


def test_probe_scoring_leaves_training_untouched_and_reducible_loss():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.1))
    probe = {"a": torch.randint(0, 32, (5, 9)), "b": torch.randint(0, 32, (3, 9))}
    ref = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    tr = DifficultyTracker(probe=probe, probe_every=2, reference=ref, probe_batch_size=2)
    mon = Monitor(model, [tr], sinks=[NullSink()], strict=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = torch.get_rng_state()
    rec = mon.on_step_end(0)  # a loop without per-example losses: the probe still runs
    assert model.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        for name, t in probe.items():
            loss = per_example_loss(model(t[:, :-1])[0], t[:, 1:])
            ref_loss = per_example_loss(ref(t[:, :-1])[0], t[:, 1:])
            assert rec[f"difficulty/{name}/probe_loss"] == pytest.approx(loss.mean().item(), rel=1e-5)
            assert rec[f"difficulty/{name}/reducible_loss"] == pytest.approx((loss - ref_loss).mean().item(), rel=1e-4)
            assert rec[f"difficulty/{name}/frac_learned"] == float((loss < 1.0).float().mean())
            assert 0 < rec[f"difficulty/{name}/el2n"] < math.sqrt(2)
    assert "difficulty/a/probe_loss" not in mon.on_step_end(1)  # every 2 steps


@pytest.mark.parametrize("announce", [True, False])
def test_probe_scores_the_parameters_validation_sees(announce):
    """A loop like midtrain.loop: validation at step s runs before step s's update, and so does the
    probe (scored at the step's start: on_step_begin, or the first on_backward_end when the loop does
    not announce the step), so probe_loss and val loss in one record measure the same parameters.
    (Before, the probe was scored in on_step_end, one update later.)"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    probe = {"a": torch.randint(0, 32, (6, 9))}
    tr = DifficultyTracker(probe=probe, probe_every=2, domain_names=["a"])
    mon = Monitor(model, [tr], sinks=[NullSink()], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = probe["a"][:, :-1], probe["a"][:, 1:]

    def val_loss():  # what the loop's evaluate() would log for these sequences now
        model.eval()
        with torch.no_grad():
            out = per_example_loss(model(x)[0], y).mean().item()
        model.train()
        return out

    for step in range(5):
        before = val_loss()
        if announce:
            mon.on_step_begin(step)
        _, losses = model(x, y, reduction="none")
        losses.mean().backward()
        mon.on_backward_end(len(x), losses=losses.detach(), ids=torch.arange(len(x)),
                            domains=torch.zeros(len(x), dtype=torch.long))
        mon.on_grads_ready()
        opt.step()
        opt.zero_grad()
        rec = mon.on_step_end(step, tokens=(step + 1) * x.numel())
        if step % 2:
            assert "difficulty/a/probe_loss" not in rec
            continue
        after = val_loss()
        assert abs(after - before) > 1e-3  # one update moves the loss: the test can tell them apart
        assert rec["difficulty/a/probe_loss"] == pytest.approx(before, rel=1e-6)
    # the probe history's x: train tokens seen by the scored parameters (0 at step 0)
    assert tr.probe_series["a"].arrays()[0].tolist() == [0.0, 2 * x.numel(), 4 * x.numel()]


def test_probe_without_a_step_start_is_scored_at_the_step_end():
    """A caller that only calls the hook's on_step_end (no Monitor) still gets the probe, scored then."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    probe = {"a": torch.randint(0, 32, (4, 9))}
    tr = DifficultyTracker(probe=probe, probe_every=1)
    tr.attach(model, None)
    rec = tr.on_step_end(0, {})
    model.eval()
    with torch.no_grad():
        ref = per_example_loss(model(probe["a"][:, :-1])[0], probe["a"][:, 1:]).mean().item()
    assert rec["difficulty/a/probe_loss"] == pytest.approx(ref, rel=1e-6)


def test_table_is_saved_to_the_run_store_and_through_a_callback(tmp_path):
    mon = Monitor(None, [DifficultyTracker(domain_names=["a", "b"])], run_dir=str(tmp_path / "r"))
    for s, losses, ids, doms in _stream(steps=5):
        mon.on_backward_end(len(ids), losses=losses, ids=ids, domains=doms)
        mon.on_step_end(s, tokens=(s + 1) * 100)
    mon.close()  # the end of a run: the hook saves through the Monitor's run store
    a = load_run(tmp_path / "r").load_array("difficulty_examples")
    assert a["domain_names"].tolist() == ["a", "b"] and a["visits"].sum() == 5 * 12
    assert set(np.unique(a["region"]).tolist()) <= {0, 1, 2}
    saved = {}
    tr = DifficultyTracker(save_fn=lambda name, **arrays: saved.update({name: arrays}), save_every=2, array_name="dm")
    _feed(tr, _stream(steps=2))
    assert saved["dm"]["visits"].sum() == 2 * 12  # saved at step 2 (save_every)


def test_builtin_loop_turns_it_on_with_probes_for_every_domain():
    cfg = _tiny_cfg()
    corpus = _corpus()
    model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=1, n_head=2, n_embd=16))
    hooks = [h for h in build_hooks(cfg, model, corpus) if isinstance(h, DifficultyTracker)]
    assert len(hooks) == 1
    tr = hooks[0]
    assert set(tr.probe) == {"pattern", "random", "later"} and tr.probe_every == 25
    assert tr.probe["later"].shape == (16, 33) and tr.domain_names == corpus.names()
    cfg.monitor.difficulty = {"probe_evry": 3}
    with pytest.raises(ConfigError, match="difficulty"):
        build_hooks(cfg, model, corpus)
    cfg.monitor.difficulty = {"window": 0}
    with pytest.raises(ConfigError, match="window"):
        build_hooks(cfg, model, corpus)
