"""The multi-power law fitted by its authors' protocol (``fit_schedule_law(..., protocol="luo2025")``,
diagnostics/schedule/_luo2025.py): its objective's gradient against autograd of the law's double-sum
definition, its AdamW stage against ``torch.optim.AdamW`` in the authors' loop, and the published
PredE / WorstE on the paper's real curves (benchmarks/schedule_laws.py, data in
benchmarks/data/loss-curves; issue 12: within 10% of the authors' numbers).

The 25M fit takes about 20 s on one busy core and runs once per session (module fixture); the 100M one
(about 30 s) is marked slow: ``python benchmarks/schedule_laws.py`` prints both sizes."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from diagnostics.schedule import fit_schedule_law, multi_power_law
from diagnostics.schedule import _luo2025 as L
from diagnostics.schedule._fit import check_curves, offset_design
from diagnostics.schedule._multi_power import _MultiPowerLaw

ROOT = Path(__file__).resolve().parents[2]
PEAK = L.REF_PEAK             # natural units = the protocol's reference units: no conversion to check twice
N, EVERY, WARM = 400, 10, 40
STEPS = np.arange(WARM + EVERY, N + 1, EVERY)   # logged after the warmup, as the paper's
X0 = np.array([2.4, 0.4, 0.45, 300.0, 1.5, 0.55, 0.6])   # L0, A, alpha, B, C, beta, gamma (natural)


def sched(kind):
    warm = np.linspace(0.0, PEAK, WARM)
    s = np.arange(N - WARM)
    rest = {"constant": np.full(N - WARM, PEAK),
            "cosine": 0.1 * PEAK + 0.45 * PEAK * (1 + np.cos(np.pi * s / (N - WARM))),
            "step": np.where(s < (N - WARM) // 2, PEAK, 0.3 * PEAK)}[kind]
    return np.r_[warm, rest]


def small_problem(seed=0, offset=True):
    rng = np.random.default_rng(seed)
    curves, segs = [], []
    for kind in ("constant", "cosine", "step"):
        lrs = sched(kind)
        y = multi_power_law(lrs, STEPS, *X0) * np.exp(rng.normal(0, 2e-3, len(STEPS)))
        seg = (STEPS > N // 2).astype(int) if offset else np.zeros(len(STEPS), int)
        curves.append((lrs, STEPS, y + 0.05 * seg))
        segs.append(seg)
    return check_curves(curves, segs)


def direct_pred(x, lrs, steps, off):
    """The multi-power law after t updates by its definition (torch, every update k < t, one step at a time),
    the warmup's increases included as in the authors' code, plus the segment offsets."""
    L0, A, alpha, B, C, beta, gamma = x[:7]
    eta = torch.as_tensor(lrs)
    out = []
    for t in steps:
        k = torch.arange(1, int(t))
        area = torch.stack([eta[j:int(t)].sum() for j in k]) if len(k) else torch.zeros(0, dtype=eta.dtype)
        d = eta[k - 1] - eta[k]
        G = 1 - (1 + C * eta[k] ** -gamma * area) ** -beta
        out.append(L0 + A * eta[:int(t)].sum() ** -alpha - B * (d * G).sum())
    return torch.stack(out) + off


def direct_objective(x, cs, O):
    pred = torch.cat([direct_pred(x, c.lrs, c.steps, 0.0) for c in cs]) + torch.as_tensor(O) @ x[7:]
    r = torch.log(pred.clamp(min=1e-10)) - torch.log(torch.as_tensor(np.concatenate([c.y for c in cs])))
    a = r.abs()
    return torch.where(a < L.HUBER_DELTA, 0.5 * r ** 2, L.HUBER_DELTA * (a - 0.5 * L.HUBER_DELTA)).sum()


def test_objective_and_gradient_equal_autograd_of_the_definition():
    cs = small_problem()
    _, O = offset_design(cs)
    law = _MultiPowerLaw()
    feats = [law.features(c.lrs / PEAK, c.steps) for c in cs]
    ly = np.log(np.concatenate([c.y for c in cs]))
    for x in (np.r_[X0, 0.05], np.r_[X0 * [1.01, 0.9, 1.1, 1.2, 0.7, 1.1, 0.9], 0.0]):
        obj, g, _ = L.objective(law, feats, ly, O, x)
        xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        ref = direct_objective(xt, cs, O)
        ref.backward()
        assert obj == pytest.approx(ref.item(), rel=1e-9)
        np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-7, atol=1e-12 * np.abs(xt.grad.numpy()).max())


def test_adam_stage_is_torch_adamw_in_the_authors_loop():
    """The same trajectory as torch.optim.AdamW (two parameter groups, default decay and betas) driven by
    src/fitting.py's loop (patience, gradient-norm stop, the parameters after the best step's update), fed
    the objective's gradient (checked against autograd above)."""
    cs = small_problem(1)
    _, O = offset_design(cs)
    law = _MultiPowerLaw()
    feats = [law.features(c.lrs / PEAK, c.steps) for c in cs]
    y = np.concatenate([c.y for c in cs])
    x0 = np.r_[X0 * [0.98, 1.3, 0.9, 0.8, 0.6, 0.9, 0.85], 0.0]
    ours = L._adam(law, feats, y, O, x0.copy())

    ps = [torch.nn.Parameter(torch.tensor(v, dtype=torch.float64)) for v in x0]
    opt = torch.optim.AdamW([{"params": [p for i, p in enumerate(ps) if i not in L._SLOW], "lr": L.ADAM_LR_FAST},
                             {"params": [ps[i] for i in L._SLOW], "lr": L.ADAM_LR_SLOW}])
    best, best_x, min_obj, no_gain, steps = np.inf, None, np.inf, 0, 0
    for step in range(L.MAX_STEPS):
        obj, g, _ = L.objective(law, feats, np.log(y), O, np.array([p.item() for p in ps]))
        for p, gi in zip(ps, g):
            p.grad = torch.tensor(gi, dtype=torch.float64)
        opt.step()
        steps += 1
        if obj < min_obj:
            min_obj, no_gain = obj, 0
        else:
            no_gain += 1
        if step > L.PATIENCE and no_gain >= L.PATIENCE:
            break
        if np.linalg.norm(g) < L.GRAD_TOL:
            break
        if obj < best:
            best, best_x = obj, np.array([p.item() for p in ps])
    assert steps > L.PATIENCE                       # the loop ran long enough for the bookkeeping to matter
    np.testing.assert_allclose(ours, best_x, rtol=1e-9)


def test_bad_input():
    cs = small_problem(offset=False)
    curves = [(c.lrs, c.steps, c.y) for c in cs]
    with pytest.raises(ValueError, match="protocol must be"):
        fit_schedule_law(curves, law="multi_power", protocol="adam")
    with pytest.raises(ValueError, match="> 0"):
        fit_schedule_law([*curves[:2], (curves[2][0], curves[2][1], curves[2][2] - 10)], law="multi_power",
                         protocol="luo2025")


def test_luo2025_fit_and_its_band_on_a_small_problem():
    """Generated curves (0.2% multiplicative noise): the protocol's fit follows the data, predicts a held-out
    WSD schedule within 0.5% on average (measured: 0.18%; the converged least-squares fit does better on
    curves that follow the law exactly, 0.02%: the protocol's early stop is a prior, not a free gain), and
    its bootstrap band (stage 2 rerun from the fit on block-resampled residuals) brackets its prediction."""
    cs = small_problem(2, offset=False)
    fit = fit_schedule_law([(c.lrs, c.steps, c.y) for c in cs], law="multi_power", protocol="luo2025")
    assert fit.protocol == "luo2025"
    assert fit.rmse < 0.01 * float(np.mean(cs[0].y))
    held = np.r_[np.linspace(0.0, PEAK, WARM), np.full(N - WARM - 100, PEAK), np.linspace(PEAK, 0.1 * PEAK, 100)]
    pred = fit.predict(held, steps=STEPS)
    truth = multi_power_law(held, STEPS, *X0)
    assert np.mean(np.abs(pred - truth) / truth) < 0.005
    lo, hi = fit.predict_interval(held, level=0.9, steps=STEPS, n_boot=8)
    assert np.all(lo <= hi) and np.mean((lo <= pred + 1e-9) & (pred - 1e-9 <= hi)) >= 0.8


# -- the paper's curves --------------------------------------------------------------------------

def _bench():
    spec = importlib.util.spec_from_file_location("schedule_laws_bench_real", ROOT / "benchmarks" / "schedule_laws.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _bench()


@pytest.fixture(scope="module")
def fitted_25(bench):
    return bench.protocol("25", "multi_power", fit_protocol="luo2025")


def _check(bench, size, fit, errs):
    pe, we = bench.summary(errs)
    ref_pe, ref_we = bench.AUTHORS[size]
    assert 100 * pe == pytest.approx(ref_pe, rel=0.1)          # issue 12: within 10% of the authors'
    assert 100 * we == pytest.approx(ref_we, rel=0.1)
    exact_pe, _ = bench.summary(bench.authors_errors(size))
    assert pe <= exact_pe                                        # and at or below their PredE
    # the published parameters, to the few AdamW steps the two implementations differ by
    for k, v in zip(fit.params, bench.AUTHORS_PARAMS[size]):
        assert fit.params[k] == pytest.approx(v, rel=0.05), k


def test_luo2025_reproduces_the_authors_numbers_25m(bench, fitted_25):
    fit, errs, _ = fitted_25
    _check(bench, "25", fit, errs)


@pytest.mark.slow
def test_luo2025_reproduces_the_authors_numbers_100m(bench):
    fit, errs, _ = bench.protocol("100", "multi_power", fit_protocol="luo2025")
    _check(bench, "100", fit, errs)
