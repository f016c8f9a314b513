"""GradientNoiseScale hook against ground truth (McCandlish et al. 2018, arXiv 1812.06162).

References used here, slow and obvious:
- exact |G|^2 and tr(Sigma) of a finite least-squares data set from per-example gradients, one
  autograd call per example (population covariance, 1/N: batches drawn WITH replacement, as in
  tests/diagnostics/test_gns.py);
- per-micro-batch gradients from separate backward passes (torch.autograd.grad), so the hook's
  no-copy tensor-hook norms are compared with plain gradient vectors.
"""

import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from diagnostics.gns import recompute_b_simple, two_batch_estimates
from hooks.gradient_noise import GradientNoiseScale, default_groups
from hooks.monitor import MemorySink, Monitor


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only contend (10x slower on a loaded 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def lsq_problem(seed=0, N=64, d=5):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=g)
    y = X @ torch.randn(d, generator=g) + 0.5 * torch.randn(N, generator=g)
    torch.manual_seed(seed)
    return X, y, nn.Linear(d, 1)


def lsq_loss(model, X, y, idx):
    return 0.5 * ((model(X[idx]).squeeze(-1) - y[idx]) ** 2).mean()


def exact_b_simple(model, X, y):
    params = [p for p in model.parameters() if p.requires_grad]
    per = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        lsq_loss(model, X, y, torch.tensor([i])), params)]) for i in range(len(X))]).double()  # (N, D)
    G = per.mean(0)
    return float(((per - G) ** 2).sum(1).mean()) / float(G @ G)


def plain_loop(model, monitor, batches, loss_fn, *, begin=True, backward=None, before_ready=None,
               after_ready=None):
    """batches[step][k] = index tensor of micro-batch k. Loss scaled by 1/accum like the built-in loop."""
    for step, micros in enumerate(batches):
        if begin:
            monitor.on_step_begin(step)
        for idx in micros:
            loss = loss_fn(idx) / len(micros)
            (backward(loss) if backward else loss.backward())
            monitor.on_backward_end(len(idx))
        if before_ready:
            before_ready()
        monitor.on_grads_ready()
        if after_ready:
            after_ready()
        model.zero_grad(set_to_none=True)
        monitor.on_step_end(step)


def draw(seed, steps, accum, b, N):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, N, (b,), generator=g) for _ in range(accum)] for _ in range(steps)]


def run_hook(model, batches, loss_fn, **kw):
    sink, hook = MemorySink(), GradientNoiseScale(**{"mode": "microbatch", **kw})
    mon = Monitor(model, [hook], sinks=[sink], strict=True)
    plain_loop(model, mon, batches, loss_fn)
    mon.close()
    return pd.DataFrame(sink.records), hook


# ----------------------------------------------------------------------------------------------
# (1) converges to the exact B_simple (learning rate 0: the gradient distribution is fixed)

def test_microbatch_b_simple_converges_to_exact():
    X, y, model = lsq_problem()
    truth = exact_b_simple(model, X, y)
    batches = draw(1, steps=1000, accum=8, b=4, N=len(X))
    df, hook = run_hook(model, batches, lambda i: lsq_loss(model, X, y, i), ema=0.999, groups=False)
    assert set(df["gns/b_small"]) == {4.0} and set(df["gns/b_big"]) == {32.0}
    online = df["gns/b_simple"].iloc[-1]
    offline = recompute_b_simple(df, window=len(df))["gns/b_simple"].iloc[-1]  # ratio of sums
    assert online == pytest.approx(truth, rel=0.05)
    assert offline == pytest.approx(truth, rel=0.05)
    # the logged raw norms reproduce the online EMA exactly
    again = recompute_b_simple(df, decay=0.999)["gns/b_simple"]
    np.testing.assert_allclose(again, df["gns/b_simple"], rtol=1e-9)
    assert hook.summary()["gns/measured"] == 1000
    # power: without undoing the 1/accum loss scaling the estimate would be far off
    naive = df.assign(**{"gns/small_sq": df["gns/small_sq"] / 8 ** 2})
    assert not recompute_b_simple(naive, window=len(df))["gns/b_simple"].iloc[-1] == pytest.approx(truth, rel=0.5)


def test_float64_model_is_measured_like_float32():
    """A float64 model: the norms are taken in float64 (torch refuses to narrow them to float32, which
    disabled the hook before) and give the float32 model's numbers (same data, same weights)."""
    X, y, model = lsq_problem()
    batches = draw(3, steps=20, accum=4, b=4, N=len(X))
    df32, _ = run_hook(model, batches, lambda i: lsq_loss(model, X, y, i), groups=False)
    m64, X64, y64 = model.double(), X.double(), y.double()
    df64, _ = run_hook(m64, batches, lambda i: lsq_loss(m64, X64, y64, i), groups=False)
    for k in ("gns/small_sq", "gns/big_sq", "gns/b_simple"):
        np.testing.assert_allclose(df64[k], df32[k], rtol=1e-4)


def b_simple_and_se(df, prefix="gns"):
    """Ratio-of-means B_simple over all logged steps and its delta-method standard error.

    Steps are independent at learning rate 0, so mean(trace_cov) / mean(grad_sq) has standard
    error std(trace_cov - B grad_sq) / (sqrt(n) mean(grad_sq)) to first order."""
    g2, tr = two_batch_estimates(*(df[f"{prefix}/{k}"].to_numpy() for k in ("small_sq", "big_sq", "b_small", "b_big")))
    b = tr.mean() / g2.mean()
    return float(b), float((tr - b * g2).std(ddof=1) / math.sqrt(len(tr)) / g2.mean())


def test_per_example_b_simple_converges_to_exact():
    """B_small = 1 (per-example norms from hooks.per_example) vs B_big = 32, same ground truth."""
    X, y, model = lsq_problem()
    truth = exact_b_simple(model, X, y)
    df, hook = run_hook(model, draw(1, steps=1000, accum=1, b=32, N=len(X)),
                        lambda i: lsq_loss(model, X, y, i), mode="per_example", ema=0.999, groups=False)
    assert hook.last_mode == "per_example"
    assert set(df["gns/b_small"]) == {1.0} and set(df["gns/b_big"]) == {32.0}
    b, se = b_simple_and_se(df)
    assert se < 0.015 * truth                  # the 5% check below is >3 standard errors wide
    assert b == pytest.approx(truth, rel=0.05)
    assert df["gns/b_simple"].iloc[-1] == pytest.approx(truth, rel=0.05)      # the online EMA
    # power: per-example norms of the mean loss (not undoing 1/B) would be 32^2 too small
    naive = df.assign(**{"gns/small_sq": df["gns/small_sq"] / 32 ** 2})
    assert not recompute_b_simple(naive, window=len(df))["gns/b_simple"].iloc[-1] == pytest.approx(truth, rel=0.5)


def gpt_exact_b_simple(model, data, only=None):
    """Exact tr(Sigma) / |G|^2 of the finite data set ``data`` (N, T+1) over the parameters whose
    names pass ``only``: one backward per sequence (population covariance, 1/N)."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and (only is None or only(n))]
    per = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(
        model(xy[None, :-1], xy[None, 1:])[1], params)]) for xy in data]).double()   # (N, D)
    G = per.mean(0)
    return float(((per - G) ** 2).sum(1).mean()) / float(G @ G)


def test_gpt_modes_agree_with_exact_b_simple_and_each_other():
    """The built-in GPT at learning rate 0 on a finite data set: microbatch (B 4 vs 8),
    per_example (1 vs 8) and layernorm (1 vs 8, norm gains only) agree with the exact B_simple of
    the same parameters and with each other, within their statistical errors (z < 4)."""
    model = gpt_no_extras()
    g = torch.Generator().manual_seed(3)
    # N = 24 sequences (T = 8) over 4 of the 32 symbols: a strong mean gradient (B_simple ~ 1),
    # so 150 steps pin B_simple down to a few per cent
    data = torch.randint(0, 4, (24, 9), generator=g)
    is_norm = lambda n: "norm" in n  # noqa: E731   the layernorm mode's parameters (RMSNorm gains)
    truth = {"gns": gpt_exact_b_simple(model, data), "gns/norms": gpt_exact_b_simple(model, data, is_norm)}
    steps = 150
    idx = torch.randint(0, len(data), (steps, 8), generator=g)
    loss = GPTLoss(model)
    est = {}
    for mode, accum in [("microbatch", 2), ("per_example", 1), ("layernorm", 1)]:
        batches = [[data[i] for i in row.chunk(accum)] for row in idx]        # the same examples
        df, hook = run_hook(model, batches, loss, mode=mode, group_details=True)
        assert hook.last_mode == mode and set(df["gns/b_big"]) == {8.0}
        if mode != "layernorm":
            est[(mode, "gns")] = b_simple_and_se(df)
        est[(mode, "gns/norms")] = b_simple_and_se(df, "gns/norms")
        if mode == "layernorm":               # its total is the norm gains' group
            assert b_simple_and_se(df) == pytest.approx(est[(mode, "gns/norms")], rel=1e-9)
    # layernorm mode computes exactly the per_example mode's norm-gain norms
    assert est[("layernorm", "gns/norms")] == pytest.approx(est[("per_example", "gns/norms")], rel=1e-6)
    for (mode, what), (b, se) in est.items():
        assert se < 0.1 * truth[what], (mode, what)
        assert abs(b - truth[what]) < 4 * se, (mode, what, b, se, truth[what])
    for what in truth:
        pairs = [(m, v) for (m, w), v in est.items() if w == what]
        for (m1, (b1, s1)), (m2, (b2, s2)) in zip(pairs, pairs[1:]):
            assert abs(b1 - b2) < 4 * math.hypot(s1, s2), (what, m1, m2)


# ----------------------------------------------------------------------------------------------
# (2) exact norms vs per-micro-batch backward passes: accumulation scaling, tied weights,
#     parameters without gradients, groups

def tiny_gpt():
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_weights=True))
    model.unused = nn.Parameter(torch.ones(3))                  # trainable, never gets a gradient
    model.blocks[0].mlp_norm.weight.requires_grad_(False)       # frozen
    return model


def gpt_batches(seed, steps, accum, b, T=8, vocab=32):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, vocab, (b, T + 1), generator=g) for _ in range(accum)] for _ in range(steps)]


def brute_force_norms(model, micros):
    """Per group: mean_k |g_k|^2 and |mean_k g_k|^2 from separate backward passes (g_k: micro-batch mean)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]   # a tied weight once
    grads = []
    for xy in micros:
        loss = model(xy[:, :-1], xy[:, 1:])[1]
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for (_, p), g in zip(named, gs)])
    groups = {"total": list(range(len(named)))}
    for i, (n, _) in enumerate(named):
        for g in default_groups(n):
            groups.setdefault(g, []).append(i)
    out = {}
    for g, idx in groups.items():
        small = np.mean([sum(float(gr[i].double().pow(2).sum()) for i in idx) for gr in grads])
        big = sum(float(torch.stack([gr[i] for gr in grads]).double().mean(0).pow(2).sum()) for i in idx)
        out[g] = (small, big)
    return out


class GPTLoss:
    def __init__(self, model):
        self.model = model

    def __call__(self, xy):
        return self.model(xy[:, :-1], xy[:, 1:])[1]


def test_exact_norms_tied_weights_frozen_and_unused_params():
    model = tiny_gpt()
    assert model.lm_head.weight is model.tok_emb.weight
    batches = gpt_batches(0, steps=2, accum=3, b=2)
    df, hook = run_hook(model, batches, GPTLoss(model), group_details=True)
    # one tensor hook per distinct trainable parameter: the tied weight once, the frozen one not
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(hook._params) == n_trainable
    for step, micros in enumerate(batches):
        ref = brute_force_norms(model, micros)
        row = df.iloc[step]
        assert row["gns/b_small"] == 2 and row["gns/b_big"] == 6
        for g, (small, big) in ref.items():
            prefix = "gns" if g == "total" else f"gns/{g}"
            assert row[f"{prefix}/small_sq"] == pytest.approx(small, rel=1e-5), g
            assert row[f"{prefix}/big_sq"] == pytest.approx(big, rel=1e-5), g
    assert {"embeddings", "attention", "mlp", "norms", "other", "blocks.0", "blocks.1"} <= set(ref)
    assert "gns/blocks.1/b_simple" in df and "gns/norms/b_simple" in df


def test_default_groups():
    assert default_groups("blocks.3.attn.qkv.weight") == ["attention", "blocks.3"]
    assert default_groups("blocks.3.attn_norm.weight") == ["norms", "blocks.3"]
    assert default_groups("transformer.h.11.mlp.c_fc.weight") == ["mlp", "blocks.11"]
    assert default_groups("transformer.h.0.ln_1.bias") == ["norms", "blocks.0"]
    assert default_groups("tok_emb.weight") == ["embeddings"]
    assert default_groups("lm_head.weight") == ["head"]        # untied; tied: embeddings (test_gns_groups)
    assert default_groups("scale") == ["other"]
    # custom groups: a mapping group -> regex
    model = tiny_gpt()
    df, _ = run_hook(model, gpt_batches(0, 1, 2, 2), GPTLoss(model), groups={"qkv": r"attn\.qkv"})
    assert "gns/qkv/b_simple" in df and "gns/attention/b_simple" not in df


# ----------------------------------------------------------------------------------------------
# (3) mixed-precision loss scaling

def test_grad_scaler_scale_is_divided_out():
    X, y, model = lsq_problem()
    batches = draw(2, steps=4, accum=2, b=3, N=len(X))
    loss_fn = lambda i: lsq_loss(model, X, y, i)  # noqa: E731
    ref, _ = run_hook(model, batches, loss_fn)
    cols = ["gns/small_sq", "gns/big_sq", "gns/b_simple"]

    S = 1024.0
    for scale_arg, unscale in [(S, False), (lambda: S, False), ("scaler", False), ("scaler", True)]:
        scaler = torch.amp.GradScaler("cpu", init_scale=S)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        hook = GradientNoiseScale(mode="microbatch", grad_scale=scaler if scale_arg == "scaler" else scale_arg,
                                  grads_unscaled=unscale)
        sink = MemorySink()
        mon = Monitor(model, [hook], sinks=[sink], strict=True)
        plain_loop(model, mon, batches, loss_fn, backward=lambda loss: scaler.scale(loss).backward(),
                   before_ready=(lambda: scaler.unscale_(opt)) if unscale else None,
                   after_ready=lambda: (scaler.step(opt), scaler.update()))
        assert scaler.get_scale() == S   # no overflow: the scale never changed
        mon.close()
        got = pd.DataFrame(sink.records)
        np.testing.assert_allclose(got[cols], ref[cols], rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# (4) NaN/inf gradients skip the measurement

def test_nan_gradient_skips_step_and_keeps_ema():
    X, y, model = lsq_problem()
    batches = draw(3, steps=6, accum=2, b=3, N=len(X))
    sink, hook = MemorySink(), GradientNoiseScale(mode="microbatch")
    mon = Monitor(model, [hook], sinks=[sink], strict=True)
    bad_step = 3
    for step, micros in enumerate(batches):
        mon.on_step_begin(step)
        for k, idx in enumerate(micros):
            loss = lsq_loss(model, X, y, idx) / 2
            if step == bad_step and k == 1:
                loss = loss * float("nan")
            loss.backward()
            mon.on_backward_end(len(idx))
        mon.on_grads_ready()
        model.zero_grad(set_to_none=True)
        if step == bad_step:
            before = hook.state_dict()["trackers"]
        mon.on_step_end(step)
        if step == bad_step:
            assert hook.state_dict()["trackers"] == before
    recs = sink.records
    assert recs[bad_step]["gns/skipped"] == 1 and recs[bad_step - 1]["gns/skipped"] == 0
    assert recs[bad_step]["gns/b_simple"] == recs[bad_step - 1]["gns/b_simple"]
    assert "gns/small_sq" not in recs[bad_step]
    assert recs[-1]["gns/skipped"] == 1 and math.isfinite(recs[-1]["gns/grad_sq"])
    assert hook.summary()["gns/measured"] == 5


# ----------------------------------------------------------------------------------------------
# (5) one batch size only; modes that are not available

class RawAffine(nn.Module):
    """y = x w + b by matmul in its own forward: no per-example rule (hooks.per_example)."""

    def __init__(self, d):
        super().__init__()
        self.w, self.b = nn.Parameter(0.1 * torch.randn(d, 1)), nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x @ self.w + self.b


@pytest.mark.parametrize("why", ["no supported module", "fallback none"])
def test_single_batch_size_says_what_is_needed_once_and_keeps_running(why):
    X, y, model = lsq_problem()
    if why == "no supported module":     # auto cannot fall back to per-example norms
        model = RawAffine(X.shape[1])
    sink, hook = MemorySink(), GradientNoiseScale(fallback="none" if why == "fallback none" else "per_example")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        mon = Monitor(model, [hook], sinks=[sink], strict=True)
        plain_loop(model, mon, draw(4, steps=3, accum=1, b=4, N=len(X)), lambda i: lsq_loss(model, X, y, i))
    assert hook._pe is None       # not built (fallback none) or built, found useless, dropped
    assert any("RawAffine" in str(x.message) for x in w) == (why == "no supported module")
    msgs = [str(x.message) for x in w if "GradientNoiseScale" in str(x.message)]
    assert len(msgs) == 1
    assert "accumulation" in msgs[0] and "processes" in msgs[0] and "per-example" in msgs[0]
    assert not any(k.startswith("gns/") for r in sink.records for k in r)
    assert not mon.disabled and hook.summary()["gns/unmeasured"] == 3
    # the same hook measures as soon as a step accumulates (modes resolve per step)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain_loop(model, mon, draw(5, steps=1, accum=2, b=4, N=len(X)), lambda i: lsq_loss(model, X, y, i))
    assert sink.records[-1]["gns/b_big"] == 8 and hook.last_mode == "microbatch"


def test_unavailable_modes_are_clear_errors():
    X, _, lin = lsq_problem()
    # per-example modes on a model they cannot measure: refused at attach, with the reason
    for mode, model in [("per_example", RawAffine(X.shape[1])), ("layernorm", lin)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # PerExampleGradNorms names the unsupported module
            with pytest.raises(ValueError, match=r"hooks\.per_example.*no supported"):
                Monitor(model, [GradientNoiseScale(mode=mode)], strict=True)
    with pytest.raises(ValueError, match="valid modes"):
        GradientNoiseScale(mode="bogus")
    with pytest.raises(ValueError, match="every"):
        GradientNoiseScale(every=0)
    _, _, model = lsq_problem()
    with pytest.raises(ValueError, match="several processes"):
        Monitor(model, [GradientNoiseScale(mode="ddp")], strict=True)
    with pytest.warns(RuntimeWarning, match="several processes"):   # non-strict: disabled, no crash
        mon = Monitor(model, [GradientNoiseScale(mode="ddp")])
    assert "gns" in mon.disabled


# ----------------------------------------------------------------------------------------------
# (5b) per-example modes (hooks.per_example): B_small = 1

def per_example_reference(model, micros, only=None):
    """mean_i |grad loss_i|^2 over every example of the step (one backward per example) and
    |mean_k g_k|^2, over the parameters whose names pass ``only``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and (only is None or only(n))]
    params = [p for _, p in named]
    per, micro_means = [], []
    for xy in micros:
        for i in range(len(xy)):
            gs = torch.autograd.grad(model(xy[i:i + 1, :-1], xy[i:i + 1, 1:])[1], params, allow_unused=True)
            per.append(sum(float(g.double().pow(2).sum()) for g in gs if g is not None))
        gs = torch.autograd.grad(model(xy[:, :-1], xy[:, 1:])[1], params, allow_unused=True)
        micro_means.append([torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)])
    big = sum(float(torch.stack(col).double().mean(0).pow(2).sum()) for col in zip(*micro_means))
    return float(np.mean(per)), big


def gpt_no_extras():
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_weights=True))


@pytest.mark.parametrize("mode,accum", [("per_example", 2), ("layernorm", 1), ("auto", 1)])
def test_per_example_modes_match_brute_force(mode, accum):
    model = gpt_no_extras()
    batches = gpt_batches(1, steps=2, accum=accum, b=3)
    df, hook = run_hook(model, batches, GPTLoss(model), mode=mode)
    only = (lambda n: "norm" in n) if mode == "layernorm" else None
    assert hook.last_mode == ("layernorm" if mode == "layernorm" else "per_example")
    for step, micros in enumerate(batches):
        small, big = per_example_reference(model, micros, only)
        row = df.iloc[step]
        assert row["gns/b_small"] == 1 and row["gns/b_big"] == 3 * accum
        assert row["gns/small_sq"] == pytest.approx(small, rel=1e-4)
        assert row["gns/big_sq"] == pytest.approx(big, rel=1e-5)
    if mode == "layernorm":   # only groups that hold normalisation parameters are reported
        assert "gns/norms/b_simple" in df and "gns/attention/b_simple" not in df
    else:
        assert "gns/attention/b_simple" in df


def test_auto_switches_between_accumulation_and_per_example():
    """auto follows the phases of a run: microbatch while accumulating, per-example otherwise."""
    model = gpt_no_extras()
    batches = gpt_batches(2, 2, 2, 2) + gpt_batches(3, 3, 1, 4) + gpt_batches(4, 1, 2, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        df, hook = run_hook(model, batches, GPTLoss(model), mode="auto")
    # the first one-batch-size step after accumulating is not measured (per-example norms attach
    # at the next step), then per-example takes over; accumulation again -> microbatch
    assert list(df["gns/b_small"].fillna(0)) == [2, 2, 0, 1, 1, 2]
    assert any("per-example gradient norms" in str(x.message) for x in w)
    assert hook._pe is not None and not hook._pe.attached


def test_auto_per_example_never_mixes_a_partial_group_into_an_ema():
    """A parameter per-example norms cannot see (here one owned by the root module) keeps auto
    from feeding per-example estimates to the total's and that group's EMAs: they would average
    a subset with the whole."""
    model = tiny_gpt()          # has model.unused (root module: no per-example rule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df, hook = run_hook(model, gpt_batches(5, 2, 2, 2) + gpt_batches(6, 3, 1, 3), GPTLoss(model), mode="auto")
    pe_rows = df.iloc[3:]       # per-example steps (step 2: per-example norms attach after it)
    assert "gns/attention/b_simple" in df and pe_rows["gns/attention/b_simple"].notna().all()
    assert pe_rows["gns/b_small"].isna().all() and pe_rows["gns/other/b_simple"].isna().all()
    assert hook.trackers["total"].n_updates == 2 and hook.trackers["attention"].n_updates == 4


# ----------------------------------------------------------------------------------------------
# (6) scheduling: unscheduled steps cost a flag test

def test_every_k_steps_and_idle_tensor_hooks(monkeypatch):
    X, y, model = lsq_problem()
    calls = []   # every tensor op the tensor hooks may run
    for mod, fn in [(torch.linalg, "vector_norm"), (torch, "dot")]:
        real = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    sink, hook = MemorySink(), GradientNoiseScale(mode="microbatch", every=3)
    mon = Monitor(model, [hook], sinks=[sink], strict=True)
    batches = draw(6, steps=7, accum=2, b=3, N=len(X))
    per_step = []
    for step, micros in enumerate(batches):
        n0 = len(calls)
        mon.on_step_begin(step)
        for idx in micros:
            (lsq_loss(model, X, y, idx) / 2).backward()
            mon.on_backward_end(len(idx))
        mon.on_grads_ready()
        model.zero_grad(set_to_none=True)
        mon.on_step_end(step)
        per_step.append(len(calls) - n0)
    measured = [r["step"] for r in sink.records if "gns/b_simple" in r]
    assert measured == [0, 3, 6]
    assert [per_step[s] for s in (1, 2, 4, 5)] == [0, 0, 0, 0]          # hooks idle
    assert all(per_step[s] == 2 * 2 for s in (0, 3, 6))                  # 2 params x 2 micro-batches


def test_without_on_step_begin_still_measures():
    """A loop that never calls on_step_begin: the Monitor arms the hook at the first backward."""
    X, y, model = lsq_problem()
    batches = draw(7, steps=6, accum=3, b=2, N=len(X))
    loss_fn = lambda i: lsq_loss(model, X, y, i)  # noqa: E731
    for every in (1, 2):
        sink, hook = MemorySink(), GradientNoiseScale(mode="microbatch", every=every)
        mon = Monitor(model, [hook], sinks=[sink], strict=True)
        plain_loop(model, mon, batches, loss_fn, begin=False)
        rows = [r for r in sink.records if "gns/b_small" in r]
        assert [r["step"] for r in rows] == list(range(0, 6, every))
        for r in rows:
            assert r["gns/b_big"] == 6
            # every=1 sees all micro-batches; every=2 misses the first one of a measured step
            # (the estimator stays unbiased) -- never a stale or foreign contribution
            micros = batches[r["step"]][(0 if every == 1 else 1):]
            ref = []
            for idx in micros:
                g = torch.autograd.grad(loss_fn(idx), list(model.parameters()))
                ref.append(sum(float(x.double().pow(2).sum()) for x in g))
            assert r["gns/small_sq"] == pytest.approx(np.mean(ref), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# (7) state: resuming continues the EMAs exactly

def test_state_dict_resume_equals_uninterrupted(tmp_path):
    X, y, model = lsq_problem()
    batches = draw(8, steps=8, accum=2, b=3, N=len(X))
    loss_fn = lambda i: lsq_loss(model, X, y, i)  # noqa: E731
    full, _ = run_hook(model, batches, loss_fn)

    sink1, h1 = MemorySink(), GradientNoiseScale(mode="microbatch")
    mon1 = Monitor(model, [h1], sinks=[sink1], strict=True)
    plain_loop(model, mon1, batches[:5], loss_fn)
    torch.save(mon1.state_dict(), tmp_path / "state.pt")
    mon1.close()

    sink2, h2 = MemorySink(), GradientNoiseScale(mode="microbatch")
    mon2 = Monitor(model, [h2], sinks=[sink2], strict=True)
    mon2.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    for step, micros in enumerate(batches[5:], start=5):
        mon2.on_step_begin(step)
        for idx in micros:
            (loss_fn(idx) / 2).backward()
            mon2.on_backward_end(len(idx))
        mon2.on_grads_ready()
        model.zero_grad(set_to_none=True)
        mon2.on_step_end(step)
    resumed = pd.DataFrame(sink1.records + sink2.records)
    cols = [c for c in full.columns if c.startswith("gns/")]
    np.testing.assert_allclose(resumed[cols], full[cols], rtol=1e-12)
    assert h2.summary()["gns/measured"] == 8


# ----------------------------------------------------------------------------------------------
# (8) the built-in loop attaches it by default

def only_gns(cfg):
    """Turn the loop's other default hooks off (they have their own tests)."""
    from midtrain.hookset import _BUILDERS

    for name in _BUILDERS:
        if name != "gns":
            setattr(cfg.monitor, name, {"enabled": False})

def test_builtin_loop_logs_gns_by_default(tmp_path):
    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(4, 2, 1), checkpoint_every=100, eval_every=100)
    only_gns(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the grad_accum=1 phases: "one batch size only"
        train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    m = load_run(tmp_path / "r").metrics
    pre = m[m["step"] < 4]                           # pretrain: batch 8 = 2 micro-batches of 4
    assert (pre["gns/b_small"] == 4).all() and (pre["gns/b_big"] == 8).all()
    assert np.isfinite(pre["gns/small_sq"]).all() and np.isfinite(pre["gns/big_sq"]).all()
    np.testing.assert_allclose(pre["gns/b_simple_tokens"], pre["gns/b_simple"] * 32, equal_nan=True)
    for g in ("embeddings", "attention", "mlp", "norms", "blocks.0", "blocks.1"):
        assert f"gns/{g}/b_simple" in m
    # grad_accum = 1 from step 4: per-example norms take over one step later (auto mode)
    train_rows = m.dropna(subset=["train/loss"])
    assert list(train_rows["gns/b_small"].fillna(0))[4:] == [0, 1, 1]
    # every recorded value can be recomputed offline from the raw norms
    again = recompute_b_simple(pre, decay=0.95)
    np.testing.assert_allclose(again["gns/b_simple"], pre["gns/b_simple"], rtol=1e-9, equal_nan=True)


def test_builtin_loop_config_table(tmp_path):
    from midtrain.config import ConfigError
    from midtrain.hookset import build_hooks
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config()
    only_gns(cfg)
    cfg.monitor.gns = {"mode": "microbatch", "every": 2, "ema": 0.9}
    hooks = build_hooks(cfg, tiny_gpt(), None)
    gns = [h for h in hooks if isinstance(h, GradientNoiseScale)]
    assert len(gns) == 1 and gns[0].every == 2 and gns[0].ema == 0.9
    cfg.monitor.gns = {"enabled": False}
    assert not any(isinstance(h, GradientNoiseScale) for h in build_hooks(cfg, tiny_gpt(), None))
    cfg.monitor.gns = {"mode": "bogus"}
    with pytest.raises(ConfigError, match=r"monitor\.gns.*valid modes"):
        train(cfg, str(tmp_path / "bad"), progress=False)
    assert not os.path.exists(tmp_path / "bad")      # refused before touching disk
    cfg.monitor.gns = {"modee": "ddp"}
    with pytest.raises(ConfigError, match="monitor.gns"):
        build_hooks(cfg, tiny_gpt(), None)
