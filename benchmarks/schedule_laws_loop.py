"""Schedule laws on the built-in loop's own runs: fitted on a constant-LR run and a cosine run, does the
joint fit predict a WSD run? (issue 12: a mean relative error of at most 1%.)

    python benchmarks/schedule_laws_loop.py                  # 3 runs of 300 steps, small model (~3-5 min, 1 core)
    python benchmarks/schedule_laws_loop.py --steps 120      # a smaller budget

Three runs of the built-in loop (``midtrain.loop.train``, CPU, no hooks), identical but for the LR schedule of
their one phase: ``constant`` (warmup, then the peak), ``cosine`` (warmup, then cosine to 10% of the peak over
the rest) and ``wsd`` (warmup, the peak, the last ``--decay-fraction`` decaying ``--shape`` to 10% of the
peak). Same seed: the same initial weights and the same batches in the same order, so the batch-to-batch
noise of ``train/loss`` is common to the three curves. ``fit_schedule_law`` is fitted jointly on the
constant and cosine runs' ``train/loss`` (every step after the warmup, per-update LRs rebuilt from the
config by ``diagnostics.recommend.schedule_of``) and predicts the WSD run at its logged steps. Printed per
law (and protocol), once for each ``--fit-from`` start (the first steps of a short run fall faster than
any of the laws' power laws allow, so the fit is also shown without them): the mean relative error over the
WSD run's steps from that start, over its decay only,
and of a moving average of the logged loss (``--smooth`` steps, centred) that takes most of the
single-batch noise out of the comparison; and the final loss predicted vs measured (mean of the last
``--smooth`` steps). The noise floor line is the mean relative deviation of the logged loss from that
moving average. Nothing is asserted; ``tests/diagnostics/test_schedule_laws_loop.py`` runs a smaller budget.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

FITS = (("annealing", "least_squares"), ("multi_power", "least_squares"), ("multi_power", "luo2025"),
        ("auto", "least_squares"))


def config(shape: str, steps: int, *, warmup: int, lr: float, decay_fraction: float, wsd_shape: str, seed: int,
           batch: int, seq: int, n_layer: int, n_embd: int):
    from midtrain.config import Phase, TrainConfig

    decay = {"constant": dict(decay="constant"),
             "cosine": dict(decay="cosine", decay_fraction=1.0, final_lr=0.1 * lr),
             "wsd": dict(decay=wsd_shape, decay_fraction=decay_fraction, final_lr=0.1 * lr)}[shape]
    cfg = TrainConfig(phases=[Phase(name=shape, steps=steps, lr=lr, warmup_steps=warmup, batch_size=batch,
                                    seq_len=seq, mixture={"prose": 0.6, "code": 0.25, "math": 0.15}, **decay)])
    cfg.seed, cfg.device, cfg.dtype = seed, "cpu", "float32"
    cfg.model.preset, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = "tiny", n_layer, 4, n_embd
    cfg.eval_every = cfg.checkpoint_every = steps       # evaluation and checkpoints only at the end
    cfg.log_every = max(1, steps // 4)
    return cfg


def run_curves(out: str, steps: int, **kw):
    """Train the three runs under ``out``: {shape: (lrs, steps, losses)} of ``train/loss`` after the warmup."""
    from diagnostics.recommend import schedule_of
    from diagnostics.runs import load_run
    from midtrain.loop import train

    curves = {}
    for shape in ("constant", "cosine", "wsd"):
        cfg = config(shape, steps, **kw)
        d = os.path.join(out, shape)
        if not os.path.exists(os.path.join(d, "run.json")):
            t = time.perf_counter()
            train(cfg, d, hooks=[], progress=False)
            print(f"  trained {shape}: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        run = load_run(d)
        rows = run.metrics[["step", "train/loss"]].dropna()
        s = rows["step"].to_numpy(dtype=np.int64)
        y = rows["train/loss"].to_numpy(dtype=np.float64)
        keep = s > kw["warmup"]
        curves[shape] = (schedule_of(run.config).lrs, s[keep], y[keep])
    return curves


def moving_average(y: np.ndarray, w: int) -> np.ndarray:
    """Centred moving average over ``w`` steps (shorter windows at the ends)."""
    c = np.cumsum(np.r_[0.0, y])
    i = np.arange(len(y))
    lo, hi = np.maximum(0, i - w // 2), np.minimum(len(y), i + w // 2 + 1)
    return (c[hi] - c[lo]) / (hi - lo)


def evaluate(curves, smooth: int, fits=FITS, fit_from: int = 0) -> list[dict]:
    """Fit on the constant and cosine runs' losses at steps >= ``fit_from`` (and after the warmup); errors
    on the WSD run at the same steps."""
    from diagnostics.schedule import fit_schedule_law, relative_error

    cut = {k: (lrs, s[s >= fit_from], y[s >= fit_from]) for k, (lrs, s, y) in curves.items()}
    lrs, s, y = cut["wsd"]
    ma = moving_average(curves["wsd"][2], smooth)[curves["wsd"][1] >= fit_from]   # smoothed before the cut
    decaying = lrs[s - 1] < lrs.max()
    out = []
    for law, how in fits:
        t = time.perf_counter()
        fit = fit_schedule_law([cut["constant"], cut["cosine"]], law=law, protocol=how)
        sec = time.perf_counter() - t
        pred = fit.predict(lrs, steps=s)
        e = relative_error(pred, y)
        out.append(dict(law=law if law != "auto" else f"auto (chose {fit.law})", protocol=how, sec=sec,
                        mre=float(e.mean()), mre_decay=float(e[decaying].mean()),
                        mre_smooth=float(relative_error(pred, ma).mean()),
                        final_pred=float(pred[-smooth:].mean()), final=float(y[-smooth:].mean())))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--decay-fraction", type=float, default=0.2)
    ap.add_argument("--shape", default="1-sqrt", help="the WSD run's decay shape")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-embd", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smooth", type=int, default=11)
    ap.add_argument("--fit-from", default="0,0.33", help="fractions of the run: fit (and compare) from these steps on; "
                    "0 = right after the warmup")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="folder for the three runs (reused when they exist); default a temp dir")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="schedule_laws_loop-")
    kw = dict(warmup=args.warmup, lr=args.lr, decay_fraction=args.decay_fraction, wsd_shape=args.shape,
              seed=args.seed, batch=args.batch, seq=args.seq, n_layer=args.n_layer, n_embd=args.n_embd)
    print(f"== built-in loop, CPU, {args.threads} thread(s): 3 runs x {args.steps} steps (warmup {args.warmup}, "
          f"peak {args.lr}, batch {args.batch} x {args.seq} tokens, {args.n_layer} layers x {args.n_embd}, seed "
          f"{args.seed}); WSD: last {args.decay_fraction:.0%} {args.shape} to 10%; runs in {out}", flush=True)
    curves = run_curves(out, args.steps, **kw)
    y = curves["wsd"][2]
    floor = float(np.mean(np.abs(y - moving_average(y, args.smooth)) / moving_average(y, args.smooth)))
    print(f"  noise floor: the WSD run's logged loss vs its {args.smooth}-step moving average, mean relative "
          f"deviation {100 * floor:.2f}%")
    for frac in (float(f) for f in args.fit_from.split(",")):
        start = max(args.warmup + 1, int(round(frac * args.steps)))
        print(f"  -- fitted on steps >= {start} ({frac:.0%} of the run; errors at the same steps of the WSD run)")
        print(f"  {'law':<28} {'protocol':<14} {'MRE':>7} {'decay':>7} {'smooth':>7}  {'final pred/meas':>16} {'fit':>6}")
        for r in evaluate(curves, args.smooth, fit_from=start):
            print(f"  {r['law']:<28} {r['protocol']:<14} {100 * r['mre']:6.2f}% {100 * r['mre_decay']:6.2f}% "
                  f"{100 * r['mre_smooth']:6.2f}%  {r['final_pred']:7.3f}/{r['final']:7.3f} {r['sec']:5.1f}s")


if __name__ == "__main__":
    main()
