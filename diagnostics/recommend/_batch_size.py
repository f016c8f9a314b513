"""Batch size from the gradient noise scale (McCandlish et al. 2018, arXiv 1812.06162)::

    B_simple = tr(Sigma) / |G|^2   estimates   B_noise ~= B_crit,
    steps    S(B) = S_min (1 + B_noise / B),   examples  E(B) = E_min (1 + B / B_noise)

At B = B_noise a run needs twice the minimum steps and twice the minimum examples: larger batches
buy fewer steps with more data, smaller ones save data at the price of steps. The estimate is the
ratio of the MEANS of the per-step unbiased two-batch estimates of tr(Sigma) and |G|^2 over a
window of measured steps (``diagnostics.gns``; the mean of noisy ratios would be biased), and its
range a moving-block bootstrap over those steps (blocks keep the steps' autocorrelation).

    >>> from diagnostics import load_run                                # doctest: +SKIP
    >>> from diagnostics.recommend import batch_size_recommendation
    >>> print(batch_size_recommendation(load_run("runs/demo")).to_text())
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from diagnostics.gns import examples_needed, steps_needed, two_batch_estimates
from diagnostics.recommend._common import (Recommendation, RecommendationError, _check_not_diverged, _fmt,
                                           _phase_table, _runnable_batch)
from diagnostics.stats import block_bootstrap_ratio

__all__ = ["batch_size_recommendation"]


def batch_size_recommendation(run, *, phase: str | None = None, window: int | None = None,
                              level: float = 0.9, n_boot: int = 2000, min_steps: int = 8,
                              seed: int = 0, prefix: str = "gns") -> Recommendation:
    """The batch size (sequences per optimizer step) the measured gradient noise scale points to.

    run: a ``diagnostics.Run`` (``load_run``) or a metrics DataFrame with the GNS raw norms
        (``{prefix}/small_sq``, ``big_sq``, ``b_small``, ``b_big``; the GradientNoiseScale hook logs them).
    phase: the phase (built-in loop runs) whose steps to use; default the latest phase with at least
        ``min_steps`` measured steps.
    window: use the last ``window`` measured steps of that phase (default: its later half, at least
        ``min_steps``): the noise scale grows as the loss falls, so recent steps describe the
        present; half a phase leaves enough steps for the bootstrap.
    level: the range's coverage (moving-block bootstrap over the steps, ``block_bootstrap_ratio``).

    The value is B_simple rounded to a batch the loop can run with the same micro-batch (a multiple
    of micro-batch x processes); ``patch`` sets it (``batch_size``, ``grad_accum``) for that phase
    and every later phase of the same sequence length.
    """
    df = run.metrics if hasattr(run, "metrics") else run
    cols = [f"{prefix}/{c}" for c in ("small_sq", "big_sq", "b_small", "b_big")]
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise RecommendationError(
            f"no gradient-noise-scale measurements: the run has no {', '.join(missing)}. Train with the "
            "GradientNoiseScale hook on (the built-in loop's default, [monitor.gns]).")
    ok = np.ones(len(df), dtype=bool)
    for c in cols:
        ok &= np.isfinite(df[c].to_numpy(dtype=np.float64))
    steps_all = df["step"].to_numpy() if "step" in df.columns else np.arange(len(df))
    table = _phase_table(run)
    chosen = None
    if table:
        counts = {n: int((ok & (steps_all >= s) & (steps_all < e)).sum()) for n, s, e, _ in table}
        if phase is not None:
            chosen = next((t for t in table if t[0] == phase), None)
            if chosen is None:
                raise RecommendationError(f"no phase {phase!r} in this run; phases: {[t[0] for t in table]}")
        else:
            chosen = next((t for t in reversed(table) if counts[t[0]] >= min_steps), None)
            if chosen is None:
                raise RecommendationError(
                    f"no phase has {min_steps} measured GNS steps (measured per phase: {counts}); train "
                    "longer with the GradientNoiseScale hook on ([monitor.gns]), or name a phase and use fewer "
                    "of its steps: `midtrain recommend RUN --phase NAME --window N` (phase=, window=)")
        ok &= (steps_all >= chosen[1]) & (steps_all < chosen[2])
    elif phase is not None:
        raise RecommendationError("phase= needs a run of the built-in loop (run.json with its phases)")
    rows = np.flatnonzero(ok)
    n_avail = len(rows)
    n_use = window if window is not None else max(min_steps, n_avail // 2)
    if n_avail < max(2, min(n_use, min_steps)):
        raise RecommendationError(
            f"only {n_avail} measured GNS steps{' in phase ' + repr(chosen[0]) if chosen else ''}; "
            f"a recommendation needs at least {min_steps}")
    rows = rows[-min(n_use, n_avail):]
    # steps whose update was skipped (non-finite gradient) are dropped; a diverged stretch is refused
    skipped = _check_not_diverged(run, int(steps_all[rows[0]]), int(steps_all[rows[-1]]), "the noise scale")
    rows = rows[~np.isin(steps_all[rows], skipped)]
    pick = lambda c: df[c].to_numpy(dtype=np.float64)[rows]  # noqa: E731
    small, big, bs, bb = (pick(c) for c in cols)
    grad_sq, trace_cov = two_batch_estimates(small, big, bs, bb)
    grad_sq, trace_cov = np.atleast_1d(grad_sq), np.atleast_1d(trace_cov)
    steps = steps_all[rows]
    g_mean, t_mean = float(grad_sq.mean()), float(trace_cov.mean())
    if g_mean <= 0 or t_mean < 0:
        raise RecommendationError(
            f"the noise scale is not defined over steps {int(steps[0])}-{int(steps[-1])}: mean |G|^2 "
            f"estimate {g_mean:.3g}, mean tr(Sigma) estimate {t_mean:.3g}. The gradient signal is below "
            "the noise at these batch sizes: measure over more steps (a longer window), or with a larger "
            "B_big (more accumulation).")
    b_simple = t_mean / g_mean
    low, high, _ = block_bootstrap_ratio(trace_cov, grad_sq, n_boot=n_boot, level=level, seed=seed)
    half = len(rows) // 2
    first = float(trace_cov[:half].sum() / grad_sq[:half].sum()) if half and grad_sq[:half].sum() > 0 else math.nan
    second = float(trace_cov[half:].sum() / grad_sq[half:].sum()) if grad_sq[half:].sum() > 0 else math.nan

    current = float(np.median(bb))
    seq_len = _median_col(df, "train/seq_len", rows)
    pcfg = chosen[3] if chosen else {}
    if seq_len is None and pcfg.get("seq_len"):
        seq_len = float(pcfg["seq_len"])
    world = int((run.info or {}).get("world_size") or 1) if hasattr(run, "metrics") else 1
    value, accum, micro = _runnable_batch(b_simple, pcfg, current, world, float(np.median(bs)))
    evidence = {
        "phase": chosen[0] if chosen else None,          # which phase and sequence length the answer holds for
        "seq_len": int(seq_len) if seq_len else None,
        "steps": f"{int(steps[0])}-{int(steps[-1])} ({len(rows)} measured)" + (f", phase {chosen[0]!r}" if chosen else ""),
        "B_simple (ratio of mean estimates)": b_simple,
        "mean |G|^2 estimate": g_mean,
        "mean tr(Sigma) estimate": t_mean,
        "B_small / B_big (sequences)": f"{_fmt(float(np.median(bs)))} / {_fmt(current)}",
        "B_simple, first / second half of the window": f"{_fmt(first)} / {_fmt(second)}",
        "current batch (sequences)": current,
        "steps x S_min at the current batch": float(steps_needed(current, 1.0, b_simple)),
        "examples x E_min at the current batch": float(examples_needed(current, 1.0, b_simple)),
    }
    if seq_len:
        evidence["B_simple (tokens)"] = b_simple * seq_len
    by_domain = _domain_sentence(df, rows, prefix)
    if by_domain:
        evidence["B_simple by domain"] = by_domain
    assumptions = [
        "B_simple approximates the critical batch size B_noise when the Hessian is well conditioned "
        "(McCandlish et al. 2018, section 2.2); otherwise it is a scale, not the exact optimum",
        "SGD-like dynamics: under Adam the noise scale can sit far below the empirical critical "
        "batch size (Merrill et al. 2025, arXiv 2505.23971), so treat the value as a lower bound and "
        "check it with branches at 1/2x, 1x and 2x",
        "the data mixture, learning rate and sequence length stay as in the measured window",
    ]
    would_change = [
        "the noise scale grows as the loss falls (McCandlish et al. 2018; Kaplan et al. 2020 fit the "
        "critical batch as a power law of the loss); re-measure later in training, before a long phase",
        "a different data mixture or sequence length (other per-example gradient statistics)",
        "a different learning rate or schedule phase (B_simple is measured at the current weights)",
    ]
    if math.isfinite(first) and math.isfinite(second) and second > 1.2 * first:
        would_change.insert(0, f"it is rising within the window ({_fmt(first)} -> {_fmt(second)}): the "
                               "next phase likely warrants a larger batch")
    patch: dict[str, Any] = {}
    check = ""
    if chosen and pcfg:
        later = [t for t in table if t[1] >= chosen[1] and t[3].get("seq_len") == pcfg.get("seq_len")]
        patch = {"phases": {n: {"batch_size": value, "grad_accum": accum} for n, _, _, _ in later}}
        check = ("midtrain recommend RUN --write-config rec.toml, then midtrain train --from RUN --step S "
                 "--config rec.toml --out RUN-bs%d (S: a checkpoint at or before step %d, the state after the "
                 "window); compare its validation loss per token with the parent's, and with branches at "
                 "half and twice the batch" % (value, int(steps[-1]) + 1))
    where = " in phase %r" % chosen[0] if chosen else ""
    where += f" at seq_len {int(seq_len)}" if seq_len else ""
    summary = (f"measured gradient noise scale B_simple = {_fmt(b_simple)} sequences{where}"
               + (f" ({_fmt(b_simple * seq_len)} tokens)" if seq_len else "")
               + f"; the run used {_fmt(current)}. " + _tradeoff_sentence(current, b_simple))
    return Recommendation(name="batch_size", value=float(value), unit="sequences per optimizer step",
                          low=low, high=high, level=level, estimate=b_simple, summary=summary,
                          evidence=evidence, assumptions=assumptions, would_change=would_change,
                          patch=patch, check=check, branch_step=int(steps[-1]) + 1 if patch else None)


def _domain_sentence(df, rows, prefix: str) -> str:
    """Which domain drives the noise scale: each domain's last per-domain B_simple
    (``{prefix}/domain/<d>/b_simple``, GradientNoiseScale's per-domain GNS) within the window's steps,
    the largest named first; "" when the run has none."""
    head, tail = f"{prefix}/domain/", "/b_simple"
    last = {}
    for c in df.columns:
        if c.startswith(head) and c.endswith(tail):
            v = df[c].to_numpy(dtype=np.float64)[rows[0]:rows[-1] + 1]
            v = v[np.isfinite(v)]
            if len(v):
                last[c[len(head):-len(tail)]] = float(v[-1])
    if not last:
        return ""
    order = sorted(last, key=last.get, reverse=True)
    return (f"{order[0]} drives the noise scale (the largest per-domain B_simple, its last value in the "
            f"window): " + ", ".join(f"{d} {_fmt(last[d])}" for d in order) + " sequences")


def _median_col(df, col, rows):
    if col not in df.columns:
        return None
    v = df[col].to_numpy(dtype=np.float64)[rows]
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _tradeoff_sentence(current: float, b_noise: float) -> str:
    s, e = float(steps_needed(current, 1.0, b_noise)), float(examples_needed(current, 1.0, b_noise))
    if current > 2 * b_noise:
        return (f"At {_fmt(current)} the run spends {e:.2f}x the minimum examples for {s:.2f}x the minimum "
                "steps: a smaller batch reaches the same loss on less data.")
    if current < b_noise / 2:
        return (f"At {_fmt(current)} it needs {s:.2f}x the minimum steps (examples {e:.2f}x): a larger batch "
                "reaches the same loss in fewer steps at little extra data.")
    return f"The current batch is near the noise scale (steps {s:.2f}x, examples {e:.2f}x their minima)."
