"""diagnostics.stats.pooled_sd against the obvious reference: every value's squared deviation from its own
group's mean, summed, over (values - groups) degrees of freedom."""

import math

import numpy as np
import pytest

from diagnostics.stats import pooled_sd


def test_pooled_sd_is_the_within_group_sd():
    rng = np.random.default_rng(0)
    groups = [list(rng.normal(m, 0.3, n)) for m, n in ((1.0, 2), (5.0, 3), (-2.0, 4))] + [[7.0]]  # a singleton
    ss, df = 0.0, 0
    for g in groups:
        if len(g) < 2:
            continue
        mean = sum(g) / len(g)
        for v in g:
            ss += (v - mean) ** 2
        df += len(g) - 1
    sd, dof = pooled_sd(groups)
    assert dof == df == 6
    assert sd == pytest.approx(math.sqrt(ss / df), rel=1e-12)
    # two replicates at J -+ d: sd d sqrt(2), one degree of freedom per pair
    assert pooled_sd([[1.0 - 0.01, 1.0 + 0.01], [2.0 - 0.01, 2.0 + 0.01]]) == (pytest.approx(0.01 * math.sqrt(2)), 2)
    s, d = pooled_sd([[1.0], [2.0]])
    assert math.isnan(s) and d == 0
