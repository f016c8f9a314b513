"""The built-in loop under FSDP2 (``parallelism = "fsdp"``), two gloo processes on CPU: the same losses as
one process on the same global batch, the same hook metrics as DDP, sharded checkpoints that resume to
the uninterrupted run, probes that run on every rank (a time limit: a hang fails), and clear errors
for what is not supported. One spawn for the whole module (processes cost seconds on 2 shared cores)."""

from __future__ import annotations

import faulthandler
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diagnostics.runs import load_run
from midtrain.config import ConfigError
from midtrain.loop import train
from tests.midtrain.conftest import micro_config

WORLD, TIME_LIMIT_S = 2, 120


def _cfg(parallelism: str):
    cfg = micro_config(steps=(3, 2, 1), checkpoint_every=100, eval_every=2, parallelism=parallelism)
    return cfg


def _worker(rank, world, init_file, root):
    faulthandler.dump_traceback_later(TIME_LIMIT_S - 10, exit=True)  # a hang prints where each rank waits
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        train(_cfg("fsdp"), os.path.join(root, "fsdp"), progress=False, strict_hooks=True)
        train(_cfg("ddp"), os.path.join(root, "ddp"), progress=False, strict_hooks=True)
        train(_cfg("fsdp"), os.path.join(root, "split"), until_step=4, progress=False, strict_hooks=True)
        train(_cfg("fsdp"), os.path.join(root, "split"), resume=True, progress=False, strict_hooks=True)
        # a sharded checkpoint loads into DDP (the shards read into whole tensors)
        train(_cfg("ddp"), os.path.join(root, "branch_ddp"), parent=os.path.join(root, "fsdp"), parent_step=3,
              progress=False, hooks=[])
    finally:
        dist.destroy_process_group()


def spawn_with_time_limit(fn, args, nprocs: int, limit_s: float) -> None:
    """``mp.spawn`` that fails (and ends the processes it started) instead of hanging past ``limit_s``."""
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + limit_s
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {nprocs} processes did not finish within {limit_s} s (a collective hangs?)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    spawn_with_time_limit(_worker, (WORLD, str(root / "init"), str(root)), WORLD, TIME_LIMIT_S)
    train(_cfg("ddp"), str(root / "single"), progress=False, hooks=[])
    return root


def _col(run, name):
    m = run.metrics
    return m[["step", name]].dropna()


def test_fsdp_loss_equals_one_process_on_the_same_global_batch(runs):
    fsdp, single = load_run(runs / "fsdp"), load_run(runs / "single")
    assert fsdp.info["world_size"] == WORLD
    for name in ["train/loss", "train/grad_norm"] + [c for c in single.metrics.columns if c.startswith("val/")]:
        a, b = _col(fsdp, name), _col(single, name)
        assert list(a["step"]) == list(b["step"]) and len(a) > 0, name
        torch.testing.assert_close(torch.tensor(a[name].values), torch.tensor(b[name].values), rtol=1e-5, atol=1e-6,
                                   msg=f"FSDP != one process on {name}")


def test_every_hook_metric_equals_the_ddp_run(runs):
    fsdp, ddp = load_run(runs / "fsdp").metrics, load_run(runs / "ddp").metrics
    hook_cols = [c for c in ddp.columns if c.split("/")[0] in ("gns", "repr", "difficulty", "retrieval")
                 and not c.endswith("_time_s")]
    for area in ("gns/b_simple", "repr/", "difficulty/"):   # every hook measured something
        assert any(c.startswith(area) for c in hook_cols), area
    assert set(hook_cols) <= set(fsdp.columns)
    for c in hook_cols:
        a, b = fsdp[["step", c]].dropna(), ddp[["step", c]].dropna()
        assert list(a["step"]) == list(b["step"]), c
        for x, y in zip(a[c], b[c]):
            if isinstance(y, float) and math.isnan(y):
                assert math.isnan(x), c
            elif isinstance(y, (int, float)):
                # a retrieval gain is a difference of two losses of ~5 nats, near 0 here: relative to it,
                # float32 summation order (FSDP vs DDP) shows; 1e-5 nats absolute (2e-6 of the losses)
                assert x == pytest.approx(y, rel=1e-4, abs=1e-5 if c.startswith("retrieval/") else 1e-7), c
            else:
                assert x == y, c


def test_probes_run_on_every_rank_and_do_not_hang(runs):
    """The fixture's spawn has a time limit; the probes measured at their steps under FSDP."""
    m = load_run(runs / "fsdp").metrics
    probe_steps = set(m.dropna(subset=[c for c in m.columns if c.startswith("repr/")][:1])["step"])
    assert {0, 2, 4} <= probe_steps
    assert m.dropna(subset=[c for c in m.columns if c.endswith("/probe_loss")][:1])["step"].size >= 3


def test_sharded_checkpoint_resumes_to_the_uninterrupted_run(runs):
    whole, split = load_run(runs / "fsdp"), load_run(runs / "split")
    ck = runs / "split" / "checkpoints"
    assert any(p.name.endswith(".dcp") and p.is_dir() for p in ck.iterdir())
    split_steps, whole_steps = [s for s, _ in split.checkpoints()], [s for s, _ in whole.checkpoints()]
    assert set(whole_steps) <= set(split_steps) and 4 in split_steps   # --until 4 left its checkpoint
    assert all((ck / f"step_{s:07d}.dcp").is_dir() for s in split_steps)
    for name in ("train/loss", "train/grad_norm"):
        a, b = _col(whole, name), _col(split, name)
        assert list(a["step"]) == list(b["step"])
        torch.testing.assert_close(torch.tensor(a[name].values), torch.tensor(b[name].values), rtol=1e-6, atol=0)


def test_a_sharded_checkpoint_branches_unsharded(runs):
    """From the FSDP run's step-3 checkpoint, on one process and under DDP: the same steps 3-5 as the FSDP
    run itself (the same config: a branch that changes nothing continues the run)."""
    train(_cfg("fsdp"), str(runs / "branch_one"), parent=str(runs / "fsdp"), parent_step=3, progress=False,
          hooks=[])
    whole = _col(load_run(runs / "fsdp"), "train/loss")
    whole = whole[whole["step"] >= 3]
    for name in ("branch_one", "branch_ddp"):
        b = _col(load_run(runs / name), "train/loss")
        assert list(b["step"]) == list(whole["step"]) == [3, 4, 5], name
        torch.testing.assert_close(torch.tensor(b["train/loss"].values), torch.tensor(whole["train/loss"].values),
                                   rtol=1e-5, atol=1e-6, msg=name)


def test_check_sharding_says_what_loads_where():
    from midtrain.checkpoint import check_sharding

    sharded, plain = {"sharded": {"dir": "step_0000003.dcp", "world_size": 2}}, {"sharded": None}
    check_sharding(sharded, "c.pt", 2)
    check_sharding(plain, "c.pt", 0)
    check_sharding({}, "c.pt", 0)    # a checkpoint from before the key
    check_sharding(sharded, "c.pt", 0)   # read into whole tensors
    with pytest.raises(ConfigError, match="--nproc_per_node 2"):
        check_sharding(sharded, "c.pt", 4)
    with pytest.raises(ConfigError, match="unsharded .single-process or DDP. run"):
        check_sharding(plain, "c.pt", 2)


def test_parallelism_is_validated():
    with pytest.raises(ConfigError, match="parallelism 'zero3' is not one of ddp, fsdp"):
        _cfg("zero3").validate()
    assert _cfg("fsdp").to_dict()["parallelism"] == "fsdp"
