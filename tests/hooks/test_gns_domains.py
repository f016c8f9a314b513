"""Per-domain gradient noise scale (``gns/domain/<d>/...``; docs/gns.md, "Per-domain GNS").

Ground truth:

- a mixture of two least-squares populations with known per-domain noise scales. With x ~ N(0, I_p),
  y = x . w*_d + sigma_d eps and loss_i = (x_i . w - y_i)^2 / 2 at a fixed w (learning rate 0), the
  per-example gradient is g = (x . delta_d - sigma_d eps) x with delta_d = w - w*_d, so
  G_d = delta_d, E|g|^2 = (p + 2)|delta_d|^2 + p sigma_d^2 and
  B_simple,d = tr(Sigma_d) / |G_d|^2 = ((p + 1)|delta_d|^2 + p sigma_d^2) / |delta_d|^2. The hook's
  per-domain B_simple must be within 10% of it for both domains (issue 14);
- the fast parts (the per-example Gram of every parameter of the built-in GPT, tied head included,
  and its per-domain blocks) against torch.func per-example gradients, relative tolerance 1e-4
  (float32), and the estimator against the two-batch formulas it generalises.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from diagnostics.gns import grouped_estimates, pegram, two_batch_estimates
from hooks import DifficultyTracker, GradientNoiseScale, Monitor
from hooks.monitor import MemorySink
from hooks.per_example import PerExampleGradNorms
from tests.diagnostics.test_pegrad import gpt_and_batch

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
RTOL = 1e-4
P = 6


def mixture_truth(w, w_star, sigma):
    delta = w - w_star
    g2 = float(delta @ delta)
    return ((P + 1) * g2 + P * sigma ** 2) / g2


def run_mixture(domains_as, steps=600, B=32, seed=0):
    """The least-squares mixture at learning rate 0; returns (last record, truth per domain)."""
    torch.manual_seed(seed)
    w_star = {"code": torch.randn(P), "math": 3 * torch.randn(P)}
    sigma = {"code": 2.0, "math": 0.5}        # noisy code, clean math: B_simple ~11 vs ~7
    model = nn.Linear(P, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    gns = GradientNoiseScale(mode="per_example", ema=0.99, groups=False, domain_every=1,
                             domain_names=["code", "math"] if domains_as == "indices" else None)
    mon = Monitor(model, [gns], sinks=[MemorySink()], strict=True)
    names = ["code"] * (B // 2) + ["math"] * (B // 2)
    order = torch.randperm(B)
    names = [names[i] for i in order]
    idx = torch.tensor([0 if d == "code" else 1 for d in names])
    W = torch.stack([w_star[d] for d in names])
    S = torch.tensor([sigma[d] for d in names])
    for step in range(steps):
        x = torch.randn(B, P)
        y = (x * W).sum(1) + S * torch.randn(B)
        mon.on_step_begin(step)
        losses = 0.5 * (model(x)[:, 0] - y) ** 2
        losses.mean().backward()
        mon.on_backward_end(B, losses=losses.detach(), domains=names if domains_as == "names" else idx)
        mon.on_grads_ready()
        model.zero_grad()
        rec = mon.on_step_end(step)
    w = model.weight.detach()[0]
    return rec, {d: mixture_truth(w, w_star[d], sigma[d]) for d in w_star}


@pytest.mark.parametrize("domains_as", ["names", "indices"])
def test_mixture_per_domain_b_simple_within_ten_percent(domains_as):
    rec, truth = run_mixture(domains_as)
    assert truth["code"] > 1.3 * truth["math"]                        # two different noise scales
    for d, ref in truth.items():
        got = rec[f"gns/domain/{d}/b_simple"]
        assert abs(got / ref - 1) < 0.10, (d, got, ref)
        assert rec[f"gns/domain/{d}/b_big"] == 16
    assert "gns/b_simple" in rec                                     # the global estimate still there


def test_names_and_indices_give_the_same_numbers():
    a, _ = run_mixture("names", steps=20)
    b, _ = run_mixture("indices", steps=20)
    keys = [k for k in a if k.startswith("gns/domain/")]
    assert keys and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in keys)


# ----------------------------------------------------------------------------------------------
# the fast parts against torch.func


def per_example_grads(model, x, y):
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_i(p, xi, yi):
        return functional_call(model, p, (xi[None], yi[None]))[1]

    g = vmap(grad(loss_i), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([v.flatten(1) for v in g.values()], 1)   # (B, all parameters)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gram_of_every_parameter_matches_torch_func(tie):
    model, x, y = gpt_and_batch(tie, B=6)
    model(x)                                        # RoPE cache outside vmap
    ref = per_example_grads(model, x, y)
    K_ref = ref @ ref.T
    with PerExampleGradNorms(model, gram=True) as pe:
        model.zero_grad()
        model(x, y)[1].backward()
        res = pe.sq_norms(loss_scale="mean")
    assert len(res.grams) == 1 and set(res.grams[0]) == set(res.params)
    B = x.shape[0]
    K = sum(res.grams[0].values()) * B ** 2          # grams are as backpropagated: undo 1/B
    assert float((K - K_ref).abs().max() / K_ref.abs().max()) < RTOL
    assert torch.allclose(torch.diagonal(K), res.total, rtol=RTOL)
    dom = torch.tensor([0, 1, 1, 0, 2, 1])
    tot, sq, n = pegram.group_block_sums(K, dom, 3)
    for d in range(3):
        S = ref[dom == d].sum(0)
        assert float(tot[d]) == pytest.approx(float(S @ S), rel=RTOL)
        assert float(sq[d]) == pytest.approx(float(ref[dom == d].pow(2).sum()), rel=RTOL)
        assert int(n[d]) == int((dom == d).sum())


def test_hook_logs_the_exact_per_domain_estimate():
    """One step, ema = 0 (the EMA is the step's estimate): the logged per-domain grad_sq / trace_cov
    equal the unbiased formulas on torch.func per-example gradients (float32, 1e-4)."""
    model, x, y = gpt_and_batch(True, B=8)
    model(x)
    ref = per_example_grads(model, x, y)
    dom = ["prose", "code", "prose", "code", "code", "prose", "prose", "code"]
    gns = GradientNoiseScale(mode="per_example", ema=0.0, domain_every=1)
    mon = Monitor(model, [gns], sinks=[MemorySink()], strict=True)
    mon.on_step_begin(0)
    _, losses = model(x, y, reduction="none")
    losses.mean().backward()
    mon.on_backward_end(8, losses=losses.detach(), domains=dom)
    mon.on_grads_ready()
    rec = mon.on_step_end(0)
    for d in ("prose", "code"):
        g = ref[[i for i, e in enumerate(dom) if e == d]]
        n = g.shape[0]
        S, sq = g.sum(0), g.pow(2).sum()
        grad_sq = float((S @ S - sq) / (n * (n - 1)))
        trace = float((sq - (S @ S) / n) / (n - 1))
        assert rec[f"gns/domain/{d}/grad_sq"] == pytest.approx(grad_sq, rel=1e-3, abs=1e-4 * abs(trace))
        assert rec[f"gns/domain/{d}/trace_cov"] == pytest.approx(trace, rel=RTOL * 10)
        assert rec[f"gns/domain/{d}/small_sq"] == pytest.approx(float(sq) / n, rel=RTOL * 10)
    assert gns.domains.names == ["prose", "code"]                # order of first appearance


def test_grouped_estimates_are_the_two_batch_formulas_and_pool_micro_batches():
    rng = np.random.default_rng(0)
    sq, tot, n = rng.uniform(1, 2, 3), rng.uniform(2, 9, 3), np.array([4.0, 2.0, 7.0])
    g, t = grouped_estimates(tot, sq, n)
    g2, t2 = two_batch_estimates(sq / n, tot / n ** 2, 1.0, n)
    assert np.allclose(g, g2) and np.allclose(t, t2)
    # two micro-batches pooled: sums of numerators over sums of fixed denominators
    tot2, sq2, n2 = np.stack([tot, tot * 2]), np.stack([sq, sq * 3]), np.stack([n, [1.0, 3.0, 0.0]])
    g, t = grouped_estimates(tot2, sq2, n2)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_n = np.where(n2 > 0, tot2 / np.where(n2 > 0, n2, 1), 0)
    assert np.allclose(g, (tot2 - sq2).sum(0) / (n2 * (n2 - 1)).sum(0))
    assert np.allclose(t, (sq2 - per_n).sum(0) / np.clip(n2 - 1, 0, None).sum(0))
    g, t = grouped_estimates([[3.0]], [[3.0]], [[1.0]])           # one example: undefined
    assert math.isnan(g[0]) and math.isnan(t[0])


def test_gram_paths_agree():
    """linear ghost vs materialize (chunked too), embedding dense vs token Gram: float64, 1e-10."""
    torch.manual_seed(0)
    A, G = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 4, dtype=torch.float64)
    per = torch.einsum("bto,bti->boi", G, A).flatten(1)
    ref = per @ per.T
    for method, max_el in (("ghost", 1 << 25), ("materialize", 1 << 25), ("materialize", 48), ("ghost", 100)):
        assert torch.allclose(pegram.linear_gram(A, G, method=method, max_elements=max_el), ref, rtol=1e-10)
    ids = torch.randint(0, 5, (4, 6))
    Ge = torch.randn(4, 6, 3, dtype=torch.float64)
    dense = torch.zeros(4, 5, 3, dtype=torch.float64)
    for b in range(4):
        for t in range(6):
            dense[b, ids[b, t]] += Ge[b, t]
    ref = dense.flatten(1) @ dense.flatten(1).T
    for max_el in (1 << 25, 10):
        assert torch.allclose(pegram.embedding_gram(ids, Ge, 5, max_elements=max_el), ref, rtol=1e-10)


def test_difficulty_tracker_and_gns_share_names_in_one_monitor():
    """Names work for every hook at once (the friction case): no hook is disabled."""
    model, x, y = gpt_and_batch(True, B=4)
    hooks = [GradientNoiseScale(mode="per_example", domain_every=1), DifficultyTracker(stats_every=1)]
    mon = Monitor(model, hooks, sinks=[MemorySink()])
    for step in range(2):
        _, losses = model(x, y, reduction="none")
        losses.mean().backward()
        mon.on_backward_end(4, losses=losses.detach(), ids=torch.arange(4), domains=["code", "math"] * 2)
        mon.on_grads_ready()
        model.zero_grad()
        rec = mon.on_step_end(step)
    assert mon.disabled_hooks == []
    assert "difficulty/code/loss" in rec and "gns/domain/math/b_simple" in rec


def test_batch_size_recommendation_names_the_domain_that_drives_it():
    import pandas as pd

    from diagnostics.recommend import batch_size_recommendation

    rng = np.random.default_rng(0)
    n = 40
    small = 10 + rng.normal(0, 0.1, n)                 # B_small 1, B_big 16: |G|^2 ~ 0.5, tr ~ 9.5
    df = pd.DataFrame({"step": np.arange(n), "gns/small_sq": small, "gns/big_sq": 0.5 + 9.5 / 16 + 0 * small,
                       "gns/b_small": 1.0, "gns/b_big": 16.0,
                       "gns/domain/code/b_simple": np.where(np.arange(n) % 10 == 0, 30.0, np.nan),
                       "gns/domain/prose/b_simple": np.where(np.arange(n) % 10 == 0, 12.0, np.nan)})
    rec = batch_size_recommendation(df)
    assert rec.evidence["B_simple by domain"].startswith("code drives the noise scale")
    assert "prose 12" in rec.evidence["B_simple by domain"]
    assert "B_simple by domain" not in batch_size_recommendation(df.drop(
        columns=["gns/domain/code/b_simple", "gns/domain/prose/b_simple"])).evidence
