"""Two gloo processes under DDP keep identical parameters and match one process
on the same global batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from midtrain.loop import train
from tests.midtrain.conftest import micro_config


def _cfg():
    return micro_config(steps=(3, 2, 1), checkpoint_every=100, eval_every=100)


def _worker(rank, world, init_file, out_dir, result_dir):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        res = train(_cfg(), out_dir, progress=False)
        torch.save({k: v.detach().clone() for k, v in res.model.state_dict().items()},
                   os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_gloo_ranks_match_single_process(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path / "ddp"), str(tmp_path)), nprocs=world, join=True)
    p0 = torch.load(tmp_path / "rank0.pt")
    p1 = torch.load(tmp_path / "rank1.pt")
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"ranks diverged on {k}"
    single = train(_cfg(), str(tmp_path / "single"), progress=False).model.state_dict()
    for k in p0:
        torch.testing.assert_close(p0[k], single[k], rtol=1e-4, atol=1e-5, msg=f"DDP != single process on {k}")
    # only rank 0 wrote the run directory
    assert os.path.exists(tmp_path / "ddp" / "run.json")
