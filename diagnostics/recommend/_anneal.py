"""When to start the anneal, for how long and in which shape, for a total token budget: a schedule law
(``diagnostics.schedule.fit_schedule_law``) fitted JOINTLY to the run and its anneal probes (branches
of ``midtrain sweep RUN --anneal-at S1,S2,...``), minimised over anneal starts (docs/recommendations.md,
"Anneal start").

The plan: the stable (constant-LR) stretch runs to step s, then the run's decaying phase (its LR decay
from its peak to its ``final_lr`` and its mixture) runs over the n steps the budget leaves,
``tokens(s) + n x tokens per anneal step = budget``. Each curve is ``(lrs, steps, train losses)``: the
parent's LR of every update up to the end of its decaying phase, a branch's the parent's up to the
branch step then its own; a new mixture or sequence length gets a segment offset shared by every curve
that sees it. Without branches the one-curve fit (the annealing law) places candidate starts to probe.
Replicates (``midtrain sweep --anneal-at S --seeds 0,1``: the same start and length with another seed, or
the run's own schedule with another seed from its anneal start) enter the fit as curves of their own, and
their spread is the seed noise of the range: the starts whose predicted final loss lies within
z x sqrt(2) x sigma_seed of the best join the bootstrap's range.

    >>> from diagnostics import load_run                                    # doctest: +SKIP
    >>> from diagnostics.recommend import anneal_recommendation
    >>> rec = anneal_recommendation(load_run("runs/a"), [load_run("runs/a-probes/anneal150-60")])
"""

from __future__ import annotations

import math

import numpy as np

from diagnostics.recommend._common import (Recommendation, RecommendationError, _check_not_diverged, _fmt, skipped_steps,
                                           weighted_val_loss)
from statistics import NormalDist

from diagnostics.recommend._probes import (ProbeInputError, anneal_phase_index, branch_kind, mixture_key,
                                          replicate_seed, schedule_of)
from diagnostics.schedule import DECAY_SHAPES, ScheduleLawFit, fit_schedule_law, phase_lrs
from diagnostics.stats import pooled_sd

__all__ = ["anneal_recommendation", "anneal_curves", "anneal_fit"]


TARGETS = ("train", "val")
MIN_VAL_POINTS = 3      # target="auto": evaluations each curve needs for the validation target


def _curve(run, sched, first: int, end: int, labels: dict, skip_from: int = 0, weights: dict | None = None):
    """(lrs, steps, losses), segment labels: the run's train losses at steps first..end-1 or, with ``weights``
    (the anneal mixture), its validation losses weighted by them at its evaluations first..end (an
    evaluation at step k is the model after k updates, as a train loss at k is)."""
    df = run.metrics
    key_end = end - 1                # the evaluation at ``end`` belongs to the phase it ends
    if weights is None:
        if "train/loss" not in df.columns:
            raise RecommendationError(f"{run.path} has no train/loss column")
        rows = df[["step", "train/loss"]].dropna()
        s, y = rows["step"].to_numpy(dtype=np.int64), rows["train/loss"].to_numpy(dtype=np.float64)
    else:
        val = weighted_val_loss(df, weights)
        if val is None:
            raise RecommendationError(f"{run.path} has no validation loss of every domain of the anneal mixture "
                                      f"{sorted(weights)}: use the train-loss target")
        s, y = val
        end += 1
    ok = (s >= max(1, first)) & (s < end) & np.isfinite(y) & ~np.isin(s, skipped_steps(df)[skipped_steps(df) >= skip_from])
    s, y = s[ok], y[ok]
    seg = np.array([labels.setdefault(sched.key_at(min(int(k), key_end)), len(labels)) for k in s], dtype=np.int64)
    return (sched.lrs[:end], s, y), seg


def anneal_curves(run, branches=(), *, target: str = "train"):
    """The curves of the joint fit: [(lrs, steps, losses)], their segment labels, the label of each
    phase key and, per branch, (branch step, anneal steps, Run). ``target``: ``"train"`` (the logged train
    loss of every step) or ``"val"`` (the validation loss of the fixed evaluation set, its domains weighted
    by the anneal phase's mixture: one objective for every curve, without the batch-to-batch noise)."""
    if target not in TARGETS:
        raise ProbeInputError(f"the anneal target must be one of {TARGETS}, got {target!r}")
    sched = schedule_of(run.config)
    a = anneal_phase_index(run.config)
    weights = dict(sched.phases[a].get("mixture") or {}) if target == "val" else None
    end = int(sched.starts[a]) + int(np.sum(sched.phase_of == a))
    warm0 = int(sched.phases[0].get("warmup_steps") or 0)
    _check_not_diverged(run, warm0, end - 1, "the schedule law")
    labels: dict = {}
    c, seg = _curve(run, sched, warm0, end, labels, weights=weights)
    curves, segs, probes = [c], [seg], []
    for b in branches:
        bs = schedule_of(b.config)
        ba = anneal_phase_index(b.config)
        bend = int(bs.starts[ba]) + int(np.sum(bs.phase_of == ba))
        step = int(b.parent["step"])
        if int(bs.starts[ba]) != step:
            if replicate_seed(run, b) != 0 and branch_kind(run, b) == "same":
                continue   # the run again with another seed, from before its anneal: not an anneal replicate
            raise ProbeInputError(f"{b.path} is not an anneal probe of {run.path}: its decaying phase starts at step "
                                  f"{int(bs.starts[ba])}, not at its branch step {step}")
        c, seg = _curve(b, bs, step, bend, labels, skip_from=step, weights=weights)
        if len(c[1]):
            curves.append(c)
            segs.append(seg)
            probes.append((step, bend - step, b))
    return curves, segs, labels, probes


def auto_target(run, branches=()) -> str:
    """``"val"`` when there are anneal probes and the run and every probe have at least ``MIN_VAL_POINTS``
    evaluations of every domain of the anneal mixture in their fitted stretch (8 in all), else ``"train"``."""
    if not branches:
        return "train"
    try:
        curves = anneal_curves(run, branches, target="val")[0]
    except ProbeInputError:
        raise
    except RecommendationError:
        return "train"
    n = [len(c[1]) for c in curves]
    return "val" if min(n) >= MIN_VAL_POINTS and sum(n) >= 8 else "train"


def anneal_fit(run, branches=(), *, law: str = "auto", target: str = "train"):
    """The schedule law ``anneal_recommendation`` fits: jointly on the run and its anneal probes (the
    annealing law alone for the run without probes). Returns ``(fit, curves, segments, labels, probes)``
    as :func:`anneal_curves` gives them; RecommendationError when the law cannot be fitted."""
    curves, segs, labels, probes = anneal_curves(run, branches, target=target)
    if target == "val" and sum(len(c[1]) for c in curves) < 8:
        raise RecommendationError(f"{sum(len(c[1]) for c in curves)} validation points on the run and its probes: too "
                                  "few to fit the law on the validation loss (evaluate more often: eval_every)")
    try:
        fit = fit_schedule_law(curves, law=law if len(curves) > 1 else "annealing", segments=segs)
    except ValueError as e:
        raise RecommendationError(f"the schedule law did not fit: {e}") from None
    if not all(math.isfinite(v) for v in fit.params.values()) or not math.isfinite(fit.rmse):
        raise RecommendationError(f"the {fit.law} law fit did not converge (parameters {fit.params})")
    return fit, curves, segs, labels, probes


def _seed_noise(curves, probes, start_a: int, n_a: int) -> tuple[float, str]:
    """The pooled standard deviation of the final train loss (mean of the last 3 logged) over replicates:
    probes of the same start and length (the run itself is the probe (start_a, n_a)); NaN without any."""
    finals: dict = {(start_a, n_a): [float(np.mean(curves[0][2][-3:]))]}
    for (s, n, b), c in zip(probes, curves[1:]):
        finals.setdefault((s, n), []).append(float(np.mean(c[2][-3:])))
    reps = [v for v in finals.values() if len(v) >= 2]
    if not reps:
        return math.nan, "no replicates (midtrain sweep --anneal-at S --seeds 0,1 measures it)"
    sigma, dof = pooled_sd(reps)
    return sigma, (f"sigma {_fmt(sigma)}: pooled spread of the final train loss (mean of the last 3) over "
                   f"{sum(len(v) for v in reps)} replicate runs of {len(reps)} plan(s), {dof} degrees of freedom")


def _anneal_lrs(stable: np.ndarray, peak: float, s: int, ann: dict, n: int, shape: str) -> np.ndarray:
    pre = stable[:s] if s <= len(stable) else np.concatenate([stable, np.full(s - len(stable), peak)])
    ph = {**ann, "steps": n, "tokens": None, "warmup_steps": 0, "decay": shape, "decay_fraction": 1.0}
    return np.concatenate([pre, phase_lrs(ph, n)])


def anneal_recommendation(run, branches=(), *, budget_tokens: int | None = None, shapes=None, law: str = "auto",
                          level: float = 0.9, n_boot: int = 50, max_candidates: int = 60, seed: int = 0,
                          target: str = "auto") -> Recommendation:
    """The anneal start (step), length and shape minimising the law's predicted final loss for
    ``budget_tokens`` (default: the run's tokens up to the end of its decaying phase), fitted jointly
    on ``run`` and its anneal-probe ``branches`` (Runs). ProbeInputError (bad input: exit 2 in the CLI)
    for a budget that does not fit or a branch that is not an anneal probe; RecommendationError when
    the law cannot be fitted. ``target``: the loss the law is fitted to and predicts (``anneal_curves``);
    ``"auto"`` (default): the validation loss where the run and its probes have enough evaluations
    (``auto_target``), else the train loss."""
    cfg = run.config or {}
    sched = schedule_of(cfg)
    a = anneal_phase_index(cfg)
    ann, st = dict(sched.phases[a]), dict(sched.phases[a - 1])
    chosen = target == "auto"
    if chosen:
        target = auto_target(run, branches)
    what = ("train loss on the anneal mixture" if target == "train" else
            "validation loss of the fixed evaluation set, domains weighted by the anneal mixture")
    if any(p.get("decay", "constant") != "constant" for p in sched.phases[:a]):
        raise RecommendationError("a phase before the decaying one decays too: no single stable stretch")
    shapes = [ann.get("decay")] if shapes is None else list(shapes)
    if not shapes or any(s not in DECAY_SHAPES or s == "constant" for s in shapes):
        raise ProbeInputError(f"shapes {shapes} must be decaying shapes of {DECAY_SHAPES[1:]}")
    start_a = int(sched.starts[a])
    n_a = int(np.sum(sched.phase_of == a))
    b_ann = int(ann["batch_size"]) * int(ann["seq_len"])
    b_st = int(st["batch_size"]) * int(st["seq_len"])
    s_lo = max(int(sched.starts[a - 1]) + int(st.get("warmup_steps") or 0),
               int(sched.phases[0].get("warmup_steps") or 0), 1)
    tok_lo = sched.tokens_before(s_lo)
    run_budget = sched.tokens_before(start_a + n_a)
    budget = int(budget_tokens) if budget_tokens is not None else run_budget
    if budget < tok_lo + 2 * b_ann:
        raise ProbeInputError(f"a budget of {budget} tokens does not fit this run: the stable stretch reaches its "
                              f"first candidate start (step {s_lo}) after {tok_lo} tokens and an anneal needs at least "
                              f"2 steps of {b_ann} tokens; give --budget-tokens above {tok_lo + 2 * b_ann}")
    tok = lambda s: sched.tokens_before(min(s, start_a)) + max(0, s - start_a) * b_st  # noqa: E731
    s_hi = s_lo
    while tok(s_hi + 1) + 2 * b_ann <= budget:
        s_hi += 1
    fit, curves, segs, labels, probes = anneal_fit(run, branches, law=law, target=target)
    lab = labels.get(mixture_key(ann))
    stable, peak = sched.lrs[:start_a], float(st.get("lr"))
    starts = np.unique(np.r_[np.round(np.linspace(s_lo, s_hi, max_candidates)).astype(int),
                             [p[0] for p in probes if s_lo <= p[0] <= s_hi]])
    plans = [(int(s), sh, max(2, int((budget - tok(int(s))) // b_ann))) for sh in shapes for s in starts]
    lrs_of = [_anneal_lrs(stable, peak, s, ann, n, sh) for s, sh, n in plans]

    def finals(f):
        return np.array([f.final_loss(x, segment=lab) for x in lrs_of])

    pred = finals(fit)
    best = int(np.argmin(pred))
    s_best, shape, n_best = plans[best]
    lo_l, hi_l = fit.predict_interval(lrs_of[best], level=level, segment=lab, steps=[len(lrs_of[best])],
                                      n_boot=n_boot, seed=seed)
    reps = [ScheduleLawFit(law=fit.law, params=p, offsets=o, momentum=fit.momentum)
            for p, o in fit.bootstrap_params(n_boot, seed)]
    rep_starts = [plans[int(np.argmin(finals(r)))][0] for r in reps]
    q = (1 - level) / 2
    low, high = ((float(np.quantile(rep_starts, q)), float(np.quantile(rep_starts, 1 - q))) if rep_starts
                 else (math.nan, math.nan))
    sigma_seed, seed_how = _seed_noise(curves, probes, start_a, n_a)
    if math.isfinite(sigma_seed):   # plans a seed change could reorder: within z sqrt(2) sigma of the best
        z = NormalDist().inv_cdf(0.5 + level / 2)
        close = [plans[i][0] for i in np.flatnonzero(pred <= pred[best] + z * math.sqrt(2) * sigma_seed)]
        low, high = ((min(low, float(min(close))), max(high, float(max(close)))) if math.isfinite(low)
                     else (float(min(close)), float(max(close))))
    own = [i for i, (s, sh, n) in enumerate(plans) if s == min(start_a, s_hi) and sh == shapes[0]]
    ckpts = [s for s, _ in run.checkpoints()] if hasattr(run, "checkpoints") else []
    evidence = {
        "budget": f"{budget} tokens" + (" (the run's, to the end of its decaying phase)" if budget_tokens is None
                                        else f" (the run's: {run_budget})"),
        "plan": f"stable LR {_fmt(peak)} to step {s_best} ({tok(s_best)} tokens), then phase {ann.get('name')!r}'s "
                f"{shape} decay to {_fmt(float(ann.get('final_lr', 0.0)))} over {n_best} steps ({n_best * b_ann} tokens) "
                f"on its mixture {ann.get('mixture')}",
        "predicted final loss": f"{_fmt(float(pred[best]))} ({level:.0%} band {_fmt(float(lo_l[0]))} - "
                                f"{_fmt(float(hi_l[0]))}; {what})",
        "law": f"{fit.law} {', '.join(f'{k} {_fmt(v)}' for k, v in fit.params.items())}; "
               f"{fit.selection.get('reason', 'law fixed')}",
        "fit quality": f"rmse {_fmt(fit.rmse)} vs per-step noise {_fmt(fit.noise)}, R^2 {fit.r2:.3f}, {fit.n_points} "
                       f"losses from {len(curves)} curve(s)",
        "candidates": f"starts {int(starts[0])}-{int(starts[-1])} ({len(starts)}), shapes {shapes}",
        "start range": f"{len(rep_starts)} moving-block residual bootstrap refits, argmin of each"
                       + (f"; with the starts whose predicted final loss is within {NormalDist().inv_cdf(0.5 + level / 2):.2f}"
                          f" x sqrt(2) x the seed noise of the best" if math.isfinite(sigma_seed) else ""),
        "seed noise": seed_how,
        "fit target": what + (" (chosen automatically: --anneal-target auto)" if chosen else ""),
    }
    if own:
        evidence["the run's own anneal start"] = f"step {plans[own[0]][0]}: predicted {_fmt(float(pred[own[0]]))}"
    for s, n, b in probes:
        c = curves[1 + probes.index((s, n, b))]
        meas = float(np.mean(c[2][-3:]))
        fitd = float(np.mean(fit.predict(c[0], steps=c[1][-3:]) + fit.offsets.get(lab, 0.0)))
        evidence[f"probe {s}+{n}"] = f"last {target} losses {_fmt(meas)} vs law {_fmt(fitd)} ({b.path})"
    would_change = ["more probes (other starts or lengths) pin the law's annealing term down",
                    "another budget: the optimal start moves with it"]
    if len(probes) == 0:
        cands = sorted({int(v) for v in (low, s_best, high) if math.isfinite(v)} | {min(start_a, s_hi)})
        missing = [c for c in cands if c not in ckpts]
        cmd = f"midtrain sweep {run.path} --anneal-at {','.join(map(str, cands))} --anneal-steps {n_a}"
        evidence["probes"] = (f"none: a one-run fit (the annealing law); probe starts {cands}: {cmd}"
                              + (f" (steps {missing} have no checkpoint: add checkpoint_steps = {missing} to the "
                                 f"config and train again; checkpoints now at {ckpts})" if missing else ""))
        would_change.insert(0, "anneal probes: the one-run fit extrapolates from the one anneal the run has seen")
    else:
        cmd = f"midtrain sweep {run.path} --anneal-at {s_best} --anneal-steps {n_best}"
    if s_best in (int(starts[0]), int(starts[-1])):
        would_change.insert(0, f"the optimum is at the edge of the candidate starts ({s_best})")
    st_steps = s_best - int(sched.starts[a - 1])
    patch = {"phases": {st.get("name"): {"steps": st_steps, "tokens": None},
                        ann.get("name"): {"steps": n_best, "tokens": None, "warmup_steps": 0, "decay": shape,
                                          "decay_fraction": 1.0}}}
    if st_steps <= int(st.get("warmup_steps") or 0):
        patch = {}
    assumptions = [
        f"the {fit.law} law (one parameter set for the run and its probes) describes the {what} under every "
        "candidate schedule; starts and lengths far from the probed ones are extrapolations",
        "a mixture or sequence-length change only shifts the loss level (one offset per mixture, shared by all "
        f"curves); the final loss is the {what}",
        "the stable LR continues unchanged to the start (beyond the run's stable stretch too); later phases "
        "(after the decaying one) are kept as they are and not predicted",
    ]
    summary = (f"start phase {ann.get('name')!r}'s {shape} anneal at step {s_best} ({tok(s_best)} tokens) for "
               f"{n_best} steps; predicted final loss {_fmt(float(pred[best]))} for a budget of {budget} tokens"
               + (f", fitted jointly on the run and {len(probes)} anneal probe(s)" if probes else
                  " (one-run fit: probe it)"))
    return Recommendation(name="lr_decay", value=float(s_best), unit="step (anneal start)", low=low, high=high,
                          level=level, estimate=float(s_best), summary=summary, evidence=evidence,
                          assumptions=assumptions, would_change=would_change, patch=patch,
                          check=f"{cmd}; then midtrain recommend {run.path} --branches <probe dirs>",
                          branch_step=int(min(s_best, start_a)))
