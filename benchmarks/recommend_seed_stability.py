"""Does the whole recommendation procedure give the same schedule under another seed? (issue 12, "Done
when": rerunning it with another seed moves the recommended switch step and anneal start by at most 10% of
the budget.)

    python benchmarks/recommend_seed_stability.py --steps 200 --seeds 1337,1338
    python benchmarks/recommend_seed_stability.py --quick             # 40 steps: a smoke test, not a result
    python benchmarks/recommend_seed_stability.py --steps 200 --out D --resume   # recommend again on D's runs

For each seed (``TrainConfig.seed``: the model's initialisation and the data order of the parent and of
every probe branched from it), the same procedure as ``benchmarks/recommend_vs_grid.py`` steps 1-3, through
the project's CLI in this one process: ``midtrain train`` (default recipe, ``tiny`` preset, CPU, rescaled
to ``--steps``, checkpoints at the probe steps), ``midtrain sweep --anneal-at`` at ``--probe-at`` (default
0.5, 0.75 of the stable phase) and ``--switch-at`` at ``--switch-at-frac`` (default 0.5, 0.625, 0.75, 0.875),
``midtrain recommend --branches <probes>``. No validation. It prints each seed's
``lr_decay`` (anneal start) and ``data_switch`` (switch step) with their ranges, and the largest move
between seeds as a fraction of the budget (the parent's total steps, all phases), PASS when at most
``--max-move`` (default 0.10). Nothing is asserted; everything is written under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.recommend_vs_grid import SWITCH_FRACS, _cli, _probe_steps, _targets, parent_and_probes  # noqa: E402


def _one_seed(steps: int, seed: int, probe_at: str, switch_at: str, out: str, resume: bool = False,
              anneal_target: str = "auto") -> dict:
    from diagnostics.runs import RECOMMENDATIONS_FILE
    from midtrain.config import default_config

    cfg = default_config().scaled_to(steps)
    cfg.model.preset, cfg.device, cfg.seed = "tiny", "cpu", seed
    probe_steps, switch_steps = _probe_steps(cfg, probe_at), _probe_steps(cfg, switch_at)
    cfg.checkpoint_steps = sorted(set(probe_steps) | set(switch_steps))
    cfg.validate()
    parent, probes, walls = parent_and_probes(cfg, out, probe_steps, switch_steps, resume)
    walls["recommend"] = _cli(["recommend", parent, "--branches", *probes, "--anneal-target", anneal_target])
    doc = json.load(open(os.path.join(parent, RECOMMENDATIONS_FILE)))
    recs = {r["name"]: r for r in doc.get("recommendations", [])}
    return {"seed": seed, "total": cfg.total_steps(), "probe_steps": probe_steps, "switch_steps": switch_steps,
            "targets": _targets(cfg),
            "recs": {k: recs.get(k) or str(doc.get("not_available", {}).get(k, "missing"))
                     for k in ("lr_decay", "data_switch")},
            "walls": walls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="total steps of each parent (default 400 = the recipe)")
    ap.add_argument("--quick", action="store_true", help="--steps 40 (a smoke test, not a result)")
    ap.add_argument("--seeds", default="1337,1338", help="config seeds, comma-separated (default 1337 = the "
                                                         "recipe's, and 1338)")
    ap.add_argument("--probe-at", default="0.5,0.75", help="anneal probe steps as fractions of the stable phase")
    ap.add_argument("--switch-at-frac", default=SWITCH_FRACS,
                    help=f"switch probe steps as fractions of the stable phase (default {SWITCH_FRACS}; the "
                         "first seed-stability run of docs/validation.md used 0.5,0.75)")
    ap.add_argument("--max-move", type=float, default=0.10, help="largest allowed move / budget (default 0.10)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--anneal-target", choices=["auto", "train", "val"], default="auto",
                    help="midtrain recommend --anneal-target: the loss lr_decay's law is fitted to (default auto)")
    ap.add_argument("--out", help="output folder (default: a new temp dir)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the parents and probes already under --out (same budget, seeds and probe steps) "
                         "and only run recommend again (e.g. after a change to the recommenders)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    steps = 40 if args.quick else args.steps
    seeds = [int(s) for s in args.seeds.split(",")]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds needs at least two different seeds, got {args.seeds}")
    out = args.out or tempfile.mkdtemp(prefix="recommend_seed_stability-")
    print(f"budget: {steps} steps (the default recipe has 400), preset tiny, cpu, {args.threads} thread(s); "
          f"seeds {seeds}; out {out}", flush=True)
    res = [_one_seed(steps, s, args.probe_at, args.switch_at_frac, os.path.join(out, f"seed{s}"), args.resume,
                     args.anneal_target)
           for s in seeds]
    with open(os.path.join(out, "seed_stability.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    total = res[0]["total"]
    print(f"\n== recommend seed stability: {steps} steps (budget {total} steps), tiny, cpu, anneal probes at "
          f"{res[0]['probe_steps']}, switch probes at {res[0]['switch_steps']} ==")
    print(f"{'seed':>6} {'anneal start':>12} {'range':>11} {'switch step':>11} {'range':>11}  switch model / "
          "discrete best probe")
    for r in res:
        cells = []
        for k in ("lr_decay", "data_switch"):
            v = r["recs"][k]
            cells += ([f"{v['value']:.0f}", f"{v['low']:.0f}-{v['high']:.0f}"] if isinstance(v, dict)
                      else ["n/a", "n/a"])
        ev = r["recs"]["data_switch"].get("evidence", {}) if isinstance(r["recs"]["data_switch"], dict) else {}
        model = str(ev.get("model", "-")).split(" weighted")[0].split(" (the best")[0]
        disc = str(ev.get("discrete best probe", "-")).split(" (the run")[0]
        print(f"{r['seed']:>6} {cells[0]:>12} {cells[1]:>11} {cells[2]:>11} {cells[3]:>11}  {model} / {disc}")
    for r in res:
        for k, v in r["recs"].items():
            if not isinstance(v, dict):
                print(f"seed {r['seed']}: {k} not available: {v}")
    for k, what in (("lr_decay", "anneal start"), ("data_switch", "switch step")):
        vals = [r["recs"][k]["value"] for r in res if isinstance(r["recs"][k], dict)]
        if len(vals) < len(res):
            print(f"FAIL  {what}: not available for every seed")
            continue
        move = (max(vals) - min(vals)) / total
        print(f"{'PASS' if move <= args.max_move else 'FAIL'}  {what} moves {max(vals) - min(vals):.0f} steps "
              f"= {move:.3f} of the budget (<= {args.max_move})")
    for r in res:
        print(f"wall seed {r['seed']}: " + ", ".join(f"{k} {v:.0f}s" for k, v in r["walls"].items()))
    print(f"saved under {out} (seed_stability.json, seed*/parent/recommendations.json)")


if __name__ == "__main__":
    main()
