"""LR schedules and the laws that predict loss from them: the front door of the schedule family.

    _lr     the built-in loop's per-phase schedule (warmup, constant, decay of a chosen shape):
            ``lr_schedule``, ``phase_lrs``, ``phase_num_steps``, ``DECAY_SHAPES``
    _laws   the LR-annealing law of Tissue et al. 2024 (arXiv 2408.11029): the areas S1/S2, the law
            and its robust fit to a run's loss curve (``fit_annealing_law``)

The recommendation that uses them is ``diagnostics.recommend.lr_decay_recommendation``.
"""

from diagnostics.schedule._laws import AnnealingLawFit, annealing_law, fit_annealing_law, lr_areas, lr_decreases
from diagnostics.schedule._lr import DECAY_SHAPES, lr_schedule, phase_lrs, phase_num_steps

__all__ = ["lr_areas", "lr_decreases", "annealing_law", "AnnealingLawFit", "fit_annealing_law",
           "lr_schedule", "phase_lrs", "phase_num_steps", "DECAY_SHAPES"]
