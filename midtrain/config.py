"""Run configuration: dataclasses for a phased mid-training run, TOML in and out.

A run is a list of phases. Each phase has a budget (steps or tokens), a data
mixture, a learning-rate segment, a batch size, a sequence length and a RoPE
base. The default recipe is the canonical mid-training recipe in miniature:

    pretrain      prose-heavy mixture, warmup then constant LR, short context
    midtrain      anneal: LR decays (1-sqrt) to a tenth, mixture upweights code and math
    long_context  longer sequences, raised RoPE base, low LR decaying linearly to a tenth of it

    >>> cfg = default_config()
    >>> cfg.total_steps()
    400
    >>> print(dumps_toml(cfg))   # what `midtrain config --dump` writes

The learning rate is a pure function of the global step (`lr_at`), so the
schedule a run used can be checked against its config record by record.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any

from diagnostics.schedule import DECAY_SHAPES, lr_schedule, phase_num_steps  # one schedule, shared
from midtrain.rope import rope_scaling_spec

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


class ConfigError(ValueError):
    """A config that cannot be run: names the offending key and what is valid."""


@dataclass
class Phase:
    """One phase of a run.

    Budget: exactly one of ``steps`` (optimizer steps) or ``tokens`` (tokens
    seen, converted to steps with ``batch_size * seq_len`` tokens per step).

    LR segment, within the phase's own steps ``t = 0 .. n-1``:
    linear warmup from ``lr / warmup_steps`` to ``lr`` over ``warmup_steps``;
    then ``lr`` held; the last ``decay_fraction`` of the post-warmup steps decay
    to ``final_lr`` with the given shape, reaching ``final_lr`` on the phase's
    last step. ``decay="constant"`` means no decay.
    """

    name: str
    steps: int | None = None
    tokens: int | None = None
    mixture: dict[str, float] = field(default_factory=dict)
    lr: float = 3e-3
    warmup_steps: int = 0
    decay: str = "constant"
    decay_fraction: float = 1.0
    final_lr: float = 0.0
    batch_size: int = 16  # global sequences per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (per rank)
    seq_len: int = 128
    rope_base: float | None = None  # None: keep the model's current base
    # a RoPE scaling method (midtrain.rope; docs/training.md "RoPE scaling"), e.g.
    # { type = "yarn", factor = 2.0, original_max_position = 128 }; None: keep the model's current one
    rope_scaling: dict[str, Any] | None = None
    # a phase that is a piece of a longer LR segment (a data switch inside a decay, `midtrain validate`):
    # the schedule above runs over lr_span steps and this phase is its steps lr_offset .. lr_offset + n - 1
    lr_span: int | None = None
    lr_offset: int = 0

    def num_steps(self) -> int:
        return phase_num_steps(vars(self))

    def lr_at(self, t: int) -> float:
        """LR at step ``t`` (0-based) within this phase (``diagnostics.schedule.lr_schedule``,
        which the LR-decay recommendation evaluates too)."""
        try:
            return float(lr_schedule(t + self.lr_offset, self.lr_span or self.num_steps(), lr=self.lr, final_lr=self.final_lr,
                                     warmup_steps=self.warmup_steps, decay=self.decay,
                                     decay_fraction=self.decay_fraction))
        except ValueError as e:  # an unknown shape (validate() reports it first)
            raise ConfigError(str(e)) from None


@dataclass
class ModelSection:
    """Model: a preset from ``midtrain.model.PRESETS`` plus optional overrides."""

    preset: str = "tiny"
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    rope_base: float | None = None
    tie_weights: bool | None = None
    dropout: float | None = None


@dataclass
class DataSection:
    """Data: ``path=""`` uses the embedded default corpus (prose, code, math)."""

    path: str = ""
    val_fraction: float = 0.05
    eval_batches: int = 4  # validation batches per domain per evaluation
    eval_batch_size: int = 16
    # evaluation at every length (midtrain.evaluate, docs/long_context.md): besides each phase's seq_len,
    # these lengths; at every phase boundary, the final step and every eval_lengths_every steps (0: only those)
    eval_lengths: list[int] = field(default_factory=list)
    eval_lengths_every: int = 0


@dataclass
class OptimSection:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


def _hook(builder: str, enabled: bool = True) -> Any:
    """A ``[monitor.<name>]`` table, built into a hook by ``midtrain.hookset.<builder>`` (named,
    not imported: loading a config imports no hook); ``enabled``: attached by default."""
    return field(default_factory=dict, metadata={"builder": builder, "enabled": enabled})


@dataclass
class MonitorSection:
    """Which measurement hooks the built-in loop attaches, with their options: the one list of
    them (adding a hook is a field here and its builder in ``midtrain.hookset``).

    Each entry is a table of keyword arguments for that hook's constructor plus
    ``enabled``; e.g. ``[monitor.gns] mode = "microbatch"``. An option the hook's
    constructor does not take is a ConfigError listing those it does (``midtrain.hookset``).
    """

    gns: dict[str, Any] = _hook("build_gradient_noise_scale")
    representation: dict[str, Any] = _hook("build_representation_probe")
    difficulty: dict[str, Any] = _hook("build_difficulty_tracker")
    retrieval: dict[str, Any] = _hook("build_retrieval_probe")


@dataclass
class TrainConfig:
    """A whole run. ``phases`` run in order; steps are counted globally."""

    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16
    compile: bool = False
    parallelism: str = "ddp"  # ddp | fsdp: how several processes under torchrun split the model (midtrain.distributed)
    eval_every: int = 100  # also at step 0, at each phase end and at the end
    checkpoint_every: int = 200  # also at each phase end
    checkpoint_steps: list[int] = field(default_factory=list)  # also after these steps (anneal/switch probes)
    log_every: int = 10  # progress-bar / stdout cadence; metrics are written every step
    # divergence guard (midtrain/_guard.py): the run stops as "diverged" when more than
    # max_skipped_steps of its last skip_window steps were skipped for non-finite gradients
    max_skipped_steps: int = 10
    skip_window: int = 100
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    monitor: MonitorSection = field(default_factory=MonitorSection)
    # Weights & Biases mirror of the run store (hooks.sinks.WandbSink): empty = off; keys
    # project, name, mode ("online" | "offline" | "disabled"), entity, tags, group, notes, job_type
    wandb: dict[str, Any] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)

    # -- schedule ---------------------------------------------------------
    def total_steps(self) -> int:
        return sum(p.num_steps() for p in self.phases)

    def phase_at(self, step: int) -> tuple[int, Phase, int]:
        """(phase index, phase, step within phase) for global ``step``."""
        start = 0
        for i, p in enumerate(self.phases):
            n = p.num_steps()
            if step < start + n:
                return i, p, step - start
            start += n
        raise IndexError(f"step {step} is past the last phase (total {start} steps)")

    def phase_starts(self) -> list[int]:
        out, s = [], 0
        for p in self.phases:
            out.append(s)
            s += p.num_steps()
        return out

    def lr_at(self, step: int) -> float:
        _, p, t = self.phase_at(step)
        return p.lr_at(t)

    def checkpoint_due(self, done: int) -> bool:
        """Whether the state after ``done`` updates is checkpointed by cadence or by ``checkpoint_steps``
        (the loop adds each phase end and the last step)."""
        return done % self.checkpoint_every == 0 or done in self.checkpoint_steps

    def scaled_to(self, total_steps: int) -> "TrainConfig":
        """A copy whose phases' budgets are scaled in proportion to ``total_steps``.

        Each phase keeps at least one step; warmups scale with their phase.
        """
        if total_steps < len(self.phases):
            raise ConfigError(
                f"--steps {total_steps} is fewer than the {len(self.phases)} phases of this recipe; "
                "every phase needs at least one step."
            )
        cfg = copy.deepcopy(self)
        old = [p.num_steps() for p in cfg.phases]
        total_old = sum(old)
        # largest-remainder apportionment so the budgets sum exactly to total_steps
        raw = [total_steps * n / total_old for n in old]
        new = [max(1, math.floor(r)) for r in raw]
        order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
        i = 0
        while sum(new) < total_steps:
            new[order[i % len(order)]] += 1
            i += 1
        while sum(new) > total_steps:
            j = max(range(len(new)), key=lambda k: new[k])
            new[j] -= 1
        for p, n_old, n_new in zip(cfg.phases, old, new):
            p.warmup_steps = min(n_new - 1, round(p.warmup_steps * n_new / n_old)) if p.warmup_steps else 0
            p.steps, p.tokens = n_new, None
        return cfg

    # -- (de)serialisation -----------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for p in d["phases"]:  # lr_span / lr_offset, rope_scaling only where set: run.json of ordinary runs stays as before
            if p.get("lr_span") is None and not p.get("lr_offset"):
                p.pop("lr_span", None), p.pop("lr_offset", None)
            if p.get("rope_scaling") is None:
                p.pop("rope_scaling", None)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        d = dict(d)
        _check_keys(d, cls, "the top level")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name in ("model", "data", "optim", "monitor"):
                sub = {"model": ModelSection, "data": DataSection, "optim": OptimSection,
                       "monitor": MonitorSection}[f.name]
                if not isinstance(v, dict):
                    raise ConfigError(f"[{f.name}] must be a table, got {type(v).__name__}.")
                _check_keys(v, sub, f"[{f.name}]")
                kw[f.name] = sub(**v)
            elif f.name == "wandb":
                if not isinstance(v, dict):
                    raise ConfigError(f"[wandb] must be a table, got {type(v).__name__}.")
                kw["wandb"] = dict(v)
            elif f.name == "phases":
                if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                    raise ConfigError("phases must be a list of tables ([[phases]] in TOML).")
                ps = []
                for j, x in enumerate(v):
                    _check_keys(x, Phase, f"[[phases]] #{j + 1}")
                    if "name" not in x:
                        raise ConfigError(f"[[phases]] #{j + 1} has no name; every phase needs one.")
                    ps.append(Phase(**x))
                kw["phases"] = ps
            else:
                kw[f.name] = v
        cfg = cls(**kw)
        return cfg

    def validate(self, domains: list[str] | None = None, max_seq_len: int | None = None) -> "TrainConfig":
        """Raise ConfigError, naming the field, on anything that cannot run. Returns self.

        Types first (every field against its annotation: ``steps = "240"``, ``240.5`` or ``true``
        is refused, not converted; floats must be finite), then ranges, then how fields combine."""
        _check_fields(self, "")
        for sect in ("model", "data", "optim", "monitor"):
            _check_fields(getattr(self, sect), f"[{sect}] ")
        if not isinstance(self.phases, list) or not self.phases:
            raise ConfigError("the config has no phases; a run needs at least one [[phases]] table.")
        for i, p in enumerate(self.phases):
            if not isinstance(p, Phase) or not isinstance(p.name, str) or not p.name.strip():
                raise ConfigError(f"[[phases]] #{i + 1}: name must be a non-empty string, got {getattr(p, 'name', p)!r}.")
            _check_fields(p, f"phase {p.name!r}: ")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ConfigError(f"phase names must be unique, got {names}.")
        for p in self.phases:
            _validate_phase(p, domains, max_seq_len)
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed}.")
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", self.device):
            raise ConfigError(f"device {self.device!r} (device = ... or --device) is not one of auto, cpu, cuda, cuda:N.")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"dtype {self.dtype!r} is not one of auto, float32, bfloat16.")
        if self.parallelism not in ("ddp", "fsdp"):
            raise ConfigError(f"parallelism {self.parallelism!r} is not one of ddp, fsdp.")
        for k in ("eval_every", "checkpoint_every", "log_every", "skip_window"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be a positive number of steps, got {getattr(self, k)}.")
        cs = self.checkpoint_steps
        if not isinstance(cs, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0
                                                   for x in cs) or len(set(cs)) != len(cs):
            raise ConfigError(f"checkpoint_steps must be a list of different positive step numbers, got {cs!r}.")
        if cs and max(cs) > self.total_steps():
            raise ConfigError(f"checkpoint_steps {sorted(x for x in cs if x > self.total_steps())} are past the "
                              f"run's last step {self.total_steps()}.")
        if self.max_skipped_steps < 0:
            raise ConfigError(f"max_skipped_steps must be >= 0, got {self.max_skipped_steps}.")
        self._validate_sections()
        self._validate_eval_lengths(max_seq_len)
        self._validate_wandb()
        return self

    def _validate_eval_lengths(self, max_seq_len: int | None) -> None:
        el, every = self.data.eval_lengths, self.data.eval_lengths_every
        if not isinstance(el, list) or any(isinstance(x, bool) or not isinstance(x, int) or x < 2 for x in el) \
                or len(set(el)) != len(el):
            raise ConfigError(f"[data] eval_lengths must be a list of different integer lengths >= 2, got {el!r}.")
        if max_seq_len is not None and el and max(el) > max_seq_len:
            raise ConfigError(f"[data] eval_lengths {sorted(x for x in el if x > max_seq_len)} are beyond what the "
                              f"model supports (block_size {max_seq_len}). Raise [model] block_size (the RoPE "
                              "tables grow with it; the weights do not) or drop those lengths.")
        if every < 0:
            raise ConfigError(f"[data] eval_lengths_every must be >= 0 steps (0: only at phase boundaries and the "
                              f"end), got {every}.")

    def _validate_sections(self) -> None:
        d, o = self.data, self.optim
        if not 0 <= d.val_fraction < 1:
            raise ConfigError(f"[data] val_fraction must be in [0, 1), got {d.val_fraction}.")
        if not d.path and d.val_fraction != DataSection.val_fraction:
            warnings.warn(f"[data] val_fraction = {d.val_fraction} is ignored: the built-in corpus keeps its fixed "
                          "split by document; val_fraction applies to [data] path.", UserWarning, stacklevel=3)
        for k in ("eval_batches", "eval_batch_size"):
            if getattr(d, k) < 1:
                raise ConfigError(f"[data] {k} must be at least 1, got {getattr(d, k)}.")
        for k in ("beta1", "beta2"):
            if not 0 <= getattr(o, k) < 1:
                raise ConfigError(f"[optim] {k} must be in [0, 1), got {getattr(o, k)}.")
        for k in ("weight_decay", "eps", "grad_clip"):
            if getattr(o, k) < 0:
                raise ConfigError(f"[optim] {k} must be >= 0, got {getattr(o, k)}"
                                  + (" (grad_clip = 0 turns clipping off)." if k == "grad_clip" else "."))
        for name, opts in vars(self.monitor).items():
            if not isinstance(opts.get("enabled", True), bool):
                raise ConfigError(f"[monitor.{name}] enabled must be true or false, got {opts['enabled']!r}.")

    def _validate_wandb(self) -> None:
        bad = sorted(set(self.wandb) - set(WANDB_KEYS))
        if bad:
            raise ConfigError(f"[wandb]: unknown key(s) {bad}; known: {', '.join(WANDB_KEYS)}.")
        mode = self.wandb.get("mode")
        if mode is not None and mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"[wandb] mode must be online, offline or disabled, got {mode!r}.")
        tags = self.wandb.get("tags")
        if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) for t in tags)):
            raise ConfigError(f"[wandb] tags must be a list of strings, got {tags!r}.")

    def with_patch(self, patch: dict[str, Any]) -> "TrainConfig":
        """A copy with a recommendation's patch applied (``diagnostics.recommend``):
        ``{"phases": {phase name: {key: value}}}`` and top-level ``{key: value}``; ``{"phases": [tables]}``
        replaces the whole phase list (a batch-size ramp splits phases)."""
        d = self.to_dict()
        if isinstance(patch.get("phases"), list):
            d["phases"] = [dict(p) for p in patch["phases"]]
            patch = {k: v for k, v in patch.items() if k != "phases"}
        for k, v in patch.items():
            if k != "phases":
                if k not in d:
                    raise ConfigError(f"patch: unknown top-level key {k!r}.")
                d[k] = v
        names = [p["name"] for p in d["phases"]]
        for name, changes in (patch.get("phases") or {}).items():
            if name not in names:
                raise ConfigError(f"patch: no phase {name!r} in this config (phases: {names}).")
            d["phases"][names.index(name)].update(changes)
        total = TrainConfig.from_dict({**d, "checkpoint_steps": []}).total_steps()
        past = sorted(s for s in d.get("checkpoint_steps") or [] if isinstance(s, int) and s > total)
        if past:   # a shorter schedule (a larger batch): kept probe checkpoints past its end mean nothing there
            warnings.warn(f"patch: checkpoint_steps {past} are past the patched schedule's last step {total}; "
                          "dropped.", UserWarning, stacklevel=2)
            d["checkpoint_steps"] = [s for s in d["checkpoint_steps"] if s not in past]
        return TrainConfig.from_dict(d)

    def wandb_enabled(self) -> bool:
        return bool(self.wandb) and bool(self.wandb.get("enabled", True))


def _check_keys(d: dict, cls: type, where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in d if k not in valid]
    if bad:
        raise ConfigError(f"unknown key(s) {bad} in {where}; valid keys are: {', '.join(valid)}.")


def _validate_phase(p: Phase, domains: list[str] | None, max_seq_len: int | None) -> None:
    """ConfigError naming the field for a phase that cannot run (types already checked)."""
    where = f"phase {p.name!r}"
    if p.batch_size <= 0 or p.grad_accum <= 0 or p.batch_size % p.grad_accum:
        raise ConfigError(f"{where}: batch_size ({p.batch_size}) must be a positive multiple of grad_accum ({p.grad_accum}).")
    if p.seq_len <= 0:
        raise ConfigError(f"{where}: seq_len must be positive, got {p.seq_len}.")
    if (p.steps is None) == (p.tokens is None):
        raise ConfigError(f"{where}: give exactly one budget, steps or tokens (got steps={p.steps}, tokens={p.tokens}).")
    if p.num_steps() <= 0:
        raise ConfigError(f"{where} has a zero budget ({p.steps=}, {p.tokens=}); every phase needs at least one optimizer step.")
    if p.decay not in DECAY_SHAPES:
        raise ConfigError(f"{where}: unknown decay {p.decay!r}; valid shapes: {', '.join(DECAY_SHAPES)}.")
    if p.lr <= 0 or p.final_lr < 0:
        raise ConfigError(f"{where}: lr must be > 0 and final_lr >= 0 (got lr={p.lr}, final_lr={p.final_lr}).")
    if p.decay == "exponential" and p.final_lr <= 0:
        raise ConfigError(f"{where}: an exponential decay needs final_lr > 0 (a floor); got {p.final_lr}.")
    if not 0.0 < p.decay_fraction <= 1.0:
        raise ConfigError(f"{where}: decay_fraction must be in (0, 1], got {p.decay_fraction}.")
    if p.warmup_steps < 0 or p.warmup_steps >= p.num_steps() + (1 if p.decay == "constant" else 0):
        raise ConfigError(f"{where}: warmup_steps={p.warmup_steps} must be >= 0 and leave room in the phase's {p.num_steps()} steps.")
    if p.lr_span is not None and not (p.lr_offset >= 0 and p.lr_offset + p.num_steps() <= p.lr_span):
        raise ConfigError(f"{where}: lr_offset {p.lr_offset} + its {p.num_steps()} steps must fit in lr_span {p.lr_span}.")
    if p.lr_span is None and p.lr_offset:
        raise ConfigError(f"{where}: lr_offset needs lr_span (the length of the LR segment it is a piece of).")
    if max_seq_len is not None and p.seq_len > max_seq_len:
        raise ConfigError(
            f"{where}: seq_len {p.seq_len} is beyond what the model supports (block_size {max_seq_len}). "
            "Raise [model] block_size or shorten the phase's sequences."
        )
    if p.rope_base is not None and p.rope_base <= 1:
        raise ConfigError(f"{where}: rope_base must be > 1 (as the model's), got {p.rope_base}.")
    try:
        rope_scaling_spec(p.rope_scaling)
    except ValueError as e:
        raise ConfigError(f"{where}: rope_scaling {e} (docs/training.md, \"RoPE scaling\").") from None
    if not p.mixture:
        raise ConfigError(f"{where} has an empty mixture; give domain weights, e.g. mixture = {{ prose = 1.0 }}.")
    weights = list(p.mixture.values())
    if any(_type_problem(w, float) for w in weights) or min(weights) < 0 or sum(weights) <= 0:
        raise ConfigError(f"{where}: mixture weights must be finite non-negative numbers with a positive sum, got {p.mixture}.")
    if domains is not None:
        bad = sorted(set(p.mixture) - set(domains))
        if bad:
            raise ConfigError(f"{where}: unknown domain(s) {bad} in the mixture; the data has {sorted(domains)}.")


def _type_problem(value: Any, hint: Any) -> str | None:
    """What is wrong with ``value`` for a field annotated ``hint`` (bool, int, float, str, dict,
    optionally ``| None``); None if nothing. Nothing is converted: ``"240"`` is not an integer."""
    args = typing.get_args(hint)
    if type(None) in args:
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    kind = typing.get_origin(hint) or hint
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is bool:
        ok, want = isinstance(value, bool), "true or false"
    elif kind is int:
        ok, want = number and isinstance(value, int), "an integer"
    elif kind is float:
        ok, want = number and (isinstance(value, int) or math.isfinite(value)), "a finite number"
    elif kind is str:
        ok, want = isinstance(value, str), "a string"
    elif kind is dict:
        ok, want = isinstance(value, dict), "a table"
    else:
        return None
    if ok:
        return None
    what = {bool: "a boolean", str: "a string", list: "a list", dict: "a table"}.get(type(value))
    shown = str(value).lower() if isinstance(value, bool) else repr(value)  # as TOML writes a boolean
    return f"must be {want}, got {shown}" + (f" ({what})" if what else "")


def _check_fields(obj: Any, where: str) -> None:
    """ConfigError naming the first field of dataclass ``obj`` whose value does not fit its annotation."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        problem = _type_problem(getattr(obj, f.name), hints[f.name])
        if problem:
            raise ConfigError(f"{where}{f.name} {problem}.")


def default_config() -> TrainConfig:
    """The default recipe: pretrain -> midtrain (anneal + data switch) -> long_context.

    Sized so that ``midtrain train`` with the ``tiny`` preset finishes in a few
    minutes on two CPU cores.
    """
    return TrainConfig(
        phases=[
            Phase(
                name="pretrain", steps=240, lr=3e-3, warmup_steps=20, decay="constant",
                mixture={"prose": 0.6, "code": 0.25, "math": 0.15},
                batch_size=16, grad_accum=2, seq_len=128,
            ),
            Phase(
                name="midtrain", steps=120, lr=3e-3, decay="1-sqrt", final_lr=3e-4,
                mixture={"prose": 0.3, "code": 0.35, "math": 0.35},
                batch_size=16, grad_accum=2, seq_len=128,
            ),
            Phase(
                name="long_context", steps=40, lr=3e-4, decay="linear", final_lr=3e-5,
                mixture={"prose": 0.3, "code": 0.35, "math": 0.35},
                batch_size=8, grad_accum=2, seq_len=256, rope_base=40000.0,
            ),
        ],
    )


# -- TOML -------------------------------------------------------------------

def load_toml(path) -> TrainConfig:
    """Read a config file. Keys missing from the file take their defaults; phases
    given in the file replace the default recipe's phases (a file without ``[[phases]]``
    runs the default recipe's, with a warning; ``phases = []`` is refused by ``validate``)."""
    import os

    if not os.path.exists(path):
        raise ConfigError(f"config file {path!s} does not exist.")
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path!s} is not valid TOML: {e}.") from None
    if "phases" not in d:
        warnings.warn(f"config file {path!s} has no [[phases]]: it runs the default recipe's phases "
                      f"({', '.join(p.name for p in default_config().phases)}).", UserWarning, stacklevel=2)
    return config_from_dict(d)


WANDB_KEYS = ("enabled", "project", "name", "mode", "entity", "tags", "group", "notes", "job_type")


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    base = default_config().to_dict()
    merged = dict(base)
    for k, v in d.items():
        if k in ("model", "data", "optim", "monitor") and isinstance(v, dict):
            merged[k] = {**base[k], **v}
        else:
            merged[k] = v
    return TrainConfig.from_dict(merged)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int,)):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def dumps_toml(cfg: TrainConfig) -> str:
    """TOML text for ``cfg``; ``load_toml`` reads it back to an equal config.
    Unset optional values (None) are left out: absent means "use the default"."""
    d = cfg.to_dict()
    lines = ["# midtrain run config (midtrain config --dump). Steps are optimizer steps;",
             "# batch_size is global sequences per step; lr schedules are per phase.", ""]
    for k, v in d.items():
        if k not in ("model", "data", "optim", "monitor", "phases", "wandb") and v is not None:
            lines.append(f"{k} = {_toml_value(v)}")
    for sect in ("model", "data", "optim"):
        lines += ["", f"[{sect}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d[sect].items() if v is not None]
    if d.get("wandb"):
        lines += ["", "[wandb]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d["wandb"].items() if v is not None]
    for name, opts in d["monitor"].items():  # [monitor.gns], [monitor.representation], ...
        lines += ["", f"[monitor.{name}]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in opts.items() if v is not None]
    for p in d["phases"]:
        lines += ["", "[[phases]]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in p.items() if v is not None]
    return "\n".join(lines) + "\n"
