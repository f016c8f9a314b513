"""RepresentationProbe cost, amortised over training, and our TwoNN against scikit-dimension's.

    python benchmarks/probe_cost.py                     # small preset, CPU (a few minutes on 2 cores)
    python benchmarks/probe_cost.py --preset tiny       # the default `midtrain train` model
    python benchmarks/probe_cost.py --threads 1         # steadier numbers on a shared CPU
    python benchmarks/probe_cost.py --device cuda

Everything runs in this one process, inside the built-in loop itself (``midtrain.loop.train`` on the
default recipe's first phase, batch 16 x 128 tokens), with the probe scheduled every 2nd step so that
probe and training steps interleave and see the same machine load:

1. the probe the loop attaches by default (``midtrain.hookset``: 4 sequences per domain,
   max_tokens 512, info plane on 256 of them);
2. the issue's case: one probe of every block (``blocks.<i>.resid_post`` + ``final_norm``) at
   N = ``--tokens`` (2048) tokens -- just enough probe sequences per domain to hold N valid positions
   (6 of 128 tokens: 2304 tokens forwarded) -- all metrics, info plane on 512 of them.

From each run: the median training step (``perf/step_time_s``, which excludes the hooks) and the
median probe (``repr/probe_time_s``). Three amortised costs, probe time / training time:

- **at the default interval** (the issue's 3 % goal): one probe every ``eval_every`` = 100 steps,
  the loop's default ``[monitor.representation] every``: probe / (100 x step). This is what a long
  run pays;
- over the whole default schedule of the 400-step demo recipe: step 0, every 100 steps and the
  log-spaced early steps 1, 2, 4, ..., 64 (11 probes, 7 of them log-spaced);
- the same schedule over a 10 000-step run (107 probes).

The probe's forward pass alone (eval mode, no_grad) is timed next to a training-mode forward of the
same tokens (autograd on, as in a training step, no backward), and the metric math is broken down
per site in-process on one thread (pooled + per-domain spectra, TwoNN, information plane, readout).

3. ``diagnostics.representation.twonn_dimension`` against ``skdim.id.TwoNN`` (scikit-dimension, in the
   ``dev`` extra) on the probe's own activations (2048 tokens), alternating: time ratio and both
   estimates. dadapy pins numpy < 2, so it is reported as skipped next to numpy 2
   (docs/representation.md, "Test-only dependencies").
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnostics.runs import load_run  # noqa: E402
from diagnostics.representation import (  # noqa: E402
    grouped_representation_metrics,
    information_plane,
    readout_loss,
    twonn_dimension,
)
from hooks.representation import RepresentationProbe  # noqa: E402
from midtrain.config import default_config  # noqa: E402
from midtrain.data import default_corpus  # noqa: E402
from midtrain.hookset import build_hooks  # noqa: E402
from midtrain.distributed import resolve_device  # noqa: E402
from midtrain.loop import train  # noqa: E402

GOAL = 0.03  # the issue: amortised cost at the default interval at most 3 % of training time


def loop_with_probe(cfg, corpus, probe_opts: dict, steps: int) -> tuple[float, float, RepresentationProbe]:
    """Run the built-in loop with only the representation probe, every 2nd step.

    Returns (median step time, median probe time, the probe hook rebuilt on the trained model)."""
    c = copy.deepcopy(cfg)
    c.phases = [c.phases[0]]
    c.phases[0].steps, c.phases[0].warmup_steps = steps, 0
    c.eval_every = c.checkpoint_every = 10**9
    c.data.eval_batches = 1
    c.monitor.gns = {"enabled": False}
    c.monitor.difficulty = {"enabled": False}
    c.monitor.representation = {"every": 2, "log_spaced_until": 0, **probe_opts}
    with tempfile.TemporaryDirectory() as tmp:
        res = train(c, str(Path(tmp) / "run"), corpus=corpus, progress=False, strict_hooks=True)
        m = load_run(Path(tmp) / "run").metrics
    step_s = float(m["perf/step_time_s"].iloc[1:].median())  # the first step warms up
    probe_s = float(m["repr/probe_time_s"].dropna().iloc[1:].median())
    (hook,) = build_hooks(c, res.model, corpus)
    hook.attach(res.model, None)
    return step_s, probe_s, hook


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first call warms up


def forward_times(hook: RepresentationProbe, repeats: int) -> tuple[float, float]:
    """(probe-style forward: eval + no_grad, training-style forward: train mode + autograd, no backward)."""
    model = hook.model
    device = next(model.parameters()).device
    args = [[a.to(device) for a in job.args] for job in hook.jobs]

    def probe_fwd():
        with torch.no_grad():
            for a in args:
                model(*a)

    def train_fwd():
        for a in args:
            logits, _ = model(*a)
            del logits

    model.eval()
    t_probe = _median_time(probe_fwd, repeats)
    model.train()
    t_train = _median_time(train_fwd, repeats)
    return t_probe, t_train


def capture(hook: RepresentationProbe, site: str) -> torch.Tensor:
    """The probe's (N, D) float64 subsample of one site, as the hook sees it."""
    device = next(hook.model.parameters()).device
    parts = []
    for job in hook.jobs:
        h = hook.model.get_submodule(site).register_forward_hook(
            lambda mod, i, o, job=job: parts.append(o.detach().reshape(-1, o.shape[-1])[job.rows.to(o.device)]))
        hook.model.eval()
        with torch.no_grad():
            hook.model(*[a.to(device) for a in job.args])
        h.remove()
    hook.model.train()
    return torch.cat(parts).double().cpu()


def metric_breakdown(hook: RepresentationProbe, Z: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of each part of one site's metric math, one thread (as metric_threads=1)."""
    sel = hook._mi_rows
    x = torch.cat([j.x_label for j in hook.jobs])[sel]
    y = torch.cat([j.y for j in hook.jobs])
    dom = torch.cat([j.domain for j in hook.jobs])
    norm, head = hook._readout
    cache: dict = {}
    information_plane(x, Z[sel], y[sel], kernel_x="onehot", cache=cache)  # X, Y: once per probe
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        parts = {  # as RepresentationProbe._finalize / _readout_chunk compute them
            "spectra (pooled + per domain)": lambda: grouped_representation_metrics(Z, dom, twonn=False),
            "TwoNN": lambda: twonn_dimension(Z),
            "info plane": lambda: information_plane(x, Z[sel], y[sel], kernel_x="onehot", cache=cache),
            "readout": lambda: readout_loss(Z.float(), y, head.weight, norm=norm, reduction="none"),
        }
        return {k: _median_time(f, repeats) for k, f in parts.items()}
    finally:
        torch.set_num_threads(old)


def n_probes(total_steps: int, every: int = 100) -> int:
    """Probes of the default schedule (step 0, every `every`, log-spaced below it) in total_steps."""
    return sum(1 for s in range(total_steps) if s % every == 0 or (s < every and (s & (s - 1)) == 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=9, help="training steps per measuring run (probes on every 2nd)")
    ap.add_argument("--tokens", type=int, default=2048, help="N of the every-block probe")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = resolve_device(args.device)
    corpus = default_corpus()
    cfg = default_config()
    cfg.model.preset = args.preset
    cfg.device = str(device)
    p0 = cfg.phases[0]
    every = cfg.eval_every  # the loop's default [monitor.representation] every
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads (metric math on 1), device {device}, "
          f"preset {args.preset}, training batch {p0.batch_size} x {p0.seq_len} tokens, "
          f"default probe interval every = eval_every = {every} steps")

    n_dom = len(corpus.names())
    n_seq_big = math.ceil(math.ceil(args.tokens / n_dom) / (p0.seq_len - 1))  # valid positions: seq_len - 1
    issue_label = f"every block, N = {args.tokens}" + (" (the issue's case)" if args.preset == "small" else "")
    rows = []
    for label, opts in [("default probe", {}),
                        (issue_label, {"probe_sequences": n_seq_big, "max_tokens": args.tokens,
                                       "info_plane_tokens": 512})]:
        step_s, probe_s, hook = loop_with_probe(cfg, corpus, opts, args.steps)
        fwd_s, train_fwd_s = forward_times(hook, args.repeats)
        n_fwd = sum(int(j.args[0].numel()) for j in hook.jobs)
        n_rows = sum(int(j.rows.numel()) for j in hook.jobs)
        print(f"\n[{label}] {len(hook.sites)} sites ({hook.sites[0]}, ..., {hook.sites[-1]}), forward over {n_fwd} "
              f"tokens, N = {n_rows} probed, info plane on {hook.info_plane_tokens}")
        print(f"  in the loop: training step {step_s:.3f} s, probe {probe_s:.3f} s "
              f"(forward alone {fwd_s:.3f} s, metric math ~{max(probe_s - fwd_s, 0):.3f} s)")
        print(f"  probe forward (eval, no_grad) {fwd_s:.3f} s vs a training-mode forward of the same tokens "
              f"(autograd on, no backward) {train_fwd_s:.3f} s: ratio {fwd_s / train_fwd_s:.2f}")
        site = hook.sites[len(hook.sites) // 2]
        parts = metric_breakdown(hook, capture(hook, site), args.repeats)
        print(f"  metric math of one site ({site}), 1 thread: "
              + ", ".join(f"{k} {v:.3f} s" for k, v in parts.items())
              + f"; total {sum(parts.values()):.3f} s x {len(hook.sites)} sites = {sum(parts.values()) * len(hook.sites):.2f} s")
        at_interval = probe_s / (every * step_s)
        verdict = ("" if label != issue_label or args.preset != "small"
                   else f"  -> {'meets' if at_interval <= GOAL else 'MISSES'} the issue's 3 % goal")
        print(f"  at the default interval (1 probe / {every} steps): probe / training time = {at_interval:6.2%}{verdict}")
        for total in (cfg.total_steps(), 10_000):
            k = n_probes(total, every)
            print(f"  whole default schedule, {total:>6} steps, {k:>3} probes (step 0, every {every}, log-spaced "
                  f"below): probe / training time = {k * probe_s / (total * step_s):6.2%}")
        rows.append((label, hook))

    # TwoNN vs scikit-dimension (and dadapy), alternating
    hook = rows[-1][1]
    site = hook.sites[len(hook.sites) // 2]
    X = capture(hook, site)
    torch.set_num_threads(1)  # as the probe's metric math (metric_threads=1); skdim's search is single-threaded
    ours = twonn_dimension(X)
    print(f"\n[TwoNN] {tuple(X.shape)} activations of {site} (trained {args.steps} steps), one thread: ours d = {ours:.2f}")
    try:
        import skdim

        Xn = X.numpy()
        est = skdim.id.TwoNN().fit(Xn).dimension_
        t_ours, t_sk = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            twonn_dimension(X)
            t_ours.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            skdim.id.TwoNN().fit(Xn)
            t_sk.append(time.perf_counter() - t0)
        a, b = statistics.median(t_ours), statistics.median(t_sk)
        print(f"  ours {a:.3f} s; scikit-dimension {skdim.__version__} d = {est:.2f} in {b:.3f} s "
              f"-> skdim / ours time = {b / a:.2f}x")
    except ImportError:
        print("  scikit-dimension: skipped (not installed; pip install -e '.[dev]')")
    try:
        from dadapy import Data

        t0 = time.perf_counter()
        d_est = Data(X.numpy()).compute_id_2NN()[0]
        print(f"  dadapy: d = {d_est:.2f} in {time.perf_counter() - t0:.3f} s")
    except ImportError:
        print("  dadapy: skipped (it pins numpy < 2; docs/representation.md, 'Test-only dependencies')")


if __name__ == "__main__":
    main()
