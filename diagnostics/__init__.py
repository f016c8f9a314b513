"""UNDERSTAND: estimators, analyses, recommendations, the run store and plots.

Pure functions on arrays/tensors and run directories; never imports ``hooks``
or ``midtrain``.
"""

from .runs import Run, RunDirError, RunWriter, load_run

__all__ = ["Run", "RunDirError", "RunWriter", "load_run"]
