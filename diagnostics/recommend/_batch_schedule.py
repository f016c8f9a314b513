"""A batch-size ramp from the trajectory of the gradient noise scale against tokens.

B_simple rises as the loss falls (McCandlish et al. 2018; the critical batch grows during training,
Merrill et al. 2025). Fitted over the measured steps of one sequence length up to a checkpoint S as a
power law of the tokens seen, ``B(T) = c T^p`` (ratio of means of the unbiased two-batch estimates
in consecutive bins, least squares in log-log), it is extrapolated over the budget left after S in
that sequence length. The ramp keeps the current batch B0 while B(T) / B(T0) < 2 and then runs
k x B0 from the tokens where the ratio reaches k = 2, 3, ... (integer multiples):

    T_k = T0 k^(1/p)

i.e. the batch follows the RELATIVE growth of the noise scale from a batch taken as right at S (under
Adam the level of B_simple is off, its growth less so; check the level with ``midtrain sweep``).
Each batch change multiplies the LR by sqrt(k) (Adam-type optimisers; OLMo-core's batch-size warmup
does the same). The patch is the phase list with phases split at the switch points: a phase is split
only where its LR is constant (after its warmup, no decay); a switch that falls inside a decaying
phase (or a warmup) moves to its end, which the evidence says.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diagnostics.gns import two_batch_estimates
from diagnostics.recommend._common import (Recommendation, RecommendationError, _check_not_diverged, _phase_table,
                                           _runnable_batch, lr_factor, rescale_phase)

__all__ = ["batch_schedule_recommendation", "ramp_points"]

HOW = ("train with the GradientNoiseScale hook on ([monitor.gns], the built-in loop's default) and checkpoints "
       "inside the phases (checkpoint_every), then `midtrain recommend RUN` (or name a checkpoint: from_step=)")


def ramp_points(c: float, p: float, t0: float, t_end: float) -> list[tuple[int, float]]:
    """[(k, T_k)]: the tokens T_k = T0 k^(1/p) in (T0, T_end) at which B(T) = c T^p reaches k B(T0)."""
    if not (p > 0 and c > 0 and t0 > 0):
        return []
    out, k = [], 2
    while (t := t0 * k ** (1.0 / p)) < t_end:
        out.append((k, float(t)))
        k += 1
    return out


def _fit_trajectory(df, rows, n_bins: int, prefix: str) -> tuple[float, float, np.ndarray, np.ndarray]:
    pick = lambda c: df[c].to_numpy(dtype=np.float64)[rows]  # noqa: E731
    g, t = two_batch_estimates(pick(f"{prefix}/small_sq"), pick(f"{prefix}/big_sq"), pick(f"{prefix}/b_small"),
                               pick(f"{prefix}/b_big"))
    tok = pick("train/tokens")
    bins = [b for b in np.array_split(np.arange(len(rows)), n_bins) if len(b) and g[b].sum() > 0 and t[b].sum() > 0]
    xs = np.array([tok[b].mean() for b in bins])
    ys = np.array([t[b].sum() / g[b].sum() for b in bins])
    if len(xs) < 2:
        return math.nan, math.nan, xs, ys
    p0, logc0 = np.polyfit(np.log(xs), np.log(ys), 1)
    # a bin's ratio of means is c x mean(T^p) over its steps (|G|^2 about constant inside a bin), not c x
    # mean(T)^p: fitted as such in log space, so wide early bins do not bias the exponent
    from scipy.optimize import least_squares

    res = least_squares(lambda v: v[0] + np.log([np.mean(tok[b] ** v[1]) for b in bins]) - np.log(ys),
                        [logc0, p0])
    return float(math.exp(res.x[0])), float(res.x[1]), xs, ys


def batch_schedule_recommendation(run, *, from_step: int | None = None, n_bins: int = 8, min_points: int = 4,
                                  lr_scaling: str = "sqrt", prefix: str = "gns") -> Recommendation:
    """A batch-size ramp over the budget left after checkpoint ``from_step`` (default: the latest
    checkpoint inside a sequence-length stretch with at least ``min_points`` bins of measured GNS
    before it), as a config patch of phases. Raises RecommendationError with what is missing."""
    df = run.metrics if hasattr(run, "metrics") else run
    need = [f"{prefix}/{c}" for c in ("small_sq", "big_sq", "b_small", "b_big")] + ["train/tokens"]
    if [c for c in need if c not in df.columns]:
        raise RecommendationError(f"a batch-size ramp needs the noise-scale trajectory ({', '.join(need)}); the run "
                                  f"lacks {[c for c in need if c not in df.columns]}: {HOW}")
    table = _phase_table(run)
    if not table:
        raise RecommendationError("a batch-size ramp is a config patch of phases: it needs a run of the built-in "
                                  "loop (run.json with its phases)")
    ok = np.ones(len(df), dtype=bool)
    for c in need:
        ok &= np.isfinite(df[c].to_numpy(dtype=np.float64))
    steps = df["step"].to_numpy()
    ckpts = [s for s, _ in run.checkpoints()] if hasattr(run, "checkpoints") else []
    cands = [from_step] if from_step is not None else sorted(ckpts, reverse=True)
    why = []
    for s in cands:
        here = next((i for i, (_, a, e, _) in enumerate(table) if a <= s < e), None)
        if here is None:
            why.append(f"step {s} is not inside a phase with budget left")
            continue
        seq = table[here][3].get("seq_len")
        lo = here
        while lo > 0 and table[lo - 1][3].get("seq_len") == seq:
            lo -= 1
        rows = np.flatnonzero(ok & (steps >= table[lo][1]) & (steps < s))
        if len(rows) < 2 * min_points:
            why.append(f"from step {s}: {len(rows)} measured GNS steps of seq_len {seq} before it")
            continue
        skipped = _check_not_diverged(run, int(steps[rows[0]]), int(steps[rows[-1]]), "the noise-scale trajectory")
        rows = rows[~np.isin(steps[rows], skipped)]
        c, p, xs, ys = _fit_trajectory(df, rows, n_bins, prefix)
        if len(xs) < min_points:
            why.append(f"from step {s}: only {len(xs)} of {n_bins} bins with a measurable noise scale")
            continue
        return _schedule(run, table, here, s, seq, c, p, xs, ys, lr_scaling)
    raise RecommendationError(
        "too few points for a batch-size ramp (it needs >= %d bins of measured noise scale before a checkpoint "
        "with budget left after it): %s. %s" % (min_points, "; ".join(why) or "the run has no checkpoints", HOW))


def _schedule(run, table, here, s, seq, c, p, xs, ys, lr_scaling) -> Recommendation:
    df = run.metrics
    name, start, _, pc = table[here]
    before = df.loc[df["step"] < s, "train/tokens"].dropna()
    t0 = float(before.iloc[-1]) if len(before) else 0.0
    group = []
    for t in table[here:]:   # the phases from S on with this sequence length, up to the first other one
        if t[3].get("seq_len") != seq:
            break
        group.append(t)
    b0 = int(pc["batch_size"])
    left = [(t, (s - t[1]) if i == 0 else 0) for i, t in enumerate(group)]
    t_end = t0 + sum((t[2] - t[1] - done) * int(t[3]["batch_size"]) * seq for t, done in left)
    if not p > 0:
        raise RecommendationError(
            f"the noise scale does not rise with tokens before step {s} (fitted exponent {p:.3g} <= 0 over "
            f"{len(xs)} bins of seq_len {seq}): no ramp; keep the batch and measure again later in training "
            f"(`midtrain recommend RUN` on a longer run, with checkpoints inside its phases)")
    points = ramp_points(c, p, t0, t_end)
    world = int((run.info or {}).get("world_size") or 1)
    phases, deferred, cursor, new_phases = [], [], t0, []
    for (pname, a, e, pcfg), done in left:
        ptok = (e - a - done) * int(pcfg["batch_size"]) * seq
        inside = [(k, tk) for k, tk in points if cursor < tk < cursor + ptok]
        k_now = max([1] + [k for k, tk in points if tk <= cursor])
        constant = pcfg.get("decay", "constant") == "constant"
        warm = max(0, int(pcfg.get("warmup_steps") or 0) - done) * int(pcfg["batch_size"]) * seq
        if not constant:
            deferred += [f"k={k} at {tk:.4g} tokens -> end of phase {pname!r} (it decays)" for k, tk in inside]
            inside = []
        elif warm:
            deferred += [f"k={k} at {tk:.4g} tokens -> end of the warmup of {pname!r}" for k, tk in inside
                         if tk < cursor + warm]
            inside = [(k, max(tk, cursor + warm)) for k, tk in inside]
        bounds = [cursor] + [tk for _, tk in inside] + [cursor + ptok]
        ks = [k_now] + [k for k, _ in inside]
        for j, k in enumerate(ks):
            if j and bounds[j + 1] - bounds[j] <= 0:
                continue
            batch, accum, _ = _runnable_batch(k * b0, pcfg, float(pcfg["batch_size"]), world, 1.0)
            piece = dict(pcfg, name=pname if j == 0 else f"{pname}.bs{batch}")
            span = (bounds[j + 1] - bounds[j]) / (int(pcfg["batch_size"]) * seq)   # parent steps of this piece
            if j:
                piece.update(warmup_steps=0, steps=max(1, round(span)), tokens=None)
            elif len(ks) > 1:
                piece.update(steps=done + max(1, round(span)), tokens=None)
            piece.update(rescale_phase(piece, batch, accum, done=done if j == 0 else 0, lr_scaling=lr_scaling))
            new_phases.append(piece)
            phases.append((pname, piece["name"], bounds[j], batch, lr_factor(batch, int(pcfg["batch_size"]),
                                                                             lr_scaling)))
        cursor += ptok
    cfg_phases = list((run.config or {}).get("phases") or [])
    names = [q.get("name") for q in cfg_phases]
    first, last = names.index(group[0][0]), names.index(group[-1][0])
    full = cfg_phases[:first] + new_phases + cfg_phases[last + 1:]
    final = phases[-1][3]
    evidence: dict[str, Any] = {
        "phase": name, "seq_len": seq, "from step": s, "tokens at the start": t0,
        "budget left (tokens, this seq_len)": t_end - t0,
        "fit B_simple = c T^p": f"c = {c:.4g}, p = {p:.4g} over {len(xs)} bins, tokens {xs[0]:.4g}-{xs[-1]:.4g}",
        "B_simple at the start (fitted)": c * t0 ** p,
        "switch points (k: tokens)": ", ".join(f"{k}: {tk:.6g}" for k, tk in points) or "none inside the budget",
        "schedule": "; ".join(f"{piece} from {tk:.6g} tokens: batch {b}, LR x {f:.4g}" for _, piece, tk, b, f in phases),
    }
    if deferred:
        evidence["switches moved"] = "; ".join(deferred)
    return Recommendation(
        name="batch_schedule", value=float(final), unit="sequences per optimizer step (at the end of the ramp)",
        low=float(b0), high=float(final), level=float("nan"), estimate=float(p),
        summary=(f"from step {s} ({name!r}, seq_len {seq}) the noise scale grows as tokens^{p:.3g}: ramp the batch "
                 f"from {b0} to {final} over the {t_end - t0:.4g} tokens left, LR x sqrt(k) at each switch "
                 f"({len(points)} switch point(s))"),
        evidence=evidence,
        assumptions=[
            "B_simple keeps growing as the same power of the tokens seen over the rest of the budget (an "
            "extrapolation; a mixture switch or an anneal changes it)",
            "the batch at the start is right and the critical batch grows in proportion to B_simple (under Adam "
            "the level of B_simple sits far below the empirical critical batch, Merrill et al. 2025)",
            "LR x sqrt(k) keeps Adam's dynamics at k x B (the square-root rule); warmup stays in steps",
            "the range is [current batch, final batch], not a statistical interval",
        ],
        would_change=["a sweep at a later checkpoint (midtrain sweep) measuring the critical batch directly",
                      "a different mixture or sequence length in the remaining phases"],
        patch={"phases": full},
        check=(f"TrainConfig.from_dict(run.config).with_patch(rec.patch) -> midtrain train --from RUN --step {s} "
               f"--config ramp.toml; compare with a fair sweep from a later checkpoint (midtrain sweep RUN --step S2 "
               f"--batch-sizes {b0},{2 * b0},{4 * b0})"),
        branch_step=s)
