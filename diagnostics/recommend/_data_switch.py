"""When to switch the data mixture (and to which mixture), judged on switch probes: branches of
``midtrain sweep RUN --switch-at S1,... [--mixtures NAME=w1,...]`` that switch earlier with the LR
schedule unchanged, all evaluated at the end of the switched-to phase (docs/recommendations.md,
"Data switch").

Objective (stated with the result): the mean final validation loss of the TARGET domains (default: those
the switched-to phase upweights), among candidates whose EARLIER domains (the others of the phase before)
end at most ``tolerance`` (default 1%) above the parent's own recipe at the same step. A candidate is a
(switch step, mixture) pair; its replicates (``midtrain sweep --seeds``: same step and mixture, another
seed; the parent's own switch with another seed is a replicate of the parent) are averaged. The parent itself
is the candidate "switch at its own phase start". Range: the switch steps of feasible candidates within
z x sqrt(se_best^2 + se^2) of the best (z the normal quantile of ``level``; se = sigma / sqrt(replicates)),
sigma the noise of one run's final objective: the pooled standard deviation of the replicates where there
are some, else the point-to-point scatter of the candidates' objective over their evaluations after the
switch (``diagnostics.stats.robust_noise_scale``; the evaluation set is fixed, so this scatter is the
training noise a seed change also moves). ``switch_table`` is that table of candidates, which the
``mixture`` entry (``_mixture``) shares. Without probes the run's own signals place candidate steps
(``switch_candidates``) and the error prints the sweep command.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt
from diagnostics.recommend._probes import (anneal_phase_index, mixture_key, replicate_seed, schedule_of,
                                          switch_phase_index)
from diagnostics.recommend._switch_fit import SmoothSwitch, smooth_switch
from diagnostics.stats import pooled_sd, robust_noise_scale

__all__ = ["data_switch_recommendation", "switch_candidates", "switch_table", "SwitchTable"]


def _weights(phase: dict) -> dict:
    return dict(mixture_key(phase)[0])


def _first(df, col: str, cond) -> int | None:
    if col not in df.columns:
        return None
    rows = df[["step", col]].dropna()
    hit = rows[cond(rows[col].to_numpy(dtype=np.float64))]
    return int(hit["step"].iloc[0]) if len(hit) else None


def switch_candidates(run, lo: int, hi: int, earlier: list[str]) -> dict[str, int]:
    """Steps in (lo, hi] where the run's own signals say the earlier data has done most of its work:
    each earlier domain's learnability reaching diminishing returns (``difficulty/<d>/diminishing``), its
    validation loss having made 80% of its drop over the stretch, ``frac_learned`` (mean over domains)
    reaching 90% of its value at ``hi``, and the first compression onset (``repr/<layer>/compressing``)."""
    df = run.metrics
    df = df[(df["step"] > lo) & (df["step"] <= hi)]
    out: dict[str, int] = {}
    for d in earlier:
        s = _first(df, f"difficulty/{d}/diminishing", lambda v: v >= 1)
        if s is not None:
            out[f"{d} learnability diminishing"] = s
        v = df[["step", f"val/{d}/loss"]].dropna() if f"val/{d}/loss" in df.columns else None
        if v is not None and len(v) >= 3:
            y = v[f"val/{d}/loss"].to_numpy()
            drop = y[0] - y[-1]
            if drop > 0:
                out[f"{d} validation loss 80% of its drop"] = int(v["step"].to_numpy()[np.argmax(y <= y[0] - 0.8 * drop)])
    fl = [c for c in df.columns if c.endswith("/frac_learned")]
    if fl:
        f = df[["step"] + fl].dropna()
        if len(f) >= 3:
            m = f[fl].mean(axis=1).to_numpy()
            if m[-1] > 0:
                out["frac_learned at 90% of its value"] = int(f["step"].to_numpy()[np.argmax(m >= 0.9 * m[-1])])
    comp = [int(s) for c in df.columns if c.startswith("repr/") and c.endswith("/compressing")
            for s in [_first(df, c, lambda v: v >= 1)] if s is not None]
    if comp:
        out["first compression onset"] = min(comp)
    return out


def _gns_trend(run, lo: int, hi: int) -> str | None:
    df = run.metrics
    if "gns/b_simple" not in df.columns:
        return None
    g = df[(df["step"] > lo) & (df["step"] <= hi)][["step", "gns/b_simple"]].dropna()
    if len(g) < 6:
        return None
    y = g["gns/b_simple"].to_numpy()
    a, b = np.median(y[: len(y) // 3]), np.median(y[-(len(y) // 3):])
    return (f"B_simple {_fmt(float(a))} -> {_fmt(float(b))} over steps {lo + 1}-{hi}: "
            + ("rising (the loss is falling into the noise: a later-phase signal)" if b > 1.2 * a else "flat or falling"))


def _objective_series(run, targets: list[str], lo: int, hi: int):
    cols = [f"val/{d}/loss" for d in targets]
    df = run.metrics
    if any(c not in df.columns for c in cols):
        return np.zeros(0), np.zeros(0)
    v = df[(df["step"] >= lo) & (df["step"] <= hi)][["step"] + cols].dropna()
    return v["step"].to_numpy(dtype=np.int64), v[cols].mean(axis=1).to_numpy(dtype=np.float64)


def _final(run, end: int, domains: list[str]) -> dict | None:
    df = run.metrics
    cols = [f"val/{d}/loss" for d in domains if f"val/{d}/loss" in df.columns]
    row = df[df["step"] == end][cols].dropna()
    return None if not len(row) or len(cols) < len(domains) else {c.split("/")[1]: float(row[c].iloc[0]) for c in cols}


@dataclass
class SwitchTable:
    """The switch candidates of a run and its switch probes, judged on one objective."""

    sched: object
    prev: dict                  # the phase before the switch
    nxt: dict                   # the switched-to phase
    P: int                      # the run's own switch step
    E: int                      # the end of the switched-to phase: where every candidate is judged
    lo: int                     # the first step a switch probe may start from (after the warmup)
    targets: list
    earlier: list
    tolerance: float
    objective: str
    groups: list = field(default_factory=list)   # one dict per (step, mixture): see switch_table
    sigma: float = math.nan     # the noise of one run's final objective
    how: str = ""               # where sigma comes from (sigma_r: the same source)
    sigma_r: float = math.nan   # the noise of one run's earlier-domain rise (relative)
    n_replicated: int = 0       # candidates with at least two replicates

    def se(self, g: dict) -> float:
        return self.sigma / math.sqrt(g["n"])

    def near(self, best: dict, level: float, among=None) -> list:
        """The feasible candidates (of ``among``, default all) within z x sqrt(se_best^2 + se^2) of ``best``."""
        z = NormalDist().inv_cdf(0.5 + level / 2)
        pool = [g for g in (self.groups if among is None else among) if g["ok"]]
        if not math.isfinite(self.sigma):
            return [best]
        return [g for g in pool if g["J"] <= best["J"] + z * math.hypot(self.se(best), self.se(g))]


def _mixture_name(path, step: int) -> str | None:
    """NAME of a ``--mixtures NAME=...`` probe from its directory (``switch<S>-NAME[-seed<K>]``)."""
    m = re.fullmatch(rf"switch{step}-(.+?)(-seed\d+)?", os.path.basename(str(path).rstrip("/")))
    return m.group(1) if m and m.group(1) else None


def switch_table(run, branches=(), *, target_domains=None, tolerance: float = 0.01) -> SwitchTable:
    """Every (switch step, mixture) candidate of ``run`` and its switch probes ``branches`` (Runs; a branch
    that repeats the parent's schedule with another seed is a replicate of the parent), with the mean of
    its replicates' objective ``J``, its earlier domains' worst relative rise against the parent's recipe
    ``rise``, ``ok`` (the rise within ``tolerance``), ``n`` replicates, their objectives ``Js``, the
    mixture's ``name`` and the runs' ``labels``. Raises RecommendationError when the run lacks what the
    objective needs; ``groups`` is empty without probes."""
    cfg = run.config or {}
    sched = schedule_of(cfg)
    m = switch_phase_index(cfg)
    prev, nxt = sched.phases[m - 1], sched.phases[m]
    P = int(sched.starts[m])
    E = P + int(np.sum(sched.phase_of == m))
    lo = int(sched.starts[m - 1]) + int(prev.get("warmup_steps") or 0)
    wp, wn = _weights(prev), _weights(nxt)
    targets = list(target_domains) if target_domains else [d for d in wn if wn[d] > wp.get(d, 0.0)]
    earlier = [d for d in wp if d not in targets]
    if not targets:
        raise RecommendationError(f"phase {nxt.get('name')!r} upweights no domain; name the target domains")
    objective = (f"mean final validation loss (step {E}, the end of phase {nxt.get('name')!r}) of {targets}, with "
                 f"{earlier} at most {tolerance:.1%} above the run's own recipe")
    t = SwitchTable(sched, prev, nxt, P, E, lo, targets, earlier, tolerance, objective)
    if not branches:
        return t
    cands = [("parent", P, dict(wn), run)]
    for b in branches:
        bs = schedule_of(b.config)
        k = switch_phase_index(b.config)
        cands.append((str(b.path), int(bs.starts[k]), _weights(bs.phases[k]), b))
    finals, noise, noise_r = [], [], []
    for label, s, mix, r in cands:
        fin = _final(r, E, targets + earlier)
        if fin is None:
            continue
        st, series = _objective_series(r, targets, s, E)
        if len(series) >= 4:
            noise.append(robust_noise_scale(series))
        for d in earlier:
            st, series = _objective_series(r, [d], s, E)
            if len(series) >= 4:
                noise_r.append((d, robust_noise_scale(series)))
        finals.append((label, s, mix, r, fin))
    parent_reps = [f for lab, s, mix, r, f in finals if s == P and mix == dict(wn)]
    if not parent_reps:
        raise RecommendationError(f"the run has no validation of every domain at step {E} (the end of phase "
                                  f"{nxt.get('name')!r}); train it through that phase")
    ref = {d: float(np.mean([f[d] for f in parent_reps])) for d in targets + earlier}
    by: dict = {}
    for label, s, mix, r, fin in finals:
        key = (s, tuple(sorted(mix.items())))
        g = by.setdefault(key, {"step": s, "mixture": mix, "labels": [], "Js": [], "fins": [], "seeds": [],
                                "name": (f"{nxt.get('name')} (the run's)" if mix == dict(wn) else None)})
        g["labels"].append(label)
        g["Js"].append(float(np.mean([fin[d] for d in targets])))
        g["fins"].append(fin)
        g["seeds"].append(0 if r is run else replicate_seed(run, r))
        g["name"] = g["name"] or _mixture_name(label, s)
    for g in by.values():
        g["n"], g["J"] = len(g["Js"]), float(np.mean(g["Js"]))
        g["rises"] = [max([f[d] / ref[d] - 1 for d in earlier] or [0.0]) for f in g["fins"]]
        g["rise"] = max([float(np.mean([f[d] for f in g["fins"]])) / ref[d] - 1 for d in earlier] or [0.0])
        g["ok"] = g["rise"] <= tolerance
        g["name"] = g["name"] or ",".join(f"{k}:{v:g}" for k, v in sorted(g["mixture"].items()))
    t.groups = sorted(by.values(), key=lambda g: (g["step"], g["name"]))
    reps = [g for g in t.groups if g["n"] >= 2]
    if reps:   # the pooled replicate variance: a seed study
        t.sigma, dof = pooled_sd([g["Js"] for g in reps])
        t.how = (f"pooled spread of the replicates of {len(reps)} candidate(s) ({sum(g['n'] for g in reps)} runs, "
                 f"{dof} degrees of freedom; seeds added to the run's: "
                 f"{sorted({k for g in reps for k in g['seeds']})})")
        t.sigma_r = pooled_sd([g["rises"] for g in reps])[0]
    elif noise:
        t.sigma = float(np.median(noise))
        t.how = (f"median point-to-point scatter of the objective over {len(noise)} candidates' evaluations after "
                 "the switch (no replicates: midtrain sweep --seeds 0,1 measures the seed noise)")
        if noise_r:   # the same scatter of each earlier domain's loss, relative to the parent's final loss
            t.sigma_r = float(np.median([v / ref[d] for d, v in noise_r]))
    t.n_replicated = len(reps)
    return t


def _no_probes(run, t: SwitchTable) -> RecommendationError:
    cands = switch_candidates(run, t.lo, t.P, t.earlier)
    steps = sorted({*cands.values()} | {t.P})
    ckpts = [s for s, _ in run.checkpoints()] if hasattr(run, "checkpoints") else []
    miss = [s for s in steps if s not in ckpts]
    probe = [s for s in steps if s != t.P] or [max(t.lo + 1, (t.lo + t.P) // 2)]
    return RecommendationError(
        f"no switch probes: the run's own signals place candidates at {cands or 'no step (no signal)'}"
        + (f"; {_gns_trend(run, t.lo, t.P)}" if _gns_trend(run, t.lo, t.P) else "")
        + f". Probe them (objective: {t.objective}): midtrain sweep {run.path} --switch-at "
        + ",".join(map(str, probe)) + " --seeds 0,1" + (f" (steps {miss} need checkpoints: checkpoint_steps = {miss}, "
                                                          f"and train again)" if miss else "")
        + f", then midtrain recommend {run.path} --branches <probe dirs>")


def _smooth_per_mixture(t: SwitchTable, level: float) -> list:
    """Per mixture: (J, step, group-like dict, SmoothSwitch or None, why not). The smooth model where it can
    be fitted and passes its check, else the mixture's best feasible probe (the discrete rule)."""
    own = _weights(t.nxt)
    out = []
    for key in sorted({tuple(sorted(g["mixture"].items())) for g in t.groups}):
        gs = [g for g in t.groups if tuple(sorted(g["mixture"].items())) == key]
        ok = [g for g in gs if g["ok"]]
        disc = min(ok, key=lambda g: g["J"]) if ok else None
        sm = smooth_switch([g["step"] for g in gs], [g["J"] for g in gs], [g["rise"] for g in gs],
                           [g["n"] for g in gs], t.sigma, t.sigma_r, t.tolerance, level=level,
                           always_ok=t.P if dict(key) == own else None)
        if isinstance(sm, SmoothSwitch):
            out.append((sm.J, sm.step, {**(disc or gs[0]), "step": sm.step, "J": sm.J}, sm, None))
        elif disc is not None:
            out.append((disc["J"], disc["step"], disc, None, sm))
    return out


def data_switch_recommendation(run, branches=(), *, target_domains=None, tolerance: float = 0.01,
                               level: float = 0.9) -> Recommendation:
    """The switch step minimising the target domains' mean final validation loss subject to the earlier
    domains rising at most ``tolerance`` (relative) against the parent; ``branches``: the switch probes
    (Runs) of ``run`` and replicates of it (another seed). Per mixture, the objective and the rise are
    fitted as smooth functions of the switch step (``_switch_fit.smooth_switch``) and the step is the fitted
    optimum, any step between the probed ones; where the model cannot be fitted or fails its check, the best
    feasible probe (the discrete rule). The mixture of the best candidate is the ``mixture`` entry's
    (``mixture_recommendation``)."""
    t = switch_table(run, branches, target_domains=target_domains, tolerance=tolerance)
    if not branches:
        raise _no_probes(run, t)
    sched, prev, P = t.sched, t.prev, t.P
    ok = [g for g in t.groups if g["ok"]]
    if not ok:
        raise RecommendationError(f"no candidate keeps {t.earlier} within {tolerance:.1%} of the run's own recipe "
                                  "(raise the tolerance or probe later switches)")
    disc = min(ok, key=lambda g: g["J"])
    _, step, best, sm, why = min(_smooth_per_mixture(t, level), key=lambda c: (c[0], c[1]))
    z = NormalDist().inv_cdf(0.5 + level / 2)
    if sm is not None:
        low, high = sm.low, sm.high
    else:
        near = [g["step"] for g in t.near(best, level)]
        low, high = float(min(near)), float(max(near))
    cfg = run.config or {}
    A = int(sched.starts[anneal_phase_index(cfg)]) if any(p.get("decay", "constant") != "constant"
                                                           for p in sched.phases) else None
    tie = A is not None and low <= A <= high
    mixtures = {tuple(sorted(g["mixture"].items())) for g in t.groups}
    evidence = {
        "objective": t.objective,
        "model": sm.describe() if sm is not None else f"discrete rule (the best feasible probe): {why}",
        "discrete best probe": f"step {disc['step']} {disc['name']}: {_fmt(disc['J'])}, earlier {disc['rise']:+.2%}",
        "candidates": "; ".join(f"step {g['step']} {g['name']}: {_fmt(g['J'])}"
                                + (f" (mean of {g['n']}, sd {_fmt(float(np.std(g['Js'], ddof=1)))})" if g["n"] > 1 else "")
                                + f", earlier {g['rise']:+.2%}" + ("" if g["ok"] else " (rejected)") for g in t.groups),
        "noise": f"sigma {_fmt(t.sigma)} per run's final objective, {_fmt(t.sigma_r)} per run's earlier-domain rise "
                 f"({t.how}); " + ("the range is the fitted optimum's bootstrap interval" if sm is not None else
                                   f"the range holds the feasible steps within {z:.2f} x sqrt(se_best^2 + se^2) of "
                                   "the best (se = sigma / sqrt(replicates))"),
        "anneal start": (f"step {A}: " + ("inside the range: tie the switch to it" if tie else
                                          f"the switch goes {A - step} steps before it")) if A else "no anneal",
        "tokens at the switch": sched.tokens_before(step),
    }
    signals = switch_candidates(run, t.lo, P, t.earlier)
    if signals:
        evidence["single-run signals"] = ", ".join(f"{k} at {v}" for k, v in signals.items())
    if (g := _gns_trend(run, t.lo, P)):
        evidence["GNS trend"] = g
    pname = prev.get("name")
    summary = (f"switch the data at step {step} ({evidence['tokens at the switch']} tokens)"
               + (", tied to the anneal start" if tie else "")
               + (f", to mixture {best['name']} (the mixture entry)" if len(mixtures) > 1 else "")
               + f": target loss {_fmt(best['J'])}" + (" (fitted)" if sm is not None else "") + f" ({t.objective})")
    would_change = ["another objective (target domains, tolerance) or budget",
                    "probes at steps between the candidates"
                    + ("" if t.n_replicated else "; replicate probes (--seeds 0,1) measure the seed noise")]
    probed = any(g["step"] == step for g in t.groups)
    if step < P:
        would_change.insert(0, f"an earlier switch than the run's own cannot be written as a phase patch alone: split "
                               f"phase {pname!r} at step {step}" + (f" as the probe {best['labels'][0]} does" if probed
                                                                    else " (midtrain validate's recommended plan does)"))
    ckpts = sorted(s for s, _ in run.checkpoints()) if hasattr(run, "checkpoints") else []
    start = step if probed or not ckpts else max([c for c in ckpts if c <= step] or [step])
    check = (f"midtrain sweep {run.path} --switch-at {step} --seeds 1,2 (replicates), or midtrain train "
             f"--from {run.path} --step {step} with the probe's config" if probed or start == step else
             f"midtrain validate {run.path} --step {start} --seeds 0,1 (no checkpoint at step {step}: the plan "
             f"trains from step {start} and switches at {step})")
    return Recommendation(
        name="data_switch", value=float(step), unit="step (data switch)", low=low, high=high, level=level,
        estimate=best["J"], summary=summary, evidence=evidence,
        assumptions=["the candidates differ only in the switch step (and mixture); the LR schedule is the run's",
                     "the final validation loss at one step ranks the candidates; the noise estimate above holds",
                     "between probed steps the objective and the rise follow the fitted line or quadratic",
                     "later phases (after the switched-to one) are not probed"],
        would_change=would_change, patch={}, check=check, branch_step=int(start))
