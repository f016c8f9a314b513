"""RoPE scaling methods: what a ``rope_scaling`` table means, checked, and the rotary frequencies
it gives, in plain Python floats (no torch: ``midtrain.config`` checks phases with it and
``midtrain.model`` builds its cos/sin tables from it). docs/training.md, "RoPE scaling".

Plain RoPE (Su et al. 2021, arXiv 2104.09864) rotates pair ``i`` (``0 <= i < d/2``, ``d`` the head
dimension) of a query or key at position ``m`` by the angle ``m * theta_i``, ``theta_i = b^(-2i/d)``
with base ``b``. A scaling method with factor ``s >= 1`` (a context ``s`` times the one trained at)
changes those angles:

- ``"pi"`` (alias ``"linear"``), position interpolation (Chen et al. 2023, arXiv 2306.15595):
  the position is divided by the factor, angle ``(m / s) * theta_i``.
- ``"ntk"``, NTK-aware scaling (bloc97 2023, written down in Peng et al. 2023, arXiv 2309.00071,
  sec. 3.1): the base is multiplied, ``b' = b * s^(d / (d - 2))``, so the lowest frequency is
  interpolated by ``s`` and the highest is kept.
- ``"yarn"`` (Peng et al. 2023, sec. 3.2 "NTK-by-parts" and 3.4): per pair, the number of turns it
  makes over the original context ``L``, ``r_i = L / lambda_i = L * theta_i / (2 pi)``, picks between
  interpolation and extrapolation with the ramp ``gamma(r) = 0`` below ``alpha``, ``1`` above
  ``beta``, ``(r - alpha) / (beta - alpha)`` between (defaults 1 and 32), and
  ``theta_i' = (1 - gamma(r_i)) * theta_i / s + gamma(r_i) * theta_i``; the attention logits are
  multiplied by ``1 / t`` with ``sqrt(1 / t) = 0.1 ln(s) + 1``, applied by multiplying the cos and sin
  tables (so both q and k) by ``sqrt(1 / t)``.

``"none"`` is plain RoPE. Raising the base itself (ABF, Xiong et al. 2023, arXiv 2309.16039) is the
``rope_base`` setting, not a scaling type; a scaling applies on top of whatever base is in use.
Factor 1 is plain RoPE for every method (each formula reduces to it) and is returned as plain RoPE,
bit for bit.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCALING_TYPES", "SCALING_ALIASES", "SCALING_KEYS", "YARN_ALPHA", "YARN_BETA", "rope_scaling_spec",
           "rope_frequencies", "describe_scaling"]

SCALING_TYPES = ("none", "pi", "ntk", "yarn")
SCALING_ALIASES = {"linear": "pi"}  # Hugging Face's name for position interpolation
# the keys each type takes besides ``type`` (required ones first, then optional with their defaults)
SCALING_KEYS = {"none": (), "pi": ("factor",), "ntk": ("factor",),
                "yarn": ("factor", "original_max_position", "alpha", "beta")}
_REQUIRED = {"none": (), "pi": ("factor",), "ntk": ("factor",), "yarn": ("factor", "original_max_position")}
YARN_ALPHA, YARN_BETA = 1.0, 32.0  # Peng et al. 2023, sec. 3.2: the values they use for LLaMA


def _number(table: dict, key: str, default: float | None = None) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def rope_scaling_spec(table: Any) -> dict | None:
    """The checked, normalised form of a ``rope_scaling`` table: None for plain RoPE (None or
    ``{type = "none"}``), else ``{"type", "factor"}`` plus, for yarn, ``original_max_position``,
    ``alpha`` and ``beta`` (defaults filled in); ``"linear"`` becomes ``"pi"``. ValueError naming the
    key for an unknown type, a missing or unknown key, a factor below 1 or a bad value."""
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ValueError(f"must be a table such as {{ type = \"yarn\", factor = 2.0, original_max_position = 128 }}, "
                         f"got {table!r}")
    kind = table.get("type")
    kind = SCALING_ALIASES.get(kind, kind) if isinstance(kind, str) else kind
    if kind not in SCALING_TYPES:
        raise ValueError(f"type must be one of {', '.join(SCALING_TYPES)} (or linear, another name for pi), "
                         f"got {table.get('type')!r}")
    allowed = ("type",) + SCALING_KEYS[kind]
    bad = sorted(str(k) for k in table if k not in allowed)
    if bad:
        raise ValueError(f"unknown key(s) {bad} for type {kind!r}; its keys are: {', '.join(allowed)}")
    missing = [k for k in _REQUIRED[kind] if k not in table]
    if missing:
        raise ValueError(f"type {kind!r} needs {', '.join(missing)}")
    if kind == "none":
        return None
    factor = _number(table, "factor")
    if factor < 1.0:
        raise ValueError(f"factor must be >= 1 (the new context over the trained one), got {factor}")
    out: dict[str, Any] = {"type": kind, "factor": factor}
    if kind == "yarn":
        length = table["original_max_position"]
        if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
            raise ValueError(f"original_max_position must be a positive integer (the context length trained "
                             f"at), got {length!r}")
        alpha, beta = _number(table, "alpha", YARN_ALPHA), _number(table, "beta", YARN_BETA)
        if not 0.0 <= alpha < beta:
            raise ValueError(f"yarn needs 0 <= alpha < beta, got alpha={alpha}, beta={beta}")
        out.update(original_max_position=length, alpha=alpha, beta=beta)
    return out


def rope_frequencies(head_dim: int, base: float, scaling: Any = None) -> tuple[list[float], float, float]:
    """``(theta, divisor, attention_factor)`` of RoPE with base ``base`` under ``scaling`` (a
    ``rope_scaling`` table or None): the angle of pair ``i`` at position ``m`` is
    ``(m / divisor) * theta[i]``, and both the cos and sin tables are multiplied by
    ``attention_factor`` (YaRN's ``sqrt(1 / t)``; 1 for the other methods). ValueError for a bad table,
    or NTK scaling at head dimension 2 (its exponent d / (d - 2) is undefined)."""
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even integer, got {head_dim!r}")
    spec = rope_scaling_spec(scaling)
    if spec is not None and spec["type"] == "ntk" and head_dim == 2:
        raise ValueError("ntk scaling needs head_dim > 2 (its exponent is d / (d - 2))")
    plain = [1.0 / base ** (2 * i / head_dim) for i in range(head_dim // 2)]
    if spec is None or spec["factor"] == 1.0:
        return plain, 1.0, 1.0
    s = spec["factor"]
    if spec["type"] == "pi":
        return plain, s, 1.0
    if spec["type"] == "ntk":
        ntk_base = base * s ** (head_dim / (head_dim - 2))
        return [1.0 / ntk_base ** (2 * i / head_dim) for i in range(head_dim // 2)], 1.0, 1.0
    length, alpha, beta = spec["original_max_position"], spec["alpha"], spec["beta"]
    theta = []
    for th in plain:
        r = length * th / (2.0 * math.pi)  # turns over the original context: L / wavelength
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        theta.append((1.0 - gamma) * th / s + gamma * th)
    return theta, 1.0, 0.1 * math.log(s) + 1.0


def describe_scaling(scaling: Any) -> str:
    """A short text of a scaling table for progress lines: ``"yarn x2 (L=128)"``, ``"none"``."""
    spec = rope_scaling_spec(scaling)
    if spec is None:
        return "none"
    text = f"{spec['type']} x{spec['factor']:g}"
    return text + (f" (L={spec['original_max_position']})" if spec["type"] == "yarn" else "")
