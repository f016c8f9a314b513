"""The closed loop on the default recipe: do the probe-based recommendations beat the grid they compete with?

    python benchmarks/recommend_vs_grid.py --quick               # micro budget (40 steps), a few minutes
    python benchmarks/recommend_vs_grid.py --steps 200           # half the default recipe's 400 steps
    python benchmarks/recommend_vs_grid.py                       # the full default recipe (400 steps)

Default recipe, ``tiny`` preset, CPU, everything through the project's own CLI (``midtrain.cli.main``) in
this one process (``--threads`` sets ``torch.set_num_threads``, default 1). ``--steps N`` rescales every
phase (``TrainConfig.scaled_to``, as ``midtrain train --steps``); the budget is printed first.

1. trains the parent run, keeping checkpoints (``checkpoint_steps``) at the probe and validate steps:
   fractions ``--probe-at`` (default 0.5, 0.75) of the stable (constant-LR) phase;
2. ``midtrain sweep PARENT --anneal-at S1,S2`` and ``--switch-at S1,S2`` (anneal probes of the decaying
   phase's own length, switch probes to the next phase's mixture);
3. ``midtrain recommend PARENT --branches <probes>`` (writes PARENT/recommendations.json);
4. ``midtrain validate PARENT --step S --seeds ... --branches <probes>`` over all plans, S the first probe step;
5. the table: per plan the mean final **target loss** (the mean final validation loss of the domains the
   mid-training phase upweights over the phase before it, per seed, then mean and sd over seeds), its
   rank, and PASS/FAIL for: the recommended plan within two seed sds of the best plan (2 x the larger of
   the two plans' sds), better than ``own`` (the recipe) and than ``cosine``, and the probes' tokens over
   the grid's tokens at most 1/3. Nothing is asserted; everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _targets(cfg) -> list[str]:
    """The domains the switched-to phase upweights (normalised weights), as `recommend`'s data_switch default."""
    from diagnostics.recommend import switch_phase_index

    d = cfg.to_dict()
    m = switch_phase_index(d)
    wp, wn = ({k: v / sum(p["mixture"].values()) for k, v in p["mixture"].items()} for p in d["phases"][m - 1:m + 1])
    return sorted(k for k in wn if wn[k] > wp.get(k, 0.0))


def _cli(argv: list[str]) -> float:
    from midtrain.cli import main

    print("\n$ midtrain " + " ".join(argv), flush=True)
    t = time.perf_counter()
    rc = main(argv)
    if rc:
        raise SystemExit(f"midtrain {argv[0]} exited {rc}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="total steps of the parent (default 400 = the recipe)")
    ap.add_argument("--quick", action="store_true", help="micro budget: --steps 40 (a smoke test, not a result)")
    ap.add_argument("--seeds", default="0,1", help="validate seeds (default 0,1)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--probe-at", default="0.5,0.75", help="probe steps as fractions of the stable phase")
    ap.add_argument("--out", help="output folder (default: a new temp dir)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from diagnostics.runs import load_run
    from midtrain.config import default_config, dumps_toml
    from midtrain.validate import _final_val

    torch.set_num_threads(args.threads)
    steps = 40 if args.quick else args.steps
    out = args.out or tempfile.mkdtemp(prefix="recommend_vs_grid-")
    os.makedirs(out, exist_ok=True)
    cfg = default_config().scaled_to(steps)
    cfg.model.preset, cfg.device = "tiny", "cpu"
    from diagnostics.recommend import anneal_phase_index

    a = anneal_phase_index(cfg.to_dict())
    starts = cfg.phase_starts()
    lo, hi = starts[a - 1] + cfg.phases[a - 1].warmup_steps, starts[a]
    probe_steps = sorted({min(hi - 1, max(lo + 1, round(hi * float(f)))) for f in args.probe_at.split(",")})
    cfg.checkpoint_steps = probe_steps
    cfg.validate()
    targets = _targets(cfg)
    budget = ", ".join(f"{p.name} {p.num_steps()}" for p in cfg.phases)
    print(f"budget: {steps} steps ({budget}; the default recipe has 400), preset tiny, cpu, "
          f"{args.threads} thread(s); probes at {probe_steps}; validate from step {probe_steps[0]} "
          f"with seeds {args.seeds}; target domains {targets}; out {out}", flush=True)
    cfg_path = os.path.join(out, "parent.toml")
    with open(cfg_path, "w") as f:
        f.write(dumps_toml(cfg))
    parent = os.path.join(out, "parent")
    walls = {}
    walls["train"] = _cli(["train", "--config", cfg_path, "--out", parent, "--quiet"])
    at = ",".join(map(str, probe_steps))
    walls["probes"] = _cli(["sweep", parent, "--anneal-at", at, "--quiet"])
    walls["probes"] += _cli(["sweep", parent, "--switch-at", at, "--quiet"])
    probes = sorted(os.path.join(parent + "-probes", d) for d in os.listdir(parent + "-probes"))
    walls["recommend"] = _cli(["recommend", parent, "--branches", *probes])
    vdir = os.path.join(out, "validate")
    walls["validate"] = _cli(["validate", parent, "--step", str(probe_steps[0]), "--seeds", args.seeds,
                              "--branches", *probes, "--out", vdir, "--quiet"])
    doc = json.load(open(os.path.join(vdir, "validation.json")))

    rows = {}
    for name, r in doc["plans"].items():
        per_seed = [float(np.mean([v[d] for d in targets])) for v in (_final_val(load_run(x)) for x in r["runs"])]
        rows[name] = (float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                      r["switch_step"], r["decay_start"])
    order = sorted(rows, key=lambda n: rows[n][0])
    print(f"\n== recommend vs grid: {steps} steps ({budget}), tiny, cpu, validate from step {doc['step']}, "
          f"seeds {args.seeds} ==")
    print(f"target loss = mean final validation loss of {targets} (end of run), mean +- sd over seeds")
    print(f"{'rank':>4} {'plan':<12} {'target loss':>11} {'sd':>7} {'switch':>7} {'decay':>6}  all-domain objective")
    for i, n in enumerate(order):
        m, s, sw, dc = rows[n]
        ob = doc["plans"][n]["objective"]
        print(f"{i + 1:>4} {n:<12} {m:>11.4f} {s:>7.4f} {str(sw):>7} {str(dc):>6}  "
              f"{ob['mean']:.4f} +- {ob['std']:.4f}")
    for n, why in (doc.get("dropped") or {}).items():
        print(f"     {n:<12} dropped: {why}")
    c = doc["compute"]
    ratio = c["probe_over_grid"]
    print(f"probes: {len(c['probe_branches'])} branches, {c['probe_tokens']} tokens; grid {c['grid_tokens']} tokens; "
          f"ratio {ratio:.3f}" if ratio is not None else "probes: n/a")
    checks = []
    if "recommended" in rows:
        rm, rs = rows["recommended"][:2]
        best = order[0]
        bm, bs = rows[best][:2]
        tol = 2 * max(rs, bs)
        print(f"recommended rank {order.index('recommended') + 1} of {len(order)} (target loss); best {best}")
        checks.append((f"recommended within 2 seed sds of best ({rm:.4f} - {bm:.4f} = {rm - bm:.4f} <= {tol:.4f})",
                       rm - bm <= tol))
        for other in ("own", "cosine"):
            if other in rows:
                checks.append((f"recommended better than {other} ({rm:.4f} < {rows[other][0]:.4f})",
                               rm < rows[other][0]))
            else:
                checks.append((f"recommended better than {other} (plan {other} not in the grid)", False))
    else:
        checks.append(("recommended plan in the grid (it was dropped)", False))
    checks.append((f"probes' compute <= 1/3 of the grid's ({ratio if ratio is None else f'{ratio:.3f}'})",
                   ratio is not None and ratio <= 1 / 3))
    for what, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    print("wall: " + ", ".join(f"{k} {v:.0f}s" for k, v in walls.items()))
    print(f"saved under {out} (validate/validation.json, parent/recommendations.json)")


if __name__ == "__main__":
    main()
