"""hooks/representation.py: schedule, the numbers against brute-force references, no leaks, modes,
generic modules, DDP rank skip, the built-in loop, online phase events."""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from diagnostics.representation import gram_entropy, joint_gram_entropy, kernel_gram, representation_metrics
from hooks.monitor import MemorySink, Monitor
from hooks.representation import RepresentationProbe, default_sites
from midtrain.model import GPT, GPTConfig



def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64))


def easy_ids(B=4, T=32):
    """A short repeated sentence: easy to learn in ~100 steps."""
    text = (b"the cat sat on the mat. " * 20)[: B * (T + 1)]
    return torch.tensor(list(text), dtype=torch.long).view(B, T + 1)


@pytest.fixture
def one_thread():
    """Tiny tensors on a shared 2-core CPU: extra threads only spin-wait (docs/representation.md, pitfalls)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def repr_keys(record):
    return sorted(k for k in record if k.startswith("repr/"))


# ----------------------------------------------------------------------------------------------------
# schedule

def test_schedule_step0_every_and_log_spaced():
    rp = RepresentationProbe(torch.zeros(1, 8, dtype=torch.long), every=10)
    assert [s for s in range(45) if rp.scheduled(s)] == [0, 1, 2, 4, 8, 10, 20, 30, 40]
    rp = RepresentationProbe(torch.zeros(1, 8, dtype=torch.long), every=100, log_spaced_until=0)
    assert [s for s in range(350) if rp.scheduled(s)] == [0, 100, 200, 300]


def test_metrics_only_at_scheduled_steps_through_the_monitor():
    model = tiny_gpt()
    sink = MemorySink()
    rp = RepresentationProbe(easy_ids()[:, :-1], every=5, max_tokens=64, info_plane_tokens=64)
    mon = Monitor(model, [rp], sinks=[sink], strict=True)
    for step in range(12):
        mon.on_step_end(step, loss=1.0)
    probed = [r["step"] for r in sink.records if repr_keys(r)]
    assert probed == [0, 1, 2, 4, 5, 10]
    first = sink.records[0]
    for site in ("blocks.0.resid_post", "blocks.1.resid_post", "final_norm"):
        for k in ("entropy", "effective_rank", "alpha_req", "twonn_id", "mi_xt", "mi_ty", "readout_loss",
                  "compressing"):
            assert f"repr/{site}/{k}" in first, f"repr/{site}/{k}"
    assert "repr/blocks.0.attn_out/entropy" not in first
    assert all(math.isfinite(first[k]) for k in repr_keys(first))


# ----------------------------------------------------------------------------------------------------
# the numbers, against brute force

def test_metrics_equal_a_manual_capture_and_readout_equals_the_model_loss():
    model = tiny_gpt()
    ids = easy_ids()
    x, y = ids[:, :-1], ids[:, 1:]
    rp = RepresentationProbe((x, y), max_tokens=50, info_plane_tokens=50, model=model, skip_first=0)
    out = rp.probe()
    rows = rp.jobs[0].rows
    assert rows.numel() == 50

    captured = {}
    hs = [model.get_submodule(s).register_forward_hook(lambda m, i, o, s=s: captured.__setitem__(s, o))
          for s in ("blocks.1.resid_post", "final_norm")]
    with torch.no_grad():
        logits, _ = model(x)
    for h in hs:
        h.remove()
    Z = captured["blocks.1.resid_post"].reshape(-1, 32)[rows].double()
    ref = representation_metrics(Z)
    for k in ("entropy", "effective_rank", "alpha_req", "twonn_id"):
        assert out[f"repr/blocks.1.resid_post/{k}"] == pytest.approx(ref[k], rel=1e-9, nan_ok=True)
    # I(X;T) with X = the current token (one-hot) and I(T;Y) with Y = the next token, against the
    # dense N x N Hadamard-product reference (the hook takes the block-diagonal label path)
    cur, nxt = x.reshape(-1)[rows], y.reshape(-1)[rows]
    Kx, Kt, Ky = kernel_gram(cur, "onehot"), kernel_gram(Z, "gaussian"), kernel_gram(nxt, "onehot")
    Hx, Ht, Hy = gram_entropy(Kx), gram_entropy(Kt), gram_entropy(Ky)
    assert out["repr/blocks.1.resid_post/mi_xt"] == pytest.approx(Hx + Ht - joint_gram_entropy(Kx, Kt), rel=1e-9)
    assert out["repr/blocks.1.resid_post/mi_ty"] == pytest.approx(Ht + Hy - joint_gram_entropy(Kt, Ky), rel=1e-9)
    # logit lens at the final norm = the model's own loss on those tokens
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1])[rows], nxt)
    assert out["repr/final_norm/readout_loss"] == pytest.approx(float(ce), rel=1e-5)


def test_metrics_change_after_training_on_an_easy_batch(one_thread):
    model = tiny_gpt()
    ids = easy_ids()
    rp = RepresentationProbe(ids[:, :-1], max_tokens=96, info_plane_tokens=96, model=model)
    before = rp.probe(0)
    opt = model.configure_optimizer(lr=3e-3, weight_decay=0.0)
    for _ in range(80):
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = rp.probe(80)
    site = "repr/blocks.1.resid_post"
    assert before[f"{site}/readout_loss"] > 4.0 and after[f"{site}/readout_loss"] < 1.0
    assert after[f"{site}/mi_ty"] > before[f"{site}/mi_ty"] + 0.2  # more about the next token
    assert after[f"{site}/mi_xt"] < before[f"{site}/mi_xt"] - 0.1  # less about the current one
    assert abs(after[f"{site}/entropy"] - before[f"{site}/entropy"]) > 0.1
    assert after[f"{site}/twonn_id"] < 0.7 * before[f"{site}/twonn_id"]


def test_per_domain_metrics_and_deterministic_subsample():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(0)
    probe = {"prose": torch.randint(0, 256, (3, 24), generator=g), "code": torch.randint(0, 256, (3, 24), generator=g)}
    rp = RepresentationProbe(probe, max_tokens=40, info_plane_tokens=40, model=model)
    assert len(rp.jobs) == 1  # same shapes: one forward for both domains
    out = rp.probe()
    for d in ("prose", "code"):
        for k in ("entropy", "effective_rank", "alpha_req", "readout_loss"):
            assert f"repr/final_norm/{d}/{k}" in out
    assert "repr/final_norm/prose/twonn_id" not in out
    again = RepresentationProbe(probe, max_tokens=40, info_plane_tokens=40, model=model).probe()
    out.pop("repr/probe_time_s"), again.pop("repr/probe_time_s")
    assert out == again  # fixed batch, fixed subsample, eval mode: identical numbers
    # the pooled readout is the token-weighted mean of the domains'
    n = [int((rp.jobs[0].domain == i).sum()) for i in range(2)]
    pooled = (n[0] * out["repr/final_norm/prose/readout_loss"] + n[1] * out["repr/final_norm/code/readout_loss"]) / sum(n)
    assert out["repr/final_norm/readout_loss"] == pytest.approx(pooled, rel=1e-6)


# ----------------------------------------------------------------------------------------------------
# hygiene: no leaks, hooks removed, modes restored, failures

def _tensor_count():
    import warnings

    gc.collect()
    with warnings.catch_warnings():  # isinstance on some lazily deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_many_probes_leave_no_tensors_or_hooks_behind(one_thread):
    import tracemalloc

    model = tiny_gpt()
    rp = RepresentationProbe(easy_ids(2, 16)[:, :-1], max_tokens=24, info_plane_tokens=24, model=model)
    for _ in range(3):
        rp.probe()  # warm caches (RoPE tables, allocator)
    n0 = _tensor_count()
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    for _ in range(100):
        rp.probe()
    snap1 = tracemalloc.take_snapshot()
    tracemalloc.stop()
    assert _tensor_count() <= n0
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert grown < 200_000  # bytes of Python allocations still alive after 100 probes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_train_mode_restored_and_hooks_removed_on_error():
    model = tiny_gpt()
    model.train()
    model.blocks[0].eval()  # a frozen part stays in eval
    rp = RepresentationProbe(easy_ids(2, 16)[:, :-1], max_tokens=24, model=model)
    seen = {}
    h = model.blocks[1].register_forward_hook(lambda m, i, o: seen.__setitem__("training", m.training))
    rp.probe()
    h.remove()
    assert seen["training"] is False  # the probe runs in eval mode
    assert model.training and model.blocks[1].training and not model.blocks[0].training

    def boom(*a, **k):
        raise RuntimeError("boom")

    rp._finalize = boom
    with pytest.raises(RuntimeError, match="boom"):
        rp.probe()
    assert model.training and not model.blocks[0].training
    assert all(not m._forward_hooks for m in model.modules())


def test_a_failing_probe_is_disabled_by_the_monitor_and_training_continues():
    model = tiny_gpt()
    rp = RepresentationProbe(easy_ids(2, 16)[:, :-1], max_tokens=24, model=model)
    rp._finalize = lambda site: (_ for _ in ()).throw(ValueError("bad"))
    sink = MemorySink()
    mon = Monitor(model, [rp], sinks=[sink])
    with pytest.warns(RuntimeWarning, match="representation"):
        mon.on_step_end(0, loss=1.0)
    mon.on_step_end(1, loss=1.0)
    assert "representation" in mon.disabled and len(sink.records) == 2
    assert all(not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------------
# any nn.Module: by name, glob, filter, type; compile / DDP wrappers

class Tower(nn.Module):
    def __init__(self, d=12, k=3):
        super().__init__()
        self.inp = nn.Linear(d, 16)
        self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(k))
        self.norm = nn.LayerNorm(16)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.norm(h)


def test_generic_modules_by_name_filter_and_type():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(64, 10)
    labels = torch.randint(0, 5, (64,))
    by_name = RepresentationProbe((x, labels), layers=["1", "3"], max_tokens=48, model=seq).probe()
    by_glob = RepresentationProbe((x, labels), layers="[13]", max_tokens=48, model=seq).probe()
    by_filter = RepresentationProbe((x, labels), layers=lambda n: n in ("1", "3"), max_tokens=48, model=seq).probe()
    by_type = RepresentationProbe((x, labels), layers=nn.ReLU, max_tokens=48, model=seq).probe()
    for out in (by_name, by_glob, by_filter, by_type):
        assert {k.split("/")[1] for k in out if k.count("/") == 2} == {"1", "3"}
        assert "repr/1/readout_loss" not in out  # no LM head to read out through
        # X = the float input rows (Gaussian kernel), Y = the labels
        assert math.isfinite(out["repr/3/mi_xt"]) and math.isfinite(out["repr/3/mi_ty"])
    a, b = by_name.copy(), by_type.copy()
    a.pop("repr/probe_time_s"), b.pop("repr/probe_time_s")
    assert a == b
    assert RepresentationProbe(x, model=seq, max_tokens=16).sites == ["0", "1", "2", "3", "4"]
    with pytest.raises(ValueError, match="no module"):
        RepresentationProbe(x, layers=["nope"], model=seq)

    tower = Tower()
    assert default_sites(tower) == ["layers.0", "layers.1", "layers.2", "norm"]
    out = RepresentationProbe(torch.randn(4, 8, 12), model=tower, max_tokens=30, skip_first=0).probe()
    assert "repr/layers.2/entropy" in out and "repr/layers.2/mi_ty" not in out  # no targets: no I(T;Y)
    assert not tower.training or all(not m._forward_hooks for m in tower.modules())


def test_incompatible_site_is_skipped_not_fatal():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 6)
            self.pool = nn.Identity()

        def forward(self, x):  # x (B, T, 6); pool sees (B, 6): not one vector per token
            h = self.a(x)
            return self.pool(h.mean(dim=1))

    out = RepresentationProbe(torch.randn(3, 10, 6), model=TwoHeads(), max_tokens=20, layers=["a", "pool"]).probe()
    rp = RepresentationProbe(torch.randn(3, 10, 6), model=TwoHeads(), max_tokens=20, layers=["a", "pool"])
    rp.probe()
    assert "repr/a/entropy" in out and "repr/pool/entropy" not in out
    assert "pool" in rp.skipped_sites


def test_compiled_and_wrapped_models_are_unwrapped():
    class Compiled(nn.Module):  # what torch.compile returns: an OptimizedModule holding _orig_mod
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    model = tiny_gpt()
    for wrapped in (Compiled(model), nn.DataParallel(Compiled(model))):
        rp = RepresentationProbe(easy_ids(2, 16)[:, :-1], max_tokens=24)
        rp.attach(wrapped, None)
        assert rp.model is model and rp.sites[-1] == "final_norm"
        assert "repr/final_norm/entropy" in rp.probe()


def test_ddp_non_zero_rank_skips(monkeypatch):
    import torch.distributed as dist

    model = tiny_gpt()
    rp = RepresentationProbe(easy_ids(2, 16)[:, :-1], max_tokens=24)
    sink = MemorySink()
    mon = Monitor(model, [rp], sinks=[sink], strict=True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    assert not rp.scheduled(0)
    assert repr_keys(mon.on_step_end(0, loss=1.0)) == []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    assert rp.scheduled(0) and repr_keys(mon.on_step_end(0, loss=1.0))


def test_tiny_hf_gpt2_built_offline(one_thread):
    """A Hugging Face GPT-2 built from a config (no download, no network): dict inputs with padding,
    sites by default / name glob / filter / module type, readout through its own ln_f + lm_head,
    X from its input embedding, per-domain batches, modes restored, no hooks left."""
    pytest.importorskip("transformers")  # in the dev extra
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg)
    model.train()
    ids = torch.randint(0, 64, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding: never sampled, never a target
    batch = {"input_ids": ids, "attention_mask": mask}
    rp = RepresentationProbe(batch, max_tokens=24, model=model)
    assert rp.sites == ["transformer.h.0", "transformer.h.1", "transformer.ln_f"]
    out = rp.probe()
    assert all(m.training for m in model.modules()) and not any(m._forward_hooks for m in model.modules())
    rows = rp.jobs[0].rows
    assert not bool(((rows // 16 == 1) & (rows % 16 >= 11)).any())  # padded or target-less positions
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    ce = F.cross_entropy(logits.reshape(-1, 64)[rows], rp.jobs[0].y)  # y = the next token at each row
    assert out["repr/transformer.ln_f/readout_loss"] == pytest.approx(float(ce), rel=1e-5)
    assert math.isfinite(out["repr/transformer.h.1/readout_loss"])
    for k in ("entropy", "effective_rank", "alpha_req", "twonn_id", "mi_xt", "mi_ty"):
        assert math.isfinite(out[f"repr/transformer.h.1/{k}"]), k

    # the same blocks chosen by glob, by filter and by type give the same numbers
    def block_values(o):
        return {k: v for k, v in o.items() if k.startswith("repr/transformer.h.")}
    ref = block_values(out)
    for layers in ("transformer.h.?", lambda n: n.startswith("transformer.h.") and n.count(".") == 2, GPT2Block):
        o = RepresentationProbe(batch, layers=layers, max_tokens=24, model=model).probe()
        assert block_values(o) == ref and "repr/transformer.ln_f/entropy" not in o

    # X = the output of get_input_embeddings(); two domains of keyword inputs: one forward each
    other = {"input_ids": torch.randint(0, 64, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    rp2 = RepresentationProbe({"a": batch, "b": other}, max_tokens=40, model=model, mi_input="embedding")
    out2 = rp2.probe()
    assert len(rp2.jobs) == 2
    assert math.isfinite(out2["repr/transformer.h.0/mi_xt"])
    assert "repr/transformer.h.0/a/entropy" in out2 and "repr/transformer.h.0/b/entropy" in out2
    assert not any(m._forward_hooks for m in model.modules())


class HFLike(nn.Module):
    """The shape of an HF causal LM without transformers: keyword inputs, blocks in a ModuleList,
    a sibling ``ln_f``, tuple outputs from the blocks, ``get_output_embeddings``."""

    def __init__(self, vocab=40, d=16, n=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.h = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.calls = []

    def get_input_embeddings(self):
        return self.wte

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids=None, attention_mask=None):
        self.calls.append(sorted(k for k, v in (("input_ids", input_ids), ("attention_mask", attention_mask))
                                 if v is not None))
        x = self.wte(input_ids)
        for block in self.h:
            x = x + torch.tanh(block(x))
        return (self.head(self.ln_f(x)),)


def test_hf_like_keyword_inputs_attention_mask_and_per_domain_forwards():
    torch.manual_seed(0)
    model = HFLike()
    ids = torch.randint(0, 40, (3, 12))
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0  # padding: never sampled, never a target
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids}
    rp = RepresentationProbe(batch, max_tokens=1000, model=model)
    assert rp.sites == ["h.0", "h.1", "ln_f"]
    rows = rp.jobs[0].rows
    assert rows.numel() == 3 * 10 - 4  # skip position 0 and the last; row 0 keeps positions 1..6
    assert not any(r // 12 == 0 and r % 12 >= 7 for r in rows.tolist())
    out = rp.probe()
    assert model.calls[-1] == ["attention_mask", "input_ids"]  # labels are not passed
    with torch.no_grad():
        logits = model(ids, mask)[0]
    ce = F.cross_entropy(logits.reshape(-1, 40)[rows], ids.reshape(-1)[rows + 1])
    assert out["repr/ln_f/readout_loss"] == pytest.approx(float(ce), rel=1e-5)

    two = {"a": {"input_ids": ids[:2]}, "b": {"input_ids": ids[1:], "attention_mask": mask[1:]}}
    rp2 = RepresentationProbe(two, max_tokens=30, model=model)
    assert len(rp2.jobs) == 2  # keyword inputs: one forward per domain, metrics after the last
    out2 = rp2.probe()
    assert len(rp2.jobs) == 2
    assert {"repr/h.1/a/entropy", "repr/h.1/b/readout_loss", "repr/h.1/mi_xt"} <= set(out2)
    assert all(not m._forward_hooks for m in model.modules())


def test_mi_input_embedding_uses_the_input_embedding():
    model = tiny_gpt()
    ids = easy_ids()[:, :-1]
    tok = RepresentationProbe(ids, max_tokens=64, model=model).probe()
    emb = RepresentationProbe(ids, max_tokens=64, model=model, mi_input="embedding").probe()
    site = "repr/blocks.0.resid_post"
    assert emb[f"{site}/mi_ty"] == tok[f"{site}/mi_ty"]
    assert emb[f"{site}/mi_xt"] != tok[f"{site}/mi_xt"] and math.isfinite(emb[f"{site}/mi_xt"])
    assert not any(k.startswith("repr/__input__") for k in emb)


# ----------------------------------------------------------------------------------------------------
# spectra to the run store, online phase events, state

class Scaler(nn.Module):
    """x -> x * s: the spread of the token cloud over directions is set from outside."""

    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.lin(x)


def test_spectra_saved_and_compression_onset_detected(tmp_path):
    from diagnostics.runs import RunWriter, load_run

    torch.manual_seed(0)
    d = 16
    model = Scaler(d)
    x = torch.randn(200, d)
    writer = RunWriter.create(tmp_path / "run", config={})
    rp = RepresentationProbe(x, layers=["lin"], every=100, log_spaced_until=0, max_tokens=200, twonn=False,
                             info_plane=False, model=model, writer=writer)
    records = []
    for step in range(0, 2400, 100):
        # effective number of directions rises until step 1200, then falls
        k = 2 + 12 * (step / 1200 if step < 1200 else (2400 - step) / 1200)
        scales = torch.exp(-torch.arange(d) / k)
        with torch.no_grad():
            model.lin.weight.copy_(torch.diag(scales))
        records.append(rp.probe(step))
    flags = [r["repr/lin/compressing"] for r in records]
    assert flags[0] == 0.0 and flags[-1] == 1.0
    (event,) = rp.detected_events()
    assert abs(event["step"] - 1200) <= 200 and event["kind"] == "compression_onset"
    assert event["text"].startswith("lin started compressing at step")
    summ = rp.summary()
    assert summ["repr/lin/compression_onset_step"] == event["step"] and summ["repr/events"] == [event]

    run = load_run(tmp_path / "run")
    assert "repr_spectra_step_1200" in run.arrays()
    spec = run.load_array("repr_spectra_step_1200")["lin"]
    assert spec.shape == (d,) and spec.sum() == pytest.approx(1.0)

    clone = RepresentationProbe(x, layers=["lin"], model=model, max_tokens=200)
    clone.load_state_dict(rp.state_dict())
    assert clone.detected_events() == rp.detected_events()
    assert clone.history["lin"]["step"] == list(range(0, 2400, 100))
    clone._record(1000, {"repr/lin/entropy": 1.0})  # resumed at 1000: later history is dropped
    assert clone.history["lin"]["step"][-1] == 1000 and len(clone.history["lin"]["step"]) == 11


def test_bad_arguments():
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="unknown metric"):
        RepresentationProbe(ids, metrics=("entropy", "loss"))
    with pytest.raises(ValueError, match="every"):
        RepresentationProbe(ids, every=0)
    with pytest.raises(TypeError, match="probe batch"):
        RepresentationProbe("text")
    with pytest.raises(RuntimeError, match="no model"):
        RepresentationProbe(ids).probe()


# ----------------------------------------------------------------------------------------------------
# the built-in loop

def test_builtin_loop_writes_repr_metrics_and_spectra(tmp_path, one_thread):
    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config()
    cfg.monitor.gns = {"enabled": False}
    cfg.monitor.difficulty = {"enabled": False}
    cfg.monitor.representation = {"probe_sequences": 2, "max_tokens": 96}
    train(cfg, str(tmp_path / "run"), progress=False, strict_hooks=True)
    run = load_run(tmp_path / "run")
    col = "repr/blocks.1.resid_post/entropy"
    assert col in run.metrics.columns
    probed = run.metrics.dropna(subset=[col])["step"].tolist()
    # eval_every = 5, log-spaced below it, and the phase ends 8, 14 and the final record 18
    assert probed == [0, 1, 2, 4, 5, 8, 10, 14, 15, 18]
    for k in ("effective_rank", "alpha_req", "twonn_id", "mi_xt", "mi_ty", "readout_loss"):
        assert f"repr/final_norm/{k}" in run.metrics.columns
    assert "repr/final_norm/math/entropy" in run.metrics.columns
    assert {f"repr_spectra_step_{s}" for s in probed} <= set(run.arrays())


def test_hookset_option_errors_name_the_hook():
    from midtrain.config import ConfigError
    from midtrain.data import default_corpus
    from midtrain.hookset import build_hooks
    from tests.midtrain.conftest import micro_config

    cfg = micro_config()
    cfg.monitor.gns = {"enabled": False}
    cfg.monitor.difficulty = {"enabled": False}
    cfg.monitor.representation = {"bogus": 1}
    with pytest.raises(ConfigError, match="monitor.representation"):
        build_hooks(cfg, tiny_gpt(), default_corpus())
    cfg.monitor.representation = {"metrics": ["entropy", "nope"]}
    with pytest.raises(ConfigError, match="monitor.representation.*unknown metric"):
        build_hooks(cfg, tiny_gpt(), default_corpus())
    cfg.monitor.representation = cfg.monitor.retrieval = {"enabled": False}
    assert build_hooks(cfg, tiny_gpt(), default_corpus()) == []


class LayerNormLM(nn.Module):
    """Embedding, two residual Linear blocks, nn.LayerNorm and a head (as in many HF models)."""

    def __init__(self, V=40, D=16):
        super().__init__()
        self.wte = nn.Embedding(V, D)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.ln_f = nn.LayerNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids):
        h = self.wte(ids)
        for b in self.blocks:
            h = h + torch.tanh(b(h))
        return self.lm_head(self.ln_f(h))


def test_readout_through_a_bfloat16_layernorm():
    """The logit lens runs the final norm in the model's own dtype (a bf16 nn.LayerNorm rejects
    float32 input), then the logits in float32: the loss matches the float32 model's."""
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (4, 17))
    x, y = ids[:, :-1], ids[:, 1:]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(1)
        m = LayerNormLM().to(dtype)
        rp = RepresentationProbe((x, y), layers=["blocks.0"], max_tokens=48, model=m, skip_first=0,
                                 readout=(m.ln_f, m.lm_head))
        out[dtype] = rp.probe()["repr/blocks.0/readout_loss"]
    assert math.isfinite(out[torch.bfloat16])
    assert out[torch.bfloat16] == pytest.approx(out[torch.float32], rel=2e-2)
