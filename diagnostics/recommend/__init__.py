"""Recommendations from a run's measurements: the front door of the recommend family
(docs/recommendations.md; how to add one: docs/architecture.md).

    _common          ``Recommendation`` (value, range, evidence, assumptions, what would change it, a
                     config patch, how to check it) and ``RecommendationError``; phase-table and
                     runnable-batch helpers the recommenders share; ``skipped_steps`` (the updates
                     skipped for non-finite gradients) and the refusal to fit through a diverged stretch
    _batch_size      ``batch_size_recommendation``: the batch size the gradient noise scale points to
    _lr_decay        ``lr_decay_recommendation``: when to start the LR decay, from the annealing law
    _critical_batch  ``critical_batch_recommendation``: B_crit from branches at several batch sizes
    _equal_tokens    ``equal_tokens_recommendation``: the largest batch of a sweep within noise of the best
                     at equal tokens (Merrill et al.'s critical batch)
    _batch_choice    ``combined_batch_recommendation``: one batch answer from the noise scale and the
                     branches, saying which it follows and why
    _batch_schedule  ``batch_schedule_recommendation``: a batch-size ramp from the noise scale's growth
                     against tokens, as a phase list split at the switch points
    _probes          what the anneal and switch recommendations share: a config's per-step schedule,
                     ``branch_kind`` (batch, anneal, switch, rope) and ``ProbeInputError`` (bad input)
    _anneal          ``anneal_recommendation`` (the ``lr_decay`` entry of ``midtrain recommend``): the anneal
                     start, length and shape for a token budget, a schedule law fitted jointly on the run
                     and its anneal probes (``anneal_fit``: that fit alone)
    _data_switch     ``data_switch_recommendation``: the data-switch step from switch probes and their
                     replicates (``switch_table``: the candidates, shared with ``_mixture``); without them the
                     run's own signals place the candidates (``switch_candidates``)
    _mixture         ``mixture_recommendation``: the switched-to phase's mixture from mixture probes; without
                     them the run's per-domain learnability proposes candidates (``candidate_mixtures``)
    _run             ``recommend_run``: every recommendation ``midtrain recommend`` makes for a run and its
                     branches (``sort_branches``), and why each one it cannot make is not available

One module per recommendation; each imports only ``_common`` and the families it builds on
(``diagnostics.gns``, ``diagnostics.schedule``, ``diagnostics.stats``), never another front door of
its own family, so there is no import cycle::

    from diagnostics import load_run
    from diagnostics.recommend import batch_size_recommendation, lr_decay_recommendation
    print(batch_size_recommendation(load_run("runs/a")).to_text())
"""

from diagnostics.recommend._anneal import anneal_curves, anneal_fit, anneal_recommendation
from diagnostics.recommend._batch_choice import combined_batch_recommendation
from diagnostics.recommend._batch_schedule import batch_schedule_recommendation, ramp_points
from diagnostics.recommend._batch_size import batch_size_recommendation
from diagnostics.recommend._common import (LR_SCALINGS, MAX_SKIPPED_FRACTION, Recommendation, RecommendationError,
                                           lr_factor, rescale_phase, skipped_steps, weighted_val_loss)
from diagnostics.recommend._data_switch import SwitchTable, data_switch_recommendation, switch_candidates, switch_table
from diagnostics.recommend._critical_batch import branch_curve, critical_batch_recommendation, steps_to_target
from diagnostics.recommend._equal_tokens import (equal_tokens_recommendation, equal_tokens_table,
                                                 token_efficient_batch)
from diagnostics.recommend._long_context import long_context_recommendation, rope_base_bound, rope_bound_holds
from diagnostics.recommend._lr_decay import candidate_decays, lr_decay_recommendation
from diagnostics.recommend._mixture import candidate_mixtures, mixture_recommendation
from diagnostics.recommend._probes import (ProbeInputError, anneal_phase_index, branch_kind, mixture_key,
                                         replicate_seed, schedule_of, switch_phase_index)
from diagnostics.recommend._run import recommend_run, sort_branches
from diagnostics.stats import block_bootstrap_ratio, moving_block_indices

__all__ = ["Recommendation", "RecommendationError", "skipped_steps", "weighted_val_loss", "MAX_SKIPPED_FRACTION", "LR_SCALINGS", "lr_factor",
           "rescale_phase", "batch_size_recommendation", "lr_decay_recommendation",
           "candidate_decays", "critical_batch_recommendation", "combined_batch_recommendation",
           "batch_schedule_recommendation", "ramp_points", "steps_to_target", "branch_curve",
           "block_bootstrap_ratio", "moving_block_indices", "anneal_recommendation", "anneal_curves", "anneal_fit",
           "ProbeInputError", "branch_kind", "anneal_phase_index", "schedule_of", "switch_phase_index",
           "data_switch_recommendation", "switch_candidates", "recommend_run", "sort_branches",
           "long_context_recommendation", "rope_base_bound", "rope_bound_holds",
           "switch_table", "SwitchTable", "equal_tokens_recommendation", "equal_tokens_table",
           "token_efficient_batch", "mixture_recommendation", "candidate_mixtures", "replicate_seed", "mixture_key"]
