"""The hook-API friction a new user met (issue 14, item 4); each test failed before its fix.

a. ``domains=`` with names (``["code", "math", ...]``) disabled the DifficultyTracker ("invalid literal
   for int()"): names and indices now both work everywhere domains are accepted, and a bad value is a
   TypeError / ValueError at ``Monitor.on_backward_end`` naming ``domains=``, not a disabled hook.
b. Per-example gradient norms did not cover ``transformers``' Conv1D (GPT-2 stores its Linear weights
   transposed in it), so per-example GNS on GPT-2 left out every attention and MLP weight. Conv1D is
   now handled exactly (checked against torch.func in float64 to 1e-6, relative).
c. The probes ran only on their cadence (the representation probe's last measurement in the default
   run was at step 300 of 400): the loop now marks the steps where phases end and the last step
   (``Monitor.set_boundaries``), and the representation probe and the difficulty probe set measure
   there too. A record at step s describes the model after s updates (as ``val/*``), so a phase of
   steps [a, b) ends at record b, and the run at record ``total_steps``.
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
        self.domains, self.ended = [], []

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        self.domains.append(domains)

    def on_step_end(self, step, scalars):
        self.ended.append(step)


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


def test_probes_at_every_phase_end_and_the_last_step(tmp_path):
    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(eval_every=5, checkpoint_every=100)      # phases of 8, 6, 4 steps: ends 8, 14, 18
    ends = [8, 14, 18]
    assert all(s % 5 for s in ends[:2]) and cfg.total_steps() == 18
    train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    m = load_run(tmp_path / "r").metrics.set_index("step")
    repr_cols = [c for c in m.columns if c.startswith("repr/") and c.endswith("/entropy")]
    probe_cols = [c for c in m.columns if c.startswith("difficulty/") and c.endswith("/probe_loss")]
    assert repr_cols and probe_cols
    for s in ends:
        assert m.loc[s, repr_cols].notna().all(), s            # the representation probe measured there
        assert m.loc[s, probe_cols].notna().all(), s           # and the difficulty probe set
        assert m.loc[s, [c for c in m.columns if c.startswith("val/")]].notna().all(), s   # with val/*
    assert m.loc[[3, 6, 7, 9], repr_cols].isna().all().all()  # off-cadence steps stay unmeasured
    # the default GNS (auto) measures per domain in the built-in loop too (every 10th step)
    dom = [c for c in m.columns if c.startswith("gns/domain/") and c.endswith("/b_simple")]
    assert dom and {c.split("/")[2] for c in dom} <= {"prose", "code", "math"}
    assert set(m[dom].dropna(how="all").index) <= {0, 10}


def test_set_boundaries_and_on_run_end_on_a_plain_loop():
    from hooks import RepresentationProbe

    model, x, y = gpt_and_batch(True, B=4)
    rp, seen = RepresentationProbe({"all": (x, y)}, every=100, log_spaced_until=0), Seen()
    mon = Monitor(model, [rp, seen], sinks=[MemorySink()], strict=True)
    with pytest.raises(ValueError, match="integers >= 0"):
        mon.set_boundaries([3, -1])
    assert not rp.scheduled(7)
    mon.set_boundaries([7, 12])
    assert rp.boundaries == frozenset({7, 12}) and rp.scheduled(7) and rp.scheduled(12) and not rp.scheduled(8)
    rec = mon.on_run_end(12, **{"val/all/loss": 1.0})
    assert any(k.startswith("repr/") for k in rec) and rec["val/all/loss"] == 1.0
    assert seen.ended == []                      # a hook that does not measure the model got no event
    mon.on_step_end(13)
    assert seen.ended == [13]


def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                  eos_token_id=0, attn_implementation="eager")
    return transformers.GPT2LMHeadModel(cfg).double().eval()   # eval: no dropout (gradients still flow)


def test_gpt2_conv1d_per_example_norms_and_grams_match_torch_func():
    from torch.func import functional_call, grad, vmap

    from hooks.per_example import PerExampleGradNorms

    model = tiny_gpt2()
    B, T = 4, 10
    x = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(T).expand(B, T)        # one row of position ids per example (see below)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_i(p, xi, pi):
        return functional_call(model, p, (), {"input_ids": xi[None], "labels": xi[None],
                                              "position_ids": pi[None]}).loss

    g = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, pos)
    with PerExampleGradNorms(model) as pe:
        model(input_ids=x, labels=x, position_ids=pos).loss.backward()   # mean over B (T - 1) tokens
        res = pe.sq_norms(loss_scale="mean")
    assert res.unsupported == {} and set(res.params) == set(params)      # every parameter covered
    assert any(".attn.c_attn." in k for k in res.params) and any(".mlp.c_proj." in k for k in res.params)
    for k, v in g.items():
        ref = v.flatten(1).pow(2).sum(1)
        assert float(((res.params[k] - ref).abs() / ref).max()) < 1e-6, k
    with PerExampleGradNorms(model, gram=True) as pe:                     # per-domain GNS's Gram too
        model(input_ids=x, labels=x, position_ids=pos).loss.backward()
        res = pe.sq_norms(loss_scale="mean")
    P = torch.cat([v.flatten(1) for v in g.values()], 1)
    K = sum(res.grams[0].values()) * B ** 2
    assert float((K - P @ P.T).abs().max() / (P @ P.T).abs().max()) < 1e-6


def test_gpt2_gns_measures_attention_and_mlp():
    """Through the GNS hook; GPT-2's default position ids have batch 1 (broadcast over the batch), so
    its position embedding has no per-example gradient to read: only transformer.wpe is left out, said
    once with the reason (pass position_ids of shape (B, T) to cover it, as above)."""
    from hooks import GradientNoiseScale

    model = tiny_gpt2().float()
    gns = GradientNoiseScale(mode="per_example")      # step 0 measures per domain (domain_every 10)
    mon = Monitor(model, [gns], sinks=[MemorySink()], strict=True)
    x = torch.randint(0, 64, (8, 10), generator=torch.Generator().manual_seed(2))
    with pytest.warns(RuntimeWarning, match="transformer.wpe: input batch dimension 1"):
        mon.on_step_begin(0)
        model(input_ids=x, labels=x).loss.backward()
    mon.on_backward_end(8, domains=["a", "b"] * 4)
    mon.on_grads_ready()
    rec = mon.on_step_end(0)
    assert set(gns._pe.pe.unsupported) == {"transformer.wpe"}
    covered = {n for pid, n in gns._pe.pe._names.items() if pid in gns._pe.pe._params}
    assert covered == {n for n, _ in model.named_parameters()} - {"transformer.wpe.weight"}
    for key in ("gns/small_sq", "gns/attention/b_simple", "gns/mlp/b_simple", "gns/domain/a/small_sq"):
        assert key in rec, key


def test_hf_trainer_batches_with_domain_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    from hooks.integrations.hf_trainer import MidtrainCallback
    from tests.hooks.integrations.test_hf_trainer import data, tiny_gpt2

    rows = data()

    class NamedRows(torch.utils.data.Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            return {"input_ids": rows[i], "labels": rows[i], "ids": i, "domains": ("code", "math")[i % 2]}

    def collate(features):                     # names stay a list of str (the default collator wants numbers)
        out = {k: torch.stack([f[k] for f in features]) for k in ("input_ids", "labels")}
        out["ids"] = torch.tensor([f["ids"] for f in features])
        out["domains"] = [f["domains"] for f in features]
        return out

    tracker, sink = DifficultyTracker(stats_every=1), MemorySink()
    cb = MidtrainCallback([tracker], sinks=[sink], strict=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
        report_to=[], use_cpu=True, save_strategy="no", seed=0, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, learning_rate=0.0)
    transformers.Trainer(model=tiny_gpt2(), args=args, train_dataset=NamedRows(), data_collator=collate,
                         callbacks=[cb]).train()
    assert cb.monitor.disabled_hooks == [] and cb.error is None
    assert tracker.domain_names == ["code", "math"]
    assert any("difficulty/code/loss" in r and "difficulty/math/loss" in r for r in sink.records)
