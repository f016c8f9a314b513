"""Deprecated alias of ``diagnostics.gns.pegrad`` (kept for one release; docs/architecture.md)."""
from diagnostics._moved import warn_moved
from diagnostics.gns.pegrad import *  # noqa: F401,F403

warn_moved(__name__, "diagnostics.gns.pegrad")
