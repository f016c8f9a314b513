"""When to start the LR decay: the annealing law fitted to the run, minimised over decay lengths.

The LR-annealing law of Tissue et al. 2024 (arXiv 2408.11029; ``diagnostics.schedule``)::

    L(s) = L0 + A S1(s)^(-alpha) - C S2(s)

is fitted to the run's own (LR, train loss) history. Keeping a phase's steps, peak ``lr`` and
``final_lr``, every candidate ``decay_fraction`` (and, if asked, decay shape) gives a full LR
schedule for the run; the law predicts its final loss, and the recommendation is the minimiser.
A longer decay buys annealing area S2 (the second term) but spends forward area S1 (the first):
the optimum is where the two balance, which the fit places for this run rather than a rule of thumb.

Range: a moving-block residual bootstrap (residuals of the fit resampled in blocks of consecutive
steps, added to the fitted curve, the law refitted and minimised again): the percentile interval of
the optimal fraction over the replicates.

    >>> from diagnostics import load_run                                # doctest: +SKIP
    >>> from diagnostics.recommend import lr_decay_recommendation
    >>> print(lr_decay_recommendation(load_run("runs/demo")).to_text())
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diagnostics.recommend._common import (Recommendation, RecommendationError, _check_not_diverged, _fmt,
                                           _phase_table)
from diagnostics.schedule import DECAY_SHAPES, annealing_law, fit_annealing_law, lr_areas, lr_decreases, phase_lrs
from diagnostics.stats import moving_block_indices

__all__ = ["lr_decay_recommendation", "candidate_decays"]


def candidate_decays(post: int, max_candidates: int = 100) -> np.ndarray:
    """Decay lengths (steps) to try for a phase with ``post`` post-warmup steps: every length when
    post <= max_candidates, else max_candidates evenly spaced ones (always including 1 and post)."""
    if post <= max_candidates:
        return np.arange(1, post + 1)
    return np.unique(np.round(np.linspace(1, post, max_candidates)).astype(int))


def lr_decay_recommendation(run, *, phase: str | None = None, shapes=None, level: float = 0.9,
                            momentum: float = 0.999, n_boot: int = 100, max_candidates: int = 100,
                            min_step: int | None = None, min_anneal_points: int = 3, robust: bool = True,
                            seed: int = 0) -> Recommendation:
    """The ``decay_fraction`` (when the decay starts) of a phase that minimises the fitted law's
    predicted final loss of the run.

    run: a ``diagnostics.Run`` of the built-in loop (run.json with the phases; metrics with
        ``train/loss`` and ``train/lr``). Its history must hold some LR decrease after the initial
        warmup (the law's annealing term is fitted on it).
    phase: the phase whose decay to place; default the last phase with a decay (decay != "constant").
    shapes: decay shapes to compare too (e.g. ["linear", "1-sqrt"]); default the phase's own.
    level: coverage of the bootstrap interval of the optimal fraction.
    momentum: the annealing momentum's decay factor (Tissue et al.: 0.999).
    min_step: fit on losses from this step on (default: the end of the first phase's warmup).
    """
    table = _phase_table(run)
    if not table:
        raise RecommendationError("the LR-decay recommendation needs a run of the built-in loop (run.json with "
                                  "its phases: it re-plans a phase's schedule)")
    df = run.metrics
    for c in ("train/loss", "train/lr"):
        if c not in df.columns:
            raise RecommendationError(f"the run has no {c} column; the law is fitted on train/loss vs train/lr")
    names = [t[0] for t in table]
    # -- the LR of every update: the config's schedule, overridden by the recorded LR where logged
    sizes = [e - s for _, s, e, _ in table]
    planned = np.concatenate([phase_lrs(p, n) for (_, _, _, p), n in zip(table, sizes)])
    N = len(planned)
    steps_all = df["step"].to_numpy(dtype=np.int64)
    rec_lr = df["train/lr"].to_numpy(dtype=np.float64)
    ok_lr = np.isfinite(rec_lr) & (steps_all >= 0) & (steps_all < N)
    lrs = planned.copy()
    mismatch = int(np.sum(~np.isclose(lrs[steps_all[ok_lr]], rec_lr[ok_lr], rtol=1e-6, atol=0)))
    lrs[steps_all[ok_lr]] = rec_lr[ok_lr]
    loss = df["train/loss"].to_numpy(dtype=np.float64)
    ok = np.isfinite(loss) & (steps_all >= 1) & (steps_all <= N)
    warm0 = int(table[0][3].get("warmup_steps") or 0) + table[0][1]
    first = warm0 if min_step is None else int(min_step)
    ok &= steps_all >= max(1, first)
    steps, y = steps_all[ok], loss[ok]
    if len(steps) == 0:
        raise RecommendationError(f"no logged train/loss from step {max(1, first)} on")
    # steps whose update was skipped (non-finite gradient) are dropped; a diverged stretch is refused
    keep = ~np.isin(steps, _check_not_diverged(run, int(steps.min()), int(steps.max()), "the annealing law"))
    steps, y = steps[keep], y[keep]
    last = int(steps.max())
    # -- is there annealing in the history the losses see?
    d = lr_decreases(lrs[:last], ignore_initial_warmup=True)
    falls = np.flatnonzero(d > 0)
    n_after = int(np.sum(steps > falls[0])) if len(falls) else 0
    if len(falls) == 0 or n_after < min_anneal_points:
        raise RecommendationError(
            f"the learning rate never decreases after warmup in steps 0-{last} of this run" if not len(falls) else
            f"only {n_after} logged losses after the first LR decrease (step {int(falls[0])}); need "
            f"{min_anneal_points}" + ": the annealing law's decay term is fitted on a decay the run has "
            "seen. Train through a phase with a decay (decay != \"constant\"), or branch a short cooldown "
            "from a checkpoint (midtrain train --from RUN --step S --config cooldown.toml) and recommend on it")
    # -- segments: a new data mixture or sequence length shifts the loss level (own offset)
    seg_of_phase, lab, prev = [], -1, None
    for _, _, _, p in table:
        key = (repr(sorted((p.get("mixture") or {}).items())), p.get("seq_len"))
        lab += key != prev
        prev = key
        seg_of_phase.append(lab)
    starts = np.array([s for _, s, _, _ in table])
    seg = np.array(seg_of_phase)[np.searchsorted(starts, steps, side="right") - 1]
    try:
        fit = fit_annealing_law(lrs[:last], steps, y, momentum=momentum, segments=seg, robust=robust)
    except ValueError as e:
        raise RecommendationError(f"the annealing law cannot be fitted to this run: {e}") from None
    # -- the phase to re-plan and its candidate schedules
    if phase is None:
        cands = [t for t in table if t[3].get("decay", "constant") != "constant"]
        if not cands:
            raise RecommendationError(f"no phase of this run decays (phases {names}); name one with phase= and "
                                      "give shapes=[...] to consider decaying it")
        chosen = cands[-1]
    else:
        chosen = next((t for t in table if t[0] == phase), None)
        if chosen is None:
            raise RecommendationError(f"no phase {phase!r} in this run; phases: {names}")
    pname, p0, p1, pcfg = chosen
    cur_shape = pcfg.get("decay", "constant")
    shapes = [cur_shape] if shapes is None else list(shapes)
    bad = [s for s in shapes if s not in DECAY_SHAPES or s == "constant"]
    if bad or not shapes:
        raise RecommendationError(f"shapes {bad or shapes} cannot be compared: give decaying shapes from "
                                  f"{[s for s in DECAY_SHAPES if s != 'constant']} (phase {pname!r} has decay "
                                  f"{cur_shape!r})")
    skipped = [s for s in shapes if s == "exponential" and float(pcfg.get("final_lr", 0)) <= 0]
    shapes = [s for s in shapes if s not in skipped]
    if not shapes:
        raise RecommendationError(f"an exponential decay needs final_lr > 0; phase {pname!r} has final_lr 0")
    n_ph = p1 - p0
    warm = int(pcfg.get("warmup_steps") or 0)
    post = n_ph - warm
    if post < 1:
        raise RecommendationError(f"phase {pname!r} has no steps after its warmup to decay over")
    lengths = candidate_decays(post, max_candidates)
    pre, later = lrs[:p0], planned[p1:]
    combos, S1f, S2f = [], [], []
    for sh in shapes:
        for k in lengths:
            full = np.concatenate([pre, phase_lrs(pcfg, n_ph, decay=sh, decay_fraction=k / post), later])
            a1, a2 = lr_areas(full, momentum=momentum)
            combos.append((sh, int(k)))
            S1f.append(a1[-1])
            S2f.append(a2[-1])
    S1f, S2f = np.array(S1f), np.array(S2f)
    now_full = np.concatenate([pre, phase_lrs(pcfg, n_ph), later])
    a1, a2 = lr_areas(now_full, momentum=momentum)
    off = fit.offsets.get(int(seg_of_phase[-1]), 0.0)

    def predict(par, s1, s2):
        return annealing_law(s1, s2, par["L0"], par["A"], par["alpha"], par["C"]) + off

    pred = predict(fit.params, S1f, S2f)
    best = int(np.argmin(pred))
    shape, k_best = combos[best]
    value = k_best / post
    pred_now, pred_best = float(predict(fit.params, a1[-1], a2[-1])), float(pred[best])
    # -- range: moving-block residual bootstrap of the fit, argmin per replicate
    r, fitted, n = fit.residuals, fit.fitted, fit.n_points
    blocks, L = moving_block_indices(n, n_boot, np.random.default_rng(seed))
    reps, rep_shapes = [], []
    is_shape = np.array([c[0] == shape for c in combos])
    for idx in blocks:
        try:
            bf = fit_annealing_law(lrs[:last], fit.steps, fitted + r[idx], momentum=momentum,
                                   segments=seg[np.isin(steps, fit.steps)], robust=robust, x0=fit.params, max_nfev=100)
        except ValueError:
            continue
        pb = predict(bf.params, S1f, S2f)
        j = int(np.argmin(pb))
        rep_shapes.append(combos[j][0])
        reps.append(combos[int(np.flatnonzero(is_shape)[np.argmin(pb[is_shape])])][1] / post)
    a = (1 - level) / 2
    low, high = (float(np.quantile(reps, a)), float(np.quantile(reps, 1 - a))) if reps else (math.nan, math.nan)
    start_now = p0 + n_ph - max(1, round(float(pcfg.get("decay_fraction", 1.0)) * post)) if cur_shape != "constant" else None
    start_rec = p0 + n_ph - k_best
    seen = int(np.sum(d > 0))
    evidence: dict[str, Any] = {
        "phase": f"{pname!r}, steps {p0}-{p1 - 1} ({post} after warmup), lr {pcfg.get('lr')} -> {pcfg.get('final_lr')}",
        "fit": f"L0 {_fmt(fit.L0)}, A {_fmt(fit.A)}, alpha {_fmt(fit.alpha)}, C {_fmt(fit.C)} "
               f"(momentum {momentum}; {len(fit.offsets)} mixture/length offsets)",
        "fit quality": f"rmse {_fmt(fit.rmse)} vs per-step noise {_fmt(fit.noise)}, R^2 {fit.r2:.3f}",
        "losses used": f"steps {int(fit.steps.min())}-{int(fit.steps.max())} ({fit.n_points} train/loss points, "
                       f"Huber-robust)" if robust else f"steps {int(fit.steps.min())}-{int(fit.steps.max())}",
        "annealing seen": f"the LR decreased on {seen} updates (first at step {int(falls[0])})",
        "current schedule": (f"{cur_shape}, decay_fraction {_fmt(float(pcfg.get('decay_fraction', 1.0)))} (decay from "
                             f"step {start_now}): predicted final loss {_fmt(pred_now)}") if start_now is not None
                            else f"constant: predicted final loss {_fmt(pred_now)}",
        "recommended schedule": f"{shape}, decay_fraction {_fmt(value)} (decay from step {start_rec}, {k_best} "
                                f"steps): predicted final loss {_fmt(pred_best)} ({_fmt(pred_best - pred_now)})",
        "bootstrap": f"{len(reps)} moving-block residual replicates (blocks of {L} steps)"
                     + (f"; best shape {', '.join(f'{s} {rep_shapes.count(s)}' for s in dict.fromkeys(rep_shapes))}"
                        if len(shapes) > 1 else ""),
        "branch at or before step": min(start_rec, start_now if start_now is not None else start_rec),
    }
    if mismatch:
        evidence["recorded LR"] = f"differs from the config's schedule at {mismatch} steps; the recorded LR is used"
    if skipped:
        evidence["shapes skipped"] = "exponential (needs final_lr > 0)"
    ref = [c for c in range(len(combos)) if combos[c][0] == shape and 0.1 <= combos[c][1] / post <= 0.2]
    if ref:
        evidence["predicted at 10-20% decay (Hägele et al.)"] = f"{_fmt(float(pred[ref].min()))} - {_fmt(float(pred[ref].max()))}"
    assumptions = [
        "the loss follows the annealing law of Tissue et al. 2024 (arXiv 2408.11029) with the parameters "
        "fitted on this one run's schedule; other schedules are predictions by extrapolation (the paper "
        "reports such predictions across schedules after fitting one or two curves)",
        "the decay term C is learned from the decay this run has seen" + (
            f" ({seen} decreasing updates): a much longer or different-shaped decay than that is an extrapolation"),
        "AdamW-like optimisation with the phase's peak lr, final_lr, batch and data mixture unchanged; "
        "mixture or sequence-length switches only shift the loss level (one offset each)",
        "external reference, not the answer: Hägele et al. 2024 (arXiv 2405.18392) found cooldowns of "
        "10-20% of training with a 1-sqrt shape to match cosine schedules at scale",
    ]
    would_change = [
        "more history with annealing (a finished decay, a branch with another cooldown length) pins C down",
        "a longer phase (more steps): the optimal fraction is not scale-free under the law",
        "a different peak or final LR for the phase",
    ]
    if k_best in (lengths[0], lengths[-1]):
        would_change.insert(0, f"the optimum sits at the edge of the candidates ({k_best} of {post} steps): the law "
                               "prefers " + ("no decay to speak of (little annealing benefit fitted)" if k_best == lengths[0]
                                             else "decaying over the whole phase"))
    if math.isfinite(low) and high - low > 0.5:
        would_change.insert(0, f"the range is wide ({_fmt(low)} - {_fmt(high)}): the history constrains the optimum "
                               "weakly; fit on a longer run or one with a cooldown")
    changes = {"decay_fraction": value}
    if shape != cur_shape:
        changes["decay"] = shape
    check = ("midtrain recommend RUN --write-config rec.toml, then midtrain train --from RUN --step S --config "
             f"rec.toml --out RUN-decay (S: a checkpoint at or before step {evidence['branch at or before step']}, "
             "before either decay starts); compare its final validation loss with the parent's (the law predicts "
             f"a change of {pred_best - pred_now:+.3g} in final train loss)")
    summary = (f"start phase {pname!r}'s {shape} decay at step {start_rec} (the last {_fmt(value)} of its post-warmup "
               f"steps); the fitted annealing law predicts final loss {_fmt(pred_best)} vs {_fmt(pred_now)} with the "
               "current schedule")
    return Recommendation(name="lr_decay", value=float(value), unit="decay_fraction (of the phase's post-warmup steps)",
                          low=low, high=high, level=level, estimate=float(value), summary=summary,
                          evidence=evidence, assumptions=assumptions, would_change=would_change,
                          patch={"phases": {pname: changes}}, check=check,
                          branch_step=int(evidence["branch at or before step"]))
