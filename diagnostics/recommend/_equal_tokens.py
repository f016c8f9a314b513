"""The largest batch that loses nothing at equal tokens: the critical batch size as Merrill et al. 2025
(arXiv 2505.23971) measure it, from the branches of ``midtrain sweep RUN --step S --batch-sizes ...``.

Every branch of a sweep trains the same tokens from the same checkpoint, its LR scaled by sqrt(k) (or the
best of an LR grid), so its final validation loss (mean over domains, or one domain) is the loss of that
batch size at equal tokens. The critical batch hypothesis of Merrill et al.: up to B*, a larger batch (with
its LR scaled) does not hurt the loss-versus-tokens curve; above B*, it does. Measured directly:

    B* = the largest swept batch whose final loss, and that of every swept batch between it and the best
         one, is within the noise of the best:  J_b <= J_best + max(z sqrt(se_best^2 + se_b^2), tol J_best)

with z the normal quantile of ``level`` (two-sided), se = sigma / sqrt(replicates), sigma the seed noise of
one branch's final loss: the pooled standard deviation of replicate branches (``midtrain sweep --seeds
0,1``: same batch and LR, another data order) where there are any, else the median point-to-point scatter of
the branches' validation curves after S (``diagnostics.stats.robust_noise_scale``; weaker, and said so), and
``tol`` an optional relative tolerance (Merrill et al.'s epsilon; default 0: the noise alone). A branch that
ended above the sweep's tolerance is a batch that costs tokens; the answer is what a person with a token
budget wants: as large (as parallel) as possible without losing loss.

This differs from McCandlish et al.'s B_crit (``_critical_batch``): there, B_crit = E_min / S_min is the
batch at which a run needs twice the minimal steps AND twice the minimal examples, a balance of steps
against tokens, so at equal tokens it is worse than a smaller batch by construction. Both are reported;
``combined_batch_recommendation`` follows this one when it can be made (docs/recommendations.md).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt
from diagnostics.recommend._critical_batch import _lr_multiplier, _phase_of, branch_curve
from diagnostics.recommend._probes import replicate_seed
from diagnostics.stats import pooled_sd, robust_noise_scale

__all__ = ["equal_tokens_recommendation", "equal_tokens_table", "token_efficient_batch"]


def equal_tokens_table(parent_run, branch_runs, *, domain: str | None = None) -> tuple[list[dict], float, str, int]:
    """(groups, sigma, how, start): one group per (batch, LR multiplier) with its replicates' final losses
    ``Js``, mean ``J``, count ``n``, ``seeds`` and ``labels``, then per batch only the LR with the lowest
    mean (key ``kept``); sigma the seed noise of one branch's final loss and where it comes from."""
    rows, starts = [], set()
    for r in branch_runs:
        start, b, steps, loss = branch_curve(r, parent_run, domain)
        starts.add(start)
        mult = _lr_multiplier(r, parent_run, start)
        seed = replicate_seed(parent_run, r) if parent_run is not None else 0
        rows.append((b, mult, seed, str(getattr(r, "path", "?")), steps, loss))
    if len(starts) > 1:
        raise RecommendationError(f"the branches start at different steps {sorted(starts)}; a sweep's branches "
                                  "share one branch point.")
    by: dict = {}
    for b, mult, seed, label, steps, loss in rows:
        g = by.setdefault((b, "n/a" if math.isnan(mult) else mult),
                          {"batch": b, "lr_mult": mult, "Js": [], "seeds": [], "labels": [], "scatter": []})
        g["Js"].append(float(loss[-1]))
        g["seeds"].append(seed)
        g["labels"].append(label)
        if len(loss) >= 4:
            g["scatter"].append(robust_noise_scale(loss))
    groups = sorted(by.values(), key=lambda g: (g["batch"], str(g["lr_mult"])))
    for g in groups:
        g["n"], g["J"] = len(g["Js"]), float(np.mean(g["Js"]))
    for b in {g["batch"] for g in groups}:
        mine = [g for g in groups if g["batch"] == b]
        keep = min(mine, key=lambda g: g["J"])
        for g in mine:
            g["kept"] = g is keep
    reps = [g for g in groups if g["n"] >= 2]
    if reps:
        sigma, dof = pooled_sd([g["Js"] for g in reps])
        how = (f"pooled spread of the replicates of {len(reps)} branch setting(s) ({sum(g['n'] for g in reps)} "
               f"runs, {dof} degrees of freedom)")
    else:
        scat = [s for g in groups for s in g["scatter"]]
        sigma = float(np.median(scat)) if scat else math.nan
        how = ("median point-to-point scatter of the branches' validation curves (no replicates: "
               "midtrain sweep --seeds 0,1 measures the seed noise)" if scat else
               "not measured (no replicates, fewer than 4 evaluations per branch)")
    return groups, sigma, how, starts.pop()


def token_efficient_batch(groups: list[dict], sigma: float, *, level: float = 0.9,
                          tolerance: float = 0.0) -> tuple[dict, list[dict], dict]:
    """(chosen, kept, margins): among the kept group of each batch (``equal_tokens_table``), the largest batch
    whose mean final loss, and that of every kept batch between it and the best, is within the margin of the
    best (module docstring); ``margins`` maps each batch to its margin."""
    kept = sorted((g for g in groups if g.get("kept", True)), key=lambda g: g["batch"])
    if not kept:
        raise RecommendationError("no branches to compare")
    best = min(kept, key=lambda g: g["J"])
    z = NormalDist().inv_cdf(0.5 + level / 2)
    margins = {}
    for g in kept:
        noise = z * math.hypot(sigma / math.sqrt(best["n"]), sigma / math.sqrt(g["n"])) if math.isfinite(sigma) else 0.0
        margins[g["batch"]] = max(noise, tolerance * abs(best["J"]))
    chosen = best
    for g in kept:   # walk up from the best batch; stop at the first one outside the margin
        if g["batch"] <= best["batch"]:
            continue
        if g["J"] > best["J"] + margins[g["batch"]]:
            break
        chosen = g
    return chosen, kept, margins


def equal_tokens_recommendation(parent_run, branch_runs, *, domain: str | None = None, level: float = 0.9,
                                tolerance: float = 0.0) -> Recommendation:
    """The ``equal_tokens_batch`` entry: the largest batch of a sweep that ends within noise of the best at
    equal tokens (module docstring). ``tolerance``: a relative loss tolerance added to the noise margin."""
    branch_runs = list(branch_runs)
    groups, sigma, how, start = equal_tokens_table(parent_run, branch_runs, domain=domain)
    if len({g["batch"] for g in groups}) < 2:
        raise RecommendationError(f"an equal-token comparison needs branches at >= 2 batch sizes; got "
                                  f"{sorted({g['batch'] for g in groups})}.")
    chosen, kept, margins = token_efficient_batch(groups, sigma, level=level, tolerance=tolerance)
    best = min(kept, key=lambda g: g["J"])
    name, seq_len = _phase_of(branch_runs[0], start)
    where = (f"phase {name!r}" if name else "the branches' phase") + (f" at seq_len {seq_len}" if seq_len else "")
    what = "mean validation loss over domains" if domain is None else f"validation loss of {domain!r}"
    evidence = {"phase": name, "seq_len": seq_len, "branch point": f"step {start}",
                "objective": f"final {what} of each branch, all at the sweep's equal tokens",
                "noise": f"sigma {_fmt(sigma)} per branch ({how}); margin z x sqrt(se_best^2 + se^2), z = "
                         f"{NormalDist().inv_cdf(0.5 + level / 2):.2f}" + (f", at least {tolerance:.2%} of the best"
                                                                        if tolerance else "")}
    for g in groups:
        lr = "LR x n/a" if isinstance(g["lr_mult"], float) and math.isnan(g["lr_mult"]) else f"LR x {g['lr_mult']:g}"
        sd = f", sd {_fmt(float(np.std(g['Js'], ddof=1)))}" if g["n"] > 1 else ""
        evidence[f"batch {g['batch']} ({lr})"] = (
            f"{_fmt(g['J'])} (mean of {g['n']}{sd}), {g['J'] - best['J']:+.4f} vs the best"
            + (f" (margin {_fmt(margins[g['batch']])})" if g.get("kept", True) else " (not the best LR of this batch)"))
    top, bottom = max(g["batch"] for g in kept), min(g["batch"] for g in kept)
    lower_bound = chosen["batch"] == top
    summary = (f"{chosen['batch']} sequences for {where}: the largest swept batch whose final loss at equal tokens "
               f"is within noise of the best ({_fmt(best['J'])} at batch {best['batch']}; {chosen['batch']}: "
               f"{_fmt(chosen['J'])})" + ("; the largest batch swept, so a lower bound: sweep larger batches"
                                         if lower_bound else "")
               + ("; the best is the smallest batch swept, so a smaller one may end lower still: sweep smaller "
                  "batches to see where the loss stops improving" if best["batch"] == bottom else ""))
    near = [g["batch"] for g in kept if g["J"] <= best["J"] + margins[g["batch"]]]
    return Recommendation(
        name="equal_tokens_batch", value=float(chosen["batch"]), unit="sequences per optimizer step",
        low=float(min(near)), high=float(max(near)), level=level, estimate=chosen["J"], summary=summary,
        evidence=evidence,
        assumptions=["every branch trained the same tokens from the same checkpoint (a midtrain sweep)",
                     "the LR per batch is the sweep's (sqrt(k) or the best of an LR grid), not fully tuned",
                     "the answer holds for this phase, sequence length and loss level; the critical batch grows "
                     "as the loss falls (Merrill et al. 2025)",
                     "the range is the swept batches within the margin of the best, not a coverage interval"],
        would_change=["replicate branches (--seeds 0,1) where there are none: they measure the seed noise",
                      "larger batch sizes" if lower_bound else "batch sizes between the swept ones",
                      *(["smaller batch sizes (the best is the smallest swept)"] if best["batch"] == bottom else []),
                      "a later branch point (the critical batch grows during training)"],
        check=f"midtrain train --from PARENT --step {start} with the batch-{chosen['batch']} branch's config and "
              "another seed: at equal tokens it should end within noise of the best batch",
        branch_step=start)
