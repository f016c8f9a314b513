"""Every recommendation of one run, as ``midtrain recommend`` makes them: ``recommend_run``.

The one place that decides which recommenders run for a run and its branches, and how a batch answer
from the noise scale and one from batch-size branches become one (``combined_batch_recommendation``).
``midtrain recommend`` (midtrain/cli.py) prints and saves what it returns; ``midtrain report``
(diagnostics.report) shows it.

    >>> from diagnostics import load_run                                   # doctest: +SKIP
    >>> from diagnostics.recommend import recommend_run
    >>> recs, not_available = recommend_run(load_run("runs/a"))
"""

from __future__ import annotations

from diagnostics.recommend._anneal import anneal_recommendation
from diagnostics.recommend._batch_choice import combined_batch_recommendation
from diagnostics.recommend._batch_schedule import batch_schedule_recommendation
from diagnostics.recommend._batch_size import batch_size_recommendation
from diagnostics.recommend._common import Recommendation, RecommendationError
from diagnostics.recommend._critical_batch import critical_batch_recommendation
from diagnostics.recommend._data_switch import data_switch_recommendation
from diagnostics.recommend._equal_tokens import equal_tokens_recommendation
from diagnostics.recommend._long_context import long_context_recommendation
from diagnostics.recommend._lr_decay import lr_decay_recommendation
from diagnostics.recommend._mixture import mixture_recommendation
from diagnostics.recommend._probes import ProbeInputError, branch_kind, replicate_seed

__all__ = ["recommend_run", "sort_branches"]


def sort_branches(run, branches) -> dict[str, list]:
    """The branches (Runs) by what they change against ``run`` (``branch_kind``): ``{"batch": [...],
    "anneal": [...], "switch": [...], "rope": [...], "same": [...]}``. ProbeInputError for a branch of
    another run or of an incompatible config."""
    kinds: dict[str, list] = {"batch": [], "anneal": [], "switch": [], "rope": [], "same": []}
    for b in branches:
        kinds.setdefault(branch_kind(run, b), []).append(b)
    return kinds


def recommend_run(run, branches=(), *, phase: str | None = None, window: int | None = None, level: float = 0.9,
                  decay_phase: str | None = None, shapes=None, budget_tokens: int | None = None,
                  target: float | None = None, domain: str | None = None, target_domains=None,
                  tolerance: float = 0.01, anneal_target: str = "auto") -> tuple[list[Recommendation], dict[str, str]]:
    """``(recommendations, not_available)`` for ``run`` and its ``branches`` (Runs of ``midtrain sweep``).

    Made: ``batch_size`` (the noise scale's; with batch-size branches, the one answer from both),
    ``lr_decay`` (``decay_phase`` given: where to start that phase's decay, ``lr_decay_recommendation``;
    else the anneal start for a budget from the run and its anneal probes, ``anneal_recommendation``),
    ``batch_schedule``, ``data_switch`` (the step, from switch probes), ``mixture`` (the switched-to phase's
    mixture, from mixture probes), ``long_context`` (the long phase's length and the RoPE base bound, from
    the loss by position) and, with batch-size branches, ``critical_batch_size`` (McCandlish B_crit) and
    ``equal_tokens_batch`` (the largest batch within noise of the best at equal tokens). Branches that
    repeat the run's schedule with another seed (kind ``same``) are replicates of the run: the switch and
    anneal recommendations count them with the run. One that cannot be made is in ``not_available`` with the reason (a
    RecommendationError's message); bad input (a foreign branch, a budget that does not fit) raises
    ProbeInputError. The keyword arguments are ``midtrain recommend``'s options of the same names."""
    kinds = sort_branches(run, branches)
    reps = [b for b in kinds["same"] if replicate_seed(run, b) != 0]   # the run again, another seed
    switch = kinds["switch"] + reps
    makers = {
        "batch_size": lambda: batch_size_recommendation(run, phase=phase, window=window, level=level),
        "lr_decay": (lambda: lr_decay_recommendation(run, phase=decay_phase, shapes=shapes, level=level))
        if decay_phase else (lambda: anneal_recommendation(run, kinds["anneal"] + reps, budget_tokens=budget_tokens,
                                                             shapes=shapes, level=level, target=anneal_target)),
        "batch_schedule": lambda: batch_schedule_recommendation(run),
        "data_switch": lambda: data_switch_recommendation(run, switch, target_domains=target_domains,
                                                          tolerance=tolerance, level=level),
        "mixture": lambda: mixture_recommendation(run, switch, target_domains=target_domains, tolerance=tolerance,
                                                  level=level),
        "long_context": lambda: long_context_recommendation(run, level=level),
    }
    if kinds["batch"]:
        # a sweep's branch at the run's own batch changes nothing but (maybe) the seed: kind "same"; from the
        # sweep's branch step it is the sweep's point at the run's batch (and a replicate of it with a seed)
        at = {int((b.parent or {}).get("step", -1)) for b in kinds["batch"]}
        batch = kinds["batch"] + [b for b in kinds["same"] if int((b.parent or {}).get("step", -1)) in at]
        makers["critical_batch_size"] = lambda: critical_batch_recommendation(run, batch, target=target,
                                                                              domain=domain)
        makers["equal_tokens_batch"] = lambda: equal_tokens_recommendation(run, batch, domain=domain, level=level)
    recs: list[Recommendation] = []
    unavailable: dict[str, str] = {}
    for name, make in makers.items():  # one that cannot be made is reported; the others are still made
        try:
            recs.append(make())
        except ProbeInputError:
            raise
        except RecommendationError as e:
            unavailable[name] = str(e)
    if kinds["batch"]:  # one batch answer from the noise scale and the branches (docs/recommendations.md)
        by = {r.name: r for r in recs}
        try:
            one = combined_batch_recommendation(run, *(by.get(n) or unavailable[n] for n in
                                                       ("batch_size", "critical_batch_size", "equal_tokens_batch")))
            recs = [r for r in recs if r.name != "batch_size"]
            recs.insert(0, one)
            unavailable.pop("batch_size", None)
        except RecommendationError as e:
            unavailable["batch_size"] = str(e)
    return recs, unavailable
