"""When to switch the data mixture (and to which mixture), judged on switch probes: branches of
``midtrain sweep RUN --switch-at S1,... [--mixtures NAME=w1,...]`` that switch earlier with the LR
schedule unchanged, all evaluated at the end of the switched-to phase (docs/recommendations.md,
"Data switch").

Objective (stated with the result): the mean final validation loss of the TARGET domains (default: those
the switched-to phase upweights), among candidates whose EARLIER domains (the others of the phase before)
end at most ``tolerance`` (default 1%) above the parent's own recipe at the same step. The parent itself
is the candidate "switch at its own phase start". Range: the switch steps of feasible candidates within
z x sqrt(2) x sigma of the best (z the normal quantile of ``level``), sigma the noise of one candidate's
final objective: the spread of replicate probes (same step and mixture, another seed) where there are
some, else the point-to-point scatter of the candidates' objective over their evaluations after the
switch (``diagnostics.stats.robust_noise_scale``; the evaluation set is fixed, so this scatter is the
training noise a seed change also moves). Without probes the run's own signals place candidate steps
(``switch_candidates``) and the error prints the sweep command.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt
from diagnostics.recommend._probes import anneal_phase_index, mixture_key, schedule_of, switch_phase_index
from diagnostics.stats import robust_noise_scale

__all__ = ["data_switch_recommendation", "switch_candidates"]


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


def data_switch_recommendation(run, branches=(), *, target_domains=None, tolerance: float = 0.01,
                               level: float = 0.9) -> Recommendation:
    """The switch step (and mixture) minimising the target domains' mean final validation loss subject
    to the earlier domains rising at most ``tolerance`` (relative) against the parent; ``branches``:
    the switch probes (Runs) of ``run``."""
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
    if not branches:
        cands = switch_candidates(run, lo, P, earlier)
        steps = sorted({*cands.values()} | {P})
        ckpts = [s for s, _ in run.checkpoints()] if hasattr(run, "checkpoints") else []
        miss = [s for s in steps if s not in ckpts]
        probe = [s for s in steps if s != P] or [max(lo + 1, (lo + P) // 2)]
        raise RecommendationError(
            f"no switch probes: the run's own signals place candidates at {cands or 'no step (no signal)'}"
            + (f"; {_gns_trend(run, lo, P)}" if _gns_trend(run, lo, P) else "")
            + f". Probe them (objective: {objective}): midtrain sweep {run.path} --switch-at "
            + ",".join(map(str, probe)) + (f" (steps {miss} need checkpoints: checkpoint_steps = {miss}, "
                                            f"and train again)" if miss else "")
            + f", then midtrain recommend {run.path} --branches <probe dirs>")
    ref = _final(run, E, targets + earlier)
    if ref is None:
        raise RecommendationError(f"the run has no validation of every domain at step {E} (the end of phase "
                                  f"{nxt.get('name')!r}); train it through that phase")
    cands = [("parent", P, dict(wn), run)]
    for b in branches:
        bs = schedule_of(b.config)
        cands.append((str(b.path), int(b.parent["step"]), _weights(bs.phases[switch_phase_index(b.config)]), b))
    rows, noise = [], []
    for label, s, mix, r in cands:
        fin = _final(r, E, targets + earlier)
        if fin is None:
            continue
        J = float(np.mean([fin[d] for d in targets]))
        rise = max([fin[d] / ref[d] - 1 for d in earlier] or [0.0])
        st, series = _objective_series(r, targets, s, E)
        if len(series) >= 4:
            noise.append(robust_noise_scale(series))
        rows.append({"label": label, "step": s, "mixture": mix, "J": J, "rise": rise, "ok": rise <= tolerance})
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["step"], tuple(sorted(row["mixture"].items()))), []).append(row["J"])
    reps = [np.std(g, ddof=1) for g in groups.values() if len(g) >= 2]
    sigma = float(np.sqrt(np.mean(np.square(reps)))) if reps else (float(np.median(noise)) if noise else math.nan)
    how = (f"spread of {sum(len(g) for g in groups.values() if len(g) >= 2)} replicate probes" if reps else
           f"median point-to-point scatter of the objective over {len(noise)} candidates' evaluations after the switch")
    ok = [r for r in rows if r["ok"]]
    if not ok:
        raise RecommendationError(f"no candidate keeps {earlier} within {tolerance:.1%} of the run's own recipe "
                                  "(raise the tolerance or probe later switches)")
    best = min(ok, key=lambda r: r["J"])
    z = NormalDist().inv_cdf(0.5 + level / 2)
    near = [r["step"] for r in ok if r["J"] <= best["J"] + z * math.sqrt(2) * sigma] if math.isfinite(sigma) else [best["step"]]
    low, high = float(min(near)), float(max(near))
    A = int(sched.starts[anneal_phase_index(cfg)]) if any(p.get("decay", "constant") != "constant"
                                                           for p in sched.phases) else None
    tie = A is not None and low <= A <= high
    mixtures = {tuple(sorted(r["mixture"].items())) for r in rows}
    evidence = {
        "objective": objective,
        "candidates": "; ".join(f"step {r['step']} {r['mixture']}: {_fmt(r['J'])}, earlier {r['rise']:+.2%}"
                                + ("" if r["ok"] else " (rejected)") for r in sorted(rows, key=lambda r: r["step"])),
        "noise": f"sigma {_fmt(sigma)} per final objective ({how}); the range holds the feasible steps within "
                 f"{z:.2f} x sqrt(2) x sigma of the best",
        "anneal start": (f"step {A}: " + ("inside the range: tie the switch to it" if tie else
                                          f"the switch goes {A - best['step']} steps before it")) if A else "no anneal",
        "tokens at the switch": sched.tokens_before(best["step"]),
    }
    signals = switch_candidates(run, lo, P, earlier)
    if signals:
        evidence["single-run signals"] = ", ".join(f"{k} at {v}" for k, v in signals.items())
    if (g := _gns_trend(run, lo, P)):
        evidence["GNS trend"] = g
    pname = prev.get("name")
    patch = ({"phases": {nxt.get("name"): {"mixture": best["mixture"]}}}
             if best["step"] == P and len(mixtures) > 1 else {})
    summary = (f"switch the data at step {best['step']} ({evidence['tokens at the switch']} tokens)"
               + (", tied to the anneal start" if tie else "")
               + (f", to mixture {best['mixture']}" if len(mixtures) > 1 else "")
               + f": target loss {_fmt(best['J'])} ({objective})")
    would_change = ["another objective (target domains, tolerance) or budget",
                    "probes at steps between the candidates; replicate probes (seeds) narrow the noise"]
    if best["step"] < P:
        would_change.insert(0, f"an earlier switch than the run's own cannot be written as a phase patch alone: split "
                               f"phase {pname!r} at step {best['step']} as the probe {best['label']} does")
    return Recommendation(
        name="data_switch", value=float(best["step"]), unit="step (data switch)", low=low, high=high, level=level,
        estimate=best["J"], summary=summary, evidence=evidence,
        assumptions=["the candidates differ only in the switch step (and mixture); the LR schedule is the run's",
                     "the final validation loss at one step ranks the candidates; the noise estimate above holds",
                     "later phases (after the switched-to one) are not probed"],
        would_change=would_change, patch=patch,
        check=f"midtrain sweep {run.path} --switch-at {best['step']} with another seed, or midtrain train --from "
              f"{run.path} --step {best['step']} with the probe's config", branch_step=int(best["step"]))
