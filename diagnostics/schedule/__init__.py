"""LR schedules and the laws that predict loss from them: the front door of the schedule family.

    _lr          the built-in loop's per-phase schedule (warmup, constant, decay of a chosen shape):
                 ``lr_schedule``, ``phase_lrs``, ``phase_num_steps``, ``DECAY_SHAPES``
    _laws        the LR-annealing law of Tissue et al. 2024 (arXiv 2408.11029): the areas S1/S2, the
                 law and its robust fit to one run's loss curve (``fit_annealing_law``)
    _multi_power the multi-power law of Luo et al. 2025 (arXiv 2503.12811): ``multi_power_law`` and its
                 loss-drop sum ``loss_drop``, exact and evaluated only where the LR changes
    _fit         the joint fit both laws share: checked curves, one parameter set for all of them,
                 segment offsets, a Huber-robust trust-region least squares
    _luo2025     the multi-power law fitted by its authors' own procedure (Huber on the log loss, a grid
                 start, early-stopped AdamW): ``fit_schedule_law(..., protocol="luo2025")``
    _select      ``fit_schedule_law(curves, law="annealing" | "multi_power" | "auto")``: the joint fit,
                 the choice between the laws by leave-one-curve-out prediction error, and
                 ``ScheduleLawFit.predict`` / ``predict_interval`` (moving-block residual bootstrap)

The recommendation that uses them is ``diagnostics.recommend.lr_decay_recommendation``; the check on
real curves is ``benchmarks/schedule_laws.py`` (docs/recommendations.md, "Schedule laws").
"""

from diagnostics.schedule._laws import AnnealingLawFit, annealing_law, fit_annealing_law, lr_areas, lr_decreases
from diagnostics.schedule._lr import DECAY_SHAPES, lr_schedule, phase_lrs, phase_num_steps
from diagnostics.schedule._multi_power import MULTI_POWER_PARAMS, loss_drop, multi_power_law
from diagnostics.schedule._select import LAWS, PROTOCOLS, ScheduleLawFit, fit_schedule_law, relative_error

__all__ = ["lr_areas", "lr_decreases", "annealing_law", "AnnealingLawFit", "fit_annealing_law",
           "lr_schedule", "phase_lrs", "phase_num_steps", "DECAY_SHAPES",
           "multi_power_law", "loss_drop", "MULTI_POWER_PARAMS",
           "fit_schedule_law", "ScheduleLawFit", "LAWS", "PROTOCOLS", "relative_error"]
