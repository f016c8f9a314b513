"""Book-keeping (PerExampleGradNorms(bookkeeping=True)): where a Linear's per-example gradients are
materialised, the batch weight gradient is formed as their sum instead of by autograd's GEMM.

Two things must hold: the per-example norms equal the ground truth (torch.func on the whole GPT,
as in tests/diagnostics/test_pegrad.py), and training gradients equal those of the same model
without hooks up to float summation order (the only allowed difference; stated tolerance 1e-5
relative to the largest entry, float32). Every fallback keeps the training gradient right.
"""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

from diagnostics.gns import pegrad
from hooks import per_example
from hooks.per_example import PerExampleGradNorms
from tests.diagnostics.test_pegrad import RTOL, gpt_case_for, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")

GRAD_TOL = 1e-5


def bookkept_nodes(t: torch.Tensor) -> int:
    """Number of _BookkeptLinear nodes in the autograd graph of ``t``."""
    seen, todo, n = set(), [t.grad_fn], 0
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == "_BookkeptLinearBackward"
        todo += [g for g, _ in f.next_functions]
    return n


def plain_grads(model, fn):
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    fn(twin).backward()
    return {k: p.grad.clone() for k, p in twin.named_parameters() if p.grad is not None}


def assert_grads_equal(model, ref):
    got = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(ref)
    for k, g in got.items():
        assert float((g - ref[k]).abs().max() / ref[k].abs().max().clamp(min=1e-30)) < GRAD_TOL, k


def test_pure_function_against_explicit_sums():
    """float64: dW = G^T A over all positions and examples, sq = materialised norms; chunked too."""
    torch.manual_seed(0)
    A, G = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 7, 4, dtype=torch.float64)
    per = torch.einsum("bto,bti->boi", G, A)
    for max_elements in (pegrad.DEFAULT_MAX_ELEMENTS, 2 * 24, 1):  # one chunk, chunks of 2, of 1
        dW, sq = pegrad.linear_weight_grad_and_sq_norms(A, G, max_elements=max_elements)
        assert torch.allclose(dW, G.reshape(-1, 4).T @ A.reshape(-1, 6), rtol=1e-12, atol=1e-12)
        assert torch.allclose(sq, per.pow(2).sum((1, 2)), rtol=1e-12)
    with pytest.raises(ValueError, match="disagree"):
        pegrad.linear_weight_grad_and_sq_norms(A, G[:, :3])
    with pytest.raises(ValueError, match="dtype"):
        pegrad.linear_weight_grad_and_sq_norms(A, G.float())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method", ["materialize", "auto"])
def test_gpt_norms_match_vmap_and_gradients_match_plain(tie, method):
    model, x, y, truth = gpt_case_for(tie)
    loss_fn = lambda m: m(x, y)[1]  # noqa: E731
    ref = plain_grads(model, loss_fn)
    model = copy.deepcopy(model)  # the cached case stays untouched
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    with PerExampleGradNorms(model, method=method, bookkeeping=True) as pe:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model)
        n = bookkept_nodes(loss)
        loss.backward()
        assert pe.stored_tensors() == []
        res = pe.sq_norms(loss_scale="mean")
    if method == "materialize":
        assert n == n_linear  # every Linear, the tied head included
    else:  # T = 8: the ghost form is cheaper for these layers; a tied head materialises (eq. 6)
        assert n == (1 if tie else 0)
    for name, t in truth.items():
        assert rel_err(res.params[name], t) < RTOL, name
    assert res.unsupported == {}
    assert_grads_equal(model, ref)
    assert bookkept_nodes(loss_fn(model)) == 0  # detached: the plain graph again


def test_tied_head_without_room_for_a_dense_table_keeps_autograd_gradient():
    model, x, y, truth = gpt_case_for(True)
    model = copy.deepcopy(model)
    V, D = model.tok_emb.weight.shape
    ref = plain_grads(model, lambda m: m(x, y)[1])
    with PerExampleGradNorms(model, method="materialize", bookkeeping=True,
                             max_elements=x.shape[0] * V * D - 1) as pe:
        model.zero_grad(set_to_none=True)
        loss = model(x, y)[1]
        n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
        assert bookkept_nodes(loss) == n_linear - 1  # all but the head
        loss.backward()
        res = pe.sq_norms(loss_scale="mean")
    for name, t in truth.items():
        assert rel_err(res.params[name], t) < RTOL, name
    assert_grads_equal(model, ref)


class TwiceAndInPlace(nn.Module):
    """One Linear called twice per forward (the general two-call path), and a Linear whose output
    is modified in place afterwards."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = self.a(h)
        out = self.b(h)
        out.mul_(2.0)
        return out


def per_example_truth(model, x):
    """{param: (B,) ||grad of example i's loss||^2}, one backward per example (float64)."""
    names = [n for n, _ in model.named_parameters()]
    rows = []
    for i in range(x.shape[0]):
        gs = torch.autograd.grad(model(x[i:i + 1]).pow(2).sum(), list(model.parameters()))
        rows.append([g.double().pow(2).sum() for g in gs])
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


def test_twice_called_and_in_place_modified_outputs():
    torch.manual_seed(1)
    model, x = TwiceAndInPlace(), torch.randn(4, 9, 6)
    truth = per_example_truth(model, x)
    ref = plain_grads(model, lambda m: m(x).pow(2).sum())
    with PerExampleGradNorms(model, method="materialize", bookkeeping=True) as pe:
        out = model(x)
        # b, and a's first call (decided before the second call made it a two-call group: its
        # backward takes the general path and autograd's plain gradient); never a's second call
        assert bookkept_nodes(out) == 2
        out.pow(2).sum().backward()
        res = pe.sq_norms()
    assert res.unsupported == {}
    for name, t in truth.items():
        assert rel_err(res.params[name].double(), t) < RTOL, name
    assert_grads_equal(model, ref)


def test_second_backward_and_failures_keep_the_training_gradient(monkeypatch):
    torch.manual_seed(2)
    model, x = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)), torch.randn(3, 10, 6)
    ref = plain_grads(model, lambda m: m(x).pow(2).sum())
    pe = PerExampleGradNorms(model, method="materialize", bookkeeping=True)
    loss = model(x).pow(2).sum()
    with pytest.warns(RuntimeWarning, match="second backward"):
        loss.backward(retain_graph=True)
        loss.backward()  # the plain gradient again, norms of the first only
    assert_grads_equal(model, {k: 2 * v for k, v in ref.items()})
    pe.sq_norms()

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(pegrad, "linear_weight_grad_and_sq_norms", broken)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model(x).pow(2).sum().backward()
    assert any("boom" in str(w.message) for w in record)
    assert set(pe.unsupported) == {"0", "2"}  # excluded, not miscounted
    assert_grads_equal(model, ref)  # training unaffected
    with PerExampleGradNorms(model, bookkeeping=True, strict=True):
        with pytest.raises(RuntimeError, match="boom"):
            model(x).pow(2).sum().backward()
    pe.detach()


def test_mixed_precision_and_no_weight_grad_are_not_bookkept():
    torch.manual_seed(3)
    model, x = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 5)), torch.randn(3, 10, 6)
    with PerExampleGradNorms(model, method="materialize", bookkeeping=True) as pe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert bookkept_nodes(out) == 0  # bf16 output of float32 weights: autograd's gradient
        out.float().pow(2).sum().backward()
        pe.sq_norms()
        model[0].weight.requires_grad_(False)
        assert bookkept_nodes(model(x)) == 1  # only the layer whose weight trains
    assert per_example._BookkeptLinear is not None


def test_gns_hook_with_bookkeeping_measures_the_same():
    """GradientNoiseScale(mode="per_example", bookkeeping=True) on the built-in GPT: the same raw
    norms as without book-keeping, the same training gradients up to rounding."""
    from hooks.gradient_noise import GradientNoiseScale
    from tests.hooks.test_gradient_noise import GPTLoss, gpt_batches, gpt_no_extras, run_hook

    rows = {}
    for bk in (False, True):
        model = gpt_no_extras()
        batches = gpt_batches(1, steps=3, accum=1, b=4, T=15)  # T = 15 > 12: materialised layers
        df, hook = run_hook(model, batches, GPTLoss(model), mode="per_example", bookkeeping=bk)
        assert hook.last_mode == "per_example" and hook.bookkeeping is bk
        rows[bk] = df, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    (d0, g0), (d1, g1) = rows[False], rows[True]
    for col in ("gns/small_sq", "gns/big_sq"):
        assert d1[col].to_numpy() == pytest.approx(d0[col].to_numpy(), rel=1e-5)
    for k in g0:
        assert float((g1[k] - g0[k]).abs().max() / g0[k].abs().max()) < GRAD_TOL, k
    assert isinstance(GradientNoiseScale(bookkeeping=True).bookkeeping, bool)


def test_builtin_loop_accepts_bookkeeping(tmp_path):
    """``[monitor.gns] bookkeeping = true`` reaches the hook; the loop trains and measures."""
    import numpy as np

    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.hooks.test_gradient_noise import only_gns
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(2, 2, 1), checkpoint_every=100, eval_every=100)
    only_gns(cfg)
    cfg.monitor.gns = {"mode": "per_example", "bookkeeping": True}
    train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    m = load_run(tmp_path / "r").metrics.dropna(subset=["train/loss"])
    assert (m["gns/b_small"] == 1).all() and np.isfinite(m["gns/small_sq"]).all()
    assert np.isfinite(m["train/loss"]).all()
