"""The bias-corrected exponential moving average shared by the estimators.

One implementation, used by the gradient-noise tracker (``diagnostics.gns``, which re-exports it)
and by the per-domain training-loss EMAs of ``hooks.DifficultyTracker``. State in Python floats; inputs
may be floats, numpy scalars/arrays or torch tensors of one element (torch is never imported).

    from diagnostics.ema import BiasCorrectedEMA
    ema = BiasCorrectedEMA(0.9)
    ema.update(2.0); ema.update(1.0)
    ema.value          # (0.9 * 2 + 1) / 1.9 = 1.4737: the decay-weighted mean, no pull towards 0
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

__all__ = ["BiasCorrectedEMA"]


def _scalar(x: Any) -> float:
    """float of one value: a Python / numpy scalar, a one-element sequence or array, or a one-element
    torch tensor (any device, any grad)."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().double().numpy()
    return float(np.asarray(x, dtype=np.float64).reshape(()))


class BiasCorrectedEMA:
    """EMA with Adam-style debiasing (Kingma & Ba 2015, section 3).

        m_t = decay * m_{t-1} + (1 - decay) * x_t,  m_0 = 0;   value_t = m_t / (1 - decay^t)

    value_t equals the weighted mean of x_1..x_t with weights decay^(t-i) -- exactly, not
    approximately -- so early values are not pulled towards 0. Non-finite inputs are skipped
    (state untouched) and counted in ``n_skipped``. ``value`` is NaN before the first update.
    """

    def __init__(self, decay: float = 0.95):
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.biased = 0.0       # m_t
        self.n_updates = 0      # t
        self.n_skipped = 0

    def update(self, x) -> float:
        x = _scalar(x)
        if not math.isfinite(x):
            self.n_skipped += 1
            return self.value
        self.biased = self.decay * self.biased + (1.0 - self.decay) * x
        self.n_updates += 1
        return self.value

    @property
    def value(self) -> float:
        if self.n_updates == 0:
            return float("nan")
        return self.biased / (1.0 - self.decay ** self.n_updates)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "biased": self.biased,
                "n_updates": self.n_updates, "n_skipped": self.n_skipped}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        decay = float(state["decay"])
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.biased = float(state["biased"])
        self.n_updates = int(state["n_updates"])
        self.n_skipped = int(state.get("n_skipped", 0))

    def __repr__(self) -> str:
        return f"BiasCorrectedEMA(decay={self.decay}, value={self.value:.6g}, n={self.n_updates})"
