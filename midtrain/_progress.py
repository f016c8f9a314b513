"""The loop's progress line and throughput (tokens/s, step time, MFU)."""

from __future__ import annotations

import math
import os
import sys
import time

import torch


def peak_flops(device: torch.device) -> float:
    """Dense bf16 peak FLOP/s of the accelerator, for MFU (NaN when unknown).
    ``MIDTRAIN_PEAK_FLOPS`` overrides."""
    if os.environ.get("MIDTRAIN_PEAK_FLOPS"):
        return float(os.environ["MIDTRAIN_PEAK_FLOPS"])
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device).upper()
    table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
             "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
    for k, v in table.items():
        if k in name:
            return v
    return float("nan")


class Progress:
    """A dependency-free progress line: redraws in place on a terminal, else prints
    one line every ``every`` steps."""

    def __init__(self, total: int, start: int, every: int, enabled: bool, stream=None):
        self.total, self.start, self.every, self.enabled = total, start, every, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, phase: str, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled:
            return
        done = step + 1
        if not self.tty and done % self.every and done != self.total:
            return
        el = time.perf_counter() - self.t0
        eta = el / max(1, done - self.start) * (self.total - done)
        msg = (f"[{phase}] step {done}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
               f"{tok_s / 1e3:.1f}k tok/s  eta {eta:.0f}s")
        if self.tty:
            self.stream.write("\r" + msg.ljust(100))
            if done == self.total:
                self.stream.write("\n")
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()


class Throughput:
    """The loop's speed: per step (tokens/s, its EMA for the progress line, step time, MFU) and over
    the whole loop, from the first step to the last."""

    def __init__(self, peak: float):
        self.peak, self.t_loop, self.tokens = peak, time.perf_counter(), 0
        self.tok_s_ema, self.mfu = float("nan"), float("nan")

    def step_begin(self) -> None:
        self.t0 = time.perf_counter()

    def step_end(self, step_tokens: int, flops_per_token: float) -> dict[str, float]:
        """The step's ``perf/`` scalars (``perf/mfu`` only when the accelerator's peak is known)."""
        dt = time.perf_counter() - self.t0
        self.tokens += step_tokens
        tok_s = step_tokens / dt
        self.tok_s_ema = tok_s if math.isnan(self.tok_s_ema) else 0.9 * self.tok_s_ema + 0.1 * tok_s
        self.mfu = flops_per_token * tok_s / self.peak if self.peak == self.peak else float("nan")
        perf = {"perf/tokens_per_s": tok_s, "perf/step_time_s": dt}
        if self.mfu == self.mfu:
            perf["perf/mfu"] = self.mfu
        return perf

    def loop_tokens_per_s(self) -> float:
        loop_s = time.perf_counter() - self.t_loop
        return self.tokens / loop_s if loop_s > 0 else float("nan")
