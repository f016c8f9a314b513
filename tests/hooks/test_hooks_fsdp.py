"""The hooks on a plain loop under FSDP2 (``fully_shard``), two gloo processes on CPU (one spawn, with a
time limit): GradientNoiseScale (micro-batch mode, auto with one backward per step, and per-example mode, where
a parameter without a per-example rule is left out of both norms on every rank's shard) gives the DDP
run's numbers on the same data within 1e-4 relative, step by step; the Monitor detects the sharded model;
a RepresentationProbe runs its forward on every rank (rank 0 alone would wait for ever) and measures
what it measures on the DDP model."""

from __future__ import annotations

import contextlib
import faulthandler
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn

from hooks.gradient_noise import GradientNoiseScale
from hooks.monitor import MemorySink, Monitor, probe_role
from hooks.representation import RepresentationProbe
from tests.midtrain.test_fsdp import spawn_with_time_limit

WORLD, STEPS, PER_RANK, TIME_LIMIT_S = 2, 3, 4, 90


class Gain(nn.Module):
    """A parameter no per-example rule covers (per-example mode leaves it out of both norms)."""

    def __init__(self, n):
        super().__init__()
        self.g = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x):
        return x * self.g


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Sequential(nn.Linear(16, 16), Gain(16), nn.Tanh()),
                         nn.Linear(16, 1))


def _data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(STEPS, WORLD * PER_RANK, 6, generator=g)
    return X, X.sum(-1, keepdim=True).sin()


def _run(rank, kind, accum, mode):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    if kind == "fsdp":
        fully_shard(model[0]), fully_shard(model[2]), fully_shard(model)
        fwd, sync = model, (lambda last: (model.set_requires_gradient_sync(last), contextlib.nullcontext())[1])
    else:
        fwd = DDP(model)
        sync = (lambda last: contextlib.nullcontext() if last else fwd.no_sync())
    probe = RepresentationProbe(torch.randn(8, 6, generator=torch.Generator().manual_seed(5)),
                                layers=["2"], every=1, info_plane=False, save_spectra=False)
    sink, gns = MemorySink(), GradientNoiseScale(mode=mode, groups=False)
    mon = Monitor(model, [gns, probe], sinks=[sink], strict=True, enabled=rank == 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    X, Y = _data()
    for step in range(STEPS):
        mon.on_step_begin(step)
        x, y = X[step][rank * PER_RANK:(rank + 1) * PER_RANK], Y[step][rank * PER_RANK:(rank + 1) * PER_RANK]
        for k, (xs, ys) in enumerate(zip(x.chunk(accum), y.chunk(accum))):
            with sync(k == accum - 1):
                ((fwd(xs) - ys) ** 2).mean().div(accum).backward()
            mon.on_backward_end(len(xs))
        mon.on_grads_ready()
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.on_step_end(step)
    return {"records": sink.records, "sharded": mon.sharded, "role": probe.role}


def _worker(rank, world, init_file, out):
    faulthandler.dump_traceback_later(TIME_LIMIT_S - 10, exit=True)
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = {(kind, accum, mode): _run(rank, kind, accum, mode)
               for kind in ("fsdp", "ddp") for accum, mode in ((2, "microbatch"), (1, "auto"), (2, "per_example"))}
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hooks_fsdp")
    spawn_with_time_limit(_worker, (WORLD, str(root / "init"), str(root)), WORLD, TIME_LIMIT_S)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("accum,mode", [(2, "microbatch"), (1, "auto"), (2, "per_example")])
def test_gns_and_probe_under_fsdp_equal_ddp(results, accum, mode):
    fsdp, ddp = results[0][("fsdp", accum, mode)], results[0][("ddp", accum, mode)]
    assert fsdp["sharded"] and not ddp["sharded"]
    assert len(fsdp["records"]) == len(ddp["records"]) == STEPS
    keys = [k for k in ddp["records"][-1] if k.startswith(("gns/", "repr/")) and not k.endswith("_time_s")]
    assert {"gns/small_sq", "gns/big_sq", "gns/b_simple"} <= set(keys) and any(k.startswith("repr/") for k in keys)
    if mode == "per_example":
        assert all(r["gns/b_small"] == 1.0 for r in fsdp["records"])
    for a, b in zip(fsdp["records"], ddp["records"]):
        for k in keys:
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-8, nan_ok=True), (k, a["step"])


def test_probe_roles_by_rank(results):
    assert results[0][("fsdp", 2, "microbatch")]["role"] == "measure"
    assert results[1][("fsdp", 2, "microbatch")]["role"] == "forward"   # ran the probe's forwards
    assert results[1][("ddp", 2, "microbatch")]["role"] == "skip"
    assert probe_role() == "measure"   # one process


def test_monitor_sharded_can_be_said():
    assert Monitor(_model(), [], sharded=True).sharded and not Monitor(_model(), []).sharded
