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
2. one probe of every block (``blocks.<i>.resid_post`` + ``final_norm``) at N = ``--tokens`` (2048)
   tokens (12 sequences per domain), all metrics, info plane on 512 of them.

From each run: the median training step (``perf/step_time_s``, which excludes the hooks) and the
median probe (``repr/probe_time_s``). Amortised cost = (number of probes the default schedule runs:
step 0, every ``eval_every`` = 100, log-spaced 1, 2, 4, ... below it) x probe / (steps x step), for
the default 400-step recipe and for a 10 000-step run. A forward pass alone over the probe batch
is timed for the split between forward and metric math.

3. ``diagnostics.spectra.twonn_dimension`` against ``skdim.id.TwoNN`` (scikit-dimension, optional)
   on the probe's own activations (2048 tokens), alternating: time ratio and both estimates. dadapy
   is not installable next to numpy >= 2, so it is reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diagnostics.runs import load_run  # noqa: E402
from diagnostics.spectra import twonn_dimension  # noqa: E402
from hooks.representation import RepresentationProbe  # noqa: E402
from midtrain.config import default_config  # noqa: E402
from midtrain.data import default_corpus  # noqa: E402
from midtrain.hookset import build_hooks  # noqa: E402
from midtrain.loop import resolve_device, train  # noqa: E402


def loop_with_probe(cfg, corpus, probe_opts: dict, steps: int) -> tuple[float, float, RepresentationProbe]:
    """Run the built-in loop with only the representation probe, every 2nd step.

    Returns (median step time, median probe time, the probe hook)."""
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
    # the same probe, rebuilt on the trained model, for the forward/metrics split
    (hook,) = build_hooks(c, res.model, corpus)
    hook.attach(res.model, None)
    return step_s, probe_s, hook


def forward_time(hook: RepresentationProbe, repeats: int) -> float:
    model = hook.model
    device = next(model.parameters()).device
    model.eval()
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            for job in hook.jobs:
                model(*[a.to(device) for a in job.args])
            times.append(time.perf_counter() - t0)
    model.train()
    return statistics.median(times[1:])


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, device {device}, preset {args.preset}, "
          f"training batch {p0.batch_size} x {p0.seq_len} tokens")

    rows = []
    n_seq_big = -(-args.tokens // (3 * (p0.seq_len - 1))) * 2  # 2x the valid positions needed
    for label, opts in [("default probe", {}),
                        (f"every block, N = {args.tokens}",
                         {"probe_sequences": n_seq_big, "max_tokens": args.tokens, "info_plane_tokens": 512})]:
        step_s, probe_s, hook = loop_with_probe(cfg, corpus, opts, args.steps)
        fwd_s = forward_time(hook, args.repeats)
        n_fwd = sum(int(j.args[0].numel()) for j in hook.jobs)
        print(f"\n[{label}] {len(hook.sites)} sites ({hook.sites[0]}, ..., {hook.sites[-1]}), forward over {n_fwd} "
              f"tokens, N = {hook.max_tokens}, info plane on {hook.info_plane_tokens}")
        print(f"  in the loop: training step {step_s:.3f} s, probe {probe_s:.3f} s "
              f"(forward alone {fwd_s:.3f} s, metric math ~{max(probe_s - fwd_s, 0):.3f} s)")
        for total in (cfg.total_steps(), 10_000):
            k = n_probes(total, cfg.eval_every)
            print(f"  {total:>6} steps, {k:>3} probes at the default schedule: "
                  f"probe / training time = {k * probe_s / (total * step_s):6.2%}")
        rows.append((label, hook))

    # TwoNN vs scikit-dimension (and dadapy), alternating
    hook = rows[-1][1]
    site = hook.sites[len(hook.sites) // 2]
    Z = {}
    job = hook.jobs[0]
    h = hook.model.get_submodule(site).register_forward_hook(
        lambda mod, i, o: Z.__setitem__("z", o.detach().reshape(-1, o.shape[-1])[job.rows.to(o.device)].double().cpu()))
    hook.model.eval()
    with torch.no_grad():
        hook.model(*[a.to(device) for a in job.args])
    hook.model.train()
    h.remove()
    X = Z["z"]
    ours = twonn_dimension(X)
    print(f"\n[TwoNN] {tuple(X.shape)} activations of {site} (trained {args.steps} steps): ours d = {ours:.2f}")
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
        print("  scikit-dimension: skipped (not installed; pip install scikit-dimension)")
    try:
        from dadapy import Data

        t0 = time.perf_counter()
        d_est = Data(X.numpy()).compute_id_2NN()[0]
        print(f"  dadapy: d = {d_est:.2f} in {time.perf_counter() - t0:.3f} s")
    except ImportError:
        print("  dadapy: skipped (not installable here: it pins numpy < 2)")


if __name__ == "__main__":
    main()
