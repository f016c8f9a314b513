"""RetrievalProbe: exact on models whose answer is known, equal to a slow per-context reference on a
real GPT, clear errors for bad input, isolated by the Monitor, and on in the built-in loop's
long-context phases."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from diagnostics.retrieval import check_depths, draw_keys, plant_keys
from hooks.monitor import Monitor
from hooks.retrieval import RetrievalProbe, default_depths

pytestmark = pytest.mark.usefixtures("one_thread")

V = 32  # vocabulary of the constructed models


class CopyBack(nn.Module):
    """Predicts the token k positions back: at position t (predicting token t+1) probability p on
    x[t+1-k], the rest spread evenly over the other V-1 tokens; uniform where t+1-k < 0. float64."""

    def __init__(self, k: int, p: float = 0.9, vocab: int = V):
        super().__init__()
        self.k, self.p, self.vocab = k, p, vocab
        self.dummy = nn.Parameter(torch.zeros(()))  # a device to read, no effect

    def forward(self, x):
        B, T = x.shape
        probs = torch.full((B, T, self.vocab), (1 - self.p) / (self.vocab - 1), dtype=torch.float64)
        for t in range(T):
            src = t + 1 - self.k
            if src < 0:
                probs[:, t] = 1.0 / self.vocab
            else:
                probs[torch.arange(B), t, x[:, src]] = self.p
        return probs.log(), None  # a tuple: logits first


class Bigram(nn.Module):
    """Uses only the current token: no context at all."""

    def __init__(self, vocab: int = V):
        super().__init__()
        self.emb = nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.emb(x)


def _data(n=5, T=96, seed=0):
    return torch.randint(0, V, (n, T), generator=torch.Generator().manual_seed(seed))


def test_copy_back_model_gain_is_exact_at_its_depth_and_zero_beyond_its_reach():
    k, p, K = 24, 0.9, 8
    depths = [8, 16, 24, 40, 57]  # |d - k| >= K except d = k: the token k back is never in the planted span
    probe = RetrievalProbe(_data(), lengths=[64, 96], depths=depths, key_len=K, n_keys=6, every=None,
                           far_from=32, model=CopyBack(k, p))
    out = probe.probe()
    planted, unplanted = -math.log(p), -math.log((1 - p) / (V - 1))  # per key token; others[j] != key[j]
    for L in (64, 96):
        for d in check_depths(L, K, depths):
            want = unplanted - planted if d == k else 0.0
            assert out[f"retrieval/{L}/depth_{d}/gain"] == pytest.approx(want, abs=1e-6), (L, d)
        assert "retrieval/64/depth_57/gain" not in out  # 57 > 64 - 8: does not fit length 64
    assert out["retrieval/96/gain"] == pytest.approx((unplanted - planted) / 5, abs=1e-6)
    assert out["retrieval/gain_far"] == pytest.approx(0.0, abs=1e-6)  # depths >= 32 at L=96: 40, 57
    # with p -> 1 the planted loss -> 0: the gain is the unplanted loss
    eps = 2.0 ** -40  # 1 - eps is exact in float64
    out = RetrievalProbe(_data(), [64], [k], key_len=K, n_keys=4, every=None, model=CopyBack(k, 1 - eps)).probe()
    assert out[f"retrieval/64/depth_{k}/gain"] == pytest.approx(-math.log(eps / (V - 1)), abs=1e-6)


def test_model_that_ignores_context_has_zero_gain():
    probe = RetrievalProbe(_data(), [96], key_len=8, n_keys=4, every=None, model=Bigram())
    out = probe.probe()
    gains = [v for k, v in out.items() if k.endswith("/gain")]
    assert len(gains) == len(default_depths(96)) + 1 and all(g == 0.0 for g in gains)


def _reference_gain(model, contexts, keys, others, L, d):
    """Slow and obvious: build each context by hand, one forward per sequence, -log softmax per key token."""
    K = keys.shape[1]
    losses = {}
    for kind, first in (("planted", keys), ("unplanted", others)):
        tot = []
        for i in range(len(contexts)):
            seq = contexts[i][:L].tolist()
            seq[L - K - d:L - d] = first[i].tolist()
            seq[L - K:] = keys[i].tolist()
            with torch.no_grad():
                logits = model(torch.tensor([seq]))[0][0].double()
            for j in range(1, K):
                pos = L - K + j
                tot.append(-(logits[pos - 1].log_softmax(-1)[seq[pos]]).item())
        losses[kind] = sum(tot) / len(tot)
    return losses["unplanted"] - losses["planted"], losses


def test_matches_a_slow_reference_on_a_gpt():
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=32, block_size=96))
    model.train()  # the probe must switch to eval and back
    data = _data(n=3)
    probe = RetrievalProbe(data, [48, 96], [8, 20, 40, 70], key_len=6, n_keys=4, every=None, model=model,
                           batch_size=7)  # several forwards per length
    out = probe.probe()
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    ctx = data[[0, 1, 2, 0]]  # 4 keys over 3 sequences, reused in turn
    for L in (48, 96):
        for d in check_depths(L, 6, [8, 20, 40, 70]):
            want, _ = _reference_gain(model, ctx, probe.keys, probe.others, L, d)
            assert out[f"retrieval/{L}/depth_{d}/gain"] == pytest.approx(want, abs=1e-5), (L, d)


def test_keys_contexts_and_layout():
    pool = torch.tensor([3, 5, 7, 11])
    keys, others = draw_keys(6, 5, pool, seed=1)
    k2, o2 = draw_keys(6, 5, pool, seed=1)
    assert torch.equal(keys, k2) and torch.equal(others, o2)  # a fixed seeded generator
    assert set(keys.unique().tolist()) <= set(pool.tolist()) and set(others.unique().tolist()) <= set(pool.tolist())
    assert bool((keys != others).all())
    ctx = torch.arange(6 * 40).reshape(6, 40)
    x = plant_keys(ctx, keys, others, [5, 12])
    assert x.shape == (2, 2, 6, 40)
    for i, d in enumerate([5, 12]):
        assert torch.equal(x[0, i, :, 40 - 5 - d:40 - d], keys) and torch.equal(x[1, i, :, 40 - 5 - d:40 - d], others)
        assert torch.equal(x[:, i, :, 35:], keys.expand(2, 6, 5))
        rest = torch.ones(40, dtype=torch.bool)
        rest[40 - 5 - d:40 - d] = rest[35:] = False
        assert torch.equal(x[0, i][:, rest], ctx[:, rest]) and torch.equal(x[1, i][:, rest], ctx[:, rest])
    # domains in turn, the first L tokens of each sequence
    a, b = torch.zeros(2, 50, dtype=torch.long), torch.ones(1, 60, dtype=torch.long)
    probe = RetrievalProbe({"a": a, "b": b}, [40], [10], key_len=4, n_keys=4, every=None, key_tokens=[7, 8])
    x = probe.inputs[40].reshape(2, 1, 4, 40)[:, 0, :, :20]
    assert x[:, :, 0].tolist() == [[0, 1, 0, 0]] * 2


def test_bad_configs_are_clear_errors_at_construction():
    data = _data()
    with pytest.raises(ValueError, match="fit no context length"):
        RetrievalProbe(data, [64], [64])  # depth >= length
    with pytest.raises(ValueError, match="fit no context length"):
        RetrievalProbe(data, [64], [60])  # > L - key_len
    with pytest.raises(ValueError, match="overlap"):
        RetrievalProbe(data, [64], [4])  # < key_len
    with pytest.raises(ValueError, match="empty"):
        RetrievalProbe(torch.zeros(0, 64, dtype=torch.long), [64])
    with pytest.raises(ValueError, match="empty"):
        RetrievalProbe({"a": torch.zeros(0, 64, dtype=torch.long)}, [64])
    with pytest.raises(ValueError, match="shorter than the context length 128"):
        RetrievalProbe(data, [128])
    with pytest.raises(ValueError, match="integer token ids"):
        RetrievalProbe(torch.rand(4, 64), [64])
    with pytest.raises(ValueError, match="lengths is empty"):
        RetrievalProbe(data, [])
    with pytest.raises(ValueError, match="cannot hold a key"):
        RetrievalProbe(data, [12], key_len=8)
    with pytest.raises(ValueError, match="n_keys"):
        RetrievalProbe(data, [64], n_keys=0)
    with pytest.raises(ValueError, match="2 distinct"):
        RetrievalProbe(data, [64], key_tokens=[3])


class NotLogits(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.float().sum(-1) * self.w  # (B,): not logits


def test_a_model_without_logits_disables_the_hook_not_training(tmp_path):
    model = NotLogits()
    probe = RetrievalProbe(_data(), [64], [16], n_keys=2, every=1)
    with pytest.raises(ValueError, match="not logits"):
        RetrievalProbe(_data(), [64], [16], n_keys=2, model=model).probe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mon = Monitor(model, [probe], run_dir=str(tmp_path / "r"))
        for step in range(3):
            mon.on_step_begin(step)
            mon.on_step_end(step, loss=1.0)
        mon.close()
    assert [d["name"] for d in mon.disabled_hooks] == ["retrieval"] and "not logits" in mon.disabled_hooks[0]["reason"]
    from diagnostics.runs import load_run

    assert list(load_run(tmp_path / "r").metrics["step"]) == [0, 1, 2]  # every record written
    assert model.training  # the mode is restored also on failure


def test_monitor_schedule_arrays_and_state(tmp_path):
    from diagnostics.runs import load_run

    model = CopyBack(16)
    probe = RetrievalProbe(_data(), [64, 96], [16, 40, 80], key_len=8, n_keys=3, every=None, steps=[1, 3],
                           far_from=32)
    with Monitor(model, [probe], run_dir=str(tmp_path / "r")) as mon:
        for step in range(5):
            mon.on_step_begin(step)
            mon.on_step_end(step, loss=1.0)
    run = load_run(tmp_path / "r")
    col = run.metrics.set_index("step")["retrieval/96/depth_16/gain"]
    assert col.dropna().index.tolist() == [1, 3]
    arr = run.load_array("retrieval_step_3")
    assert arr["lengths"].tolist() == [64, 96] and arr["depths"].tolist() == [16, 40, 80]
    assert arr["gain"].shape == (2, 3) and np.isnan(arr["gain"][0, 2]) and not np.isnan(arr["gain"][1]).any()
    np.testing.assert_allclose(arr["gain"], arr["unplanted"] - arr["planted"], atol=1e-12)
    assert arr["gain"][1, 0] == pytest.approx(col.loc[3], abs=1e-12)
    assert int(arr["key_len"]) == 8 and int(arr["n_keys"]) == 3
    assert probe.summary()["retrieval/gain_far"] == pytest.approx(0.0, abs=1e-9)  # depths 40, 80 at 96
    state = probe.state_dict()
    fresh = RetrievalProbe(_data(), [64, 96], [16, 40, 80], key_len=8, n_keys=3, every=None)
    fresh.load_state_dict(state)
    assert [h["step"] for h in fresh.history] == [1, 3] and fresh.summary() == probe.summary()


def test_built_in_loop_probes_the_long_context_phase(tmp_path):
    from diagnostics.runs import load_run
    from midtrain.hookset import build_hooks, retrieval_schedule
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(4, 2, 4))
    cfg.monitor.gns = cfg.monitor.representation = cfg.monitor.difficulty = {"enabled": False}
    lengths, steps = retrieval_schedule(cfg)
    assert lengths == [64] and steps == [6, 9]  # long phase 6..9: start, every max(eval_every 5, 4/4), last
    cfg.eval_every = 1
    assert retrieval_schedule(cfg)[1] == [6, 7, 8, 9]
    cfg.eval_every = 5
    cfg.monitor.retrieval = {"n_keys": 3, "every": 3}
    train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    run = load_run(tmp_path / "r")
    m = run.metrics.set_index("step")
    depths = default_depths(64)
    assert m[f"retrieval/64/depth_{depths[-1]}/gain"].dropna().index.tolist() == [6, 9]
    assert {f"retrieval/64/depth_{d}/gain" for d in depths} | {"retrieval/64/gain", "retrieval/gain_far"} <= set(m)
    assert {"retrieval_step_6", "retrieval_step_9"} <= set(run.arrays())
    # no long-context phase: no hook; an unknown key: a ConfigError naming the hook
    from midtrain.config import ConfigError
    from midtrain.data import default_corpus
    from midtrain.model import GPT, GPTConfig

    cfg.phases = cfg.phases[:2]
    assert build_hooks(cfg, GPT(GPTConfig(vocab_size=256, n_layer=1, n_head=2, n_embd=16)), default_corpus()) == []
    cfg.monitor.retrieval = {"n_kes": 3}
    with pytest.raises(ConfigError, match=r"monitor.retrieval.*n_kes"):
        build_hooks(cfg, None, default_corpus())
