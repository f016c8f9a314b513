"""Built-in loop throughput vs a minimal plain PyTorch loop, same model and batches.

    python benchmarks/loop_throughput.py                 # tiny preset, CPU
    python benchmarks/loop_throughput.py --preset small --steps 30 --device cuda

Both sides run in this process, alternating, each round from the same initial
weights. The plain loop is the least a training loop can do: batches are
pre-generated (so it pays no data cost at all), then forward, backward, clip,
AdamW step. The built-in loop additionally samples its batches, writes a
record per step, keeps per-example losses and tracks the schedule. Reported:
median step time of each side, tokens/s, and the ratio ours/plain of tokens/s
(goal: >= 0.9). `--hooks default` also measures the loop with its default
measurement hooks on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnostics.runs import load_run  # noqa: E402
from midtrain.checkpoint import model_config  # noqa: E402
from midtrain.config import Phase, TrainConfig  # noqa: E402
from midtrain.data import MixtureSampler, default_corpus  # noqa: E402
from midtrain.distributed import resolve_device  # noqa: E402
from midtrain.loop import train  # noqa: E402
from midtrain.model import GPT  # noqa: E402


def make_config(args) -> TrainConfig:
    cfg = TrainConfig(seed=0, device=args.device, eval_every=10**9, checkpoint_every=10**9, log_every=10**9)
    cfg.model.preset = args.preset
    cfg.data.eval_batches = 1
    cfg.phases = [Phase(name="bench", steps=args.steps, lr=1e-3, mixture={"prose": 1, "code": 1, "math": 1},
                        batch_size=args.batch_size, grad_accum=args.grad_accum, seq_len=args.seq_len)]
    if args.hooks == "none":
        pass
    return cfg


def plain_loop(cfg: TrainConfig, corpus, device) -> list[float]:
    torch.manual_seed(cfg.seed)
    model = GPT(model_config(cfg, corpus.vocab_size)).to(device)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type=device.type)
    p = cfg.phases[0]
    sampler = MixtureSampler(corpus, p.mixture, p.seq_len, cfg.seed)
    micro = p.batch_size // p.grad_accum
    batches = [[sampler.global_batch(0, s, m, micro).to(device) for m in range(p.grad_accum)] for s in range(p.num_steps())]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    times = []
    for step in range(p.num_steps()):
        t0 = time.perf_counter()
        for b in batches[step]:
            with autocast:
                _, loss = model(b.x, b.y)
            (loss / p.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss.item()  # a loop that logs its loss syncs once per step too
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def ours(cfg: TrainConfig, corpus, hooks) -> list[float]:
    with tempfile.TemporaryDirectory() as d:
        train(cfg, d + "/run", hooks=hooks, corpus=corpus, progress=False)
        m = load_run(d + "/run").metrics
        return list(m["perf/step_time_s"].dropna())


def main(argv=None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hooks", choices=["none", "default"], default="none")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    cfg = make_config(args)
    corpus = default_corpus()
    warm = 3  # drop the first steps of each run (allocator warm-up, lazy RoPE cache)
    plain_t, ours_t = [], []
    for r in range(args.rounds):
        plain_t += plain_loop(cfg, corpus, device)[warm:]
        ours_t += ours(cfg, corpus, [] if args.hooks == "none" else None)[warm:]
    tok = args.batch_size * args.seq_len
    tp, to = statistics.median(plain_t), statistics.median(ours_t)
    ratio = tp / to
    print(f"preset {args.preset} on {device}: {args.batch_size} x {args.seq_len} tokens/step, grad_accum {args.grad_accum}, "
          f"{args.rounds} rounds x {args.steps} steps (first {warm} dropped)")
    print(f"  plain loop   median step {tp * 1e3:8.2f} ms   {tok / tp / 1e3:8.2f}k tokens/s")
    print(f"  midtrain     median step {to * 1e3:8.2f} ms   {tok / to / 1e3:8.2f}k tokens/s   (hooks: {args.hooks})")
    print(f"  throughput ratio midtrain/plain = {ratio:.3f}   (goal >= 0.90)")
    return ratio


if __name__ == "__main__":
    main()
