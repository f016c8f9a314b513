"""Schedule laws on the built-in loop's own runs: fitted on a constant-LR run and a cosine run, does the
joint fit predict a WSD run? (issue 12: a mean relative error of at most 1%.)

    python benchmarks/schedule_laws_loop.py                  # 3 runs of 300 steps, validation loss (~1 min, 1 core)
    python benchmarks/schedule_laws_loop.py --seed 1 --steps 600       # a held-out setting
    python benchmarks/schedule_laws_loop.py --target train   # the per-step train/loss, as before

Three runs of the built-in loop (``midtrain.loop.train``, CPU, no hooks), identical but for the LR schedule of
their one phase: ``constant`` (warmup, then the peak), ``cosine`` (warmup, then cosine to 10% of the peak over
the rest) and ``wsd`` (warmup, the peak, the last ``--decay-fraction`` decaying ``--shape`` to 10% of the
peak). Same seed: the same initial weights and the same batches in the same order, so the WSD run is the
constant run until its decay. ``fit_schedule_law`` is fitted jointly on the constant and cosine runs' losses
after the warmup (per-update LRs rebuilt from the config by ``diagnostics.recommend.schedule_of``) and predicts
the WSD run at the same steps. The losses (``--target``):

- ``val`` (the default): the loop's fixed validation set (``[data]`` eval_batches x eval_batch_size sequences
  per domain at the phase's seq_len; ``--eval-batches`` 16 x 16 x 64 tokens per domain), evaluated every ``--eval-every``
  steps and at the end; the curve is the mixture-weighted mean of ``val/<domain>/loss`` with the training
  mixture's weights (0.6 prose, 0.25 code, 0.15 math), the expected loss the laws model, without the
  batch-to-batch sampling noise of a single training batch. Printed: a bound on the curve's noise from its
  second differences and the set's standard error (per-sequence spread at the last checkpoint).
- ``train``: the per-step single-batch ``train/loss`` (every step); its noise floor (deviation from a
  ``--smooth``-step centred moving average) is 1.3-4%, above the 1% target whatever the law.

Printed per law (and protocol), once for each ``--fit-from`` start: the mean relative error (MRE) over the
WSD run's logged steps from that start, over its decay only, against the moving average (train; for val the
curve itself), and the final loss predicted vs measured (train: mean of the last ``--smooth`` steps; val:
the end evaluation). Beside them, a reference that models no schedule: the constant run's own losses taken
as the WSD run's (``constant_as_prediction``; exact until the decay, so its decay-only error is how much
the decay moved the loss). A law that does not beat it on the decay has not shown it predicts the decay.

Pre-registration (``PREREGISTERED``), round 2: round 1 (``ROUND1``: law ``auto``, fixed on seed 0 at 300
steps) was run on six held-out settings (seeds 1 and 2 at 300 steps, seeds 0 and 1 at 600 steps, 1000 steps
and batch 64 at seed 0) and met 1% on three; those seven settings are now the development set. Round 2's
protocol was fixed from them and committed before any new setting was run, then run unchanged on new
held-out settings: seeds 3, 4, 5 at 300 steps, seeds 3 and 4 at 600 steps, seed 3 at batch 64, seed 3 at
1000 steps. The verdict line is printed for the pre-registered law, protocol and fit start only. Nothing is
asserted here; ``tests/diagnostics/test_schedule_laws_loop.py`` runs a smaller budget.
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

MIXTURE = {"prose": 0.6, "code": 0.25, "math": 0.15}   # the one phase's training mixture
# round 1 (docs/validation.md, "On the built-in loop's own runs"): fixed on seed 0, 300 steps; evaluate every
# 10 steps on 16 x 16 sequences per domain (the set's standard error 0.52% of the loss there, 1.03% with the
# loop's default 4 batches); fit and score from a third of the run on (the first steps of these short runs
# fall faster than the laws allow); the law chosen by fit_schedule_law's leave-one-curve-out error on the two
# fitted curves ("auto"), least_squares. Held out it met 1% on 3 of 6 settings.
ROUND1 = dict(target="val", eval_every=10, eval_batches=16, fit_from=0.33, law="auto", protocol="least_squares")
# round 2, fixed from round 1's seven settings (now the development set) before any new setting was run: the
# same target, evaluation and fit start; the multi-power law with the least_squares protocol. On the seven
# development settings it was the one fit under 1% on every one (MRE 0.43-0.96%, mean 0.66%); the annealing
# law (and "auto", which chose it in 5 of 7) missed on 3 (up to 1.20%) and underestimated the WSD decay's
# gain more; luo2025 failed outright on 2 of 7 (a negative predicted loss at 300 steps). On the real curves
# (docs/validation.md, "Schedule laws on real curves") least_squares is the project's default and the
# multi-power law's WorstE is below the annealing law's at both sizes. The verdict is printed for these only;
# the other rows are context
PREREGISTERED = dict(ROUND1, law="multi_power")
FITS = (("annealing", "least_squares"), ("multi_power", "least_squares"), ("multi_power", "luo2025"),
        ("auto", "least_squares"))


def config(shape: str, steps: int, *, warmup: int, lr: float, decay_fraction: float, wsd_shape: str, seed: int,
           batch: int, seq: int, n_layer: int, n_embd: int, eval_every: int = 0, eval_batches: int = 4):
    from midtrain.config import Phase, TrainConfig

    decay = {"constant": dict(decay="constant"),
             "cosine": dict(decay="cosine", decay_fraction=1.0, final_lr=0.1 * lr),
             "wsd": dict(decay=wsd_shape, decay_fraction=decay_fraction, final_lr=0.1 * lr)}[shape]
    cfg = TrainConfig(phases=[Phase(name=shape, steps=steps, lr=lr, warmup_steps=warmup, batch_size=batch,
                                    seq_len=seq, mixture=dict(MIXTURE), **decay)])
    cfg.seed, cfg.device, cfg.dtype = seed, "cpu", "float32"
    cfg.model.preset, cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd = "tiny", n_layer, 4, n_embd
    cfg.checkpoint_every = steps                        # checkpoints only at the end
    cfg.eval_every = eval_every or steps                # evaluation every eval_every steps (0: only at the end)
    cfg.data.eval_batches = eval_batches                # validation batches (of eval_batch_size sequences) per domain
    cfg.log_every = max(1, steps // 4)
    return cfg


def run_dir(out: str, shape: str, eval_every: int = 0, eval_batches: int = 4) -> str:
    """Where a run lives under ``out``: ``<shape>`` (evaluated at the end only, 4 batches) or
    ``<shape>-eval<k>-b<n>`` (every k steps, n validation batches per domain)."""
    return os.path.join(out, shape if not eval_every and eval_batches == 4 else f"{shape}-eval{eval_every}-b{eval_batches}")


def val_loss(metrics, mixture=MIXTURE):
    """(steps, loss) of the fixed validation set: the mixture-weighted mean of the ``val/<domain>/loss``
    columns (weights = the training mixture, normalised), at the steps where every domain was evaluated
    (``diagnostics.recommend.weighted_val_loss``, as lr_decay's validation target)."""
    from diagnostics.recommend import weighted_val_loss

    out = weighted_val_loss(metrics, mixture)
    if out is None:
        raise KeyError(f"no val/<domain>/loss column for every domain of {sorted(mixture)}")
    return out


def run_curves(out: str, steps: int, *, target: str = "train", eval_every: int = 0, **kw):
    """Train the three runs under ``out``: {shape: (lrs, steps, losses)} after the warmup, of ``train/loss``
    (target "train") or of the fixed validation set's mixture-weighted loss every ``eval_every`` steps
    (target "val"; ``val_loss``). A run already on disk is reused."""
    from diagnostics.recommend import schedule_of
    from diagnostics.runs import load_run
    from midtrain.loop import train

    if target not in ("train", "val"):
        raise ValueError(f"target must be 'train' or 'val', got {target!r}")
    if target == "val" and eval_every < 1:
        raise ValueError("target 'val' needs eval_every >= 1 (steps between evaluations)")
    curves = {}
    for shape in ("constant", "cosine", "wsd"):
        cfg = config(shape, steps, eval_every=eval_every, **kw)
        d = run_dir(out, shape, eval_every, kw.get("eval_batches", 4))
        if not os.path.exists(os.path.join(d, "run.json")):
            t = time.perf_counter()
            train(cfg, d, hooks=[], progress=False)
            print(f"  trained {shape}: {steps} steps in {time.perf_counter() - t:.0f} s", flush=True)
        run = load_run(d)
        if target == "train":
            rows = run.metrics[["step", "train/loss"]].dropna()
            s = rows["step"].to_numpy(dtype=np.int64)
            y = rows["train/loss"].to_numpy(dtype=np.float64)
        else:
            s, y = val_loss(run.metrics)
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


def constant_as_prediction(curves, fit_from: int = 0) -> dict:
    """A reference that models no schedule at all: the constant run's own losses taken as the prediction of
    the WSD run, scored like ``evaluate`` (steps >= ``fit_from``; the decay-only mean over the steps whose
    update ran below the peak). Until its decay the WSD run *is* the constant run, so this is exact there;
    on the decay it says how much the WSD decay moved the loss at all."""
    from diagnostics.schedule import relative_error

    lrs, s, y = curves["wsd"]
    s0, y0 = curves["constant"][1], curves["constant"][2]
    if not np.array_equal(s0, s):
        raise ValueError("the constant and WSD runs were not evaluated at the same steps")
    keep = s >= fit_from
    e = relative_error(y0[keep], y[keep])
    decaying = lrs[s[keep] - 1] < lrs.max()
    return dict(mre=float(e.mean()), mre_decay=float(e[decaying].mean()), final_pred=float(y0[-1]),
                final=float(y[-1]))


def curve_noise(y: np.ndarray) -> float:
    """An upper bound on a smooth curve's relative noise from its second differences: for independent
    noise of s.d. sigma, (y[i-1] - 2 y[i] + y[i+1]) has s.d. sqrt(6) sigma; curvature only adds to it."""
    d2 = y[:-2] - 2 * y[1:-1] + y[2:]
    return float(np.sqrt(np.mean(d2 ** 2) / 6) / np.mean(y)) if len(d2) else float("nan")


def set_error(run: str) -> float:
    """The relative standard error of the fixed validation set's mixture-weighted loss at ``run``'s last
    checkpoint, from the spread of its per-sequence losses: how far the set's loss may sit from the
    expected loss over the domains' validation text (a near-constant offset along a run)."""
    import torch
    import torch.nn.functional as F

    from midtrain.checkpoint import load_reference_model
    from midtrain.config import TrainConfig
    from midtrain.data import default_corpus
    from midtrain.evaluate import val_batches
    from diagnostics.runs import load_run

    corpus = default_corpus()
    model = load_reference_model(run, corpus.vocab_size)
    sets = val_batches(TrainConfig.from_dict(load_run(run).config), corpus)
    w = {d: v / sum(MIXTURE.values()) for d, v in MIXTURE.items()}
    mean = var = 0.0
    with torch.no_grad():
        for d, batches in sets.items():
            per_seq = torch.cat([F.cross_entropy(model(b.x)[0].transpose(1, 2), b.y, reduction="none").mean(1)
                                 for b in batches]).double()
            mean += w[d] * float(per_seq.mean())
            var += w[d] ** 2 * float(per_seq.var()) / len(per_seq)
    return var ** 0.5 / mean


def _fit_starts(spec: str, steps: int, warmup: int) -> list[tuple[float, int]]:
    return [(f, max(warmup + 1, int(round(f * steps)))) for f in (float(x) for x in spec.split(","))]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=("val", "train"), default=PREREGISTERED["target"],
                    help="fit and score the fixed validation set's loss (val) or the per-step train/loss (train)")
    ap.add_argument("--eval-every", type=int, default=PREREGISTERED["eval_every"],
                    help="steps between evaluations of the validation set (target val)")
    ap.add_argument("--eval-batches", type=int, default=PREREGISTERED["eval_batches"],
                    help="validation batches of 16 sequences per domain (target val; the loop's default is 4)")
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
    ap.add_argument("--smooth", type=int, default=11, help="moving-average window of the train target (steps)")
    ap.add_argument("--fit-from", help="fractions of the run: fit (and compare) from these steps on; 0 = right "
                    f"after the warmup (default: val {PREREGISTERED['fit_from']}, the pre-registered start; train 0,0.33)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="folder for the three runs (reused when they exist); default a temp dir")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or tempfile.mkdtemp(prefix="schedule_laws_loop-")
    val = args.target == "val"
    every = args.eval_every if val else 0
    fit_from = args.fit_from or (str(PREREGISTERED["fit_from"]) if val else "0,0.33")
    smooth = 1 if val else args.smooth
    kw = dict(warmup=args.warmup, lr=args.lr, decay_fraction=args.decay_fraction, wsd_shape=args.shape,
              seed=args.seed, batch=args.batch, seq=args.seq, n_layer=args.n_layer, n_embd=args.n_embd,
              eval_batches=args.eval_batches if val else 4)
    print(f"== built-in loop, CPU, {args.threads} thread(s): 3 runs x {args.steps} steps (warmup {args.warmup}, "
          f"peak {args.lr}, batch {args.batch} x {args.seq} tokens, {args.n_layer} layers x {args.n_embd}, seed "
          f"{args.seed}); WSD: last {args.decay_fraction:.0%} {args.shape} to 10%; runs in {out}", flush=True)
    what = (f"the fixed validation set's mixture-weighted loss every {every} steps ({args.eval_batches} x 16 "
            f"sequences per domain)" if val
            else "the per-step train/loss")
    print(f"  target: {what}", flush=True)
    curves = run_curves(out, args.steps, target=args.target, eval_every=every, **kw)
    y = curves["wsd"][2]
    if val:
        print(f"  noise: the WSD validation curve's second differences bound its relative noise by "
              f"{100 * curve_noise(y):.2f}%; the set's relative standard error (per-sequence spread, last "
              f"checkpoint) {100 * set_error(run_dir(out, 'wsd', every, args.eval_batches)):.2f}%")
    else:
        floor = float(np.mean(np.abs(y - moving_average(y, smooth)) / moving_average(y, smooth)))
        print(f"  noise floor: the WSD run's logged loss vs its {smooth}-step moving average, mean relative "
              f"deviation {100 * floor:.2f}%")
    pre = (PREREGISTERED["law"], PREREGISTERED["protocol"], float(PREREGISTERED["fit_from"]))
    for frac, start in _fit_starts(fit_from, args.steps, args.warmup):
        print(f"  -- fitted on steps >= {start} ({frac:.0%} of the run; errors at the same steps of the WSD run)")
        print(f"  {'law':<28} {'protocol':<14} {'MRE':>7} {'decay':>7} {'smooth':>7}  {'final pred/meas':>16} {'fit':>6}")
        for r, (law, how) in zip(evaluate(curves, smooth, fit_from=start), FITS):
            print(f"  {r['law']:<28} {r['protocol']:<14} {100 * r['mre']:6.2f}% {100 * r['mre_decay']:6.2f}% "
                  f"{100 * r['mre_smooth']:6.2f}%  {r['final_pred']:7.3f}/{r['final']:7.3f} {r['sec']:5.1f}s")
            if val and (law, how, frac) == pre:
                verdict = "met" if r["mre"] <= 0.01 else "NOT met"
                print(f"  ^ pre-registered ({law}, {how}, fit from {frac:.0%}): MRE {100 * r['mre']:.2f}% -> "
                      f"criterion (<= 1%) {verdict}; decay only {100 * r['mre_decay']:.2f}%, final "
                      f"{r['final_pred']:.3f} predicted / {r['final']:.3f} measured")
        c = constant_as_prediction(curves, fit_from=start)
        print(f"  {'no law: the constant run':<28} {'(reference)':<14} {100 * c['mre']:6.2f}% "
              f"{100 * c['mre_decay']:6.2f}% {'':>7}  {c['final_pred']:7.3f}/{c['final']:7.3f}")


if __name__ == "__main__":
    main()
