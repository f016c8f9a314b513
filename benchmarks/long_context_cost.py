"""The cost of the evaluation at every length (``midtrain.evaluate``) against the default run's training time.

    python benchmarks/long_context_cost.py               # tiny preset, default recipe, CPU (a minute or two)
    python benchmarks/long_context_cost.py --threads 1   # steadier numbers on a shared CPU
    python benchmarks/long_context_cost.py --eval-lengths 512 --every 10   # a denser, longer evaluation

Everything runs in this one process on the default recipe's model (``tiny``) and data, timings interleaved
so that both sides see the same machine load:

1. training time: the median optimizer step (forward, backward, clipping, AdamW; no hooks) of each phase of
   the default recipe at its own batch and sequence length, times the phase's steps, summed (the run's
   training time without its measurements);
2. the extra cost of the evaluation at every length: at a step where it is due (a phase boundary, the final
   step, every ``[data] eval_lengths_every``) the loop evaluates every length instead of only ``val/`` at L0
   (which the loop did at those steps before): extra = median (every length) - median (L0 only);
3. how many such steps the schedule has (the default: the two phase boundaries and the final step).

4. the retrieval probe (``[monitor.retrieval]`` as ``midtrain.hookset`` builds it for the recipe: its lengths,
   keys and depths) at each step of ``midtrain.hookset.retrieval_schedule``, timed interleaved the same way.

Printed: each part x its count / training time, and the two together: the issue's goal is at most 3% for
probing at 256 tokens (``benchmarks/retrieval_cost.py`` times the probe inside a real loop run instead).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as is)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions of each side")
    ap.add_argument("--eval-lengths", default="", help="extra lengths, comma-separated ([data] eval_lengths)")
    ap.add_argument("--every", type=int, default=0, help="[data] eval_lengths_every (0: boundaries and the end)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from midtrain import data as data_mod
    from midtrain.checkpoint import model_config
    from midtrain.config import default_config
    from midtrain.evaluate import Evaluator, evaluate, eval_lengths
    from midtrain.hookset import build_retrieval_probe, retrieval_schedule
    from midtrain.model import GPT

    cfg = default_config()
    cfg.data.eval_lengths = [int(x) for x in args.eval_lengths.split(",") if x.strip()]
    cfg.data.eval_lengths_every = args.every
    corpus = data_mod.default_corpus()
    mcfg = model_config(cfg, corpus.vocab_size)
    cfg.validate(domains=corpus.names(), max_seq_len=mcfg.block_size)
    torch.manual_seed(0)
    model = GPT(mcfg)
    opt = model.configure_optimizer(weight_decay=0.1, lr=1e-4, betas=(0.9, 0.95), device_type="cpu")
    ev = Evaluator(cfg, corpus)
    retrieval = build_retrieval_probe(dict(cfg.monitor.retrieval or {}), cfg, model, corpus)  # None: no long phase
    if retrieval is not None:
        retrieval.attach(model, None)
    dev, ctx = torch.device("cpu"), contextlib.nullcontext()

    def train_step(pi, phase, sampler, step):
        model.train()
        t0 = time.perf_counter()
        for micro in range(phase.grad_accum):
            b = sampler.global_batch(pi, step, micro, phase.batch_size // phase.grad_accum)
            _, loss = model(b.x, b.y)
            (loss / phase.grad_accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def timed(fn):
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    step_times, full, plain, probe = {}, [], [], []
    for pi, phase in enumerate(cfg.phases):
        sampler = data_mod.MixtureSampler(corpus, phase.mixture, phase.seq_len, cfg.seed)
        train_step(pi, phase, sampler, 0)  # warm-up
        step_times[phase.name] = []
        for r in range(args.repeats):  # interleaved: a training step, the full evaluation, the L0 one
            step_times[phase.name].append(train_step(pi, phase, sampler, r + 1))
            full.append(timed(lambda: ev(model, 1, dev, ctx, None, final=True)))
            plain.append(timed(lambda: evaluate(model, ev.val, dev, ctx)))
            if retrieval is not None:
                probe.append(timed(lambda: retrieval.probe()))
    train_s = sum(statistics.median(step_times[p.name]) * p.num_steps() for p in cfg.phases)
    total = cfg.total_steps()
    count = sum(1 for s in range(total) if ev.lengths_due(s)) + 1  # + the final step
    extra = max(0.0, statistics.median(full) - statistics.median(plain))
    print(f"torch threads {torch.get_num_threads()}; lengths {eval_lengths(cfg)} (evaluated: L0 + {sorted(ev.longer)}); "
          f"eval_lengths_every {cfg.data.eval_lengths_every}")
    for p in cfg.phases:
        print(f"  phase {p.name:<13} {p.num_steps():>4} steps x median step {statistics.median(step_times[p.name]):.4f} s "
              f"(batch {p.batch_size} x {p.seq_len})")
    print(f"training time (no hooks, estimated): {train_s:.1f} s")
    print(f"evaluation at a due step: every length {statistics.median(full):.3f} s, L0 only {statistics.median(plain):.3f} s, "
          f"extra {extra:.3f} s")
    print(f"due steps in the schedule: {count}; extra in all: {extra * count:.2f} s")
    print(f"ratio (extra / training time): {extra * count / train_s:.2%}")
    n_probe = len(retrieval_schedule(cfg)[1]) if retrieval is not None else 0
    probe_s = statistics.median(probe) if probe else 0.0
    print(f"retrieval probe: {probe_s:.3f} s each (lengths {getattr(retrieval, 'lengths', [])}), "
          f"{n_probe} in the schedule: {probe_s * n_probe:.2f} s, ratio {probe_s * n_probe / train_s:.2%}")
    print(f"ratio, both (evaluation at every length + retrieval probe) / training time: "
          f"{(extra * count + probe_s * n_probe) / train_s:.2%}  (goal: <= 3%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
