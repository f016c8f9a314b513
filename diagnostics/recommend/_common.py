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

__all__ = ["Recommendation", "RecommendationError"]


class RecommendationError(ValueError):
    """The run does not hold what a recommendation needs (says what is missing and what to do)."""


@dataclass
class Recommendation:
    name: str                    # what is recommended, e.g. "batch_size"
    value: float                 # the recommended value (unit below)
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
        lines = [f"{self.name}: {_fmt(self.value)} {self.unit}", f"  {self.summary}",
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
