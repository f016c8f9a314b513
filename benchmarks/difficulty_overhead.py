"""Overhead of the DifficultyTracker in the built-in loop: throughput with vs without it.

The loop computes per-example losses anyway (``reduction="none"``), so the tracker's cost is
its bookkeeping (one device->host copy per step, the vectorised per-example table, per-domain
EMAs, a learnability regression every ``stats_every`` steps) plus the probe forward passes
every ``probe_every`` (= ``eval_every``) steps. Other hooks are off in both arms.

    python benchmarks/difficulty_overhead.py --threads 1        # tiny preset, CPU, a few minutes
    python benchmarks/difficulty_overhead.py --device cuda --preset small --steps 400

Prints tokens/s of each arm (median over interleaved repeats), the A/B ratio = time with
tracker / time without, and the in-run ratio = loop time / (loop time - time inside the
tracker's events) of the same runs, which a busy machine disturbs far less (target <= 1.02);
plus the hook's own cost per step measured in isolation (no model).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hooks.difficulty import DifficultyTracker  # noqa: E402
from midtrain import hookset  # noqa: E402
from midtrain.config import default_config  # noqa: E402
from midtrain.data import default_corpus  # noqa: E402
from midtrain.loop import train  # noqa: E402


def config(args, with_tracker: bool):
    cfg = default_config().scaled_to(args.steps)
    args.tokens = sum(p.num_steps() * p.batch_size * p.seq_len for p in cfg.phases)
    cfg.device, cfg.seed = args.device, 0
    cfg.model.preset = args.preset
    cfg.eval_every = args.eval_every
    cfg.checkpoint_every = 10**9
    for name in hookset._BUILDERS:  # only the tracker, and only in one arm
        setattr(cfg.monitor, name, {"enabled": False} if name != "difficulty" else {"enabled": with_tracker})
    return cfg


def _timed(tracker: DifficultyTracker) -> list[float]:
    """Wrap the tracker's event handlers with wall-clock timers; returns the accumulator."""
    spent = [0.0]
    for event in ("on_backward_end", "on_step_end"):
        fn = getattr(tracker, event)

        def wrapped(*a, _fn=fn, **kw):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        setattr(tracker, event, wrapped)  # the Monitor looks events up on the instance
    return spent


def run_once(args, corpus, with_tracker: bool) -> tuple[float, float]:
    """(tokens/s of the loop, seconds spent inside the tracker's events)."""
    cfg = config(args, with_tracker=False)
    hooks, spent = [], [0.0]
    if with_tracker:  # the built-in loop's own registration, timed
        _, build = hookset._BUILDERS["difficulty"]
        tracker = build({}, cfg, None, corpus)
        spent = _timed(tracker)
        hooks = [tracker]
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, os.path.join(d, "run"), corpus=corpus, progress=False, strict_hooks=True, hooks=hooks)
    return res.tokens_per_s, spent[0]


def hook_only(steps: int = 2000, batch: int = 16, domains: int = 3) -> float:
    """ms per step of the tracker's bookkeeping alone (no probes, no model)."""
    g = torch.Generator().manual_seed(0)
    data = [(torch.randint(0, 20_000, (batch,), generator=g) * 129, torch.randint(0, domains, (batch,), generator=g),
             torch.rand(batch, generator=g) * 3) for _ in range(steps)]
    tr = DifficultyTracker(domain_names=[f"d{i}" for i in range(domains)])
    t0 = time.perf_counter()
    for s, (ids, doms, losses) in enumerate(data):
        tr.on_backward_end(batch, losses=losses, ids=ids, domains=doms)
        tr.on_step_end(s, {"train/tokens": (s + 1) * batch * 128})
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--eval-every", type=int, default=100, help="also the probe interval (as in the loop's default)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default); 1 is "
                    "steadier on a shared CPU")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = default_corpus()
    run_once(argparse.Namespace(**{**vars(args), "steps": 6}), corpus, True)  # warm-up: caches, allocator
    base, with_t, accounted = [], [], []
    for r in range(args.repeats):  # interleaved, so drifts in machine load hit both arms
        tps, _ = run_once(args, corpus, False)
        base.append(tps)
        tps, spent = run_once(args, corpus, True)
        with_t.append(tps)
        loop_s = args.tokens / tps
        accounted.append(loop_s / max(loop_s - spent, 1e-9))
        print(f"repeat {r}: without {base[-1]:,.0f} tok/s, with {with_t[-1]:,.0f} tok/s; tracker events took "
              f"{spent:.2f}s of the {loop_s:.1f}s loop", flush=True)
    b, w = statistics.median(base), statistics.median(with_t)
    print(f"\n{args.preset}, {args.device}, {args.steps} steps, probes every {args.eval_every} steps")
    print(f"without tracker: {b:,.0f} tokens/s   with tracker: {w:,.0f} tokens/s")
    print(f"hook bookkeeping alone: {hook_only():.3f} ms/step (batch 16, 3 domains, no model)")
    print(f"ratio A/B (time with / time without, medians)          = {b / w:.4f}")
    print(f"ratio in-run (loop time / loop time minus tracker time) = {statistics.median(accounted):.4f}"
          "   target <= 1.02")
    print("(the A/B ratio is only as steady as the machine; the in-run ratio times the tracker inside the same run)")


if __name__ == "__main__":
    main()
