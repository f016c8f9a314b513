"""`midtrain validate RUN --step S`: train the recommended schedule and the plans it competes with from
one checkpoint, to the same token budget, with several seeds, and rank them (docs/recommendations.md,
"`midtrain validate`").

The plans re-plan the stretch from S to the end of RUN's decaying phase (``anneal_phase_index``: the
stable, constant-LR phase before it must hold S); phases after it are kept as in RUN:

    own          RUN's own recipe
    cosine       one cosine from the stable LR (peak) to 10% of it over the stretch; the switch at RUN's own
    wsd          constant, then a 1-sqrt decay over the last 20% of RUN's steps up to the stretch's end to the
                 decaying phase's final_lr; the data switch at the decay start
    switch0/50/80  RUN's own LR schedule; the data switch at 0%, 50%, 80% of the remaining budget (E - S)
    recommended  anneal start and shape, switch step, mixture and batch size from RUN/recommendations.json (written by
                 `midtrain recommend`) or, without it, from the recommenders; an entry that is not available
                 stays at RUN's recipe and the output says so

A switch or a decay start inside a decaying segment splits it into phases that carry ``lr_span`` /
``lr_offset`` (``midtrain.config.Phase``), so the LR per step is exactly the unsplit segment's. A plan
identical to RUN's own (LR, mixture and batch at every step) is dropped with a note. Each plan x seed is an
ordinary branch run directory ``RUN-validate<S>/<plan>-seed<k>`` (seed: RUN's seed + k; the branch's data
order follows ``cfg.seed``, the model starts from the checkpoint).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from midtrain.config import ConfigError, TrainConfig
from midtrain.probes import _check_steps, _finish, _load, parse_steps

__all__ = ["ValidationPlan", "PLAN_NAMES", "plan_validation", "run_validation", "summarize", "probe_branches",
           "cmd_validate"]

PLAN_NAMES = ("recommended", "own", "cosine", "wsd", "switch0", "switch50", "switch80")
SWITCH_FRACTIONS = {"switch0": 0.0, "switch50": 0.5, "switch80": 0.8}
COSINE_FLOOR, WSD_DECAY, WSD_SHAPE = 0.1, 0.2, "1-sqrt"


@dataclass
class ValidationPlan:
    name: str
    config: TrainConfig                 # seed: RUN's (run_validation adds k per seed)
    description: str
    switch_step: int | None = None
    decay_start: int | None = None
    notes: list[str] = field(default_factory=list)


def _segment_phases(segs: list, Q: int, old_mix: dict, new_mix: dict) -> list[dict]:
    """Phases for the stretch [S, E): ``segs`` = [(start, end, LR template dict)] cut at the switch Q."""
    out = []
    for lo, hi, tmpl in segs:
        for a_, b_, mix in ((lo, min(hi, Q), old_mix), (max(lo, Q), hi, new_mix)):
            if b_ <= a_:
                continue
            p = {**tmpl, "name": f"{tmpl['name']}@{a_}", "steps": b_ - a_, "tokens": None, "mixture": dict(mix),
                 "lr_span": None, "lr_offset": 0}
            if (a_, b_) != (lo, hi):
                p.update(lr_span=hi - lo, lr_offset=a_ - lo)
            if a_ != lo:
                p["warmup_steps"] = 0 if p.get("warmup_steps", 0) <= a_ - lo else p["warmup_steps"]
            out.append(p)
    return out


def _per_step(cfg: TrainConfig, S: int) -> list:
    return [(round(cfg.lr_at(k), 12), tuple(sorted(cfg.phase_at(k)[1].mixture.items())),
             cfg.phase_at(k)[1].batch_size, cfg.phase_at(k)[1].seq_len) for k in range(S, cfg.total_steps())]


def _recommendations(parent: str, run) -> tuple[dict, str]:
    """{name: recommendation dict or the reason it is not available}, and where they came from."""
    from diagnostics.runs import RECOMMENDATIONS_FILE

    path = os.path.join(parent, RECOMMENDATIONS_FILE)
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
        recs = {r["name"]: r for r in doc.get("recommendations", [])}
        recs.update({k: str(v) for k, v in doc.get("not_available", {}).items() if k not in recs})
        return recs, f"read from {path} (midtrain recommend)"
    from diagnostics.recommend import (RecommendationError, anneal_recommendation, batch_size_recommendation,
                                       data_switch_recommendation)

    recs = {}
    for name, make in (("batch_size", lambda: batch_size_recommendation(run)),
                       ("lr_decay", lambda: anneal_recommendation(run, [])),
                       ("data_switch", lambda: data_switch_recommendation(run, []))):
        try:
            recs[name] = make().to_dict()
        except RecommendationError as e:
            recs[name] = str(e)
    return recs, f"computed by the recommenders (no {RECOMMENDATIONS_FILE} in {parent}; run midtrain recommend to fix it)"


def plan_validation(parent: str, step: int, names: list[str] | None = None) -> tuple[list[ValidationPlan], dict]:
    """Every plan's config (checked, nothing written) and the recommendations' provenance."""
    from diagnostics.recommend import anneal_phase_index, lr_factor

    names = list(names or PLAN_NAMES)
    bad = [n for n in names if n not in PLAN_NAMES]
    if bad or len(set(names)) != len(names):
        raise ConfigError(f"--plans: unknown or repeated plan(s) {bad or names}; choose from {', '.join(PLAN_NAMES)}.")
    run, cfg, ckpts = _load(parent)
    a = anneal_phase_index(run.config)
    starts = cfg.phase_starts()
    st, ann = cfg.phases[a - 1], cfg.phases[a]
    if any(p.decay != "constant" for p in cfg.phases[:a]):
        raise ConfigError(f"run {parent}: a phase before {ann.name!r} decays; no stable stretch to validate from.")
    P, E = starts[a], starts[a] + ann.num_steps()
    _check_steps([step], ckpts, starts[a - 1] + st.warmup_steps, P, parent, "validation plans")
    d = cfg.to_dict()
    sd, ad = d["phases"][a - 1], d["phases"][a]
    head = [{**sd, "steps": step - starts[a - 1], "tokens": None}]
    const = {**sd, "warmup_steps": 0}
    own_lr = [(step, P, const), (P, E, ad)]
    R = E - step

    def build(segs, Q, every_n=None, mix=None):
        phases = d["phases"][:a - 1] + head + _segment_phases(segs, Q, st.mixture, mix or ann.mixture) \
            + d["phases"][a + 1:]
        return _finish(cfg, d, phases, max(1, (every_n or R) // 10))

    plans, info = [], {"stretch": [step, E], "remaining_steps": R, "own_switch": P}
    for n in names:
        if n == "own":
            c = TrainConfig.from_dict({**d, "checkpoint_steps": []})
            c.checkpoint_every, c.eval_every = c.total_steps() + 1, max(1, min(cfg.eval_every, R // 10 or 1))
            plans.append(ValidationPlan("own", c.validate(), "the run's own recipe", P, P))
        elif n == "cosine":
            cos = {**ad, "lr": st.lr, "final_lr": COSINE_FLOOR * st.lr, "decay": "cosine", "decay_fraction": 1.0,
                   "warmup_steps": 0}
            plans.append(ValidationPlan("cosine", build([(step, E, cos)], P),
                                        f"cosine from {st.lr:g} to {COSINE_FLOOR:.0%} of it over steps {step}-{E}; "
                                        f"switch at the run's own step {P}", P, step))
        elif n == "wsd":
            D = max(step, E - round(WSD_DECAY * E))
            dec = {**ad, "lr": st.lr, "decay": WSD_SHAPE, "decay_fraction": 1.0, "warmup_steps": 0}
            p = ValidationPlan("wsd", build([(step, D, const), (D, E, dec)], D),
                               f"constant {st.lr:g}, then a {WSD_SHAPE} decay to {ann.final_lr:g} over the last "
                               f"{E - D} steps ({WSD_DECAY:.0%} of {E}); switch at the decay start {D}", D, D)
            if D == step and E - round(WSD_DECAY * E) < step:
                p.notes.append(f"the 20% decay would start before step {step}; it starts at {step}")
            plans.append(p)
        elif n in SWITCH_FRACTIONS:
            Q = step + round(SWITCH_FRACTIONS[n] * R)
            plans.append(ValidationPlan(n, build(own_lr, Q), f"the run's own LR; switch at step {Q} "
                                        f"({SWITCH_FRACTIONS[n]:.0%} of the remaining {R} steps)", Q, P))
        else:
            plans.append(_recommended(parent, run, cfg, step, P, E, const, ad, build, lr_factor, info))
    own = _per_step(cfg, step)
    kept = []
    for p in plans:
        if p.name != "own" and _per_step(p.config, step) == own:
            info.setdefault("dropped", {})[p.name] = "identical to the run's own recipe"
        else:
            kept.append(p)
    if not [p for p in kept if p.name != "own"]:
        raise ConfigError(f"no plan differs from the run's own recipe from step {step} ({info.get('dropped')}); "
                          "nothing to validate. Nothing was written.")
    return kept, info


def _recommended(parent, run, cfg, step, P, E, const, ad, build, lr_factor, info) -> ValidationPlan:
    recs, source = _recommendations(parent, run)
    info["recommendations"] = source
    notes, A, Q, shape = [], P, P, ad["decay"]
    ld, ds, bs, mx = recs.get("lr_decay"), recs.get("data_switch"), recs.get("batch_size"), recs.get("mixture")
    if isinstance(ld, dict) and ld.get("unit", "").startswith("step") and ld.get("value") is not None:
        A = int(ld["value"])
        shape = next((ch.get("decay") for ch in (ld.get("patch") or {}).get("phases", {}).values() if "decay" in ch),
                     shape)
        notes.append(f"anneal start {A} ({shape}) from lr_decay")
    else:
        notes.append("lr_decay: not available, the run's own anneal start ("
                     + (ld if isinstance(ld, str) else "no step-valued entry") + ")")
    if isinstance(ds, dict) and ds.get("value") is not None:
        Q = int(ds["value"])
        notes.append(f"switch step {Q} from data_switch")
    else:
        notes.append("data_switch: not available, the run's own switch (" + (ds if isinstance(ds, str) else "none") + ")")
    lo_q, hi_q = (ds.get("low"), ds.get("high")) if isinstance(ds, dict) else (None, None)
    if A != P and Q != A and lo_q is not None and hi_q is not None and lo_q <= P <= hi_q:
        # data_switch ties the switch to the anneal start (its range holds the run's own start P, the one its
        # probes were judged under), and lr_decay's plan runs the decaying phase on its own mixture from A,
        # as its anneal probes did: the switch follows the recommended anneal start
        # ... but not outside the steps data_switch found acceptable (its range: its constraint on the earlier
        # domains): a start before the range pulls the switch to the range's first step, not beyond
        T = min(max(A, math.ceil(lo_q)), math.floor(hi_q))
        notes.append(f"switch step {T}, not {Q}: data_switch ties the switch to the anneal start (its range "
                     f"{lo_q:g}-{hi_q:g} holds the run's own start {P}) and lr_decay's plan anneals on the next "
                     f"phase's mixture from step {A}, as its probes did"
                     + ("" if T == A else f"; the start {A} is outside that range, so the switch stays at its "
                                          f"nearest end, {T}"))
        Q = T
    if not step <= A < E or not step <= Q <= E:
        notes.append(f"anneal start {A} / switch {Q} outside steps {step}-{E}: clipped")
        A, Q = min(max(A, step), E - 1), min(max(Q, step), E)
    notes.append("anneal length: to the end of the budget (step %d): the budget is the run's" % E)
    mix = ((mx.get("patch") or {}).get("phases") or {}).get(ad["name"], {}).get("mixture") if isinstance(mx, dict) else None
    if mix:
        notes.append(f"mixture {(mx.get('value') or {}).get('name')} {mix} from the switch on, from mixture")
    else:
        notes.append("mixture: the run's own (" + (mx if isinstance(mx, str) else "the mixture entry keeps it"
                                                    if isinstance(mx, dict) else "no mixture entry") + ")")
    dec = {**ad, "decay": shape, "decay_fraction": 1.0, "warmup_steps": 0}
    c = build([(step, A, const), (A, E, dec)], Q, mix=mix)
    seq = (bs.get("evidence") or {}).get("seq_len") if isinstance(bs, dict) else None
    if seq is not None and int(seq) != cfg.phase_at(step)[1].seq_len:   # measured for another phase's sequences
        notes.append(f"batch_size: the run's own (the recommended {bs.get('value')} is for sequences of {seq} "
                     f"tokens, phase {(bs.get('evidence') or {}).get('phase')!r}; this stretch has "
                     f"{cfg.phase_at(step)[1].seq_len})")
    elif isinstance(bs, dict) and bs.get("value") and int(bs["value"]) != cfg.phase_at(step)[1].batch_size:
        b = int(bs["value"])
        from diagnostics.recommend import rescale_phase
        from midtrain.sweep import _accum_for

        dd = c.to_dict()
        for pd in dd["phases"][len(cfg.phases[:cfg.phase_at(step)[0]]) + 1:]:
            if pd["name"].count("@") and pd["seq_len"] == cfg.phase_at(step)[1].seq_len:
                k = pd["batch_size"]
                span, off = pd.get("lr_span"), pd.get("lr_offset", 0)
                pd.update(rescale_phase(pd, b, _accum_for(b, pd["grad_accum"])))
                if span:   # keep the LR shape: the segment scales like its pieces
                    pd["lr_offset"] = math.ceil(off * k / b)
                    pd["lr_span"] = max(math.ceil(span * k / b), pd["lr_offset"] + pd["steps"])
        c = _finish(c, dd, dd["phases"], max(1, (E - step) // 10))
        notes.append(f"batch size {b} from batch_size (LR x sqrt({b}/{cfg.phase_at(step)[1].batch_size}), same tokens)")
    else:
        notes.append("batch_size: the run's own ("
                     + (bs if isinstance(bs, str) else "the same or no recommendation") + ")")
    return ValidationPlan("recommended", c, f"anneal ({shape}) at step {A}, switch at step {Q}", Q, A, notes)


def _tokens(cfg: TrainConfig, lo: int, hi: int) -> int:
    """Tokens of updates lo..hi-1: the per-step schedule the recommendations read (``schedule_of``)."""
    from diagnostics.recommend import schedule_of

    return int(schedule_of(cfg.to_dict()).tokens[lo:hi].sum())


def _final_val(run) -> dict[str, float]:
    m = run.metrics
    cols = [c for c in m.columns if c.startswith("val/") and c.endswith("/loss") and c.count("/") == 2]
    rows = m.dropna(subset=cols, how="all")
    return {c[4:-5]: float(v) for c, v in rows.iloc[-1][cols].items() if v == v} if len(rows) else {}


def _branch_tokens(path: str) -> int:
    from diagnostics.runs import load_run

    b = load_run(path)
    c = TrainConfig.from_dict(b.config)
    tok = b.metrics["train/tokens"].dropna() if "train/tokens" in b.metrics.columns else []
    start = int((b.parent or {}).get("step") or 0)
    return int(tok.max() - _tokens(c, 0, start)) if len(tok) else _tokens(c, start, c.total_steps())


def probe_branches(parent: str, given: list[str] | None = None) -> list[str]:
    """RUN's probe branches whose compute counts: ``given`` (each must be a branch of RUN, checked as
    `midtrain recommend --branches` does: ``branch_kind``; a foreign one is bad input), or those
    `midtrain sweep` wrote by default (RUN-probes/*, RUN-sweep<S>/*) that are branches of RUN."""
    import glob

    from diagnostics.recommend import ProbeInputError, branch_kind
    from diagnostics.runs import RUN_JSON, load_run

    run = load_run(parent)
    if given is not None:
        for b in given:
            branch_kind(run, load_run(b))
        return list(given)
    base, out = str(parent).rstrip("/"), []
    for d in sorted(os.path.dirname(p) for pat in (base + "-probes/*/", base + "-sweep*/*/")
                    for p in glob.glob(pat + RUN_JSON)):
        try:
            branch_kind(run, load_run(d))
            out.append(d)
        except ProbeInputError:
            pass
    return out


def summarize(parent: str, step: int, plans: list[ValidationPlan], dirs: dict, info: dict,
              probes: list[str]) -> dict:
    """validation.json's content: per plan the final per-domain validation loss over seeds, the ranks,
    and the probes' compute against the grid's."""
    import numpy as np

    from diagnostics.runs import load_run

    rows = {}
    for p in plans:
        finals = [_final_val(load_run(d)) for d in dirs[p.name]]
        doms = sorted(set().union(*finals))
        per = {dm: [f[dm] for f in finals if dm in f] for dm in doms}
        means = [float(np.mean(list(f.values()))) for f in finals if f]
        rows[p.name] = {"description": p.description, "switch_step": p.switch_step, "decay_start": p.decay_start,
                        "notes": p.notes, "runs": dirs[p.name],
                        "val": {dm: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                                for dm, v in per.items()},
                        "objective": {"mean": float(np.mean(means)),
                                      "std": float(np.std(means, ddof=1)) if len(means) > 1 else 0.0}}
    order = sorted(rows, key=lambda n: rows[n]["objective"]["mean"])
    for i, n in enumerate(order):
        rows[n]["rank"] = i + 1
    probe_tok = sum(_branch_tokens(b) for b in probes)
    grid_tok = sum(_branch_tokens(d) for ds in dirs.values() for d in ds)
    return {"schema": 1, "run": os.path.abspath(parent), "step": step, **info,
            "objective": "mean over domains of the final validation loss (lower is better)",
            "plans": rows, "ranking": order,
            "recommended_rank": rows["recommended"]["rank"] if "recommended" in rows else None,
            "compute": {"probe_branches": probes, "probe_tokens": probe_tok, "grid_tokens": grid_tok,
                        "probe_over_grid": probe_tok / grid_tok if grid_tok else None}}


def _figure(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = doc["ranking"]
    doms = sorted(set().union(*(doc["plans"][n]["val"] for n in names)))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(names), 3.6))
    w = 0.8 / max(1, len(doms))
    for j, dm in enumerate(doms):
        m = [doc["plans"][n]["val"].get(dm, {}).get("mean", np.nan) for n in names]
        e = [doc["plans"][n]["val"].get(dm, {}).get("std", 0.0) for n in names]
        ax.bar(np.arange(len(names)) + (j - (len(doms) - 1) / 2) * w, m, w, yerr=e, label=dm, capsize=2)
    ax.set_xticks(range(len(names)), [f"{n}\n#{doc['plans'][n]['rank']}" for n in names])
    ax.set_ylabel("final validation loss (mean, sd over seeds)")
    c = doc["compute"]
    ax.set_title(f"midtrain validate from step {doc['step']}: probes/grid compute "
                 + (f"{c['probe_over_grid']:.2f}" if c["probe_over_grid"] is not None else "n/a"), fontsize=9)
    lo = min(v["mean"] for n in names for v in doc["plans"][n]["val"].values())
    ax.set_ylim(bottom=max(0.0, lo * 0.9))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_validation(parent: str, step: int, plans: list[ValidationPlan], seeds: list[int], out_dir: str, *,
                   progress: bool = False) -> dict:
    """Train every plan x seed into ``out_dir/<plan>-seed<k>``; returns {plan: [run dirs]}."""
    from midtrain.loop import train

    dirs = {}
    for p in plans:
        for k in seeds:
            c = TrainConfig.from_dict({**p.config.to_dict(), "seed": p.config.seed + k}).validate()
            out = os.path.join(out_dir, f"{p.name}-seed{k}")
            train(c, out, parent=parent, parent_step=step, progress=progress)
            dirs.setdefault(p.name, []).append(out)
    return dirs


def cmd_validate(args) -> int:
    """`midtrain validate RUN --step S` (midtrain/cli.py dispatches)."""
    from diagnostics.runs import RunDirError, atomic_write

    seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()] if args.seeds else []
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds needs at least two different non-negative integers, got {args.seeds!r}.")
    out_dir = args.out or (str(args.run_dir).rstrip("/") + f"-validate{args.step}")
    if os.path.exists(out_dir):
        raise RunDirError(f"{out_dir} already exists; midtrain validate writes a new folder only. Choose another "
                          "--out. Nothing was written.")
    names = [n.strip() for n in args.plans.split(",") if n.strip()] if args.plans else None
    plans, info = plan_validation(args.run_dir, args.step, names)
    probes = probe_branches(args.run_dir, args.branches)   # a foreign --branches is refused before training
    for n, why in info.get("dropped", {}).items():
        print(f"plan {n}: dropped, {why}")
    if "recommendations" in info:
        print(f"recommendations: {info['recommendations']}")
    for p in plans:
        print(f"plan {p.name}: {p.description}" + "".join(f"\n  {x}" for x in p.notes))
    dirs = run_validation(args.run_dir, args.step, plans, seeds, out_dir, progress=not args.quiet)
    doc = summarize(args.run_dir, args.step, plans, dirs, {**info, "seeds": seeds}, probes)
    atomic_write(os.path.join(out_dir, "validation.json"), json.dumps(doc, indent=2))
    _figure(doc, os.path.join(out_dir, "validation.png"))
    for n in doc["ranking"]:
        r = doc["plans"][n]
        vals = ", ".join(f"{dm} {v['mean']:.3f}+-{v['std']:.3f}" for dm, v in r["val"].items())
        print(f"#{r['rank']} {n}: mean {r['objective']['mean']:.4f} +- {r['objective']['std']:.4f} ({vals})")
    c = doc["compute"]
    print(f"recommended rank: {doc['recommended_rank']} of {len(doc['ranking'])}; probes {c['probe_tokens']} tokens "
          f"({len(c['probe_branches'])} branches) vs grid {c['grid_tokens']} tokens"
          + (f" = {c['probe_over_grid']:.3f}" if c["probe_over_grid"] is not None else ""))
    print(f"saved: {os.path.join(out_dir, 'validation.json')}, {os.path.join(out_dir, 'validation.png')}")
    return 0
