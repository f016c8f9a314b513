"""The ``midtrain`` command line.

    midtrain train                                  # default recipe, tiny preset, CPU, a few minutes
    midtrain train --config my.toml --out runs/x    # your recipe
    midtrain train --out runs/x --resume            # continue a stopped run
    midtrain train --from runs/x --step 400 --config cooldown.toml --out runs/x-cool   # branch
    midtrain train --reference runs/big --out runs/y   # difficulty/<domain>/reducible_loss vs runs/big
    midtrain show runs/x                            # summary of a run
    midtrain recommend runs/x --write-config rec.toml   # batch size (GNS), LR-decay start (annealing law)
    midtrain sweep runs/x --step 400 --batch-sizes 8,16,32 --tokens 2000000   # branches per batch size
    midtrain recommend runs/x --branches runs/x-sweep400/bs*   # + critical batch size from the branches
    midtrain report runs/x --compare runs/x-cool    # one HTML page of the run (runs/x/report.html)
    midtrain config --dump default.toml             # the default recipe, for editing

Bad input (a missing file, an unknown key, a run directory that already holds
a run, ...) prints one paragraph and exits with status 2; nothing on disk is
changed. A run that cannot be written (a full disk, a read-only run directory,
records of metrics.jsonl that could not be written) stops with one paragraph,
status "failed" in run.json where it can still be written, and exit status 4;
`midtrain train --out RUN --resume` continues it once the cause is fixed.
A run that diverges (too many updates skipped for non-finite gradients) stops with
status ``diverged`` in run.json, prints a paragraph naming the step and the likely cause, and exits
with status 3.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # training stopped: too many non-finite-gradient steps (midtrain/_guard.py)
EXIT_RUN_FAILED = 4  # the run could not be written: disk full, read-only run directory, lost records
EXIT_BROKEN_PIPE = 141  # stdout closed by its reader (`midtrain show RUN | head`), as 128 + SIGPIPE


def _fail(msg: str, code: int = EXIT_BAD_INPUT) -> int:
    print("midtrain: error: " + textwrap.fill(msg, width=100, subsequent_indent="  "), file=sys.stderr)
    return code


def _run_failed(out: str, e: OSError) -> int:
    """One paragraph for a run stopped by a write error: what failed, what run.json says, how to go on."""
    import warnings

    from diagnostics.runs import RunDirError, load_run

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            run = load_run(out)
    except (RunDirError, OSError):
        return _fail(f"could not write the run directory {out}: {e}. Nothing was trained.", EXIT_RUN_FAILED)
    if run.status == "failed":
        state = f"Its status in run.json is \"failed\" (steps done: {run.info.get('steps_done', '?')})"
    else:
        state = f"Its status could not be recorded (run.json still says {run.status!r})"
    latest = run.latest_checkpoint()
    where = f"from its checkpoint at step {latest[0]}" if latest else "from the start"
    return _fail(f"the run in {out} stopped: {e}. {state}. Once the cause is fixed (free "
                 f"disk space, make {out} writable), continue it {where}, recording the missing steps again: "
                 f"midtrain train --out {out} --resume", EXIT_RUN_FAILED)


def _user_errors():
    from diagnostics.runs import RunDirError
    from midtrain.config import ConfigError
    from diagnostics.recommend import RecommendationError
    from midtrain.data import DataError

    return (ConfigError, DataError, RunDirError, RecommendationError)


def _load_config(args):
    from midtrain.config import default_config, load_toml

    cfg = load_toml(args.config) if args.config else None
    if cfg is None and getattr(args, "from_run", None):  # branch: default to the parent's config
        from diagnostics.runs import load_run
        from midtrain.config import TrainConfig

        cfg = TrainConfig.from_dict(load_run(args.from_run).config)
    if cfg is None and getattr(args, "resume", False):
        from diagnostics.runs import RUN_JSON, load_run
        from midtrain.config import TrainConfig

        if os.path.exists(os.path.join(args.out, RUN_JSON)):
            cfg = TrainConfig.from_dict(load_run(args.out).config)
    if cfg is None:
        cfg = default_config()
    if args.preset:
        cfg.model.preset = args.preset
    if args.seed is not None:
        cfg.seed = args.seed
    if args.device:
        cfg.device = args.device
    if getattr(args, "wandb", None) or getattr(args, "wandb_mode", None):
        cfg.wandb = {**(cfg.wandb or {}), **({"project": args.wandb} if args.wandb else {}),
                     **({"mode": args.wandb_mode} if args.wandb_mode else {})}
    if getattr(args, "reference", None):
        cfg.monitor.difficulty = {**(cfg.monitor.difficulty or {}), "reference_checkpoint": args.reference}
    if args.steps is not None:
        cfg.validate()
        cfg = cfg.scaled_to(args.steps)
    return cfg


def _fmt(x: float) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:6.3f}"


def cmd_train(args) -> int:
    from midtrain.loop import train

    if args.resume and args.out is None:
        return _fail("--resume continues the run in a directory: name it with --out DIR.")
    cfg = _load_config(args)
    if args.out is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _fail("under torchrun every process must name the same run directory: pass --out DIR.")
    if args.out is None:
        import time

        args.out = os.path.join("runs", time.strftime("run-%Y%m%d-%H%M%S"))
    try:
        res = train(cfg, args.out, resume=args.resume, parent=args.from_run, parent_step=args.step,
                    until_step=args.until, progress=not args.quiet)
    except BrokenPipeError:
        raise
    except OSError as e:  # a full disk, a read-only run directory, records that could not be written
        return _run_failed(args.out, e)
    print(f"\nrun: {os.path.abspath(res.run_dir)}")
    print(f"steps {res.start_step} -> {res.steps_done} of {res.total_steps}   final train loss {res.final_loss:.4f}   "
          f"{res.tokens_per_s / 1e3:.1f}k tokens/s   {res.wall_s:.0f}s"
          + (f"   MFU {100 * res.mfu:.1f}%" if res.mfu == res.mfu else ""))
    if res.val_end:
        print("validation loss (nats/token)   start    end   end/start")
        for k in sorted(res.val_end):
            a, b = res.val_start.get(k, float("nan")), res.val_end[k]
            print(f"  {k.split('/')[1]:<28s} {_fmt(a)} {_fmt(b)}   {_fmt(b / a if a == a else float('nan'))}")
    print(f"next: midtrain show {res.run_dir}")
    if res.status == "diverged":
        return _fail(res.message, EXIT_DIVERGED)
    return 0


def _show_store(run) -> None:
    """What `show` says about the run's records: an error, records that waited or were lost, a
    missing metrics.jsonl, missing steps."""
    from diagnostics.runs import METRICS_FILE, step_ranges

    info = run.info
    if info.get("error"):
        print(f"  error: {info['error']}")
    store = info.get("metrics_store") or {}
    if store.get("lost_records"):
        print(f"  records lost: {store['lost_records']} could not be written to {METRICS_FILE}, the first at "
              f"step {store.get('first_missing_step')}")
    elif store.get("delayed_records"):
        print(f"  {METRICS_FILE} could not be written for a while: {store['delayed_records']} records waited "
              f"in memory and were written later, none lost")
    if not (run.path / METRICS_FILE).exists():
        print(f"  {METRICS_FILE} is missing: no step was recorded")
    elif gaps := run.gaps():
        print(f"  missing steps in {METRICS_FILE}: {step_ranges(gaps)} ({sum(b - a + 1 for a, b in gaps)} steps)")


def cmd_show(args) -> int:
    from diagnostics.runs import load_run

    run = load_run(args.run_dir)
    info, m = run.info, run.metrics
    print(f"run {run.path}")
    print(f"  created {info.get('created', '?')}  status {info.get('status', 'running or killed')}  "
          f"steps {info.get('steps_done', '?')}/{info.get('total_steps', '?')}")
    _show_store(run)
    if run.parent:
        print(f"  branched from {run.parent.get('run')} at step {run.parent.get('step')}")
    for d in info.get("disabled_hooks") or []:  # hooks.Monitor: a hook that failed, one line each
        if isinstance(d, dict):
            print(f"  hook {d.get('name')} ({d.get('class')}) disabled at step {d.get('step')} in {d.get('event')}: "
                  f"{d.get('reason')}")
    if "model" in info:
        mc = info["model"]
        print(f"  model {run.config.get('model', {}).get('preset', '?')}: {mc.get('n_layer')} layers, "
              f"{mc.get('n_embd')} dims, {info.get('n_params', 0) / 1e6:.2f}M params on {info.get('device')}")
    phases = run.config.get("phases", [])
    starts = info.get("phase_starts", [])
    for i, p in enumerate(phases):
        s = starts[i] if i < len(starts) else "?"
        print(f"  phase {p['name']:<14s} from step {s:<6} lr {p.get('lr')} ({p.get('decay')})  "
              f"seq {p.get('seq_len')}  batch {p.get('batch_size')}  mixture {p.get('mixture')}")
    if len(m):
        last = m.dropna(subset=["train/loss"]) if "train/loss" in m else m
        if len(last):
            row = last.iloc[-1]
            print(f"  last step {int(row['step'])}: train/loss {row.get('train/loss', float('nan')):.4f}  "
                  f"lr {row.get('train/lr', float('nan')):.3e}  tokens {int(row.get('train/tokens', 0))}")
        _print_skipped(m)
        if "perf/tokens_per_s" in m:
            print(f"  throughput: median {m['perf/tokens_per_s'].median() / 1e3:.1f}k tokens/s")
        vcols = [c for c in m.columns if c.startswith("val/")]
        if vcols:
            print("  validation loss      first   last")
            for c in sorted(vcols):
                s = m[c].dropna()
                print(f"    {c.split('/')[1]:<16s} {_fmt(s.iloc[0])} {_fmt(s.iloc[-1])}  (steps {int(m.loc[s.index[0], 'step'])}..{int(m.loc[s.index[-1], 'step'])})")
    cks = run.checkpoints()
    print(f"  checkpoints: {len(cks)}" + (f" (steps {', '.join(str(s) for s, _ in cks)})" if cks else ""))
    return 0


def _print_skipped(m) -> None:
    """The steps whose update was skipped for a non-finite gradient (``train/skipped_steps`` rose)."""
    from diagnostics.recommend import skipped_steps

    steps = skipped_steps(m)
    if len(steps):
        shown = ", ".join(str(s) for s in steps[:10]) + (f", ... {steps[-1]}" if len(steps) > 10 else "")
        print(f"  skipped steps: {len(steps)} (steps {shown}; non-finite gradients, the update was not applied)")


def cmd_recommend(args) -> int:
    import json
    import time

    from diagnostics.recommend import RecommendationError, recommend_run
    from diagnostics.runs import RECOMMENDATIONS_FILE, atomic_write, load_run

    if args.write_config and not os.path.isdir(os.path.dirname(os.path.abspath(args.write_config))):
        return _fail(f"--write-config {args.write_config}: its directory does not exist; nothing was written.")
    run = load_run(args.run_dir)
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()] if args.shapes else None
    targets = [d.strip() for d in args.target_domains.split(",")] if args.target_domains else None
    recs, unavailable = recommend_run(  # diagnostics/recommend/_run.py: which recommenders run, and how
        run, [load_run(b) for b in args.branches or []], phase=args.phase, window=args.window, level=args.level,
        decay_phase=args.decay_phase, shapes=shapes, budget_tokens=args.budget_tokens, target=args.target,
        domain=args.domain, target_domains=targets, tolerance=args.tolerance, anneal_target=args.anneal_target)
    if args.json:
        print(json.dumps({"recommendations": [r.to_dict() for r in recs], "not_available": unavailable}, indent=2))
    else:
        for r in recs:
            print(r.to_text() + "\n")
        for name, why in unavailable.items():
            print(f"{name}: not available: {why}\n")
    if not recs:
        raise RecommendationError("no recommendation is available for this run: "
                                  + "; ".join(f"{k}: {v}" for k, v in unavailable.items()))
    out = os.path.join(args.run_dir, RECOMMENDATIONS_FILE)
    doc = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "recommendations": [r.to_dict() for r in recs], "not_available": unavailable}
    atomic_write(out, json.dumps(doc, indent=2))
    if not args.json:
        print(f"saved: {out}")
    if args.write_config:
        from midtrain.config import ConfigError, TrainConfig, dumps_toml

        patched = [r for r in recs if r.patch and r.name != "batch_schedule"]  # it replaces the phase list
        if not patched:
            raise ConfigError("this run has no built-in loop config to patch (not a `midtrain train` run).")
        cfg = TrainConfig.from_dict(run.config)
        for r in patched:  # every patch, in order (they touch different keys)
            cfg = cfg.with_patch(r.patch)
        cfg.validate()
        try:
            atomic_write(args.write_config, dumps_toml(cfg))
        except OSError as e:
            return _fail(f"cannot write {args.write_config}: {e.strerror or e}.")
        last = min(r.branch_step for r in patched)
        ckpts = [s for s, _ in run.checkpoints()]
        step = max([s for s in ckpts if s <= last] or [min(ckpts or [0])])
        tag = "-".join("bs%d" % int(r.value) if r.name == "batch_size" else r.name for r in patched)
        print(f"wrote {args.write_config} (the run's config with {len(patched)} patch(es)). Run and check it:\n"
              f"  midtrain train --from {args.run_dir} --step {step} --config {args.write_config} "
              f"--out {args.run_dir.rstrip('/')}-{tag}")
    return 0


def cmd_sweep(args) -> int:
    from midtrain.probes import parse_seeds
    from midtrain.sweep import parse_batch_sizes, parse_lr_grid, plan_sweep, run_sweep

    if args.seeds is not None and not (args.anneal_at or args.switch_at or args.mixtures or args.batch_sizes):
        from midtrain.config import ConfigError

        raise ConfigError("--seeds replicates probes or batch branches: it goes with --anneal-at / --switch-at / "
                          "--mixtures / --batch-sizes.")
    if args.rope:
        return _sweep_rope(args)
    if args.anneal_at or args.switch_at or args.mixtures:
        from midtrain.probes import cmd_probes

        return cmd_probes(args)
    if args.step is None or not args.batch_sizes:
        from midtrain.config import ConfigError

        raise ConfigError("midtrain sweep needs --step and --batch-sizes, or --anneal-at / --switch-at / --mixtures.")
    plans = plan_sweep(args.run_dir, args.step, parse_batch_sizes(args.batch_sizes), tokens=args.tokens,
                       steps=args.steps, phase=args.phase, out_prefix=args.out_prefix, evals=args.evals,
                       lr_scaling=args.lr_scaling, lr_grid=parse_lr_grid(args.lr_grid),
                       seeds=parse_seeds(args.seeds))
    for p in plans:
        lr = p.config.phase_at(args.step)[1].lr
        print(f"branch {os.path.basename(p.out)}: {p.steps} steps after step {args.step} ({p.tokens} tokens), "
              f"lr {lr:.3g}, eval every {p.config.eval_every} -> {p.out}")
    run_sweep(args.run_dir, args.step, plans, progress=not args.quiet)
    print(f"next: midtrain recommend {args.run_dir} --branches " + " ".join(p.out for p in plans))
    return 0


def _sweep_rope(args) -> int:
    """`midtrain sweep RUN --step S --rope NAME=SPEC ...`: one branch per RoPE choice (midtrain/sweep.py)."""
    from midtrain.config import ConfigError
    from midtrain.rope import describe_scaling
    from midtrain.sweep import parse_rope, plan_rope_sweep, run_sweep

    other = [f for f, v in (("--batch-sizes", args.batch_sizes), ("--lr-grid", args.lr_grid), ("--anneal-at",
             args.anneal_at), ("--switch-at", args.switch_at), ("--mixtures", args.mixtures)) if v]
    if other or args.step is None:
        raise ConfigError("--rope branches from one checkpoint: give --step S, and no " + (", ".join(other) or
                          "other sweep kind") + " (each sweep kind is a separate command). Nothing was written.")
    plans = plan_rope_sweep(args.run_dir, args.step, parse_rope(args.rope), tokens=args.tokens, steps=args.steps,
                            phase=args.phase, out_prefix=args.out_prefix, evals=args.evals)
    for p in plans:
        print(f"branch rope-{p.name} ({p.spec}): rope_base {p.base:g}, scaling {describe_scaling(p.scaling)}; "
              f"{p.steps} steps after step {args.step} ({p.tokens} tokens), eval every {p.config.eval_every} "
              f"-> {p.out}")
    results = run_sweep(args.run_dir, args.step, plans, progress=not args.quiet)
    for p, r in zip(plans, results):
        losses = [v for k, v in (r.val_end or {}).items() if k.startswith("val/") and k.endswith("/loss") and k.count("/") == 2]
        mean = f"{sum(losses) / len(losses):.4f}" if losses else "n/a"
        print(f"rope-{p.name}: mean validation loss {mean} at step {r.steps_done}")
    return 0


def cmd_validate(args) -> int:
    from midtrain.validate import cmd_validate as run

    return run(args)


def cmd_report(args) -> int:
    import matplotlib

    matplotlib.use("Agg")  # a file is drawn, never a window
    from diagnostics.report import ReportError, write_report

    try:  # bad input (not a run, a corrupt run.json: RunDirError in main) is refused before anything is written
        out = write_report(args.run_dir, args.compare or [], args.out)
    except ReportError as e:
        return _fail(str(e))
    print(f"wrote {out}")
    return 0


def cmd_config(args) -> int:
    from midtrain.config import default_config, dumps_toml, load_toml

    cfg = load_toml(args.config) if args.config else default_config()
    text = dumps_toml(cfg)
    if args.dump and args.dump != "-":
        if os.path.exists(args.dump) and not args.force:
            return _fail(f"{args.dump} already exists; pass --force to overwrite it or choose another file name.")
        from diagnostics.runs import atomic_write

        try:  # a whole file or none: a failed write leaves nothing behind
            atomic_write(args.dump, text)
        except OSError as e:
            return _fail(f"cannot write {args.dump}: {e.strerror or e}.")
        print(f"wrote {args.dump}")
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="midtrain", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `midtrain COMMAND --help` for each command's options.")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="run a phased mid-training run (default recipe, tiny preset)",
                       description="Train the built-in GPT through the config's phases, writing a run directory "
                                   "(run.json, metrics.jsonl, checkpoints/).")
    t.add_argument("--config", help="TOML config (see `midtrain config --dump`); default: the built-in recipe")
    t.add_argument("--preset", help="model preset: tiny, small, medium, gpt2")
    t.add_argument("--out", help="run directory (default runs/run-DATE-TIME); refused if it already holds a run")
    t.add_argument("--steps", type=int, help="total optimizer steps; every phase's budget scales in proportion")
    t.add_argument("--seed", type=int, help="random seed (model init and data order)")
    t.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    t.add_argument("--from", dest="from_run", metavar="RUN_DIR", help="branch: start from a checkpoint of this run")
    t.add_argument("--step", type=int, help="with --from: the parent's checkpoint step to branch from")
    t.add_argument("--until", type=int, metavar="STEP", help="stop after this global step (checkpointed)")
    t.add_argument("--reference", metavar="CKPT_OR_RUN", help="reference model for the difficulty tracker's "
                   "reducible loss: a checkpoint file or a run directory (its latest checkpoint); sets "
                   "[monitor.difficulty] reference_checkpoint")
    t.add_argument("--wandb", metavar="PROJECT", help="also mirror the metrics to this Weights & Biases project "
                   "(sets [wandb] project; needs pip install \"midtrain[wandb]\")")
    t.add_argument("--wandb-mode", choices=["online", "offline", "disabled"],
                   help="wandb mode (offline: no API key, sync later with `wandb sync`)")
    t.add_argument("--quiet", action="store_true", help="no progress line")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("show", help="summarise a run directory", description="Print a summary of a run directory.")
    s.add_argument("run_dir")
    s.set_defaults(func=cmd_show)

    r = sub.add_parser("recommend", help="batch size and LR-decay start from the run (docs/recommendations.md)",
                       description="Recommend a batch size (from the measured gradient noise scale) and when to "
                                   "start the LR decay (from the annealing law fitted to the run), each with its "
                                   "range, evidence and assumptions; one that cannot be made says why. Saves "
                                   "RUN/recommendations.json.")
    r.add_argument("run_dir")
    r.add_argument("--phase", help="batch size: phase whose measurements to use (default: the latest with enough)")
    r.add_argument("--decay-phase", help="LR decay: the phase whose decay to place (default: the last that decays)")
    r.add_argument("--shapes", help="LR decay: comma-separated decay shapes to compare, e.g. linear,1-sqrt "
                   "(default: the phase's own)")
    r.add_argument("--window", type=int, help="use the last N measured steps (default: the later half of the phase)")
    r.add_argument("--level", type=float, default=0.9, help="coverage of the range (moving-block bootstrap)")
    r.add_argument("--json", action="store_true", help="print JSON instead of text")
    r.add_argument("--write-config", metavar="TOML", help="write the run's config with the recommendation applied, "
                   "for `midtrain train --from RUN --step S --config TOML`")
    r.add_argument("--branches", nargs="+", metavar="RUN_DIR", help="branch runs of `midtrain sweep`, told apart "
                   "by their configs: batch-size branches add the critical batch size; anneal probes feed lr_decay, "
                   "switch probes data_switch and mixture; the run's schedule with another seed is a replicate")
    r.add_argument("--target", type=float, help="--branches: the target validation loss (default: the worst of "
                   "the branches' best losses)")
    r.add_argument("--domain", help="--branches: one domain's validation loss (default: mean over domains)")
    r.add_argument("--budget-tokens", type=int, help="lr_decay: the total token budget of the anneal plan (default: "
                   "the run's, to the end of its decaying phase)")
    r.add_argument("--anneal-target", choices=["auto", "train", "val"], default="auto", help="lr_decay with anneal "
                   "probes: fit the schedule law to the validation loss of the fixed evaluation set, domains weighted "
                   "by the anneal mixture (val), or to the logged train loss (train); auto (default): val where the "
                   "run and every probe have at least 3 evaluations in the fitted stretch, else train "
                   "(docs/recommendations.md, 'Anneal start')")
    r.add_argument("--target-domains", help="data_switch, mixture: the domains whose loss the switch should lower (default: "
                   "those the next phase upweights)")
    r.add_argument("--tolerance", type=float, default=0.01, help="data_switch, mixture: how far (relative) the other "
                   "domains may end above the run's own recipe (default 0.01)")
    r.set_defaults(func=cmd_recommend)

    w = sub.add_parser("sweep", help="branch a run at several batch sizes (empirical critical batch size)",
                       description="From RUN's checkpoint at --step, train one branch per batch size for the same "
                                   "number of tokens, into OUT_PREFIX/bs<B>; then `midtrain recommend RUN "
                                   "--branches OUT_PREFIX/bs*` fits the critical batch size (docs/recommendations.md). "
                                   "With --rope, one branch per RoPE choice instead (OUT_PREFIX/rope-NAME).")
    w.add_argument("run_dir")
    w.add_argument("--step", type=int, help="the parent's checkpoint step to branch from")
    w.add_argument("--batch-sizes", help="comma-separated batch sizes (sequences), e.g. 8,16,32")
    w.add_argument("--tokens", type=int, help="tokens each branch trains after --step")
    w.add_argument("--steps", type=int, help="instead of --tokens: the tokens the parent spends in this many steps "
                   "(default: the tokens left in the phase containing --step)")
    w.add_argument("--phase", help="without --tokens/--steps: train the tokens the parent spends up to the end of "
                   "this phase (default: the phase containing --step)")
    w.add_argument("--evals", type=int, default=20, help="validation evaluations per branch (default 20)")
    w.add_argument("--lr-scaling", choices=["sqrt", "none"], default="sqrt", help="LR at batch k x B: sqrt "
                   "multiplies each changed phase's lr and final_lr by sqrt(k) (default; the Adam rule, a fair "
                   "sweep), none keeps the parent's LR")
    w.add_argument("--lr-grid", metavar="M1,M2,...", help="LR multipliers on top of the scaling, one branch per "
                   "batch and multiplier (OUT_PREFIX/bs<B>-lr<M>), e.g. 0.5,1,2; the fit keeps the best per batch")
    w.add_argument("--out-prefix", help="folder for the branches (default RUN-sweep<STEP>)")
    w.add_argument("--quiet", action="store_true", help="no progress line")
    w.add_argument("--anneal-at", metavar="S1,S2", help="anneal probes: run the next decaying phase from these "
                   "checkpoint steps (midtrain/probes.py)")
    w.add_argument("--anneal-steps", metavar="N1,N2", help="anneal probes' lengths (default: the decaying phase's)")
    w.add_argument("--switch-at", metavar="S1,S2", help="switch probes: the next phase's mixture from these steps, "
                   "LR schedule unchanged")
    w.add_argument("--mixtures", nargs="+", metavar="NAME=w1,w2", help="switch probes with candidate mixtures "
                   "(weights in the order of the next phase's domains, or domain:w pairs)")
    w.add_argument("--seeds", metavar="K1,K2", help="probes and batch branches: run each once per seed K (the run's "
                   "seed + K) into <branch>-seed<K>; the replicates' spread is the seed noise of data_switch, "
                   "mixture, lr_decay and the equal-token batch comparison")
    w.add_argument("--rope", nargs="+", metavar="NAME=SPEC", help="RoPE branches from --step, one per NAME "
                   "(OUT_PREFIX/rope-NAME), the phases from --step on set to SPEC: base:B, none, pi:S, ntk:S, yarn:S, "
                   "yarn:S:L or base:B+METHOD, e.g. base1e3=base:1000 yarn2=yarn:2 (docs/recommendations.md)")
    w.set_defaults(func=cmd_sweep)

    v = sub.add_parser("validate", help="train the recommended plan and its alternatives from a checkpoint, "
                       "with seeds, and rank them (docs/recommendations.md)", description="From RUN's checkpoint at "
                       "--step, train the recommended plan, the run's own recipe, cosine, WSD and switch plans to the "
                       "same budget with each seed; save RUN-validate<S>/validation.json and validation.png.")
    v.add_argument("run_dir")
    v.add_argument("--step", type=int, required=True, help="the checkpoint step every plan starts from")
    v.add_argument("--seeds", default="0,1", help="seeds added to the run's seed (at least two; default 0,1)")
    v.add_argument("--plans", help="a subset of recommended,own,cosine,wsd,switch0,switch50,switch80 (default all)")
    v.add_argument("--branches", nargs="*", metavar="RUN_DIR", help="the probe branches whose compute to count "
                   "(default: RUN-probes/* and RUN-sweep*/*)")
    v.add_argument("--out", help="output folder (default RUN-validate<STEP>); refused if it exists")
    v.add_argument("--quiet", action="store_true", help="no progress line")
    v.set_defaults(func=cmd_validate)

    p = sub.add_parser("report", help="one self-contained HTML page of a run (docs/report.md)",
                       description="Write one HTML file (figures embedded, no network, no server) with the run's "
                                   "summary and config, phases, validation loss, noise scale, representations, "
                                   "difficulty, LR schedule and schedule law, recommendations, validation tables and "
                                   "long-context figures; a figure whose metric the run lacks is one line naming the "
                                   "hook that writes it.")
    p.add_argument("run_dir")
    p.add_argument("--compare", nargs="+", metavar="RUN_DIR", help="overlay these runs on the loss, validation, "
                   "GNS and LR figures (a parent and its branches, or two recipes); branches of RUN also feed its "
                   "recommendations, as midtrain recommend --branches")
    p.add_argument("--out", metavar="FILE", help="the HTML file to write (default RUN/report.html)")
    p.set_defaults(func=cmd_report)

    c = sub.add_parser("config", help="print or write a config", description="Print the default recipe (or a "
                       "config file, normalised) as TOML, or write it with --dump FILE.")
    c.add_argument("--dump", nargs="?", const="-", metavar="FILE", help="write the config to FILE (default: stdout)")
    c.add_argument("--config", help="normalise this config file instead of the default")
    c.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    c.set_defaults(func=cmd_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return EXIT_BAD_INPUT
    try:
        code = args.func(args)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:  # `midtrain show RUN | head`: the reader has what it wanted
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return EXIT_BROKEN_PIPE
    except _user_errors() as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\nmidtrain: interrupted; the latest checkpoint can be resumed with --resume.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
