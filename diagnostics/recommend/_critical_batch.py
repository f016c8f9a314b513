"""Critical batch size from branches trained at different batch sizes (``midtrain sweep``).

Each branch starts from the same checkpoint at step S of the parent and trains at its own batch B.
For one target validation loss L*, branch i needs S_i optimizer steps after S and E_i = B_i S_i
examples (sequences). McCandlish et al. 2018 (eq. 2.11) model the trade-off as
(S/S_min - 1)(E/E_min - 1) = 1, with B_crit = E_min / S_min (``diagnostics.gns.fit_steps_examples``).
This is the empirical probe of Merrill et al. 2025 (arXiv 2505.23971), who found the gradient noise
scale under Adam far below the critical batch size measured this way.

Steps to target: the first crossing of L* by the branch's validation-loss curve (mean over domains,
or one domain), linearly interpolated between evaluation points; the point at S is the branch's own
evaluation there, else the parent's.

A sweep with an LR grid (``midtrain sweep --lr-grid``) has several branches per batch size; the fit
keeps, per batch, the one with the lowest final validation loss (all branches of a sweep train the
same tokens), and the evidence names each branch's LR relative to the parent's. Replicates (``--seeds``:
same batch and LR, another seed) are averaged into one curve first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diagnostics.gns import fit_steps_examples
from diagnostics.recommend._batch_size import batch_size_recommendation
from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt, _phase_table, _runnable_batch

__all__ = ["critical_batch_recommendation", "steps_to_target", "branch_curve"]


def steps_to_target(steps, losses, target: float) -> float:
    """First step at which the piecewise-linear curve through (steps, losses) reaches ``target``
    (nan if it never does). ``steps`` increasing."""
    s, l = np.asarray(steps, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    hit = np.flatnonzero(l <= target)
    if not len(hit):
        return math.nan
    i = int(hit[0])
    if i == 0:
        return float(s[0])
    frac = (l[i - 1] - target) / (l[i - 1] - l[i])
    return float(s[i - 1] + frac * (s[i] - s[i - 1]))


def _val_curve(df, domain: str | None, start: int) -> tuple[np.ndarray, np.ndarray]:
    cols = [c for c in df.columns if c.startswith("val/") and c.endswith("/loss")]
    if domain is not None:
        cols = [c for c in cols if c == f"val/{domain}/loss"]
    if not cols:
        return np.zeros(0), np.zeros(0)
    sub = df[["step"] + cols].dropna()
    sub = sub[sub["step"] >= start]
    return sub["step"].to_numpy(dtype=np.float64), sub[cols].to_numpy(dtype=np.float64).mean(axis=1)


def _branch_batch(run, step: int) -> int:
    cfg = getattr(run, "config", None) or {}
    for name, s, e, p in _phase_table(run):
        if s <= step < e and p.get("batch_size"):
            return int(p["batch_size"])
    if cfg.get("batch_size"):
        return int(cfg["batch_size"])
    raise RecommendationError(f"branch {getattr(run, 'path', run)!r}: its batch size at step {step} is not in "
                              "its run.json (phases with batch_size); pass runs of `midtrain sweep`.")


def branch_curve(run, parent=None, domain: str | None = None) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(branch step S, batch, steps >= S, validation loss) of one branch run."""
    par = getattr(run, "parent", None)
    if not par or par.get("step") is None:
        raise RecommendationError(f"{getattr(run, 'path', run)!r} is not a branch (its run.json has no parent).")
    start = int(par["step"])
    steps, loss = _val_curve(run.metrics, domain, start)
    if (not len(steps) or steps[0] > start) and parent is not None:  # the parent's evaluation at S
        ps, pl = _val_curve(parent.metrics, domain, start)
        if len(ps) and ps[0] == start:
            steps, loss = np.concatenate([[start], steps]), np.concatenate([[pl[0]], loss])
    if not len(steps):
        raise RecommendationError(f"branch {getattr(run, 'path', run)!r} has no validation loss"
                                  + (f" for domain {domain!r}" if domain else "") + " after its branch step.")
    return start, _branch_batch(run, start), steps, loss


def _phase_of(run, step: int) -> tuple[str | None, int | None]:
    """(phase name, seq_len) of the phase holding ``step`` in a run of the built-in loop, else Nones."""
    for name, s0, e0, p in _phase_table(run):
        if s0 <= step < e0:
            return name, (int(p["seq_len"]) if p.get("seq_len") else None)
    return None, None


def _phase_lr(run, step: int) -> float | None:
    for _, s0, e0, p in _phase_table(run):
        if s0 <= step < e0 and p.get("lr"):
            return float(p["lr"])
    return None


def _lr_multiplier(run, parent_run, step: int) -> float:
    """The branch's LR at ``step`` over the parent's (9 decimals, a grouping key); nan when either is unknown."""
    lr, plr = _phase_lr(run, step), _phase_lr(parent_run, step) if parent_run is not None else None
    return round(lr / plr, 9) if lr and plr else math.nan


def _mean_replicates(curves, runs, parent_run):
    """Replicates (same batch and LR, another seed: ``midtrain sweep --seeds``) averaged into one curve per
    (batch, LR multiplier) where their evaluation steps agree; [(curve, LR multiplier, label, count)]."""
    groups: dict = {}
    for c, r in zip(curves, runs):
        mult = _lr_multiplier(r, parent_run, c[1])
        groups.setdefault((c[0], "n/a" if math.isnan(mult) else mult), []).append(
            (c, mult, str(getattr(r, "path", "?"))))
    out = []
    for members in groups.values():
        c0, mult, label = members[0]
        same = [m for m in members if len(m[0][2]) == len(c0[2]) and np.array_equal(m[0][2], c0[2])]
        loss = np.mean([m[0][3] for m in same], axis=0)
        out.append(((c0[0], c0[1], c0[2], loss), mult, label if len(same) == 1 else f"{label} (mean of {len(same)})",
                    len(same)))
    return out


def _best_per_batch(curves, runs, parent_run):
    """Per batch size the (replicate-averaged) branch with the lowest final validation loss; (kept curves,
    notes per batch)."""
    groups: dict[int, list] = {}
    for c, mult, label, n in _mean_replicates(curves, runs, parent_run):
        groups.setdefault(c[0], []).append((float(c[3][-1]), mult, label, c, n))
    kept, notes = [], {}
    for b in sorted(groups):
        g = sorted(groups[b], key=lambda x: x[0])
        kept.append(g[0][3])
        lrs = ", ".join(("LR x n/a" if math.isnan(m) else f"LR x {m:.3g}") + f" -> {fl:.4g}"
                        + (f" (mean of {n} seeds)" if n > 1 else "") for fl, m, _, _, n in g)
        notes[b] = (g[0][1], f"final validation loss {lrs}" + (f"; kept {g[0][2]}" if len(g) > 1 else ""))
    return kept, notes


def _fit(curves, target):
    S, E, rows = [], [], []
    for b, start, steps, loss in curves:
        if loss[0] <= target:   # already there at the branch point: no information
            continue
        s = steps_to_target(steps, loss, target) - start
        if math.isfinite(s) and s > 0:
            S.append(s)
            E.append(s * b)
            rows.append((b, s, s * b))
    if len({r[0] for r in rows}) < 2:
        return None, rows
    try:
        return fit_steps_examples(S, E), rows
    except ValueError:
        return None, rows


def critical_batch_recommendation(parent_run, branch_runs, *, target: float | None = None,
                                  domain: str | None = None, n_targets: int = 5) -> Recommendation:
    """B_crit from branches of ``parent_run`` at different batch sizes (``midtrain sweep``).

    target: the validation loss every branch must reach (default: the worst of the branches' best
        losses, i.e. one every branch reached). domain: one domain's loss (default: mean over domains).
    The range: B_crit over ``n_targets`` targets spread from the target to halfway to the LOWEST of the
    branches' starting losses (so every branch starts above every target) and over
    leave-one-branch-out refits.
    """
    curves, branch_runs = [], list(branch_runs)
    for r in branch_runs:
        start, b, steps, loss = branch_curve(r, parent_run, domain)
        curves.append((b, start, steps, loss))
    if len({c[1] for c in curves}) > 1:
        raise RecommendationError(f"the branches start at different steps {sorted({c[1] for c in curves})}; "
                                  "a sweep's branches share one branch point.")
    if len({c[0] for c in curves}) < 2:
        raise RecommendationError("the critical batch needs branches at >= 2 different batch sizes; got "
                                  f"batch sizes {[c[0] for c in curves]}.")
    start = curves[0][1]
    curves, lr_notes = _best_per_batch(curves, branch_runs, parent_run)
    best = max(float(c[3].min()) for c in curves)
    top = min(float(c[3][0]) for c in curves)
    tgt = best if target is None else float(target)
    fit, rows = _fit(curves, tgt)
    if fit is None:
        reached = sorted({r[0] for r in rows})
        raise RecommendationError(
            f"fewer than 2 branches with different batch sizes reached validation loss {tgt:.4g} from above "
            f"(reached: batch sizes {reached}) or their (steps, examples) do not follow the trade-off model; "
            "train the branches longer (--tokens) or pass a higher target.")
    alt = []
    for f in np.linspace(0, 0.5, n_targets)[1:]:
        ft, _ = _fit(curves, tgt + f * (top - tgt))
        if ft is not None:
            alt.append(ft.b_crit)
    if len(curves) >= 3:
        for i in range(len(curves)):
            ft, _ = _fit(curves[:i] + curves[i + 1:], tgt)
            if ft is not None:
                alt.append(ft.b_crit)
    vals = [fit.b_crit] + alt
    low, high = float(min(vals)), float(max(vals))
    pcfg: dict = {}
    if parent_run is not None and hasattr(parent_run, "metrics"):
        pcfg = next((p for _, s0, e0, p in _phase_table(parent_run) if s0 <= start < e0), {})
    world = int((getattr(parent_run, "info", None) or {}).get("world_size") or 1) if pcfg else 1
    value, _, _ = _runnable_batch(fit.b_crit, pcfg, float(pcfg.get("batch_size") or 1), world, 1.0)
    name, seq_len = _phase_of(branch_runs[0], start)
    evidence: dict[str, Any] = {
        "phase": name, "seq_len": seq_len,               # which phase and sequence length the answer holds for
        "branch point": f"step {start} of {getattr(parent_run, 'path', 'the parent')}",
        "target validation loss": tgt if domain is None else f"{tgt:.4g} ({domain})",
        "S_min (steps)": fit.s_min, "E_min (sequences)": fit.e_min,
        "fit rms residual of 1 - S_min/S - E_min/E": fit.rms_residual,
    }
    for b, s, e in sorted(rows):
        evidence[f"batch {b}"] = f"{s:.4g} steps, {e:.4g} sequences to target"
    for b, (_, note) in lr_notes.items():
        evidence[f"batch {b} LR (vs the parent's)"] = note
    mults = [m for m, _ in lr_notes.values() if not math.isnan(m)]
    fair = None if len(mults) < len(lr_notes) else any(abs(m - 1) > 1e-9 for m in mults)
    gns = None
    if parent_run is not None and hasattr(parent_run, "metrics"):
        try:
            gns = batch_size_recommendation(parent_run).estimate
            evidence["parent's gradient noise scale B_simple"] = gns
            evidence["B_crit / B_simple"] = fit.b_crit / gns if gns > 0 else math.nan
        except RecommendationError as e:
            evidence["parent's gradient noise scale"] = f"not available ({str(e)[:80]}...)"
    where = (f" from phase {name!r}" if name else "") + (f" at seq_len {seq_len}" if seq_len else "")
    summary = (f"branches{where} at batch sizes {sorted({c[0] for c in curves})} reached loss {tgt:.4g} with steps and "
               f"examples that fit B_crit = E_min/S_min = {_fmt(fit.b_crit)} sequences"
               + (f" ({_fmt(fit.b_crit / gns)}x the parent's noise scale)" if gns and gns > 0 else "")
               + f"; {value} is the nearest batch the parent's micro-batch can run.")
    return Recommendation(
        name="critical_batch_size", value=float(value), unit="sequences per optimizer step", low=low, high=high,
        level=float("nan"), estimate=fit.b_crit, summary=summary, evidence=evidence,
        assumptions=[
            "the steps/examples trade-off (S/S_min - 1)(E/E_min - 1) = 1 of McCandlish et al. 2018 (eq. 2.11)",
            "one shared target loss; B_crit grows as the loss falls, so it describes this loss level",
            ("schedule effects: every branch keeps the parent's LR schedule shape in tokens, its LR scaled per "
             "batch (midtrain sweep's sqrt(k) rule, or the best of an LR grid); the LR is not fully tuned per batch"
             if fair else
             "schedule effects: the branches' LR relative to the parent's is not known (no parent config)"
             if fair is None else
             "schedule effects: the branches kept the parent's LR at every batch size (a sweep with "
             "--lr-scaling none, or of an older release), which handicaps the large batches under Adam and "
             "favours the small ones; rerun `midtrain sweep` (sqrt(k) LR scaling by default)"),
            "the range is the spread over targets and leave-one-branch-out refits, not a coverage interval",
        ],
        would_change=["more branches or longer branches (lower targets)", "an LR tuned per batch size"],
        check="compare with `midtrain recommend PARENT` (the GNS batch size); rerun the sweep later in training",
        branch_step=start)

