"""Which mixture the switched-to phase should train on: the ``mixture`` entry of ``midtrain recommend``,
judged on mixture probes (branches of ``midtrain sweep RUN --switch-at S --mixtures NAME=w1,w2,...``,
docs/recommendations.md, "Mixture").

The candidates and the objective are the data switch's (``switch_table``): each (switch step, mixture)
pair, its replicates averaged, judged on the mean final validation loss of the target domains at the end
of the switched-to phase, subject to the earlier domains ending at most ``tolerance`` above the run's own
recipe. Each mixture is represented by its best feasible candidate (the step it was best at); the chosen
mixture is the best of those, i.e. the mixture of the data switch's chosen candidate. Range: the
mixtures whose objective lies within z x sqrt(se_best^2 + se^2) of the best (z the normal quantile of
``level``, se = sigma / sqrt(replicates), sigma the seed noise of one run's objective: the replicates'
pooled spread, else the evaluations' scatter); ``low`` / ``high`` is the chosen mixture's objective
+- z x se. Without mixture probes the run's per-domain learnability proposes candidates
(``candidate_mixtures``) and the error prints the sweep command.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt
from diagnostics.recommend._data_switch import switch_table

__all__ = ["mixture_recommendation", "candidate_mixtures"]


def _learning_rates(run, domains: list[str], lo: int, hi: int) -> tuple[dict[str, float], str]:
    """Per domain, how fast it was still learning at the switch: the last ``difficulty/<d>/learnability``
    (nats per e-fold of that domain's tokens) before ``hi``; without it, the relative drop of
    ``val/<d>/loss`` over the last third of steps ``lo``..``hi``."""
    df = run.metrics
    df = df[(df["step"] > lo) & (df["step"] <= hi)]
    out: dict[str, float] = {}
    for d in domains:
        c = f"difficulty/{d}/learnability"
        if c in df.columns and df[c].notna().any():
            out[d] = float(df[c].dropna().iloc[-1])
    if len(out) == len(domains):
        return out, "difficulty/<domain>/learnability at the switch (nats per e-fold of the domain's tokens)"
    out = {}
    for d in domains:
        c = f"val/{d}/loss"
        if c not in df.columns:
            continue
        v = df[["step", c]].dropna()
        v = v[v["step"] >= lo + 2 * (hi - lo) // 3]
        if len(v) >= 2 and v[c].iloc[0] > 0:
            out[d] = float((v[c].iloc[0] - v[c].iloc[-1]) / v[c].iloc[0])
    if len(out) == len(domains):
        return out, f"relative drop of val/<domain>/loss over steps {lo + 2 * (hi - lo) // 3}-{hi} (no learnability)"
    return {}, "no per-domain learnability or validation loss at the switch"


def candidate_mixtures(run, base: dict[str, float], lo: int, hi: int) -> tuple[dict[str, dict[str, float]], str]:
    """Candidate mixtures to probe, built from ``base`` (the switched-to phase's weights) and how fast each
    domain was still learning at the switch (``_learning_rates``): ``learn``, half ``base`` and half
    ``base`` reweighted in proportion to the learning rate (domains that stopped learning get none of the
    second half), and ``up<domain>``, the fastest-learning domain's weight raised by half its share (the
    others scaled down). Returns ({NAME: weights}, which signal it used); empty without a signal."""
    rates, how = _learning_rates(run, list(base), lo, hi)
    if not rates:
        return {}, how
    tot = float(sum(base.values())) or 1.0
    b = {d: float(w) / tot for d, w in base.items()}
    pos = {d: max(0.0, rates[d]) * b[d] for d in b}
    out: dict[str, dict[str, float]] = {}
    if sum(pos.values()) > 0:
        s = sum(pos.values())
        out["learn"] = {d: round(0.5 * b[d] + 0.5 * pos[d] / s, 3) for d in b}
    fast = max(b, key=lambda d: rates[d])
    if rates[fast] > 0:
        w = min(0.95, b[fast] * 1.5)
        rest = sum(v for d, v in b.items() if d != fast)
        out[f"up{fast}"] = {d: round(w if d == fast else v * (1 - w) / rest if rest else 0.0, 3) for d, v in b.items()}
    return out, how


def mixture_recommendation(run, branches=(), *, target_domains=None, tolerance: float = 0.01,
                           level: float = 0.9) -> Recommendation:
    """The mixture of the switched-to phase minimising the data switch's objective among the mixtures of
    ``branches`` (switch probes with ``--mixtures``, their replicates) and the run's own; RecommendationError
    saying why, with the sweep command and proposed candidates, when fewer than two mixtures were probed."""
    t = switch_table(run, branches, target_domains=target_domains, tolerance=tolerance)
    mixes = {tuple(sorted(g["mixture"].items())) for g in t.groups}
    if len(mixes) < 2:
        done = [g for g in t.groups if g["ok"]]
        step = min(done, key=lambda g: g["J"])["step"] if done else t.P
        props, how = candidate_mixtures(run, dict(t.nxt.get("mixture") or {}), t.lo, t.P)
        order = list(t.nxt.get("mixture") or {})
        arg = " ".join(f"{n}=" + ",".join(f"{w[d]:g}" for d in order) for n, w in props.items())
        ckpts = [s for s, _ in run.checkpoints()] if hasattr(run, "checkpoints") else []
        raise RecommendationError(
            "no mixture probes (switch probes with other mixtures than phase "
            f"{t.nxt.get('name')!r}'s {t.nxt.get('mixture')})"
            + (f"; candidates from the run's per-domain learnability ({how}; the domains still learning "
               f"upweighted): {props}" if props else f"; {how}: name candidates yourself")
            + f". Probe them (objective: {t.objective}): midtrain sweep {run.path} --step {step} --switch-at {step} "
            f"--mixtures {arg or 'NAME=' + ','.join('w' for _ in order)} --seeds 0,1"
            + ("" if step in ckpts else f" (step {step} needs a checkpoint: checkpoint_steps = [{step}])")
            + f", then midtrain recommend {run.path} --branches <probe dirs>")
    ok = [g for g in t.groups if g["ok"]]
    if not ok:
        raise RecommendationError(f"no mixture keeps {t.earlier} within {tolerance:.1%} of the run's own recipe "
                                  "(raise the tolerance or probe milder mixtures)")
    per_mix: dict = {}
    for g in ok:   # each mixture at its best feasible step
        k = tuple(sorted(g["mixture"].items()))
        if k not in per_mix or g["J"] < per_mix[k]["J"]:
            per_mix[k] = g
    best = min(per_mix.values(), key=lambda g: g["J"])
    z = NormalDist().inv_cdf(0.5 + level / 2)
    near = t.near(best, level, among=list(per_mix.values()))
    se = t.se(best)
    low, high = (best["J"] - z * se, best["J"] + z * se) if math.isfinite(se) else (math.nan, math.nan)
    rejected = [g for g in t.groups if not g["ok"]]
    evidence = {
        "objective": t.objective,
        "mixtures": "; ".join(
            f"{g['name']} {g['mixture']} at step {g['step']}: {_fmt(g['J'])}"
            + (f" +- {_fmt(float(np.std(g['Js'], ddof=1)))} sd over {g['n']} seeds" if g["n"] > 1 else
               f" +- {_fmt(t.sigma)} (one run)")
            + f", earlier {g['rise']:+.2%}" for g in sorted(per_mix.values(), key=lambda g: g["J"])),
        "tolerance": f"earlier domains {t.earlier} at most {tolerance:.1%} above the run's own recipe: "
                     + ("every candidate passes" if not rejected else "rejected " + "; ".join(
                         f"{g['name']} at step {g['step']} ({g['rise']:+.2%})" for g in rejected)),
        "noise": f"sigma {_fmt(t.sigma)} per run's final objective ({t.how}); indistinguishable from the best "
                 f"(within {z:.2f} x sqrt(se_best^2 + se^2)): " + ", ".join(g["name"] for g in near),
    }
    steps = sorted({g["step"] for g in ok})
    for st in steps:   # mixtures probed at the same step: a comparison the switch step does not confound
        same = sorted((g for g in ok if g["step"] == st), key=lambda g: g["J"])
        if len(same) >= 2:
            evidence[f"at step {st}"] = ", ".join(f"{g['name']} {_fmt(g['J'])}" for g in same)
    own = best["name"].endswith("(the run's)")
    patch = {} if own else {"phases": {t.nxt.get("name"): {"mixture": dict(best["mixture"])}}}
    would_change = ["another objective (target domains, tolerance)", "mixtures between the probed ones"
                    + ("" if t.n_replicated else "; replicate probes (--seeds 0,1) measure the seed noise")]
    if len(near) > 1:
        would_change.insert(0, f"{len(near) - 1} other mixture(s) are within the noise of the best: more seeds")
    if best["step"] != t.P and not own:
        would_change.insert(0, f"the mixture was best with the switch at step {best['step']} (the data_switch entry); "
                               f"the patch sets phase {t.nxt.get('name')!r}'s mixture only, the probe "
                               f"{best['labels'][0]} also trains on it from step {best['step']}")
    summary = (("keep" if own else "train") + f" phase {t.nxt.get('name')!r} on mixture {best['name']} {best['mixture']}: target loss "
               f"{_fmt(best['J'])} against {_fmt(next(g['J'] for g in t.groups if g['labels'][0] == 'parent'))} "
               f"with the run's own ({t.objective})")
    return Recommendation(
        name="mixture", value={"name": best["name"], "weights": dict(best["mixture"])},
        unit=f"mixture of phase {t.nxt.get('name')!r}", low=low, high=high, level=level, estimate=best["J"],
        summary=summary, evidence=evidence,
        assumptions=["the mixtures differ only in the switched-to data; the LR schedule is the run's",
                     "the final validation loss at one step ranks the mixtures; the noise estimate above holds",
                     "later phases (after the switched-to one) keep their own mixtures"],
        would_change=would_change, patch=patch,
        check=f"midtrain sweep {run.path} --switch-at {best['step']} "
              + ("" if own else f"--mixtures {best['name']}=" + ",".join(
                  f"{best['mixture'].get(d, 0.0):g}" for d in (t.nxt.get("mixture") or {})) + " ")
              + "--seeds 1,2 (replicates)", branch_step=int(best["step"]))
