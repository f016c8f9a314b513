"""Gradient noise scale: the front door of the GNS family (docs/gns.md).

    _two_batch   unbiased two-batch estimators of |G|^2 and tr(Sigma), B_simple, the EMA tracker,
                 offline recomputation from logged raw norms   (McCandlish et al. 2018, App. A)
    _tradeoff    steps / examples needed at batch size B, the critical batch size and its fit
                 from measured (S, E) pairs                     (McCandlish et al. 2018, sec. 2.3)
    pegrad       per-example gradient norm math (Linear, Embedding, norms, tied weights): public as a
                 module, ``from diagnostics.gns import pegrad`` (imported on demand: it needs torch,
                 the rest of the family does not), used by ``hooks.per_example``
    pegram       per-example gradient Gram matrices and their per-domain block sums (public module,
                 needs torch, like pegrad), used by ``hooks.per_example`` for per-domain GNS
    _domains     per-domain unbiased |G_d|^2 and tr(Sigma_d) from those block sums

Import from here, not from the private modules::

    from diagnostics.gns import GNSTracker, recompute_b_simple, fit_steps_examples
"""

from diagnostics.gns._domains import grouped_estimates
from diagnostics.gns._tradeoff import (TradeoffFit, critical_batch_size, examples_needed, fit_steps_examples,
                                       steps_needed)
from diagnostics.gns._two_batch import (METRIC_KEYS, RAW_KEYS, GNSResult, GNSTracker, b_simple_from_estimates,
                                        recompute_b_simple, two_batch_estimates, unbiased_grad_sq,
                                        unbiased_trace_cov)
from diagnostics.stats import BiasCorrectedEMA

__all__ = ["METRIC_KEYS", "RAW_KEYS", "unbiased_grad_sq", "unbiased_trace_cov", "two_batch_estimates",
           "b_simple_from_estimates", "BiasCorrectedEMA", "GNSResult", "GNSTracker", "recompute_b_simple",
           "steps_needed", "examples_needed", "critical_batch_size", "TradeoffFit", "fit_steps_examples",
           "grouped_estimates"]
