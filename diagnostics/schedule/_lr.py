"""The built-in loop's LR schedule: one definition, shared by the loop and the schedule laws.

``midtrain.config.Phase.lr_at`` calls ``lr_schedule`` (``diagnostics`` may not import ``midtrain``,
so the schedule lives here, below both), and ``diagnostics.recommend``'s LR-decay recommendation
evaluates candidate schedules of a phase with ``phase_lrs``. A phase: linear warmup, a constant LR,
then the last ``decay_fraction`` of the post-warmup steps decaying to ``final_lr`` with one of
``DECAY_SHAPES`` (1-sqrt: Hägele et al. 2024, arXiv 2405.18392).

    >>> import numpy as np
    >>> from diagnostics.schedule import lr_schedule
    >>> lr_schedule(np.arange(4), 4, lr=1.0, final_lr=0.0, decay="linear", decay_fraction=0.5).tolist()
    [1.0, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["DECAY_SHAPES", "lr_schedule", "phase_lrs", "phase_num_steps"]

DECAY_SHAPES = ("constant", "linear", "cosine", "1-sqrt", "exponential")


def phase_num_steps(phase: dict) -> int:
    if phase.get("steps") is not None:
        return int(phase["steps"])
    return math.ceil(int(phase["tokens"]) / (int(phase["batch_size"]) * int(phase["seq_len"])))


def lr_schedule(t, n: int, *, lr: float, final_lr: float = 0.0, warmup_steps: int = 0,
                decay: str = "constant", decay_fraction: float = 1.0):
    """LR at step(s) ``t`` (0-based; an int or an array) of a phase of ``n`` steps: the built-in
    loop's schedule (``midtrain.config.Phase.lr_at`` calls this). Linear warmup from lr/warmup_steps
    to lr over ``warmup_steps``; then lr held; the last round(decay_fraction x post-warmup steps)
    steps decay to ``final_lr`` with shape ``decay``, reaching it on the phase's last step."""
    if decay not in DECAY_SHAPES:
        raise ValueError(f"unknown decay shape {decay!r}; valid: {', '.join(DECAY_SHAPES)}")
    t = np.asarray(t, dtype=np.float64)
    warm = int(warmup_steps or 0)
    hi, lo = float(lr), float(final_lr)
    out = np.full(t.shape, hi)
    if decay != "constant":
        n_decay = max(1, round(float(decay_fraction) * (n - warm)))
        start = n - n_decay
        p = (t - start + 1) / n_decay  # in (0, 1] over the decay; 1 on the phase's last step
        with np.errstate(divide="ignore", over="ignore", invalid="ignore"):  # p <= 0 before it: unused
            if decay == "linear":
                v = hi - (hi - lo) * p
            elif decay == "cosine":
                v = lo + (hi - lo) * 0.5 * (1.0 + np.cos(np.pi * p))
            elif decay == "1-sqrt":  # Hägele et al. 2024, arXiv 2405.18392
                v = lo + (hi - lo) * (1.0 - np.sqrt(p))
            else:  # exponential
                v = hi * (lo / hi) ** p
        out = np.where(t >= start, v, out)
    if warm:
        out = np.where(t < warm, hi * (t + 1) / warm, out)
    return out


def phase_lrs(phase: dict, n: int | None = None, *, decay: str | None = None,
              decay_fraction: float | None = None) -> np.ndarray:
    """The LR of each of a phase's ``n`` steps (a ``Phase`` as a dict: lr, warmup_steps, decay,
    decay_fraction, final_lr), optionally with another ``decay`` shape or ``decay_fraction``
    (``lr_schedule``)."""
    n = phase_num_steps(phase) if n is None else int(n)
    shape = decay if decay is not None else phase.get("decay", "constant")
    lo = float(phase.get("final_lr", 0.0))
    if shape == "exponential" and lo <= 0:
        raise ValueError("an exponential decay needs final_lr > 0")
    frac = decay_fraction if decay_fraction is not None else phase.get("decay_fraction", 1.0)
    if phase.get("lr_span"):  # a piece of a longer LR segment (midtrain.config.Phase.lr_span / lr_offset)
        off = int(phase.get("lr_offset") or 0)
        return lr_schedule(np.arange(n) + off, int(phase["lr_span"]), lr=float(phase.get("lr", 3e-3)), final_lr=lo,
                           warmup_steps=int(phase.get("warmup_steps") or 0), decay=shape, decay_fraction=float(frac))
    return lr_schedule(np.arange(n), n, lr=float(phase.get("lr", 3e-3)), final_lr=lo,
                       warmup_steps=int(phase.get("warmup_steps") or 0), decay=shape, decay_fraction=float(frac))
