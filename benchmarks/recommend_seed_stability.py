"""Does the whole recommendation procedure give the same schedule under another seed? (issue 12, "Done
when": rerunning it with another seed moves the recommended switch step and anneal start by at most 10% of
the budget.)

    python benchmarks/recommend_seed_stability.py --steps 200 --seeds 1337,1338
    python benchmarks/recommend_seed_stability.py --quick             # 40 steps: a smoke test, not a result

For each seed (``TrainConfig.seed``: the model's initialisation and the data order of the parent and of
every probe branched from it), the same procedure as ``benchmarks/recommend_vs_grid.py`` steps 1-3, through
the project's CLI in this one process: ``midtrain train`` (default recipe, ``tiny`` preset, CPU, rescaled
to ``--steps``, checkpoints at the probe steps), ``midtrain sweep --anneal-at`` and ``--switch-at`` at the
same probe steps, ``midtrain recommend --branches <probes>``. No validation. It prints each seed's
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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.recommend_vs_grid import _cli, _targets  # noqa: E402


def _one_seed(steps: int, seed: int, probe_at: str, out: str) -> dict:
    from diagnostics.recommend import anneal_phase_index
    from diagnostics.runs import RECOMMENDATIONS_FILE
    from midtrain.config import default_config, dumps_toml

    cfg = default_config().scaled_to(steps)
    cfg.model.preset, cfg.device, cfg.seed = "tiny", "cpu", seed
    a = anneal_phase_index(cfg.to_dict())
    starts = cfg.phase_starts()
    lo, hi = starts[a - 1] + cfg.phases[a - 1].warmup_steps, starts[a]
    probe_steps = sorted({min(hi - 1, max(lo + 1, round(hi * float(f)))) for f in probe_at.split(",")})
    cfg.checkpoint_steps = probe_steps
    cfg.validate()
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "parent.toml")
    with open(cfg_path, "w") as f:
        f.write(dumps_toml(cfg))
    parent = os.path.join(out, "parent")
    walls = {"train": _cli(["train", "--config", cfg_path, "--out", parent, "--quiet"])}
    at = ",".join(map(str, probe_steps))
    walls["probes"] = _cli(["sweep", parent, "--anneal-at", at, "--quiet"])
    walls["probes"] += _cli(["sweep", parent, "--switch-at", at, "--quiet"])
    probes = sorted(os.path.join(parent + "-probes", d) for d in os.listdir(parent + "-probes"))
    walls["recommend"] = _cli(["recommend", parent, "--branches", *probes])
    doc = json.load(open(os.path.join(parent, RECOMMENDATIONS_FILE)))
    recs = {r["name"]: r for r in doc.get("recommendations", [])}
    return {"seed": seed, "total": cfg.total_steps(), "probe_steps": probe_steps, "targets": _targets(cfg),
            "recs": {k: recs.get(k) or str(doc.get("not_available", {}).get(k, "missing"))
                     for k in ("lr_decay", "data_switch")},
            "walls": walls}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="total steps of each parent (default 400 = the recipe)")
    ap.add_argument("--quick", action="store_true", help="--steps 40 (a smoke test, not a result)")
    ap.add_argument("--seeds", default="1337,1338", help="config seeds, comma-separated (default 1337 = the "
                                                         "recipe's, and 1338)")
    ap.add_argument("--probe-at", default="0.5,0.75", help="probe steps as fractions of the stable phase")
    ap.add_argument("--max-move", type=float, default=0.10, help="largest allowed move / budget (default 0.10)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--out", help="output folder (default: a new temp dir)")
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
    res = [_one_seed(steps, s, args.probe_at, os.path.join(out, f"seed{s}")) for s in seeds]
    with open(os.path.join(out, "seed_stability.json"), "w") as f:
        json.dump(res, f, indent=1, default=str)
    total = res[0]["total"]
    print(f"\n== recommend seed stability: {steps} steps (budget {total} steps), tiny, cpu, probes at "
          f"{res[0]['probe_steps']} ==")
    print(f"{'seed':>6} {'anneal start':>12} {'range':>11} {'switch step':>11} {'range':>11}")
    for r in res:
        cells = []
        for k in ("lr_decay", "data_switch"):
            v = r["recs"][k]
            cells += ([f"{v['value']:.0f}", f"{v['low']:.0f}-{v['high']:.0f}"] if isinstance(v, dict)
                      else ["n/a", "n/a"])
        print(f"{r['seed']:>6} {cells[0]:>12} {cells[1]:>11} {cells[2]:>11} {cells[3]:>11}")
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
