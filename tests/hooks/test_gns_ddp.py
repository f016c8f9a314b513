"""GradientNoiseScale under DDP: 2 gloo processes (one spawn for the whole module).

References, slow and obvious:
- one process with micro-batches on the same global batches (the ranks' shards in order): the
  DDP runs must reproduce its raw norms exactly;
- the exact tr(Sigma) / |G|^2 of the finite least-squares data set (tests/hooks/
  test_gradient_noise.py: one autograd call per example) at learning rate 0: mode "ddp" converges
  to it, and agrees with the microbatch and per_example modes on the same data within their
  statistical errors.
"""

import contextlib
import math
import os
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hooks.gradient_noise import GradientNoiseScale
from hooks.monitor import MemorySink, Monitor
from tests.hooks.test_gradient_noise import (b_simple_and_se, exact_b_simple, lsq_loss, lsq_problem,
                                             one_thread, only_gns, run_hook)  # noqa: F401 (autouse fixture)


WORLD, STEPS, B = 2, 4, 3
TRUTH_STEPS, TRUTH_PER_RANK, TRUTH_SEED = 2500, 32, 20   # ground-truth runs: global batch 64


def _ddp_step_batches(seed, N, per_rank, steps=STEPS):
    """Global batches (drawn with replacement); rank r takes the r-th contiguous shard."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, N, (WORLD * per_rank,), generator=g) for _ in range(steps)]


class FailsOnRank1(GradientNoiseScale):
    """Raises on rank 1 only: in on_step_end at step 1, in on_backward_end at step 2."""

    def _step_end(self, step, scalars):
        if dist.get_rank() == 1 and step == 1:
            raise RuntimeError("boom")
        return super()._step_end(step, scalars)

    def on_step_begin(self, step):
        self.step = step
        super().on_step_begin(step)

    def _backward_end(self, b):
        if dist.get_rank() == 1 and self.step == 2:
            raise RuntimeError("bang")
        return super()._backward_end(b)


def _ddp_run(rank, mode, accum, per_rank, seed, cls=GradientNoiseScale, steps=STEPS, **kw):
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, y, model = lsq_problem()
    ddp = DDP(model)
    sink, hook = MemorySink(), cls(mode=mode, **kw)
    mon = Monitor(model, [hook], sinks=[sink], strict=True, enabled=rank == 0, ddp_model=ddp)
    for step, glob in enumerate(_ddp_step_batches(seed, len(X), per_rank, steps)):
        local = glob[rank * per_rank:(rank + 1) * per_rank]           # contiguous shard
        mon.on_step_begin(step)
        for k, idx in enumerate(local.chunk(accum)):
            ctx = ddp.no_sync() if k < accum - 1 else contextlib.nullcontext()
            with ctx:
                (0.5 * ((ddp(X[idx]).squeeze(-1) - y[idx]) ** 2).mean() / accum).backward()
            mon.on_backward_end(len(idx))
        mon.on_grads_ready()
        ddp.zero_grad(set_to_none=True)
        mon.on_step_end(step)
    assert not mon.disabled
    return sink.records, hook.last_mode


def _loop_cfg_ddp_mode():
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(2, 1, 1), checkpoint_every=100, eval_every=100)
    only_gns(cfg)
    cfg.monitor.gns = {"mode": "ddp"}
    return cfg


def _ddp_worker(rank, init_file, out, run_dir):
    from midtrain.loop import train

    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        res = {
            "ddp_1": _ddp_run(rank, "ddp", accum=1, per_rank=B, seed=10),
            "ddp_2": _ddp_run(rank, "ddp", accum=2, per_rank=2 * B, seed=11),     # no_sync accumulation
            "auto_1": _ddp_run(rank, "auto", accum=1, per_rank=B, seed=10),
            "micro_2": _ddp_run(rank, "microbatch", accum=2, per_rank=2 * B, seed=11),
            # ground truth: B_small = 32 (per rank) vs B_big = 64, many steps at learning rate 0
            "truth": _ddp_run(rank, "ddp", accum=1, per_rank=TRUTH_PER_RANK, seed=TRUTH_SEED,
                              steps=TRUTH_STEPS, groups=False, ema=0.999),
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res["failing"] = _ddp_run(rank, "microbatch", accum=2, per_rank=2 * B, seed=11, cls=FailsOnRank1)
        # the built-in loop hands its DDP wrapper to the Monitor: mode "ddp" works there too
        train(_loop_cfg_ddp_mode(), run_dir, progress=False, strict_hooks=True)
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


def _single(accum_per_rank, per_rank, seed):
    """One process, the global batch as WORLD x accum micro-batches (the ranks' shards in order)."""
    X, y, model = lsq_problem()
    steps = [list(glob.chunk(WORLD * accum_per_rank)) for glob in _ddp_step_batches(seed, len(X), per_rank)]
    df, _ = run_hook(model, steps, lambda i: lsq_loss(model, X, y, i))
    return df


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """One spawn of 2 gloo processes for every test here: (results of rank 0, the loop's run dir)."""
    tmp = tmp_path_factory.mktemp("gns_ddp")
    out, run_dir = tmp / "res.pt", tmp / "loop"
    mp.spawn(_ddp_worker, args=(str(tmp / "init"), str(out), str(run_dir)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False), run_dir


@pytest.mark.timeout(180)
def test_ddp_mode_matches_microbatch_mode_exactly(ddp_results):
    res, run_dir = ddp_results
    cols = ["gns/small_sq", "gns/big_sq", "gns/b_small", "gns/b_big"]

    # 2 ranks x 1 micro-batch of B (ddp) == 1 rank x 2 micro-batches of B (microbatch)
    ddp1 = pd.DataFrame(res["ddp_1"][0])
    single1 = _single(1, B, seed=10)
    assert set(ddp1["gns/b_small"]) == {B} and set(ddp1["gns/b_big"]) == {2 * B}
    np.testing.assert_allclose(ddp1[cols], single1[cols], rtol=1e-5)
    # auto with 2 ranks and no accumulation: the per-rank gradient from the tensor hooks, same numbers
    auto1 = pd.DataFrame(res["auto_1"][0])
    assert res["auto_1"][1] == "ddp"
    np.testing.assert_allclose(auto1[cols], single1[cols], rtol=1e-5)

    # ddp mode under no_sync accumulation: the comm hook sees each rank's accumulated gradient
    # (per-rank batch 2B) == 1 process with 2 micro-batches of 2B (each rank's whole shard)
    ddp2 = pd.DataFrame(res["ddp_2"][0])
    single2 = _single(1, 2 * B, seed=11)
    assert set(ddp2["gns/b_small"]) == {2 * B} and set(ddp2["gns/b_big"]) == {4 * B}
    np.testing.assert_allclose(ddp2[cols], single2[cols], rtol=1e-5)

    # microbatch mode under DDP: B_small = micro-batch, B_big = global batch; == 1 process x 4 micros
    micro2 = pd.DataFrame(res["micro_2"][0])
    single4 = _single(2, 2 * B, seed=11)
    assert set(micro2["gns/b_small"]) == {B} and set(micro2["gns/b_big"]) == {4 * B}
    np.testing.assert_allclose(micro2[cols], single4[cols], rtol=1e-5)

    # built-in loop, mode "ddp": per-rank batch vs global batch in every phase
    from diagnostics.runs import load_run

    m = load_run(run_dir).metrics.dropna(subset=["train/loss"])
    assert list(m["gns/b_small"]) == [4, 4, 4, 2] and list(m["gns/b_big"]) == [8, 8, 8, 4]
    assert np.isfinite(m["gns/small_sq"]).all() and (m["gns/small_sq"] > m["gns/big_sq"]).all()

    # an error on one rank only never hangs the others nor disables the hook there: rank 1 failed
    # after step 1's all-reduce (rank 0 measured it) and before step 2's (skipped on every rank)
    fail = pd.DataFrame(res["failing"][0])
    np.testing.assert_allclose(fail.loc[[0, 1, 3], cols], micro2.loc[[0, 1, 3], cols], rtol=1e-5)
    assert list(fail["gns/skipped"]) == [0, 0, 1, 1] and fail["gns/small_sq"].isna().tolist() == [False, False, True, False]


# ----------------------------------------------------------------------------------------------
# ground truth: learning rate 0, the exact B_simple of the finite least-squares data set

def _one_process(mode, accum, steps):
    """The DDP truth run's global batches in one process: ``accum`` micro-batches per step."""
    X, y, model = lsq_problem()
    glob = _ddp_step_batches(TRUTH_SEED, len(X), TRUTH_PER_RANK, TRUTH_STEPS)[:steps]
    batches = [list(g.chunk(accum)) for g in glob]
    df, hook = run_hook(model, batches, lambda i: lsq_loss(model, X, y, i), mode=mode, groups=False, ema=0.999)
    assert hook.last_mode == mode
    return df


@pytest.mark.timeout(180)
def test_ddp_b_simple_converges_to_exact(ddp_results):
    X, y, model = lsq_problem()
    truth = exact_b_simple(model, X, y)
    df = pd.DataFrame(ddp_results[0]["truth"][0])
    assert ddp_results[0]["truth"][1] == "ddp" and len(df) == TRUTH_STEPS
    assert set(df["gns/b_small"]) == {TRUTH_PER_RANK} and set(df["gns/b_big"]) == {WORLD * TRUTH_PER_RANK}
    b, se = b_simple_and_se(df)
    assert se < 0.017 * truth                 # the 5% check below is >3 standard errors wide
    assert b == pytest.approx(truth, rel=0.05)
    assert df["gns/b_simple"].iloc[-1] == pytest.approx(truth, rel=0.05)      # the online EMA


@pytest.mark.timeout(180)
def test_ddp_microbatch_and_per_example_agree_on_the_same_data(ddp_results):
    """The first 1000 global batches of the DDP truth run, three ways: ddp (B 32 vs 64, 2 ranks),
    microbatch (B 16 vs 64, 4 micro-batches in one process), per_example (B 1 vs 64). Each agrees
    with the exact B_simple and the others within 4 combined standard errors (the three share
    their data, so their errors are positively correlated and the combined error is generous)."""
    X, y, model = lsq_problem()
    truth = exact_b_simple(model, X, y)
    n = 1000
    est = {"ddp": b_simple_and_se(pd.DataFrame(ddp_results[0]["truth"][0][:n])),
           "microbatch": b_simple_and_se(_one_process("microbatch", 4, n)),
           "per_example": b_simple_and_se(_one_process("per_example", 1, n))}
    for mode, (b, se) in est.items():
        assert se < 0.05 * truth, mode
        assert abs(b - truth) < 4 * se, (mode, b, se, truth)
    modes = list(est)
    for i, m1 in enumerate(modes):
        for m2 in modes[i + 1:]:
            (b1, s1), (b2, s2) = est[m1], est[m2]
            assert abs(b1 - b2) < 4 * math.hypot(s1, s2), (m1, m2, est)

