"""Overhead of the DifficultyTracker in the built-in loop: throughput with vs without it.

The loop computes per-example losses anyway (``reduction="none"``), so the tracker's cost is
its bookkeeping (queueing each micro-batch's losses, ids and domains on the device; every
``stats_every`` steps one device->host copy, the vectorised per-example table update, per-domain
EMAs and a learnability regression) plus the probe forward passes every ``probe_every``
(= ``eval_every``) steps. Other hooks are off in both arms.

    python benchmarks/difficulty_overhead.py --threads 1        # tiny preset, CPU, a few minutes
    python benchmarks/difficulty_overhead.py --device cuda --preset small --steps 400

Prints tokens/s of each arm (median over interleaved repeats), the A/B ratio = time with
tracker / time without, and the in-run ratio = loop time / (loop time - time inside the
tracker) of the same runs, which a busy machine disturbs far less (target <= 1.02). "Inside the
tracker" is every call the Monitor and the loop make into it (events, probe scoring at its
interval, state_dict at checkpoints, saving), split into probe scoring and bookkeeping; plus the
bookkeeping's cost per step measured in isolation (no model, CPU time).
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


_ENTRY_POINTS = ("attach", "scheduled", "on_step_begin", "on_backward_end", "on_grads_ready", "on_step_end",
                 "state_dict", "save", "detach")


def _timed(tracker: DifficultyTracker) -> dict[str, float]:
    """Wrap every method the Monitor and the loop call on the tracker with wall-clock timers (only the
    outermost call counts, so save() inside on_step_end is not counted twice), and the probe scoring
    (``_measure_probe``, run from on_step_begin on probe steps) separately. Returns the accumulator {"total": s, "probe": s, "probes": n}."""
    spent = {"total": 0.0, "probe": 0.0, "probes": 0}
    depth = [0]

    def wrap(fn, key):
        def wrapped(*a, **kw):
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                depth[0] -= 1
                dt = time.perf_counter() - t0
                if key == "probe":
                    spent["probe"] += dt
                    spent["probes"] += 1
                elif depth[0] == 0:
                    spent["total"] += dt
        return wrapped

    for name in _ENTRY_POINTS:
        setattr(tracker, name, wrap(getattr(tracker, name), "total"))  # the Monitor looks events up on the instance
    tracker._measure_probe = wrap(tracker._measure_probe, "probe")
    return spent


def run_once(args, corpus, with_tracker: bool) -> tuple[float, dict[str, float]]:
    """(tokens/s of the loop, seconds spent inside the tracker: {"total", "probe", "probes"})."""
    cfg = config(args, with_tracker=False)
    hooks, spent = [], {"total": 0.0, "probe": 0.0, "probes": 0}
    if with_tracker:  # the built-in loop's own registration, timed
        _, build = hookset._BUILDERS["difficulty"]
        tracker = build({}, cfg, None, corpus)
        spent = _timed(tracker)
        hooks = [tracker]
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = train(cfg, os.path.join(d, "run"), corpus=corpus, progress=False, strict_hooks=True, hooks=hooks)
    return res.tokens_per_s, spent


def hook_only(steps: int = 2000, batch: int = 16, micro: int = 2, domains: int = 3, repeats: int = 3) -> float:
    """ms of CPU time per step of the tracker's bookkeeping alone (no probes, no model): ``micro``
    micro-batches per step, as in the default recipe; the best of ``repeats``."""
    g = torch.Generator().manual_seed(0)
    b = batch // micro
    data = [[(torch.randint(0, 20_000, (b,), generator=g) * 129, torch.randint(0, domains, (b,), generator=g),
              torch.rand(b, generator=g) * 3) for _ in range(micro)] for _ in range(steps)]
    best = float("inf")
    for _ in range(repeats):
        tr = DifficultyTracker(domain_names=[f"d{i}" for i in range(domains)])
        t0 = time.process_time()
        for s, micros in enumerate(data):
            for ids, doms, losses in micros:
                tr.on_backward_end(b, losses=losses, ids=ids, domains=doms)
            tr.on_step_end(s, {"train/tokens": (s + 1) * batch * 128})
        tr.state_dict()  # the last queued steps are applied too
        best = min(best, (time.process_time() - t0) / steps * 1e3)
    return best


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
    base, with_t, accounted, probe_share, book_share, per_probe, book_ms = [], [], [], [], [], [], []
    for r in range(args.repeats):  # interleaved, so drifts in machine load hit both arms
        tps, _ = run_once(args, corpus, False)
        base.append(tps)
        tps, spent = run_once(args, corpus, True)
        with_t.append(tps)
        loop_s = args.tokens / tps
        inside = spent["total"]  # the probe is scored inside on_step_begin: its time is part of the total
        bookkeeping = inside - spent["probe"]
        rest = max(loop_s - inside, 1e-9)  # the loop's own time
        accounted.append(loop_s / rest)
        probe_share.append(spent["probe"] / rest)
        book_share.append(bookkeeping / rest)
        per_probe.append(spent["probe"] / max(spent["probes"], 1))
        book_ms.append(bookkeeping / args.steps * 1e3)
        print(f"repeat {r}: without {base[-1]:,.0f} tok/s, with {with_t[-1]:,.0f} tok/s; inside the tracker "
              f"{inside:.2f}s of the {loop_s:.1f}s loop ({spent['probes']} probe scorings {spent['probe']:.2f}s, "
              f"bookkeeping {bookkeeping:.2f}s)", flush=True)
    b, w = statistics.median(base), statistics.median(with_t)
    med = statistics.median
    print(f"\n{args.preset}, {args.device}, {args.steps} steps, probes every {args.eval_every} steps")
    print(f"without tracker: {b:,.0f} tokens/s   with tracker: {w:,.0f} tokens/s")
    print(f"in the loop: probe scoring {med(per_probe) * 1e3:.0f} ms per probe = {100 * med(probe_share):.2f}% of the "
          f"loop's time; bookkeeping {med(book_ms):.3f} ms/step = {100 * med(book_share):.2f}%")
    print(f"bookkeeping alone: {hook_only():.3f} ms CPU/step (16 sequences in 2 micro-batches, 3 domains, no model)")
    print(f"ratio A/B (time with / time without, medians)          = {b / w:.4f}")
    print(f"ratio in-run (loop time / loop time minus tracker time) = {med(accounted):.4f}"
          "   target <= 1.02")
    print("(the A/B ratio is only as steady as the machine; the in-run ratio times the tracker inside the same run)")


if __name__ == "__main__":
    main()
