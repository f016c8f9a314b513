"""Deprecated alias of ``diagnostics.representation`` (kept for one release; docs/architecture.md)."""
from diagnostics._moved import warn_moved
from diagnostics.representation import *  # noqa: F401,F403

warn_moved(__name__, "diagnostics.representation")
