"""RepresentationProbe's fixed probe state: built once at set-up, rebuilt when the probe data change,
and the readout pooled by domain with index ops -- the same numbers as the former per-domain loop."""

from __future__ import annotations

import pytest
import torch

from hooks.representation import RepresentationProbe
from tests.hooks.test_representation import tiny_gpt


def _mixed_probe(seed=0):
    """Three domains, two tensor shapes (two forwards), one with masked targets."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, 24), generator=g)
    y = torch.cat([x[:, 1:], torch.full((3, 1), -1)], 1)
    y[0, 5:9] = -1
    return {"prose": (x, y), "code": torch.randint(0, 256, (2, 40), generator=g),
            "math": torch.randint(0, 256, (4, 24), generator=g)}


def test_readout_pooling_by_index_ops_equals_the_per_domain_loop(monkeypatch):
    """The readout CE is pooled per domain with index_add_ on rows fixed at set-up; the reference is
    the former per-domain mask loop over the same per-token CE (recorded from the hook's own calls).
    Only the summation order differs: per-token CE are float32 values summed in float64, which is
    exact here (rel 1e-12 allowed for CE of very different magnitudes)."""
    import hooks.representation as hr

    model = tiny_gpt()
    rp = RepresentationProbe(_mixed_probe(), max_tokens=90, info_plane_tokens=40, model=model)
    assert len(rp.jobs) == 2 and len(rp.domains) == 3
    seen, site_now = [], {}
    real_readout, real_chunk = hr.readout_loss, rp._readout_chunk

    def chunk(site, *a):
        site_now["site"] = site
        return real_chunk(site, *a)

    def readout(*a, **kw):
        ce = real_readout(*a, **kw)
        seen.append((site_now["site"], rp._call.job, ce.detach().cpu().clone()))
        return ce

    monkeypatch.setattr(hr, "readout_loss", readout)
    monkeypatch.setattr(rp, "_readout_chunk", chunk)
    out = rp.probe()
    acc: dict = {}
    for site, j, ce in seen:  # the former loop, verbatim
        job = rp.jobs[j]
        valid = job.y >= 0
        a = acc.setdefault(site, {})
        for d in job.domain.unique().tolist():
            m = (job.domain == d) & valid
            cnt = int(m.sum())
            if cnt:
                t = a.setdefault(d, [0.0, 0])
                t[0] += float(ce[m].sum())
                t[1] += cnt
    assert set(acc) == {s for s in rp.sites} and len(seen) == 2 * len(rp.sites)
    for site, a in acc.items():
        pooled = sum(v[0] for v in a.values()) / sum(v[1] for v in a.values())
        assert out[f"repr/{site}/readout_loss"] == pytest.approx(pooled, rel=1e-12, abs=0)
        for d, (tot, cnt) in a.items():
            assert out[f"repr/{site}/{rp.domains[d]}/readout_loss"] == pytest.approx(tot / cnt, rel=1e-12, abs=0)


def test_fixed_probe_state_is_built_once_and_rebuilt_when_the_probe_data_change():
    from hooks._representation_inputs import _build_jobs, _normalise_probe

    model = tiny_gpt()
    kw = dict(max_tokens=90, info_plane_tokens=40, model=model)
    rp = RepresentationProbe(_mixed_probe(), **kw)
    fixed = rp._fixed
    assert fixed is not None  # built at set-up
    first = rp.probe()
    assert rp._fixed is fixed and rp.probe().keys() == first.keys() and rp._fixed is fixed  # reused
    assert fixed.ip_cache  # the information plane's X / Y kernels and entropies, kept across probes

    def same(a, b):
        a, b = dict(a), dict(b)
        a.pop("repr/probe_time_s"), b.pop("repr/probe_time_s")
        return a == b

    # in place: a job's targets change -> rebuilt, and equal to a hook built on those data
    rp.jobs[0].y[:10] = -1
    changed = rp.probe()
    assert rp._fixed is not fixed and not same(changed, first)
    fresh = RepresentationProbe(_mixed_probe(), **kw)
    fresh.jobs[0].y[:10] = -1
    assert same(changed, fresh.probe())
    # replaced: new jobs (another probe set of the same domains)
    rp.jobs = _build_jobs(_normalise_probe(_mixed_probe(seed=1), 1), 90, 0)
    other = rp.probe()
    assert same(other, RepresentationProbe(_mixed_probe(seed=1), **kw).probe())


def test_pooling_cost_does_not_grow_with_the_number_of_domains():
    """Op count (TorchDispatchMode, every aten op of a probe): with the same tokens split over 2 or 6
    domains, a probe of the readout alone dispatches the same number of ops; the former per-domain
    loop added about 7 per domain, site and forward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    model = tiny_gpt()
    ids = torch.randint(0, 256, (6, 24), generator=torch.Generator().manual_seed(0))
    counts = []
    for n_dom in (2, 6):
        per = 6 // n_dom
        probe = {f"d{i}": ids[i * per:(i + 1) * per] for i in range(n_dom)}
        rp = RepresentationProbe(probe, max_tokens=60, metrics=("readout_loss",), per_domain=False, model=model)
        rp.probe()
        Count.n = 0
        with Count():
            rp.probe()
        counts.append(Count.n)
    assert counts[0] == counts[1], counts


def test_probe_sees_the_parameters_before_the_steps_update():
    """Through the Monitor the probe of step s runs before step s's optimizer update (as the loop's
    validation does); a hook driven by on_step_end alone probes after it."""
    import copy

    from hooks.monitor import MemorySink, Monitor
    from tests.hooks.test_representation import easy_ids, tiny_gpt

    ids = easy_ids(2, 16)
    opts = dict(max_tokens=24, info_plane_tokens=24)

    def metrics_of(model):
        rp = RepresentationProbe(ids[:, :-1], model=model, **opts)
        return rp.probe()

    model = tiny_gpt()
    before = metrics_of(copy.deepcopy(model))
    opt = torch.optim.SGD(model.parameters(), lr=5.0)  # a large update: the metrics move
    sink = MemorySink()
    mon = Monitor(model, [RepresentationProbe(ids[:, :-1], **opts)], sinks=[sink], strict=True)
    mon.on_step_begin(0)
    model(ids[:, :-1], ids[:, 1:])[1].backward()
    mon.on_backward_end(2)
    opt.step()
    opt.zero_grad()
    rec = mon.on_step_end(0)
    after = metrics_of(copy.deepcopy(model))
    key = "repr/blocks.0.resid_post/entropy"
    assert rec[key] == pytest.approx(before[key], rel=1e-9) and rec[key] != pytest.approx(after[key], rel=1e-6)
    rp = RepresentationProbe(ids[:, :-1], model=model, **opts)  # no Monitor: on_step_end probes now
    assert rp.on_step_end(0, {})[key] == pytest.approx(after[key], rel=1e-9)
