"""Batch-size branch sweep: the empirical critical-batch-size probe (docs/architecture.md,
"Recommendations"; the sweep and the fit: docs/recommendations.md, "Critical batch size").

From a run's checkpoint at step S, train one branch per batch size B for the same number of TOKENS
(a smaller batch runs more steps). Each branch is an ordinary run directory ``OUT/bs<B>`` whose
run.json records the parent (the loop does this). ``diagnostics.recommend`` then fits the
steps/examples trade-off (McCandlish et al. 2018, eq. 2.11) to the steps each branch needed to reach
one validation loss -> B_crit, the measurement Merrill et al. 2025 (arXiv 2505.23971) found far above
the gradient noise scale under Adam.

The branch config is the parent's with every phase from the one containing S on that has the same
sequence length given ``batch_size = B`` (grad_accum kept when it divides B, else the largest divisor
of B not above it) and a step budget covering the SAME tokens as in the parent: within the phase
containing S the tokens left after S, later phases their whole budget. LR schedules therefore keep
their shape in tokens (warmup_steps stay in steps). ``eval_every`` is set so each branch is evaluated
about ``evals`` times after S, at S itself where a divisor of S allows it.

RoPE branches (``midtrain sweep RUN --step S --rope NAME=SPEC ...``, ``plan_rope_sweep``): from the same
checkpoint, one branch per RoPE choice (a base, a scaling method, or both; ``parse_rope``) for the same
budget, every phase from the one containing S on set to that choice, nothing else changed; each branch is
``OUT/rope-<NAME>`` and its config records the choice in those phases' ``rope_base`` and ``rope_scaling``
(docs/recommendations.md, "RoPE choices").
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from diagnostics.recommend import LR_SCALINGS, rescale_phase
from diagnostics.recommend import lr_factor as _lr_factor
from midtrain.config import ConfigError, TrainConfig

__all__ = ["BranchPlan", "plan_sweep", "run_sweep", "parse_batch_sizes", "parse_lr_grid", "lr_factor",
           "LR_SCALINGS", "RopeChoice", "RopePlan", "parse_rope", "plan_rope_sweep", "ROPE_METHODS"]


@dataclass
class BranchPlan:
    batch_size: int
    out: str
    config: TrainConfig
    until_step: int | None      # None: run the branch config to its end
    steps: int                  # optimizer steps after the branch point
    tokens: int                 # tokens those steps see
    lr_multiplier: float = 1.0  # the grid multiplier on top of the LR scaling
    seed: int = 0               # added to the parent's seed (a replicate when not 0)


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be comma-separated positive integers, got {text!r}.") from None
    if len(sizes) < 2 or any(b <= 0 for b in sizes) or len(set(sizes)) != len(sizes):
        raise ConfigError(f"--batch-sizes needs at least 2 different positive integers, got {text!r}.")
    return sorted(sizes)


def parse_lr_grid(text: str | None) -> list[float]:
    """``--lr-grid 0.5,1,2``: distinct positive LR multipliers (sorted); None or empty: [1.0]."""
    if text is None:
        return [1.0]
    try:
        grid = [float(s) for s in str(text).split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--lr-grid must be comma-separated positive numbers (LR multipliers), e.g. 0.5,1,2; "
                          f"got {text!r}.") from None
    if not grid or any(not (m > 0 and math.isfinite(m)) for m in grid) or len(set(grid)) != len(grid):
        raise ConfigError(f"--lr-grid needs distinct positive finite LR multipliers, e.g. 0.5,1,2; got {text!r}.")
    return sorted(grid)


def lr_factor(batch: int, parent_batch: int, scaling: str = "sqrt") -> float:
    """The LR multiplier for batch ``batch`` in a phase the parent ran at ``parent_batch``: sqrt(k),
    k = batch / parent_batch (``"sqrt"``, Adam-type optimisers), or 1 (``"none"``)."""
    try:
        return _lr_factor(batch, parent_batch, scaling)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _accum_for(batch: int, accum: int) -> int:
    if batch % accum == 0:
        return accum
    return max(d for d in range(1, min(accum, batch) + 1) if batch % d == 0)


def _branch_config(cfg: TrainConfig, step: int, batch: int, lr_scaling: str = "sqrt",
                   lr_multiplier: float = 1.0) -> TrainConfig:
    starts = cfg.phase_starts()
    pi, phase, t = cfg.phase_at(step)
    d = {**cfg.to_dict(), "checkpoint_steps": []}   # the parent's probe checkpoints: none in a branch
    lr_factor(batch, batch, lr_scaling)   # an unknown scaling is a ConfigError
    for i, p in enumerate(cfg.phases):
        if i < pi or p.seq_len != phase.seq_len:
            continue
        d["phases"][i].update(rescale_phase(d["phases"][i], batch, _accum_for(batch, p.grad_accum),
                                            done=t if i == pi else 0, lr_scaling=lr_scaling,
                                            lr_multiplier=lr_multiplier))
    out = TrainConfig.from_dict(d)
    assert out.phase_starts()[: pi + 1] == starts[: pi + 1]
    return out


def _steps_for_tokens(cfg: TrainConfig, start: int, tokens: int) -> int:
    """Optimizer steps from ``start`` until ``tokens`` tokens are seen (may run past the schedule)."""
    seen, k, total = 0, start, cfg.total_steps()
    while seen < tokens:
        p = cfg.phase_at(min(k, total - 1))[1]
        seen += p.batch_size * p.seq_len
        k += 1
    return k - start


def _eval_every(step: int, n: int, evals: int) -> int:
    want = max(1, n // max(1, evals))
    divisors = [e for e in range(max(1, want // 2), want + 1) if step % e == 0]  # so S itself is evaluated
    return max(divisors) if divisors else want


def plan_sweep(parent: str, step: int, batch_sizes: list[int], *, tokens: int | None = None,
               steps: int | None = None, phase: str | None = None, out_prefix: str | None = None,
               evals: int = 20, lr_scaling: str = "sqrt", lr_grid: list[float] | None = None,
               seeds: list[int] | None = None) -> list[BranchPlan]:
    """Check everything and plan the branches; writes nothing. Raises ConfigError / RunDirError.

    tokens: tokens each branch trains after ``step``; steps: the tokens the PARENT spends in that many
    steps from ``step``; neither: the tokens the parent spends from ``step`` to the end of ``phase``
    (default: the phase containing ``step``).
    lr_scaling: ``"sqrt"`` (default) scales each changed phase's LR by sqrt(B / its batch); ``"none"``
    keeps the parent's. lr_grid: LR multipliers on top (one branch per batch and multiplier).
    seeds: replicates (``--seeds 0,1``): each branch once per K, its config's seed the parent's + K (the data
    order after S changes; the model starts from the checkpoint), into ``<name>-seed<K>``; their spread is
    the seed noise of the equal-token comparison (docs/recommendations.md, "Critical batch size").
    """
    _check_budget(tokens, steps, evals)
    if len(batch_sizes) < 2 or len(set(batch_sizes)) != len(batch_sizes) or min(batch_sizes) <= 0:
        raise ConfigError(f"a sweep needs at least 2 different positive batch sizes, got {batch_sizes}.")
    grid = sorted(lr_grid) if lr_grid else [1.0]
    if any(not (m > 0 and math.isfinite(m)) for m in grid) or len(set(grid)) != len(grid):
        raise ConfigError(f"the LR grid needs distinct positive multipliers, got {lr_grid}.")
    lr_factor(1, 1, lr_scaling)   # an unknown scaling is refused before anything is read
    cfg, tokens = _parent_budget(parent, step, tokens, steps, phase)
    prefix = out_prefix or (str(parent).rstrip("/") + f"-sweep{step}")
    plans = []
    for b in sorted(batch_sizes):
        for m in grid:
            name = f"bs{b}" if len(grid) == 1 else f"bs{b}-lr{m:g}"
            for k in (seeds if seeds is not None else [None]):
                out = os.path.join(prefix, name if k is None else f"{name}-seed{k}")
                plans.append(_plan_branch(cfg, step, b, tokens, evals, out, lr_scaling, m, k or 0))
    return plans


def _check_budget(tokens: int | None, steps: int | None, evals: int) -> None:
    if tokens is not None and steps is not None:
        raise ConfigError("give --tokens or --steps, not both.")
    if (tokens is not None and tokens <= 0) or (steps is not None and steps <= 0) or evals < 2:
        raise ConfigError("--tokens / --steps must be positive and evals at least 2.")


def _parent_budget(parent: str, step: int, tokens: int | None, steps: int | None,
                   phase: str | None) -> tuple[TrainConfig, int]:
    """The parent's checked config and the tokens each branch trains after ``step`` (``plan_sweep``)."""
    from diagnostics.runs import load_run

    run = load_run(parent)
    ckpts = [s for s, _ in run.checkpoints()]
    if step not in ckpts:
        raise ConfigError(f"run {parent} has no checkpoint at step {step}; it has checkpoints at steps {ckpts}.")
    cfg = TrainConfig.from_dict(run.config)
    cfg.validate()
    if step >= cfg.total_steps():
        raise ConfigError(f"step {step} is the end of run {parent}; branch from an earlier checkpoint.")
    pi, cur, t = cfg.phase_at(step)
    names = [p.name for p in cfg.phases]
    if phase is not None and (phase not in names or names.index(phase) < pi):
        raise ConfigError(f"--phase {phase!r} must be the phase containing step {step} ({cur.name!r}) or a later "
                          f"one of {names}.")
    if tokens is None and steps is not None:
        tokens = cur.batch_size * cur.seq_len * steps
    elif tokens is None:
        last = names.index(phase) if phase is not None else pi
        tokens = sum(p.batch_size * p.seq_len * (p.num_steps() - (t if i == pi else 0))
                     for i, p in enumerate(cfg.phases) if pi <= i <= last)
    return cfg, tokens


def _new_dir(out: str) -> str:
    from diagnostics.runs import RUN_JSON, RunDirError

    if os.path.exists(os.path.join(out, RUN_JSON)) or (os.path.isdir(out) and os.listdir(out)):
        raise RunDirError(f"{out} already exists; a sweep writes new run directories only. Choose another "
                          "--out-prefix. Nothing was written.")
    return out


def _plan_branch(cfg: TrainConfig, step: int, b: int, tokens: int, evals: int, out: str, lr_scaling: str,
                 m: float, seed: int = 0) -> BranchPlan:
    """One branch at batch ``b``, LR multiplier ``m`` and the parent's seed + ``seed``: checked and planned,
    nothing written."""
    _new_dir(out)
    bcfg = _branch_config(cfg, step, b, lr_scaling, m)
    if seed:
        bcfg = TrainConfig.from_dict({**bcfg.to_dict(), "seed": bcfg.seed + seed})
    bcfg, n, until, seen = _fit_budget(bcfg, step, tokens, evals, f"at batch {b} the branch")
    return BranchPlan(batch_size=b, out=out, config=bcfg, until_step=until, steps=n, tokens=seen,
                      lr_multiplier=m, seed=seed)


def _fit_budget(bcfg: TrainConfig, step: int, tokens: int, evals: int,
                what: str) -> tuple[TrainConfig, int, int | None, int]:
    """``bcfg`` set to train ``tokens`` tokens after ``step`` with about ``evals`` evaluations and no
    checkpoint before its end: (config, steps, until_step or None, tokens those steps see)."""
    n = _steps_for_tokens(bcfg, step, tokens)
    total = bcfg.total_steps()
    if step + n > total:
        raise ConfigError(
            f"{what} needs {n} steps after step {step} for {tokens} tokens, but the "
            f"schedule ends at step {total}; ask for fewer --tokens / --steps. Nothing was written.")
    e = _eval_every(step, n, evals)
    n = min(-(-n // e) * e if step % e == 0 else n, total - step)   # end on an eval step
    bcfg.eval_every = e
    bcfg.checkpoint_every = max(bcfg.checkpoint_every, n + 1)       # no checkpoints mid-branch
    # the loop also evaluates the final state of a run stopped by until_step (at step step + n)
    until = None if step + n >= total else step + n
    bcfg.validate()
    seen = sum(bcfg.phase_at(k)[1].batch_size * bcfg.phase_at(k)[1].seq_len for k in range(step, step + n))
    return bcfg, n, until, seen


def run_sweep(parent: str, step: int, plans: list[BranchPlan], *, progress: bool = False, corpus=None,
              hooks=None) -> list:
    """Train the planned branches one after the other; returns the loop's TrainResults."""
    from midtrain.loop import train

    return [train(p.config, p.out, parent=parent, parent_step=step, until_step=p.until_step,
                  progress=progress, corpus=corpus, hooks=hooks) for p in plans]


# -- RoPE branches: `midtrain sweep RUN --step S --rope NAME=SPEC ...` ----------------------------------

ROPE_METHODS = ("base", "none", "pi", "linear", "ntk", "yarn")


@dataclass
class RopeChoice:
    """One ``NAME=SPEC`` of ``--rope``: the base (None: the parent's at the branch step) and the scaling
    table (``{"type": "none"}`` for plain RoPE) every phase from the branch step on gets."""
    name: str
    spec: str
    base: float | None
    scaling: dict


@dataclass
class RopePlan:
    name: str
    spec: str                   # the SPEC as given
    base: float                 # rope_base of every phase from the branch step on
    scaling: dict               # their rope_scaling
    out: str
    config: TrainConfig
    until_step: int | None      # None: run the branch config to its end
    steps: int                  # optimizer steps after the branch point
    tokens: int                 # tokens those steps see


def _rope_term(term: str, item: str) -> tuple[str, dict | float]:
    """One ``METHOD:VALUE[:L]`` term of a SPEC -> ("base", B) or ("scaling", table)."""
    method, _, rest = term.partition(":")
    method, args = method.strip().lower(), [a.strip() for a in rest.split(":")] if rest else []
    if method not in ROPE_METHODS:
        raise ConfigError(f"--rope {item!r}: unknown method {method!r}; SPEC is base:B, none, pi:S, ntk:S, yarn:S or "
                          "yarn:S:L, or base:B+METHOD (docs/recommendations.md, \"RoPE choices\"). Nothing was written.")
    want = {"base": (1, 1), "none": (0, 0), "yarn": (1, 2)}.get(method, (1, 1))
    try:
        if not want[0] <= len(args) <= want[1]:
            raise ValueError
        if method == "base":
            base = float(args[0])
            if not (base > 1 and math.isfinite(base)):
                raise ValueError
            return "base", base
        table: dict = {"type": method}
        if args:
            table["factor"] = float(args[0])
        if len(args) == 2:
            table["original_max_position"] = int(args[1])
        from midtrain.rope import rope_scaling_spec

        if method != "yarn" or len(args) == 2:
            rope_scaling_spec(table)   # yarn without L is checked once L is known
        elif not (table["factor"] >= 1 and math.isfinite(table["factor"])):
            raise ValueError
        return "scaling", table
    except ValueError:
        raise ConfigError(f"--rope {item!r}: {method} takes " + {
            "base": "a base > 1, e.g. base:1e4", "none": "nothing", "yarn": "a factor >= 1 and optionally the "
            "original context length, e.g. yarn:2 or yarn:2:128"}.get(method, "a factor >= 1, e.g. " + method + ":2")
            + ". Nothing was written.") from None


def parse_rope(items: list[str]) -> list[RopeChoice]:
    """``--rope NAME=SPEC ...``: SPEC is ``base:B`` (plain RoPE at base B: ABF), ``none`` (plain RoPE at the
    parent's base), ``pi:S`` / ``linear:S``, ``ntk:S``, ``yarn:S`` or ``yarn:S:L`` (a scaling method with
    factor S on the parent's base; L, yarn's original context, defaults to the longest sequence the parent
    trained at before the branch step), or ``base:B+METHOD`` (a method on base B)."""
    out: list[RopeChoice] = []
    for item in items or []:
        name, sep, spec = str(item).partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum() \
                or name in [c.name for c in out]:
            raise ConfigError(f"--rope takes NAME=SPEC with a distinct alphanumeric NAME (e.g. yarn2=yarn:2), got "
                              f"{item!r}. Nothing was written.")
        base, scaling = None, None
        for term in spec.split("+"):
            kind, value = _rope_term(term, item)
            if (kind == "base" and base is not None) or (kind == "scaling" and scaling is not None):
                raise ConfigError(f"--rope {item!r}: one base and one method at most. Nothing was written.")
            base, scaling = (value, scaling) if kind == "base" else (base, value)
        out.append(RopeChoice(name, spec.strip(), base, scaling or {"type": "none"}))
    if not out:
        raise ConfigError("--rope needs at least one NAME=SPEC, e.g. --rope base1e3=base:1000 yarn2=yarn:2.")
    return out


def plan_rope_sweep(parent: str, step: int, choices: list[RopeChoice], *, tokens: int | None = None,
                    steps: int | None = None, phase: str | None = None, out_prefix: str | None = None,
                    evals: int = 20) -> list[RopePlan]:
    """One branch per choice from checkpoint ``step`` of ``parent``, each for the same budget (``tokens``,
    ``steps``, ``phase`` as in ``plan_sweep``), into ``OUT_PREFIX/rope-<NAME>`` (default prefix
    ``RUN-sweep<step>``): every phase from the one containing ``step`` on gets the choice's ``rope_base``
    and ``rope_scaling``; nothing else changes. Checks everything and writes nothing (ConfigError /
    RunDirError)."""
    from midtrain.checkpoint import checkpoint_path, load_checkpoint, model_config
    from midtrain.rope import rope_frequencies, rope_scaling_spec

    _check_budget(tokens, steps, evals)
    cfg, tokens = _parent_budget(parent, step, tokens, steps, phase)
    ckpt = load_checkpoint(checkpoint_path(parent, step))
    head_dim = model_config(cfg, 256).head_dim   # the vocabulary does not change it
    starts, pi = cfg.phase_starts(), cfg.phase_at(step)[0]
    trained = max([p.seq_len for p, s in zip(cfg.phases, starts) if s < step] or [cfg.phases[0].seq_len])
    prefix = out_prefix or (str(parent).rstrip("/") + f"-sweep{step}")
    plans, seen = [], {}
    for c in choices:
        base = float(c.base if c.base is not None else ckpt["rope_base"])
        table = dict(c.scaling)
        if table["type"] == "yarn":
            table.setdefault("original_max_position", trained)
        try:
            rope_frequencies(head_dim, base, table)
        except ValueError as e:
            raise ConfigError(f"--rope {c.name}={c.spec}: {e}. Nothing was written.") from None
        key = (base, repr(rope_scaling_spec(table)))
        if key in seen:
            raise ConfigError(f"--rope {c.name} and {seen[key]} are the same choice; drop one. Nothing was written.")
        seen[key] = c.name
        out = _new_dir(os.path.join(prefix, f"rope-{c.name}"))
        d = {**cfg.to_dict(), "checkpoint_steps": []}   # the parent's probe checkpoints: none in a branch
        for q in d["phases"][pi:]:
            q["rope_base"], q["rope_scaling"] = base, dict(table)
        bcfg, n, until, used = _fit_budget(TrainConfig.from_dict(d), step, tokens, evals, f"branch {c.name}")
        plans.append(RopePlan(c.name, c.spec, base, table, out, bcfg, until, n, used))
    return plans
