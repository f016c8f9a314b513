"""MEASURE: hooks that attach to any PyTorch training loop (see hooks.monitor)."""

from hooks.gradient_noise import GradientNoiseScale
from hooks.monitor import Hook, Monitor
from hooks.difficulty import DifficultyTracker, per_example_loss
from hooks.representation import RepresentationProbe
from hooks.retrieval import RetrievalProbe
from hooks.sinks import MemorySink, NullSink, RunStoreSink, StdoutSink, WandbSink  # wandb: imported only when a WandbSink is built

__all__ = ["GradientNoiseScale", "Hook", "MemorySink", "Monitor", "NullSink", "RunStoreSink", "StdoutSink", "DifficultyTracker", "per_example_loss", "RepresentationProbe", "RetrievalProbe", "WandbSink"]
