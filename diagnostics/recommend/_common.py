"""What every recommendation shares: the ``Recommendation`` type, its error, and the helpers that read a
run's phases and round a batch size to one the loop can run.

A ``Recommendation`` says what it recommends (value, unit), with a range, the evidence (which
measured signals over which steps), the assumptions it rests on and what would change it. It renders
as text for a person (``to_text``), as JSON for a program (``to_dict``), and carries a config patch
the built-in loop accepts (``patch``: phases by name -> changed keys; ``midtrain recommend RUN
--write-config new.toml`` applies it), so a recommendation can be run and checked by branching the
run from a checkpoint (``midtrain train --from RUN --step S --config new.toml``; docs/architecture.md,
"Recommendations").
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Recommendation", "RecommendationError", "skipped_steps", "weighted_val_loss", "MAX_SKIPPED_FRACTION", "LR_SCALINGS",
           "lr_factor", "rescale_phase"]

LR_SCALINGS = ("sqrt", "none")

# a fit refuses a span of steps in which more than this fraction of the updates were skipped
MAX_SKIPPED_FRACTION = 0.1


class RecommendationError(ValueError):
    """The run does not hold what a recommendation needs (says what is missing and what to do)."""


@dataclass
class Recommendation:
    name: str                    # what is recommended, e.g. "batch_size"
    value: float | dict          # the recommended value (unit below); a choice: {"name": ..., ...} (``mixture``)
    unit: str
    low: float                   # range of the estimate it rests on (``level`` interval)
    high: float
    level: float
    estimate: float              # the measured quantity behind the value (e.g. B_simple)
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    assumptions: list[str] = field(default_factory=list)
    would_change: list[str] = field(default_factory=list)
    patch: dict[str, Any] = field(default_factory=dict)   # {"phases": {name: {key: value}}}
    check: str = ""              # how to run and check it
    branch_step: int | None = None  # the latest step a branch testing the patch may start from

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("value", "low", "high", "estimate", "level"):
            v = d[k]
            d[k] = None if v is None or (isinstance(v, float) and math.isnan(v)) else (
                "inf" if v == math.inf else v)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        v = self.value
        shown = f"{v.get('name')} {v.get('weights', '')}".strip() if isinstance(v, dict) else _fmt(v)
        lines = [f"{self.name}: {shown} ({self.unit})" if isinstance(v, dict) else f"{self.name}: {shown} {self.unit}",
                 f"  {self.summary}",
                 f"  estimate {_fmt(self.estimate)} ("
                 + ("range" if math.isnan(self.level) else f"{self.level:.0%} range")
                 + f" {_fmt(self.low)} - {_fmt(self.high)})"]
        if self.evidence:
            lines.append("  evidence:")
            lines += [f"    {k}: {_fmt(v) if isinstance(v, float) else v}" for k, v in self.evidence.items()]
        for title, items in (("assumes", self.assumptions), ("would change if", self.would_change)):
            if items:
                lines.append(f"  {title}:")
                lines += [f"    - {s}" for s in items]
        if self.patch:
            lines.append(f"  config patch: {json.dumps(self.patch)}")
        if self.check:
            lines.append(f"  check it: {self.check}")
        return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "unbounded"
        return f"{v:.4g}"
    return str(v)


def _phase_table(run) -> list[tuple[str, int, int, dict]]:
    """[(name, start, end, phase config)] from run.json (empty for runs of other loops)."""
    if not hasattr(run, "metrics"):  # a bare DataFrame (its .info is a method)
        return []
    info, cfg = run.info or {}, run.config or {}
    starts, names = info.get("phase_starts"), info.get("phase_names")
    phases = cfg.get("phases") or []
    if not starts or not names:
        return []
    total = info.get("total_steps") or (starts[-1] + 10**12)
    ends = list(starts[1:]) + [total]
    by_name = {p.get("name"): p for p in phases}
    return [(n, s, e, by_name.get(n, {})) for n, s, e in zip(names, starts, ends)]


def _runnable_batch(b_simple: float, pcfg: dict, current: float, world: int,
                    b_small: float) -> tuple[int, int, int]:
    """(batch, grad_accum, micro-batch per process) nearest to b_simple that keeps the phase's
    micro-batch (memory-bound) when possible: batch = micro x accum x world. Without the phase's
    config (another loop's run) the micro-batch is the measured B_small when it is one (> 1)."""
    if pcfg.get("batch_size"):
        batch, accum = int(pcfg["batch_size"]), int(pcfg.get("grad_accum") or 1)
        micro = max(1, batch // max(1, accum * world))
    else:
        micro, world = max(1, int(round(b_small))) if b_small > 1 else 1, 1
    unit = micro * world
    if b_simple >= unit:
        accum_new = max(1, int(round(b_simple / unit)))
        return unit * accum_new, accum_new, micro
    micro_new = max(1, int(round(b_simple / world)))  # below one micro-batch: shrink it
    return micro_new * world, 1, micro_new


def weighted_val_loss(metrics, weights: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, loss) of the fixed validation set as one objective: the ``val/<domain>/loss`` columns weighted
    by ``weights`` (normalised to sum 1), at the steps where every weighted domain was evaluated; None when a
    domain has no column."""
    tot = float(sum(weights.values())) or 1.0
    w = {d: float(v) / tot for d, v in weights.items() if v}
    cols = [f"val/{d}/loss" for d in w]
    if any(c not in metrics.columns for c in cols):
        return None
    rows = metrics[["step", *cols]].dropna()
    y = sum(w[d] * rows[f"val/{d}/loss"].to_numpy(dtype=np.float64) for d in w)
    return rows["step"].to_numpy(dtype=np.int64), np.asarray(y, dtype=np.float64)


def skipped_steps(df) -> np.ndarray:
    """The steps whose optimizer update was skipped for a non-finite gradient: where the built-in
    loop's running count ``train/skipped_steps`` rose over the previous logged step (a run's first
    record counts from 0 when it is step 0; a branch's carries its parent's count). Empty without it."""
    if "train/skipped_steps" not in df.columns:
        return np.zeros(0, dtype=np.int64)
    rows = df[["step", "train/skipped_steps"]].dropna()
    steps = rows["step"].to_numpy(dtype=np.int64)
    count = rows["train/skipped_steps"].to_numpy(dtype=np.float64)
    if not len(steps):
        return steps
    prev = np.concatenate([[0.0 if steps[0] == 0 else count[0]], count[:-1]])
    return steps[count > prev]


def _check_not_diverged(run, lo: int, hi: int, what: str) -> np.ndarray:
    """The run's skipped steps (``skipped_steps``; the caller drops them), once steps ``lo``..``hi``,
    which ``what`` is fitted on, are known to hold no diverged stretch: RecommendationError when they
    overlap the stretch a ``diverged`` run stopped in (run.json ``diverged``, midtrain's divergence
    guard) or more than MAX_SKIPPED_FRACTION of them were skipped."""
    df = run.metrics if hasattr(run, "metrics") else run
    skipped = skipped_steps(df)
    info = (run.info or {}) if hasattr(run, "metrics") else {}
    div = info.get("diverged") if info.get("status") == "diverged" else None
    advice = ("a fit through it would describe a run that did not train. Fix the cause (usually a learning rate "
              "too high), train again or branch from a checkpoint before the skips, and recommend on that run")
    if isinstance(div, dict) and div.get("first_skipped", hi + 1) <= hi and div.get("step", lo - 1) >= lo:
        raise RecommendationError(
            f"the run diverged at step {div.get('step')} (updates skipped for non-finite gradients from step "
            f"{div.get('first_skipped')}), inside steps {lo}-{hi} that {what} would be fitted on: {advice}")
    inside = skipped[(skipped >= lo) & (skipped <= hi)]
    if len(inside) > MAX_SKIPPED_FRACTION * (hi - lo + 1):
        raise RecommendationError(
            f"{len(inside)} of steps {lo}-{hi}, which {what} would be fitted on, were skipped for non-finite "
            f"gradients (from step {int(inside[0])}; more than {MAX_SKIPPED_FRACTION:.0%}): the run diverged "
            f"there, and {advice}")
    return skipped


def lr_factor(batch: float, phase_batch: float, scaling: str = "sqrt") -> float:
    """The LR multiplier for running at ``batch`` a phase set for ``phase_batch``: sqrt(k), k = batch /
    phase_batch (``"sqrt"``: Adam-type optimisers, Malladi et al. 2022; Merrill et al. 2025 branch at
    k x B with LR x sqrt(k)), or 1 (``"none"``)."""
    if scaling not in LR_SCALINGS:
        raise ValueError(f"--lr-scaling must be one of {', '.join(LR_SCALINGS)}, got {scaling!r}.")
    return math.sqrt(batch / phase_batch) if scaling == "sqrt" else 1.0


def rescale_phase(phase: dict, batch: int, accum: int, *, done: int = 0, lr_scaling: str = "sqrt",
                  lr_multiplier: float = 1.0) -> dict:
    """The changes that run a phase (a ``[[phases]]`` table as a dict) at ``batch`` (``grad_accum``
    ``accum``) from its step ``done`` on, keeping the tokens it spends after ``done``: a step budget
    ``done + ceil(tokens left / (batch x seq_len))`` (warmup stays in steps), ``lr`` and ``final_lr``
    x ``lr_factor`` x ``lr_multiplier``. The batch sweep's branches and the batch recommendations'
    patches are built with it, so a patch equals the branch that tested it."""
    from diagnostics.schedule import phase_num_steps

    n, old, seq = phase_num_steps(phase), int(phase["batch_size"]), int(phase["seq_len"])
    f = lr_factor(batch, old, lr_scaling) * lr_multiplier
    return {"batch_size": int(batch), "grad_accum": int(accum), "tokens": None,
            "steps": done + max(1, math.ceil((n - done) * old * seq / (batch * seq))),
            "lr": float(phase["lr"]) * f, "final_lr": float(phase.get("final_lr") or 0.0) * f}
