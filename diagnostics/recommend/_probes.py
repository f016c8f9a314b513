"""What the anneal-start and data-switch recommendations share about a run and its probe branches:
the per-step schedule a built-in-loop config implies (LR, tokens, mixture), which kind of branch a
run is (``branch_kind``: batch, anneal, switch, rope), and the refusals for branches of another parent or
of an incompatible config (docs/recommendations.md, "Anneal start" and "Data switch").

A branch's kind is read from its config against its parent's, step by step after the branch step:
another batch size in a phase of the same name -> ``batch`` (``midtrain sweep --batch-sizes``); else
another LR -> ``anneal`` (``--anneal-at``); else another mixture -> ``switch`` (``--switch-at``,
``--mixtures``); else another ``rope_base`` or ``rope_scaling`` in a phase of the same name -> ``rope``
(``--rope``); else ``same``. A branch may have another ``seed`` than its parent: a replicate
(``midtrain sweep --seeds``: the data order after the branch step changes, the model state does not), whose
spread is the seed noise of the recommendations' ranges; ``replicate_seed`` gives the difference.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from diagnostics.recommend._common import RecommendationError
from diagnostics.schedule import phase_lrs, phase_num_steps

__all__ = ["Schedule", "schedule_of", "branch_kind", "anneal_phase_index", "switch_phase_index", "mixture_key",
           "ProbeInputError", "replicate_seed"]

class ProbeInputError(RecommendationError):
    """Bad input rather than a run that lacks something: a branch of another run or of an incompatible
    config, a budget that does not fit (``midtrain recommend`` exits 2 on it instead of "not available")."""


# the parts of a config a branch must share with its parent (the phases may differ after the branch step; the
# seed may differ: a replicate)
_SHARED = ("model", "data", "optim")


def replicate_seed(parent, branch) -> int:
    """The branch's seed minus its parent's (0: the parent's own seed; ``midtrain sweep --seeds K`` adds K)."""
    return int((branch.config or {}).get("seed") or 0) - int((parent.config or {}).get("seed") or 0)


def mixture_key(phase: dict) -> tuple:
    """A phase's data as a hashable key: the normalised mixture and the sequence length."""
    mix = phase.get("mixture") or {}
    tot = float(sum(mix.values())) or 1.0
    return tuple(sorted((k, round(float(v) / tot, 9)) for k, v in mix.items())), int(phase.get("seq_len") or 0)


@dataclass
class Schedule:
    """The per-step schedule of a config (lists of phase dicts as in run.json)."""

    phases: list[dict]
    starts: np.ndarray          # first step of each phase
    lrs: np.ndarray             # LR of every update 0..N-1
    tokens: np.ndarray          # tokens of every update
    phase_of: np.ndarray        # phase index of every update

    @property
    def n(self) -> int:
        return len(self.lrs)

    def tokens_before(self, step: int) -> int:
        """Tokens seen by the state after ``step`` updates."""
        return int(self.tokens[:step].sum())

    def key_at(self, step: int) -> tuple:
        return mixture_key(self.phases[int(self.phase_of[step])])


def schedule_of(config: dict) -> Schedule:
    phases = list(config.get("phases") or [])
    if not phases:
        raise RecommendationError("the run has no phases in its config: not a run of the built-in loop")
    sizes = [phase_num_steps(p) for p in phases]
    lrs = np.concatenate([phase_lrs(p, n) for p, n in zip(phases, sizes)])
    tokens = np.concatenate([np.full(n, int(p["batch_size"]) * int(p["seq_len"]), dtype=np.int64)
                             for p, n in zip(phases, sizes)])
    phase_of = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])
    return Schedule(phases, np.cumsum([0] + sizes[:-1]), lrs, tokens, phase_of)


def anneal_phase_index(config: dict) -> int:
    """The phase the anneal probes run: the first phase after the first one whose LR decays
    (``decay != "constant"``), every phase before it holding a constant LR after warmup."""
    phases = list(config.get("phases") or [])
    for i, p in enumerate(phases):
        if p.get("decay", "constant") != "constant":
            if i == 0:
                raise RecommendationError(f"the first phase {p.get('name')!r} already decays: there is no stable "
                                          "(constant-LR) stretch before an anneal to place its start in")
            return i
    raise RecommendationError(f"no phase of this run decays (phases {[p.get('name') for p in phases]}): there "
                              "is no anneal to place")


def switch_phase_index(config: dict) -> int:
    """The phase the data switches to: the first phase whose (normalised) mixture differs from the one
    before it."""
    phases = list(config.get("phases") or [])
    for i in range(1, len(phases)):
        if mixture_key(phases[i])[0] != mixture_key(phases[i - 1])[0]:
            return i
    raise RecommendationError(f"the mixture never changes in this run (phases {[p.get('name') for p in phases]}): "
                              "there is no data switch to place")


def _same_run(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(str(a)) == os.path.abspath(str(b))


def branch_kind(parent, branch) -> str:
    """"batch", "anneal", "switch", "rope" or "same": what ``branch`` (a Run) changes against ``parent`` after
    its branch step. RecommendationError for a branch of another run, or one whose model, data,
    optimizer or schedule before the branch step differs from the parent's (another seed is a replicate)."""
    info = branch.parent or {}
    if not info or not _same_run(info.get("run", ""), parent.path):
        raise ProbeInputError(f"{branch.path} is not a branch of {parent.path} (its parent: "
                                  f"{info.get('run') if info else 'none'}); pass branches of this run only")
    bad = [k for k in _SHARED if branch.config.get(k) != parent.config.get(k)]
    if bad:
        raise ProbeInputError(f"{branch.path} has another {', '.join(bad)} than its parent {parent.path}: "
                                  "an incompatible config; its losses cannot be compared with the parent's")
    s = int(info.get("step"))
    ps, bs = schedule_of(parent.config), schedule_of(branch.config)
    pb = {p.get("name"): p.get("batch_size") for p in ps.phases}
    if any(p.get("name") in pb and p.get("batch_size") != pb[p.get("name")] for p in bs.phases):
        return "batch"   # a batch-size sweep re-plans whole phases in tokens (midtrain.sweep); checked there
    if s > min(ps.n, bs.n) or not (np.allclose(ps.lrs[:s], bs.lrs[:s], rtol=1e-9, atol=0)
                                   and np.array_equal(ps.tokens[:s], bs.tokens[:s])
                                   and all(ps.key_at(k) == bs.key_at(k) for k in {*ps.starts[ps.starts < s], s - 1}
                                           if 0 <= k < s)):
        raise ProbeInputError(f"{branch.path}'s schedule before its branch step {s} differs from its parent's: "
                              "an incompatible config (it did not branch from this run's state)")
    m = min(ps.n, bs.n)
    if not np.allclose(ps.lrs[s:m], bs.lrs[s:m], rtol=1e-9, atol=0):
        return "anneal"
    if any(ps.key_at(k) != bs.key_at(k) for k in range(s, m)):
        return "switch"
    pr = {p.get("name"): (p.get("rope_base"), p.get("rope_scaling")) for p in ps.phases}
    if any(p.get("name") in pr and (p.get("rope_base"), p.get("rope_scaling")) != pr[p.get("name")] for p in bs.phases):
        return "rope"    # RoPE branches set rope_base / rope_scaling from the branch step on (midtrain.sweep)
    return "same"
