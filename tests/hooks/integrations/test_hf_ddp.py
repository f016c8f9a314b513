"""The HF adapter's end-of-backward callback under DDP (2 gloo processes, one spawn).

The adapter reads the step's gradient in an autograd final callback; DDP finishes its all-reduce
in a final callback of its own, queued later in the same backward. The adapter re-queues itself
so that it runs after DDP's: its gns/big_sq must be the norm of the *averaged* gradient, equal to
the plain-loop Monitor under DDP on the same batches (tests/hooks/test_gns_ddp.py checks that one
against a single process). HF's own loop is mimicked event by event (``Trainer`` itself needs a
launcher), so that this test stays a few seconds.
"""

import contextlib
import copy
import os
from types import SimpleNamespace as NS

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

pytest.importorskip("transformers")

WORLD, ACCUM, B, T, V, STEPS = 2, 2, 3, 6, 11, 3


class Output:
    """HF-style model output (ModelOutput's .loss / .logits; the real one costs seconds to import)."""

    def __init__(self, loss, logits):
        self.loss, self.logits = loss, logits


class TinyLM(nn.Module):
    """Returns an HF-style output (.loss, .logits)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids=None, labels=None):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
        return Output(loss, logits)


def _batches(rank):
    g = torch.Generator().manual_seed(7)
    full = torch.randint(0, V, (STEPS, ACCUM, WORLD * B, T), generator=g)
    return full[:, :, rank * B:(rank + 1) * B]           # this rank's shard of every micro-batch


def _worker(rank, init_file, out):
    os.environ.update(GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from torch.nn.parallel import DistributedDataParallel as DDP

    from hooks import GradientNoiseScale, MemorySink, Monitor
    from hooks.integrations.hf_trainer import MidtrainCallback

    batches = _batches(rank)
    results = {}
    # (1) the adapter, driven like HF's loop: grads are read only by its final callback
    inner = TinyLM()
    ref_model = copy.deepcopy(inner)
    ddp = DDP(inner)
    sink, gs = MemorySink(), NS(sync_gradients=False)
    cb = MidtrainCallback([GradientNoiseScale(mode="microbatch")], sinks=[sink], strict=True)
    args = NS(output_dir="", gradient_accumulation_steps=ACCUM, world_size=WORLD, average_tokens_across_devices=False)
    state = NS(global_step=0, is_world_process_zero=rank == 0, num_input_tokens_seen=0)
    cb.on_train_begin(args, state, None, model=inner, optimizer=NS(gradient_state=gs))
    averaged = []
    for step in range(STEPS):
        cb.on_step_begin(args, state, None)
        for k in range(ACCUM):
            gs.sync_gradients = k == ACCUM - 1
            x = batches[step, k]
            with ddp.no_sync() if k < ACCUM - 1 else contextlib.nullcontext():
                (ddp(input_ids=x, labels=x).loss / ACCUM).backward()
        averaged.append(sum(float(p.grad.double().pow(2).sum()) for p in inner.parameters()))
        ddp.zero_grad(set_to_none=True)
        state.global_step += 1
        cb.on_step_end(args, state, None)
    cb.on_train_end(args, state, None)
    results["adapter"] = [{k: r[k] for k in ("gns/small_sq", "gns/big_sq", "gns/b_big")} for r in sink.records]
    results["averaged"] = averaged
    # (2) the plain loop on the same batches and weights
    ddp2 = DDP(ref_model)
    sink2 = MemorySink()
    mon = Monitor(ref_model, [GradientNoiseScale(mode="microbatch")], sinks=[sink2], strict=True)
    for step in range(STEPS):
        mon.on_step_begin(step + 1)
        for k in range(ACCUM):
            x = batches[step, k]
            with ddp2.no_sync() if k < ACCUM - 1 else contextlib.nullcontext():
                (ddp2(input_ids=x, labels=x).loss / ACCUM).backward()
            mon.on_backward_end(B)
        mon.on_grads_ready()
        ddp2.zero_grad(set_to_none=True)
        mon.on_step_end(step + 1)
    results["plain"] = [{k: r[k] for k in ("gns/small_sq", "gns/big_sq", "gns/b_big")} for r in sink2.records]
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_grads_read_after_ddp_all_reduce(tmp_path):
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(out)), nprocs=WORLD, join=True)
    res = torch.load(out, weights_only=False)
    assert len(res["adapter"]) == len(res["plain"]) == STEPS
    for got, want, avg in zip(res["adapter"], res["plain"], res["averaged"]):
        assert got["gns/b_big"] == want["gns/b_big"] == WORLD * ACCUM * B
        assert got["gns/small_sq"] == pytest.approx(want["gns/small_sq"], rel=1e-5)
        assert got["gns/big_sq"] == pytest.approx(want["gns/big_sq"], rel=1e-5)
        assert got["gns/big_sq"] == pytest.approx(avg, rel=1e-5)     # the all-reduced .grad
