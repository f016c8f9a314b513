"""The accelerator path: the same ground truth as the CPU suite, on the accelerator.

Runs on CUDA when present; skipped otherwise, unless ``MIDTRAIN_TEST_DEVICE`` names a device (e.g.
``MIDTRAIN_TEST_DEVICE=cpu`` checks the tests themselves on a machine without a GPU). What CPU
tests cannot show: per-example norms and book-keeping with CUDA kernels (TF32 off: float32
ground truth), the GNS hook under bf16 autocast against its own brute force, and the built-in loop
on the device (bf16 autocast, fused AdamW, SDPA) with every hook on, and, on 2+ GPUs, the loop under FSDP2
(NCCL, bf16 mixed precision) against DDP. ``benchmarks/device_check.sh``
runs this file and the GPU benchmarks in one go.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from hooks.gradient_noise import GradientNoiseScale
from hooks.per_example import PerExampleGradNorms
from tests.diagnostics.test_pegrad import RTOL, rel_err, vmap_sq_norms

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


def _device() -> str | None:
    forced = os.environ.get("MIDTRAIN_TEST_DEVICE")
    if forced:
        return forced
    return "cuda" if torch.cuda.is_available() else None


DEVICE = _device()
needs_device = pytest.mark.skipif(DEVICE is None, reason="no accelerator (set MIDTRAIN_TEST_DEVICE to force)")


@pytest.fixture
def exact_fp32():
    """float32 ground truth: no TF32 in matmuls / convolutions for the duration of a test."""
    old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def gpt_on_device(tie=True, n_embd=64, seed=0):
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=64, tie_weights=tie)).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


@needs_device
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("method,bookkeeping", [("auto", False), ("ghost", False), ("materialize", True)])
def test_per_example_norms_and_bookkeeping_on_device(exact_fp32, tie, method, bookkeeping):
    model = gpt_on_device(tie)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 48), generator=g).to(DEVICE)
    y = torch.randint(0, 256, (4, 48), generator=g).to(DEVICE)
    model(x)  # RoPE cache outside vmap
    truth = vmap_sq_norms(model, lambda f, xi, yi: f(xi, yi)[1], x, y)
    twin = copy.deepcopy(model)
    twin(x, y)[1].backward()
    with PerExampleGradNorms(model, method=method, bookkeeping=bookkeeping) as pe:
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        res = pe.sq_norms(loss_scale="mean")
    assert res.unsupported == {}
    for name, t in truth.items():
        assert res.params[name].device.type == torch.device(DEVICE).type
        assert rel_err(res.params[name], t) < RTOL, name
    for (n, p), q in zip(model.named_parameters(), twin.parameters()):
        scale = q.grad.abs().max().clamp(min=1e-30)
        assert float((p.grad - q.grad).abs().max() / scale) < 1e-5, n  # hooks: same training gradient


@needs_device
def test_gns_microbatch_and_per_example_under_bf16_autocast():
    """The GNS hook's raw norms under bf16 autocast equal the brute force computed the same way
    (per micro-batch gradients by autograd.grad under the same autocast), on the device."""
    from hooks.monitor import MemorySink, Monitor

    dev_type = torch.device(DEVICE).type
    for mode, accum in (("microbatch", 2), ("per_example", 1)):
        model = gpt_on_device(n_embd=32)
        g = torch.Generator().manual_seed(2)
        steps = [[torch.randint(0, 256, (4, 33), generator=g).to(DEVICE) for _ in range(accum)] for _ in range(3)]
        sink = MemorySink()
        hook = GradientNoiseScale(mode=mode, groups=False)
        mon = Monitor(model, [hook], sinks=[sink], strict=True)
        params = [p for p in model.parameters() if p.requires_grad]
        for s, micros in enumerate(steps):
            ref_small, ref_mean = [], None
            for xy in micros:  # brute force first (no hooks armed outside a step)
                with torch.autocast(dev_type, dtype=torch.bfloat16):
                    if mode == "microbatch":
                        loss = model(xy[:, :-1], xy[:, 1:])[1]
                        gs = torch.autograd.grad(loss, params)
                        ref_small.append(sum(float(t.double().pow(2).sum()) for t in gs))
                    else:
                        for i in range(len(xy)):
                            li = model(xy[i:i + 1, :-1], xy[i:i + 1, 1:])[1]
                            gs = torch.autograd.grad(li, params)
                            ref_small.append(sum(float(t.double().pow(2).sum()) for t in gs))
                    loss = model(xy[:, :-1], xy[:, 1:])[1]
                    gs = torch.autograd.grad(loss, params)
                ref_mean = [t.double() / accum for t in gs] if ref_mean is None else [
                    a + t.double() / accum for a, t in zip(ref_mean, gs)]
            mon.on_step_begin(s)
            for xy in micros:
                with torch.autocast(dev_type, dtype=torch.bfloat16):
                    loss = model(xy[:, :-1], xy[:, 1:])[1] / accum
                loss.backward()
                mon.on_backward_end(len(xy))
            mon.on_grads_ready()
            model.zero_grad(set_to_none=True)
            mon.on_step_end(s)
            rec = sink.records[-1]
            big = sum(float(t.pow(2).sum()) for t in ref_mean)
            assert rec["gns/small_sq"] == pytest.approx(float(np.mean(ref_small)), rel=2e-2), mode
            assert rec["gns/big_sq"] == pytest.approx(big, rel=2e-2), mode
        mon.close()


@needs_device
def test_builtin_loop_on_device_with_every_hook(tmp_path):
    from diagnostics.runs import load_run
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(4, 3, 2), checkpoint_every=100, eval_every=3)
    cfg.device = DEVICE
    res = train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True)
    m = load_run(tmp_path / "r").metrics
    rows = m.dropna(subset=["train/loss"])
    assert np.isfinite(rows["train/loss"]).all() and len(rows) == 9
    assert rows["gns/b_small"].notna().any()
    assert any(c.startswith("repr/") for c in m) and any(c.startswith("difficulty/") for c in m)
    assert m["retrieval/64/gain"].notna().sum() == 2 and np.isfinite(m["retrieval/64/gain"].dropna()).all()
    assert res.val_end and all(np.isfinite(v) for v in res.val_end.values())


@needs_device
def test_retrieval_probe_on_device_matches_cpu(exact_fp32):
    """The retrieval gain on the device: float32 equal to the CPU's, bf16 autocast (the default on
    CUDA) within 0.05 nats of it."""
    from hooks.retrieval import RetrievalProbe
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=2, n_head=2, n_embd=64, block_size=128))
    data = torch.randint(0, 64, (6, 128), generator=torch.Generator().manual_seed(1))
    kw = dict(lengths=[64, 128], depths=[8, 40, 100], n_keys=6, every=None)
    cpu = RetrievalProbe(data, autocast=False, model=model, **kw).probe()
    model.to(DEVICE)
    fp32 = RetrievalProbe(data, autocast=False, model=model, **kw).probe()
    bf16 = RetrievalProbe(data, autocast=True, model=model, **kw).probe()
    keys = [k for k in cpu if k.endswith("gain")]
    assert len(keys) == (2 + 1) + (3 + 1)  # depths 8, 40 at 64 and 8, 40, 100 at 128, each with its mean
    for k in keys:
        assert fp32[k] == pytest.approx(cpu[k], abs=1e-4), k
        assert bf16[k] == pytest.approx(cpu[k], abs=0.05), k


def _fsdp_cuda_worker(rank, world, init_file, root):
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config
    import torch.distributed as dist

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for par in ("fsdp", "ddp"):
            cfg = micro_config(steps=(4, 3, 2), checkpoint_every=5, eval_every=3, parallelism=par)
            cfg.device = "cuda"
            train(cfg, os.path.join(root, par), progress=False, strict_hooks=True)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP on CUDA needs 2+ GPUs")
def test_builtin_loop_fsdp_on_two_gpus_matches_ddp(tmp_path):
    """The loop under FSDP2 with NCCL and bf16 mixed precision (bf16 all-gather, fp32 reduce): every hook
    measures, sharded checkpoints are written, and the losses follow the DDP run's (bf16 autocast there:
    a bf16 tolerance)."""
    from diagnostics.runs import load_run
    from tests.midtrain.test_fsdp import spawn_with_time_limit

    spawn_with_time_limit(_fsdp_cuda_worker, (2, str(tmp_path / "init"), str(tmp_path)), 2, 240)
    fsdp, ddp = load_run(tmp_path / "fsdp").metrics, load_run(tmp_path / "ddp").metrics
    a, b = fsdp.dropna(subset=["train/loss"]), ddp.dropna(subset=["train/loss"])
    assert len(a) == len(b) == 9 and np.isfinite(a["train/loss"]).all()
    np.testing.assert_allclose(a["train/loss"].values, b["train/loss"].values, rtol=3e-2)
    assert a["gns/b_small"].notna().any()
    assert any(c.startswith("repr/") for c in fsdp) and any(c.startswith("difficulty/") for c in fsdp)
    assert any(p.suffix == ".dcp" for p in (tmp_path / "fsdp" / "checkpoints").iterdir())
