"""UNDERSTAND: estimators, analyses, recommendations, the run store and plots (docs/architecture.md).

Pure functions on arrays/tensors and run directories; never imports ``hooks`` or ``midtrain``. One
sub-package per instrument family, each with its front door in ``__init__`` (its ``_modules`` are
private to it):

    diagnostics.gns             gradient noise scale: two-batch estimators, EMA tracker, S/E trade-off,
                                per-example norm math (``diagnostics.gns.pegrad``)
    diagnostics.representation  spectra, TwoNN, information plane, readout, compression-onset detection
    diagnostics.difficulty      the streaming example table, data maps, learnability, forgetting
    diagnostics.retrieval       passkey-style keys planted in held-out text, the retrieval gain
    diagnostics.schedule        the LR schedule and the schedule laws that predict loss from it
    diagnostics.recommend       ``Recommendation`` and one module per recommendation
    diagnostics.stats           statistics the families share (EMA, OLS slope test, block bootstrap)
    diagnostics.runs            the run directory: ``load_run``, ``RunWriter``
    diagnostics.plots           one figure per function

    from diagnostics import load_run, plots
"""

from .runs import Run, RunDirError, RunWriter, load_run

__all__ = ["Run", "RunDirError", "RunWriter", "load_run"]
