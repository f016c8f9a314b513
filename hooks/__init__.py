"""MEASURE: hooks that attach to any PyTorch training loop (see hooks.monitor)."""

from hooks.monitor import Hook, Monitor, NullSink, RunStoreSink, StdoutSink

__all__ = ["Hook", "Monitor", "NullSink", "RunStoreSink", "StdoutSink"]
