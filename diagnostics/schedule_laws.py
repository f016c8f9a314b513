"""Deprecated alias of ``diagnostics.schedule`` (kept for one release; docs/architecture.md)."""
from diagnostics._moved import warn_moved
from diagnostics.schedule import *  # noqa: F401,F403
from diagnostics.stats import robust_noise_scale  # noqa: F401

warn_moved(__name__, "diagnostics.schedule")
