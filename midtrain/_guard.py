"""The built-in loop's divergence guard: a run whose updates keep being skipped for non-finite
gradients is dead, and says so instead of training on to a ``finished`` status.

The loop skips an update whose gradient norm is not finite (``train/skipped_steps`` counts them).
The guard watches the last ``skip_window`` steps; when more than ``max_skipped_steps`` of them were
skipped (top-level config keys, defaults 10 of 100), the run stops at that step with status
``diverged`` (docs/training.md). An isolated overflow is tolerated; a stretch of them is not.
``max_skipped_steps >= skip_window`` turns the guard off.
"""

from __future__ import annotations

import math
from collections import deque


class DivergenceGuard:
    """Skipped steps over a sliding window of steps; ``update`` says when there are too many.

    ``recent``: the skipped steps still inside the window when the run was checkpointed (a resume
    continues the window, ``state()`` is what a checkpoint saves)."""

    def __init__(self, max_skipped: int, window: int, recent=()):
        self.max_skipped, self.window = int(max_skipped), int(window)
        self.recent: deque[int] = deque(int(s) for s in recent)
        self.history: deque[tuple[int, float, float, float]] = deque(maxlen=self.window)  # step, loss, lr, grad norm

    def update(self, step: int, *, skipped: bool, loss: float, lr: float, grad_norm: float) -> bool:
        """Record step ``step``; True when more than ``max_skipped`` of the last ``window`` steps were skipped."""
        while self.recent and self.recent[0] <= step - self.window:
            self.recent.popleft()
        if skipped:
            self.recent.append(step)
        self.history.append((step, loss, lr, grad_norm))
        return len(self.recent) > self.max_skipped

    def state(self) -> list[int]:
        return list(self.recent)

    def report(self, step: int, checkpoints: list[int], dtype: str) -> dict:
        """What run.json records of the divergence (``diverged``), its ``message`` included: the step,
        the skipped steps, the likely cause and the last checkpoint from before the first skip."""
        first = self.recent[0]
        good = max((s for s in checkpoints if s < first), default=None)
        way_on = (f"The last checkpoint from before the skips is step {good}: branch from it with a lower lr "
                  f"(midtrain train --from RUN --step {good} --config lower_lr.toml --out NEW)."
                  if good is not None else
                  "No checkpoint predates the skips: start again with a lower lr.")
        message = (f"training diverged at step {step}: {len(self.recent)} of the last {self.window} steps were "
                   f"skipped for non-finite gradients (first at step {first}; max_skipped_steps = {self.max_skipped})"
                   f". Likely cause: {self._cause(first, dtype)} {way_on}")
        return {"step": step, "first_skipped": first, "skipped_steps": list(self.recent), "window": self.window,
                "max_skipped_steps": self.max_skipped, "last_good_checkpoint": good, "message": message}

    def _cause(self, first: int, dtype: str) -> str:
        before = [(s, loss, lr, g) for s, loss, lr, g in self.history if s < first and math.isfinite(loss)]
        lr_first = next((lr for s, _, lr, _ in self.history if s == first), float("nan"))
        lr_part = f"the learning rate is too high (lr {lr_first:.3g} at step {first}"
        peak = max(before[1:], key=lambda r: r[1], default=None)
        if peak is not None and peak[1] > 1.2 * before[0][1]:
            lr_part += f"; the loss jumped from {before[0][1]:.4g} at step {before[0][0]} to {peak[1]:.4g} at step {peak[0]}"
        lr_part += "): lower [[phases]] lr or lengthen warmup_steps"
        data_part = f"bad data: a batch of step {first} that drives the model to inf/NaN (check those examples)"
        prec_part = (f"numerical precision: {dtype} overflows sooner than float32 (try dtype = \"float32\")"
                     if dtype != "float32" else "numerical precision (unlikely in float32)")
        return f"{lr_part}; or {data_part}; or {prec_part}."
