"""Anneal and data-switch probes: short branches from a run's checkpoints that try the next phase
earlier (docs/recommendations.md, "Anneal start" and "Data switch"; `midtrain sweep RUN --anneal-at` /
`--switch-at` / `--mixtures`).

Anneal probe at step S, length N: the parent's phases up to its stable (constant-LR) phase, that phase
cut at S, then the parent's decaying phase (its peak LR decaying to its ``final_lr`` in its shape, its
mixture and batch) over N steps, from its peak (``warmup_steps = 0``, ``decay_fraction = 1``); later phases
are left out. Switch probe at step S: the LR schedule stays; the stable phase is cut at S and its rest
(``<name>@switch``) and the switched-to phase use the next phase's mixture (or a ``--mixtures``
candidate), up to the end of the switched-to phase, where the parent is evaluated too. Each probe is an
ordinary run directory (run.json records parent and step) under OUT_PREFIX (default RUN-probes):
``anneal<S>-<N>``, ``switch<S>`` or ``switch<S>-<NAME>``. Replicates (``--seeds 0,1``): each probe once per
seed K, its config's seed the parent's + K (the data order after S changes; the model starts from the
checkpoint, as ``midtrain validate --seeds`` does), into ``<label>-seed<K>``; with a seed other than 0 the
parent's own anneal or switch is a probe too (a replicate of the parent). The recommendations average
replicates and take their spread as the seed noise of their ranges. ``midtrain recommend RUN --branches DIR/*``
tells the kinds apart from their configs (``diagnostics.recommend.branch_kind``).

Refused before anything is written (ConfigError / RunDirError, exit 2): a step without a checkpoint (the
message lists the steps that have one; ``checkpoint_steps`` in the config keeps them), a step outside the
stable stretch, a probe that repeats the parent (same seed), an existing probe directory, a bad mixture,
bad seeds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from midtrain.config import ConfigError, TrainConfig

__all__ = ["ProbePlan", "plan_anneal_probes", "plan_switch_probes", "run_probes", "parse_steps", "parse_mixtures",
           "parse_seeds", "cmd_probes"]


@dataclass
class ProbePlan:
    kind: str           # "anneal" or "switch"
    step: int           # the parent's checkpoint it starts from
    out: str
    config: TrainConfig
    label: str          # e.g. "anneal150-60", "switch120-code", "switch120-code-seed1"
    seed: int = 0       # added to the parent's seed (a replicate when not 0)


def parse_steps(text: str, what: str) -> list[int]:
    try:
        out = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated positive integers, got {text!r}.") from None
    if not out or min(out) <= 0 or len(set(out)) != len(out):
        raise ConfigError(f"{what} must be different positive integers, got {text!r}.")
    return sorted(out)


def parse_seeds(text: str | None) -> list[int] | None:
    """``--seeds 0,1``: distinct non-negative integers added to the parent's seed (None: no replicates)."""
    if text is None:
        return None
    try:
        out = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or min(out) < 0 or len(set(out)) != len(out):
        raise ConfigError(f"--seeds must be distinct non-negative integers (added to the run's seed), got {text!r}. "
                          "Nothing was written.")
    return sorted(out)


def _seeded(cfg: TrainConfig, k: int) -> TrainConfig:
    out = TrainConfig.from_dict({**cfg.to_dict(), "seed": cfg.seed + k})
    out.checkpoint_every, out.eval_every = cfg.checkpoint_every, cfg.eval_every
    return out.validate()


def _replicates(kind: str, step: int, out: str, cfg: TrainConfig, label: str, seeds: list[int] | None,
                own: bool) -> list[ProbePlan]:
    """One plan per seed (``seeds`` None: one plan, the parent's seed, no suffix); ``own``: the probe repeats
    the parent's schedule, so only seeds other than 0 make a probe of it."""
    if seeds is None:
        return [ProbePlan(kind, step, _out(os.path.dirname(out), label), cfg, label)]
    return [ProbePlan(kind, step, _out(os.path.dirname(out), f"{label}-seed{k}"), _seeded(cfg, k), f"{label}-seed{k}", k)
            for k in seeds if not (own and k == 0)]


def parse_mixtures(items: list[str], order: list[str]) -> dict[str, dict[str, float]]:
    """``NAME=w1,w2,...`` (weights in the order of ``order``, the switched-to phase's domains) or
    ``NAME=domain:w,domain:w`` -> {NAME: mixture}."""
    out = {}
    for it in items:
        name, sep, rest = it.partition("=")
        if not sep or not name.strip() or not name.replace("_", "").replace("-", "").isalnum() or name in out:
            raise ConfigError(f"--mixtures takes NAME=w1,w2,... with a distinct alphanumeric NAME, got {it!r}.")
        parts = [p.strip() for p in rest.split(",") if p.strip()]
        try:
            if all(":" in p for p in parts):
                mix = {p.split(":")[0].strip(): float(p.split(":")[1]) for p in parts}
            else:
                if len(parts) != len(order):
                    raise ValueError
                mix = dict(zip(order, (float(p) for p in parts)))
        except (ValueError, IndexError):
            raise ConfigError(f"--mixtures {it!r}: give {len(order)} weights in the order {order} or "
                              "domain:weight pairs.") from None
        if any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
            raise ConfigError(f"--mixtures {it!r}: weights must be non-negative with a positive sum.")
        out[name.strip()] = mix
    return out


def _load(parent: str):
    from diagnostics.runs import load_run

    run = load_run(parent)
    return run, TrainConfig.from_dict(run.config).validate(), [s for s, _ in run.checkpoints()]


def _check_steps(steps: list[int], ckpts: list[int], lo: int, hi: int, parent: str, what: str) -> None:
    missing = [s for s in steps if s not in ckpts]
    if missing:
        usable = [s for s in ckpts if lo < s <= hi]
        raise ConfigError(f"run {parent} has no checkpoint at step(s) {missing}; the {what} can start at the steps "
                          f"with one: {usable} (all checkpoints: {ckpts}). Keep checkpoints where probes start with "
                          f"checkpoint_steps = {missing} in the config (docs/training.md). Nothing was written.")
    bad = [s for s in steps if not lo < s <= hi]
    if bad:
        raise ConfigError(f"{what} steps {bad} are outside the stable stretch of run {parent}: steps {lo + 1}-{hi} "
                          "(after the warmup of the constant-LR phase, up to the next phase). Nothing was written.")


def _finish(cfg: TrainConfig, d: dict, phases: list[dict], every: int) -> TrainConfig:
    d = {**d, "phases": phases, "checkpoint_steps": []}
    out = TrainConfig.from_dict(d)
    out.checkpoint_every = out.total_steps() + 1      # the loop still checkpoints the end (and phase ends)
    out.eval_every = max(1, min(cfg.eval_every, every))
    return out.validate()


def _out(prefix: str, label: str) -> str:
    from diagnostics.runs import RUN_JSON, RunDirError

    out = os.path.join(prefix, label)
    if os.path.exists(os.path.join(out, RUN_JSON)) or (os.path.isdir(out) and os.listdir(out)):
        raise RunDirError(f"{out} already exists; probes write new run directories only. Choose another "
                          "--out-prefix. Nothing was written.")
    return out


def plan_anneal_probes(parent: str, starts: list[int], lengths: list[int] | None = None,
                       out_prefix: str | None = None, seeds: list[int] | None = None) -> list[ProbePlan]:
    """One probe per (start, length) and seed; default length: the parent's decaying phase's. Writes nothing."""
    from diagnostics.recommend import anneal_phase_index

    run, cfg, ckpts = _load(parent)
    a = anneal_phase_index(run.config)
    st, starts_at = cfg.phases[a - 1], cfg.phase_starts()
    if any(p.decay != "constant" for p in cfg.phases[:a]):
        raise ConfigError(f"run {parent}: a phase before {cfg.phases[a].name!r} decays; no stable stretch.")
    lo, hi = starts_at[a - 1] + st.warmup_steps, starts_at[a]
    _check_steps(starts, ckpts, lo, hi, parent, "anneal probes")
    lengths = lengths or [cfg.phases[a].num_steps()]
    prefix = out_prefix or (str(parent).rstrip("/") + "-probes")
    d = cfg.to_dict()
    plans = []
    for s in starts:
        for n in lengths:
            own = s == hi and n == cfg.phases[a].num_steps() and cfg.phases[a].warmup_steps == 0 \
                and cfg.phases[a].decay_fraction == 1.0
            if own and not any(seeds or []):
                raise ConfigError(f"an anneal at step {s} for {n} steps is the parent's own; drop it (or give --seeds "
                                  "with a seed other than 0 for replicates of it). Nothing was written.")
            stable = {**d["phases"][a - 1], "steps": s - starts_at[a - 1], "tokens": None}
            ann = {**d["phases"][a], "steps": n, "tokens": None, "warmup_steps": 0, "decay_fraction": 1.0}
            label = f"anneal{s}-{n}"
            plans += _replicates("anneal", s, os.path.join(prefix, label),
                                 _finish(cfg, d, d["phases"][:a - 1] + [stable, ann], max(1, n // 10)), label, seeds, own)
    return plans


def plan_switch_probes(parent: str, starts: list[int] | None = None, mixtures: dict | None = None,
                       out_prefix: str | None = None, seeds: list[int] | None = None) -> list[ProbePlan]:
    """One probe per (switch step, mixture) and seed; default step: the parent's own switch (with --mixtures),
    default mixture: the switched-to phase's. Writes nothing."""
    from diagnostics.recommend import mixture_key, switch_phase_index

    run, cfg, ckpts = _load(parent)
    m = switch_phase_index(run.config)
    prev, nxt, starts_at = cfg.phases[m - 1], cfg.phases[m], cfg.phase_starts()
    if prev.decay != "constant":
        raise ConfigError(f"run {parent}: phase {prev.name!r} before the switch decays; a switch probe keeps the LR "
                          "schedule and can only split a constant-LR phase.")
    lo, hi = starts_at[m - 1] + prev.warmup_steps, starts_at[m]
    starts = starts or [hi]
    if not mixtures and hi in starts and not any(seeds or []):
        raise ConfigError(f"a switch at step {hi} with the next phase's mixture is the parent's own; drop it or give "
                          "--mixtures (or --seeds with a seed other than 0 for replicates of it). Nothing was written.")
    _check_steps(starts, ckpts, lo, hi, parent, "switch probes")
    domains = sorted({k for p in cfg.phases for k in p.mixture})
    for name, mix in (mixtures or {}).items():
        if set(mix) - set(domains):
            raise ConfigError(f"--mixtures {name}: unknown domain(s) {sorted(set(mix) - set(domains))}; the run's "
                              f"domains are {domains}. Nothing was written.")
    prefix = out_prefix or (str(parent).rstrip("/") + "-probes")
    d = cfg.to_dict()
    plans = []
    for s in starts:
        for name, mix in ((mixtures or {None: dict(nxt.mixture)})).items():
            head = {**d["phases"][m - 1], "steps": s - starts_at[m - 1], "tokens": None}
            rest = [{**d["phases"][m - 1], "name": prev.name + "@switch", "steps": hi - s, "tokens": None,
                     "warmup_steps": 0, "mixture": dict(mix)}] if hi > s else []
            label = f"switch{s}" + (f"-{name}" if name else "")
            phases = d["phases"][:m - 1] + [head] + rest + [{**d["phases"][m], "mixture": dict(mix)}]
            own = s == hi and mixture_key({"mixture": mix})[0] == mixture_key({"mixture": nxt.mixture})[0]
            plans += _replicates("switch", s, os.path.join(prefix, label),
                                 _finish(cfg, d, phases, max(1, (hi + nxt.num_steps() - s) // 12)), label, seeds, own)
    return plans


def run_probes(parent: str, plans: list[ProbePlan], *, progress: bool = False, corpus=None, hooks=None) -> list:
    """Train the planned probes one after the other; returns the loop's TrainResults."""
    from midtrain.loop import train

    return [train(p.config, p.out, parent=parent, parent_step=p.step, progress=progress, corpus=corpus, hooks=hooks)
            for p in plans]


def cmd_probes(args) -> int:
    """`midtrain sweep RUN --anneal-at ... | --switch-at ... | --mixtures ... [--seeds K1,K2]` (midtrain/cli.py
    dispatches). ``--step S`` may name the one checkpoint the probes start from: it must equal every
    --anneal-at / --switch-at step, and --mixtures without --switch-at switch at S."""
    if args.batch_sizes:
        raise ConfigError("--anneal-at / --switch-at / --mixtures plan probes from their own steps; drop "
                          "--batch-sizes (a batch-size sweep is a separate command).")
    seeds = parse_seeds(getattr(args, "seeds", None))
    S = args.step
    for flag, text in (("--anneal-at", args.anneal_at), ("--switch-at", args.switch_at)):
        if S is not None and text and parse_steps(text, flag) != [S]:
            raise ConfigError(f"--step {S} names the checkpoint the probes start from; {flag} {text} differs. Give "
                              f"{flag} {S} or drop --step. Nothing was written.")
    if S is not None and not args.switch_at and not args.anneal_at and not args.mixtures:
        raise ConfigError("--step with probes goes with --anneal-at / --switch-at / --mixtures. Nothing was written.")
    plans = []
    if args.anneal_at:
        lengths = parse_steps(args.anneal_steps, "--anneal-steps") if args.anneal_steps else None
        plans += plan_anneal_probes(args.run_dir, parse_steps(args.anneal_at, "--anneal-at"), lengths, args.out_prefix,
                                    seeds)
    elif args.anneal_steps:
        raise ConfigError("--anneal-steps goes with --anneal-at.")
    if args.switch_at or args.mixtures:
        from diagnostics.recommend import switch_phase_index
        from diagnostics.runs import load_run

        order = list(TrainConfig.from_dict(load_run(args.run_dir).config).phases[
            switch_phase_index(load_run(args.run_dir).config)].mixture)
        mixtures = parse_mixtures(args.mixtures, order) if args.mixtures else None
        starts = parse_steps(args.switch_at, "--switch-at") if args.switch_at else ([S] if S is not None else None)
        plans += plan_switch_probes(args.run_dir, starts, mixtures, args.out_prefix, seeds)
    if len({p.out for p in plans}) != len(plans):
        raise ConfigError("two probes would share a directory; give each step once. Nothing was written.")
    for p in plans:
        print(f"probe {p.label}: from step {p.step} to step {p.config.total_steps()} "
              f"({p.config.total_steps() - p.step} steps), eval every {p.config.eval_every}"
              + (f", seed +{p.seed}" if seeds is not None else "") + f" -> {p.out}")
    run_probes(args.run_dir, plans, progress=not args.quiet)
    print(f"next: midtrain recommend {args.run_dir} --branches " + " ".join(p.out for p in plans))
    return 0
