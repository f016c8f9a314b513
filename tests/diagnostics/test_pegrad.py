"""Per-example gradient norms (diagnostics.gns.pegrad, hooks/per_example.py) against brute force.

Ground truth is the slow, obvious computation: materialised per-example gradients from explicit
sums, and torch.func (``vmap(grad(loss_i))`` through ``functional_call``) on whole models.

Convention: a norm is that of the per-example gradient of the per-example loss, ||grad loss_i||^2.
A model trained on ``loss.mean()`` over B examples backpropagates (1/B) grad loss_i per example, so
its hooks' raw norms carry 1/B^2; ``sq_norms(loss_scale="mean")`` (or ``loss_scale=1/B``) undoes it.
"""

import functools
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from diagnostics.gns import pegrad
from hooks.per_example import PerExampleGradNorms, module_kind
from midtrain.model import GPT, GPTConfig

RTOL = 1e-4
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")  # sdpa under vmap


def rel_err(a, b):
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


# ----------------------------------------------------------------------------------------------
# pure functions: float64 brute force


def test_linear_ghost_materialize_and_bias_match_explicit_sum():
    torch.manual_seed(0)
    A, G = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 9, dtype=torch.float64)
    W = torch.stack([sum(torch.outer(G[b, t], A[b, t]) for t in range(7)) for b in range(5)])  # eq. (1)
    ref = W.pow(2).sum((1, 2))
    for method in ("ghost", "materialize", "auto"):
        assert rel_err(pegrad.linear_sq_norms(A, G, method=method), ref) < 1e-12
        assert rel_err(pegrad.linear_sq_norms(A, G, method=method, max_elements=1), ref) < 1e-12  # chunked
    bias = G.sum(1).pow(2).sum(1)
    assert rel_err(pegrad.linear_sq_norms(A, G, bias=True), ref + bias) < 1e-12
    # 2-d inputs (B, D) are T = 1; 4-d inputs flatten their middle dims
    assert rel_err(pegrad.linear_sq_norms(A[:, 0], G[:, 0]), A[:, 0].pow(2).sum(1) * G[:, 0].pow(2).sum(1)) < 1e-12
    assert rel_err(pegrad.linear_sq_norms(A.view(5, 7, 1, 6), G.view(5, 7, 1, 9)), ref) < 1e-12
    assert pegrad.choose_linear_method(T=4, d_in=64, d_out=64) == "ghost"
    assert pegrad.choose_linear_method(T=512, d_in=64, d_out=64) == "materialize"
    with pytest.raises(ValueError, match="method"):
        pegrad.linear_sq_norms(A, G, method="nope")


def test_embedding_repeated_tokens_summed_before_squaring():
    torch.manual_seed(1)
    B, T, V, D = 4, 12, 5, 3  # few tokens: many repeats
    ids, G = torch.randint(0, V, (B, T)), torch.randn(B, T, D, dtype=torch.float64)
    table = torch.zeros(B, V, D, dtype=torch.float64)
    for b in range(B):
        table[b].index_add_(0, ids[b], G[b])
    ref = table.pow(2).sum((1, 2))
    for method in ("gram", "scatter", "auto"):
        assert rel_err(pegrad.embedding_sq_norms(ids, G, V, method=method), ref) < 1e-12
    sparse = pegrad.embedding_sq_norms(ids, G, method="scatter", max_elements=1)  # sort + segment sum
    assert rel_err(sparse, ref) < 1e-12
    naive = G.pow(2).sum((1, 2))  # what squaring row by row would give: wrong with repeats
    assert rel_err(naive, ref) > 1e-3
    table[:, 2] = 0  # padding_idx rows get no gradient
    ref_pad = table.pow(2).sum((1, 2))
    for method in ("gram", "scatter"):
        assert rel_err(pegrad.embedding_sq_norms(ids, G, V, padding_idx=2, method=method), ref_pad) < 1e-12


def test_norm_layers_match_per_example_autograd():
    torch.manual_seed(2)
    B, T, D = 3, 5, 4
    ln = nn.LayerNorm(D).double()
    with torch.no_grad():
        ln.weight.normal_(), ln.bias.normal_()
    x, target = torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64)
    ref_w, ref_b = [], []
    for b in range(B):
        gw, gb = torch.autograd.grad((ln(x[b]) * target[b]).sum(), [ln.weight, ln.bias])
        ref_w.append(gw.pow(2).sum()), ref_b.append(gb.pow(2).sum())
    xhat = pegrad.layer_normalize(x, ln.eps)
    w_sq, b_sq = pegrad.layernorm_sq_norms(xhat, target)  # G = d(sum y * target)/dy = target
    assert rel_err(w_sq, torch.stack(ref_w)) < 1e-10 and rel_err(b_sq, torch.stack(ref_b)) < 1e-10
    # RMSNorm: the gain's gradient is sum_t g_t * xhat_t with xhat = x / rms(x)
    xr = pegrad.rms_normalize(x, 1e-6)
    assert torch.allclose(xr.pow(2).mean(-1), torch.ones(B, T, dtype=torch.float64), atol=1e-5)
    assert rel_err(pegrad.rmsnorm_sq_norms(xr, target), (target * xr).sum(1).pow(2).sum(1)) < 1e-12
    # the hook's form from the norm's input (no xhat temporary): same gain gradients
    assert rel_err(pegrad.norm_gain_grads(x, target, ln.eps, "layernorm"),
                   pegrad.norm_weight_grads(xhat, target)) < 1e-10
    assert rel_err(pegrad.norm_gain_grads(x, target, 1e-6, "rmsnorm"), pegrad.norm_weight_grads(xr, target)) < 1e-10
    x2, t2 = torch.randn(B, T, 2, 3, dtype=torch.float64), torch.randn(B, T, 2, 3, dtype=torch.float64)
    for kind, f in (("rmsnorm", pegrad.rms_normalize), ("layernorm", pegrad.layer_normalize)):
        ref = pegrad.norm_weight_grads(f(x2, 1e-5, 2), t2, 2)   # 2 feature dims
        assert rel_err(pegrad.norm_gain_grads(x2, t2, 1e-5, kind, 2), ref) < 1e-10
    with pytest.raises(ValueError, match="kind"):
        pegrad.norm_gain_grads(x, target, 1e-6, "batchnorm")
    # from the output y = xhat * w + b (what the hook uses when the gain has no zero entry)
    with torch.no_grad():
        y = ln(x)
    assert rel_err(pegrad.norm_gain_grads_from_output(y, target, ln.weight.detach(), ln.bias.detach()),
                   pegrad.norm_weight_grads(xhat, target)) < 1e-10
    w2 = torch.rand(2, 3, dtype=torch.float64) + 0.5
    y2 = pegrad.rms_normalize(x2, 1e-5, 2) * w2
    assert rel_err(pegrad.norm_gain_grads_from_output(y2, t2, w2, feature_dims=2),
                   pegrad.norm_weight_grads(pegrad.rms_normalize(x2, 1e-5, 2), t2, 2)) < 1e-10


class NormThenInplace(nn.Module):
    """A LayerNorm whose output is changed in place afterwards (optionally), between Linears."""

    def __init__(self, inplace):
        super().__init__()
        self.inp, self.ln, self.out, self.inplace = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3), inplace

    def forward(self, x):
        h = self.ln(self.inp(x))
        if self.inplace:
            h.add_(0.5)  # autograd allows it (add's backward needs no input): the stored y is stale
        return self.out(torch.tanh(h)).pow(2).mean((1, 2))  # (B,)


@pytest.mark.parametrize("case", ["plain", "inplace", "zero_gain"])
def test_norm_gain_from_output_or_input_matches_autograd(case):
    """The hook stores a norm's output instead of its input when it can; an output modified in
    place, or a gain with a zero entry (y / w undefined), falls back to the input. Same norms."""
    torch.manual_seed(7)
    model = NormThenInplace(case == "inplace").double()
    with torch.no_grad():
        model.ln.weight.normal_()
        if case == "zero_gain":
            model.ln.weight[2] = 0.0
    x = torch.randn(4, 7, 5, dtype=torch.float64)
    truth = {}
    for b in range(4):
        gs = torch.autograd.grad(model(x[b:b + 1]).sum(), [model.ln.weight, model.ln.bias])
        for n, g in zip(("ln.weight", "ln.bias"), gs):
            truth.setdefault(n, []).append(g.pow(2).sum())
    with PerExampleGradNorms(model) as pe:
        model(x).sum().backward()
        res = pe.sq_norms()
        assert not pe.stored_tensors()
    for n in ("ln.weight", "ln.bias"):
        assert rel_err(res.params[n], torch.stack(truth[n])) < 1e-10


def test_tied_embedding_head_cross_term():
    torch.manual_seed(3)
    B, T, V, D = 3, 6, 7, 4
    ids = torch.randint(0, V, (B, T))
    G_emb, A, G_head = (torch.randn(B, T, D, dtype=torch.float64), torch.randn(B, T, D, dtype=torch.float64),
                        torch.randn(B, T, V, dtype=torch.float64))
    E = torch.zeros(B, V, D, dtype=torch.float64)
    for b in range(B):
        E[b].index_add_(0, ids[b], G_emb[b])
    H = torch.einsum("btv,btd->bvd", G_head, A)
    assert rel_err(pegrad.tied_embedding_head_cross(ids, G_emb, A, G_head), (E * H).sum((1, 2))) < 1e-10
    assert rel_err(pegrad.linear_grad_rows(ids, A, G_head, max_elements=1),
                   torch.stack([H[b, ids[b]] for b in range(B)])) < 1e-10
    ref = (E + H).pow(2).sum((1, 2))  # the tied matrix counted once
    assert rel_err(pegrad.tied_embedding_head_sq_norms(ids, G_emb, A, G_head, V), ref) < 1e-10
    # dense form used by the hook when a (B, V, D) table fits: H_b materialised, E_b added in place
    W = pegrad.linear_grads(A, G_head)
    assert rel_err(W, H) < 1e-12
    assert rel_err(pegrad.add_embedding_grads(W, ids, G_emb).pow(2).sum((1, 2)), ref) < 1e-10
    pad = int(ids[0, 0])
    E_pad = torch.zeros(B, V, D, dtype=torch.float64)
    for b in range(B):
        keep = ids[b] != pad
        E_pad[b].index_add_(0, ids[b][keep], G_emb[b][keep])
    got = pegrad.add_embedding_grads(pegrad.linear_grads(A, G_head), ids, G_emb, padding_idx=pad)
    assert rel_err(got, H + E_pad) < 1e-12


def test_rescale_sq_norms():
    sq = torch.tensor([1.0, 4.0])
    assert torch.equal(pegrad.rescale_sq_norms(sq, 0.5), torch.tensor([4.0, 16.0]))
    assert pegrad.rescale_sq_norms(2.0, 1.0) == 2.0
    with pytest.raises(ValueError):
        pegrad.rescale_sq_norms(sq, 0.0)


# ----------------------------------------------------------------------------------------------
# hooks on models: torch.func ground truth


def vmap_sq_norms(model, per_example_loss, *inputs):
    """{param name: (B,) ||grad loss_i||^2} by vmap(grad) over examples (tied weights kept tied)."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss_i(p, *xs):
        return per_example_loss(lambda *a, **kw: functional_call(model, p, a, kw), *(x[None] for x in xs))

    grads = vmap(grad(loss_i), in_dims=(None,) + (0,) * len(inputs))(params, *inputs)
    return {k: g.flatten(1).pow(2).sum(1) for k, g in grads.items()}


def gpt_and_batch(tie, seed=0, B=4, T=8):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, tie_weights=tie))
    with torch.no_grad():  # non-trivial gains so norm gradients are not special
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    x, y = torch.randint(0, 256, (B, T)), torch.randint(0, 256, (B, T))
    x[:, 5] = x[:, 1]  # repeated tokens inside every example
    return model, x, y


@functools.lru_cache(maxsize=None)
def gpt_case_for(tie):
    """(model, x, y, truth): the vmap ground truth is the slow part, computed once per file."""
    model, x, y = gpt_and_batch(tie)
    model(x)  # fill the RoPE cache outside vmap
    return model, x, y, vmap_sq_norms(model, lambda f, xi, yi: f(xi, yi)[1], x, y)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def gpt_case(request):
    return gpt_case_for(request.param)


@pytest.mark.parametrize("method", ["auto", "ghost", "materialize"])
def test_gpt_per_parameter_norms_match_vmap(gpt_case, method):
    model, x, y, truth = gpt_case
    B = x.shape[0]
    with PerExampleGradNorms(model, method=method) as pe:
        model.zero_grad()
        _, loss = model(x, y)  # mean over all B*T tokens = (1/B) sum_i loss_i
        loss.backward()
        assert pe.stored_tensors() == []  # activations freed inside the backward
        res = pe.sq_norms(loss_scale="mean")
    assert set(res.params) == set(truth)
    for name, ref in truth.items():
        assert rel_err(res.params[name], ref) < RTOL, name
    assert rel_err(res.total, sum(truth.values())) < RTOL
    assert res.batch_sizes == [B] and res.unsupported == {}
    tied = model.lm_head.weight is model.tok_emb.weight
    assert ("lm_head.weight" in res.params) is not tied  # a tied matrix appears once
    assert set(res.groups) == {"embeddings", "attention", "mlp", "norms"} | (set() if tied else {"head"})
    assert rel_err(sum(res.groups.values()), res.total) < 1e-6
    assert set(res.layers) == {"blocks.0", "blocks.1"}
    block0 = sum(v for k, v in truth.items() if k.startswith("blocks.0."))
    assert rel_err(res.layers["blocks.0"], block0) < RTOL
    assert not pe._handles  # the context manager removed its hooks


def test_tied_head_without_room_for_a_dense_table():
    """A (B, V, D) table over max_elements: the tied head keeps ||H_b||^2 and H_b at the
    example's tokens instead (eq. 6 by rows); the same norms."""
    model, x, y, truth = gpt_case_for(True)
    V, D = model.tok_emb.weight.shape
    with PerExampleGradNorms(model, max_elements=x.shape[0] * V * D - 1) as pe:
        model.zero_grad()
        model(x, y)[1].backward()
        assert pe.stored_tensors() == []
        res = pe.sq_norms(loss_scale="mean")
    for name, ref in truth.items():
        assert rel_err(res.params[name], ref) < RTOL, name


def test_loss_scale_conventions_and_micro_batches():
    model, x, y, truth = gpt_case_for(True)
    truth = sum(truth.values())  # ||grad loss_i||^2 summed over params, (B,)
    B = x.shape[0]
    pe = PerExampleGradNorms(model)
    model(x, y)[1].backward()  # mean over the batch: each example carries 1/B
    assert rel_err(pe.sq_norms(reset=False).total, truth / B**2) < RTOL  # raw: as backpropagated
    assert rel_err(pe.sq_norms(loss_scale=1.0 / B).total, truth) < RTOL
    model(x, y, reduction="none")[1].sum().backward()  # sum of per-example losses: scale 1
    assert rel_err(pe.sq_norms().total, truth) < RTOL
    # two micro-batches (gradient accumulation: loss / n_micro) -> examples concatenated in order
    for half in (slice(0, 2), slice(2, 4)):
        (model(x[half], y[half])[1] / 2).backward()
    res = pe.sq_norms(loss_scale=1.0 / (2 * 2))
    assert res.batch_sizes == [2, 2] and rel_err(res.total, truth) < RTOL
    assert pe.sq_norms().batch_sizes == []  # reset after reading
    model(x, y)[1].backward()
    pe.reset()
    assert pe.sq_norms().total.numel() == 0
    with torch.no_grad():  # evaluation forwards store nothing
        model(x, y)
    assert pe.stored_tensors() == []
    for _ in range(5):  # read after every backward (as the GNS hook does): bookkeeping stays bounded
        model(x, y)[1].backward()
        assert rel_err(pe.sq_norms(loss_scale=1.0 / B).total, truth) < RTOL
    assert len(pe._pass_batch) == 1
    pe.detach()


def test_norms_only_mode():
    model, x, y, truth = gpt_case_for(False)
    with PerExampleGradNorms(model, modules="norms") as pe:
        model(x, y)[1].backward()
        res = pe.sq_norms(loss_scale="mean")
    assert set(res.params) == {k for k in truth if "norm" in k} and set(res.groups) == {"norms"}
    for name, sq in res.params.items():
        assert rel_err(sq, truth[name]) < RTOL


class Shared(nn.Module):
    """Biases, LayerNorm, padding_idx, a Linear called twice, an embedding looked up twice."""

    def __init__(self, V=11, D=6, tie=False):
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=0)
        self.ln = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.out = nn.Linear(D, V)
        if tie:  # three uses of one matrix: two lookups and the head
            self.out.weight = self.emb.weight

    def forward(self, ids, y):
        h = self.ln(self.emb(ids) + self.emb(ids.flip(1)))  # (B, T, D) table used twice
        h = self.fc(torch.tanh(self.fc(h)))  # same Linear twice
        return F.cross_entropy(self.out(h).transpose(1, 2), y, reduction="none").mean(1)  # (B,)


@pytest.mark.parametrize("tie", [False, True])
def test_weight_sharing_biases_layernorm_padding(tie):
    torch.manual_seed(4)
    model = Shared(tie=tie)
    with torch.no_grad():
        model.ln.weight.normal_(), model.ln.bias.normal_()
    ids, y = torch.randint(0, 11, (3, 7)), torch.randint(0, 11, (3, 7))
    ids[:, 2] = 0  # padding positions
    truth = vmap_sq_norms(model, lambda f, i, t: f(i, t)[0], ids, y)
    with PerExampleGradNorms(model) as pe:
        model(ids, y).sum().backward()
        assert pe.stored_tensors() == []
        res = pe.sq_norms()
    for name, ref in truth.items():
        assert rel_err(res.params[name], ref) < RTOL, name
    assert rel_err(res.total, sum(truth.values())) < RTOL


class WithConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)
        return self.head(h).logsumexp(-1).mean(1)  # (B,)


def test_unsupported_module_warned_and_left_out_of_total():
    torch.manual_seed(5)
    model, ids = WithConv(), torch.randint(0, 10, (3, 5))
    truth = vmap_sq_norms(model, lambda f, i: f(i)[0], ids)
    with pytest.warns(RuntimeWarning, match=r"conv: Conv1d") as record:
        pe = PerExampleGradNorms(model)
    assert len(record) == 1 and set(pe.unsupported) == {"conv"}
    model(ids).sum().backward()
    res = pe.sq_norms()
    assert set(res.params) == {"emb.weight", "head.weight", "head.bias"}
    assert rel_err(res.total, sum(v for k, v in truth.items() if not k.startswith("conv"))) < RTOL
    assert module_kind(nn.BatchNorm1d(3))[0] is None and module_kind(nn.LayerNorm(3))[0] == "layernorm"
    pe.detach()


class FunctionalUse(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.b(F.linear(x, self.a.weight, self.a.bias)).squeeze(-1)  # a's forward never runs


class NotANorm(nn.Module):  # looks like an RMSNorm (weight + eps) but does not normalise
    def __init__(self, D):
        super().__init__()
        self.eps, self.weight = 1e-6, nn.Parameter(torch.ones(D))

    def forward(self, x):
        return x * self.weight


def test_bypassed_modules_and_fake_norms_are_excluded_not_miscounted():
    torch.manual_seed(6)
    model, x = FunctionalUse(), torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as record, PerExampleGradNorms(model) as pe:
        warnings.simplefilter("always")
        model(x).sum().backward()
        res = pe.sq_norms()
    assert "a" in pe.unsupported and set(res.params) == {"b.weight", "b.bias"}
    assert any("functional" in str(w.message) for w in record)
    fake = nn.Sequential(nn.Linear(4, 4), NotANorm(4))
    with pytest.warns(RuntimeWarning, match="not rmsnorm"), PerExampleGradNorms(fake) as pe:
        fake(x).sum().backward()
        res = pe.sq_norms()
    assert "1" in pe.unsupported and set(res.params) == {"0.weight", "0.bias"}
