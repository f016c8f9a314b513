"""Curriculum difficulty: the front door of the difficulty family (docs/difficulty.md).

    _table     the streaming state: ``ExampleTable`` (one row per example: visits, Welford moments,
               learned flag, forgetting events), its ``IdIndex``, ``RingSeries``, EMA state readers
    _analysis  what the table and the curves mean: data maps (Swayamdipta et al. 2020), learnability
               (slope of loss vs log tokens), power-law fits, EL2N / sequence scores, reducible loss,
               per-domain curves from a run's metrics

The least-squares slope test behind learnability is ``diagnostics.stats.ols_slope_test`` (re-exported
here, as before). Import from here, not from the private modules::

    from diagnostics.difficulty import ExampleTable, learnability, fit_power_law
"""

from diagnostics.difficulty._analysis import (REGIONS, Learnability, PowerLawFit, data_map_regions, domain_curves,
                                              fit_power_law, learnability, local_exponent, reducible_loss, roc_auc,
                                              sequence_scores)
from diagnostics.difficulty._table import ExampleTable, IdIndex, RingSeries, UpdateStats, emas_from_state, hash_ids
from diagnostics.stats import ols_slope, ols_slope_test

__all__ = [
    "ExampleTable", "UpdateStats", "IdIndex", "hash_ids", "RingSeries", "emas_from_state",
    "data_map_regions", "REGIONS", "roc_auc",
    "Learnability", "ols_slope", "ols_slope_test", "learnability", "PowerLawFit", "fit_power_law", "local_exponent",
    "sequence_scores", "reducible_loss", "domain_curves",
]
