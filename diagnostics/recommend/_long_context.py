"""The long-context recommendation (the ``long_context`` entry of ``midtrain recommend``; docs/long_context.md):
the RoPE base a target length needs, beside what the run measured about its long-context phase.

(a) **The RoPE base lower bound** of Men et al. 2024 ("Base of RoPE Bounds Context Length", arXiv
2405.14591): with ``theta_i = base^(-2i/d)`` (d the head dimension), the model can tell similar tokens
apart at relative distance m only while ``B(m) = sum_{i=0}^{d/2-1} cos(m theta_i) >= 0``; a context of L
tokens needs it for every m in [0, L]. The condition is not monotone in the base: ``rope_base_bound``
returns the first base where it holds and the base above which it holds for every larger base.

(b) **What the run measured** (``midtrain.evaluate``'s loss by position): at L, the longest phase length,
the extrapolation gap ``val_pos/<L>/gap`` (far - near loss, far = positions >= L0, the first phase's
length) at the end of the phase before the first longer phase, the fraction of it the long phase
closed by its end, and the step after which ``val_pos/<L>/far_loss`` stopped improving: the first
evaluation within one noise sd (sigma, ``diagnostics.stats.robust_noise_scale`` of the far-loss series:
the evaluation set is fixed, so its scatter is training noise) of the phase's best; the range runs from
the first evaluation within z x sqrt(2) x sigma of the best (z: the normal quantile of ``level``) to the
best itself. The recommended phase length is that step minus the phase start.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from diagnostics.recommend._common import Recommendation, RecommendationError, _fmt, _phase_table
from diagnostics.stats import robust_noise_scale

__all__ = ["rope_base_bound", "rope_bound_holds", "long_context_recommendation"]

_GRID_PER_DECADE = 500  # log-spaced bases scanned per decade before the transitions are bisected
_CHUNK = 1 << 22  # elements of the (m, base, i) cosine block evaluated at once


def _min_b(bases: np.ndarray, head_dim: int, length: int) -> np.ndarray:
    """min over m in [0, length] of B(m) for each base (vectorised, in chunks)."""
    half = head_dim // 2
    i = np.arange(half, dtype=np.float64)
    m = np.arange(length + 1, dtype=np.float64)
    out = np.empty(len(bases))
    step = max(1, _CHUNK // ((length + 1) * half))
    for a in range(0, len(bases), step):
        theta = np.asarray(bases[a:a + step], dtype=np.float64)[:, None] ** (-2.0 * i / head_dim)  # (k, d/2)
        out[a:a + step] = np.cos(m[:, None, None] * theta[None]).sum(-1).min(0)
    return out


def rope_bound_holds(base: float, head_dim: int, length: int) -> bool:
    """Whether B(m) >= 0 for every m in [0, length] at ``base``."""
    return bool(_min_b(np.array([float(base)]), head_dim, length)[0] >= 0)


def _sufficient_base(head_dim: int, length: int) -> float:
    """A base above which the condition holds for sure: B(m) >= min_m cos(m) + sum_{i>=1} g_i with g_i =
    cos(length theta_i) when length theta_i <= pi (cos falls on [0, pi] and m theta_i <= length theta_i),
    else -1; that lower bound rises with the base, so the first base where it is >= 0 bounds every larger one."""
    half = head_dim // 2
    worst = float(np.cos(np.arange(length + 1)).min())

    def lower(log_b: float) -> float:
        th = np.exp(-2.0 * np.arange(1, half) / head_dim * log_b) * length
        return worst + float(np.where(th <= np.pi, np.cos(th), -1.0).sum())

    lo, hi = 0.0, 1.0
    while lower(hi) < 0:
        lo, hi = hi, 2 * hi
        if hi > 1e4:
            raise ValueError(f"no RoPE base satisfies the bound for head dim {head_dim} at {length} tokens")
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if lower(mid) >= 0 else (mid, hi)
    return math.exp(hi)


def _bisect(lo: float, hi: float, holds_hi: bool, head_dim: int, length: int, rtol: float) -> float:
    """The transition between ``lo`` and ``hi`` (the condition differs at the two), to a relative ``rtol``:
    the end of the final bracket where the condition is ``holds_hi``."""
    while hi / lo - 1 > rtol:
        mid = math.sqrt(lo * hi)
        if rope_bound_holds(mid, head_dim, length) == holds_hi:
            hi = mid
        else:
            lo = mid
    return hi if holds_hi else lo


def rope_base_bound(head_dim: int, length: int, *, rtol: float = 1e-6) -> dict[str, float]:
    """The smallest RoPE base for which ``B(m) = sum_i cos(m base^(-2i/d)) >= 0`` for every m in [0, length]
    (Men et al. 2024): ``{"first": the first base where it holds, "all_larger": the base above which it holds
    for every larger base}`` (equal when the condition is monotone there). Bases are scanned on a log grid of
    ``_GRID_PER_DECADE`` points per decade up to a base where the condition provably holds
    (``_sufficient_base``), then each transition is bisected to ``rtol``; a failing window narrower than
    the grid spacing (0.5%) can be missed."""
    if head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim must be an even number >= 4 (one frequency pair always fails), got {head_dim}")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    top = _sufficient_base(head_dim, length)
    n = max(2, int(math.ceil(math.log10(top) * _GRID_PER_DECADE)) + 1)
    grid = np.logspace(0, math.log10(top), n)[1:]  # base > 1
    ok = _min_b(grid, head_dim, length) >= 0
    if not ok.any():  # only at the provable top
        return {"first": float(top), "all_larger": float(top)}
    j = int(np.argmax(ok))
    first = float(grid[0]) if j == 0 else _bisect(float(grid[j - 1]), float(grid[j]), True, head_dim, length, rtol)
    bad = np.flatnonzero(~ok)
    if not len(bad) or bad[-1] < j:
        return {"first": first, "all_larger": first}
    k = int(bad[-1])
    hi = float(grid[k + 1]) if k + 1 < len(grid) else top
    return {"first": first, "all_larger": _bisect(float(grid[k]), hi, True, head_dim, length, rtol)}


# -- what the run measured ----------------------------------------------------------------------------

def _series(df, col: str, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    if col not in df.columns:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    v = df[(df["step"] >= lo) & (df["step"] <= hi)][["step", col]].dropna()
    return v["step"].to_numpy(dtype=np.int64), v[col].to_numpy(dtype=np.float64)


def _at(df, col: str, step: int) -> float | None:
    s, v = _series(df, col, step, step)
    return float(v[0]) if len(v) else None


def _head_dim(run) -> int | None:
    m = (run.info or {}).get("model") or {}
    if m.get("n_embd") and m.get("n_head"):
        return int(m["n_embd"]) // int(m["n_head"])
    return None


def _bases(table, model_base: float | None) -> list[float | None]:
    """The RoPE base in force in each phase (a phase without ``rope_base`` keeps the one before)."""
    out, cur = [], model_base
    for _, _, _, p in table:
        cur = p.get("rope_base") or cur
        out.append(cur)
    return out


def long_context_recommendation(run, *, level: float = 0.9) -> Recommendation:
    """The long-context phase's length from where its far-position loss stopped improving, with the RoPE
    base bound for its length, the gap before it and the fraction closed (module docstring).
    RecommendationError says what is missing and which config or command makes it."""
    table = _phase_table(run)
    if not table:
        raise RecommendationError("the run has no phase table (run.json phase_starts/phase_names): long_context "
                                  "needs a run of the built-in loop (midtrain train)")
    lens = [int(p.get("seq_len") or 0) for *_, p in table]
    l0 = lens[0]
    longer = [j for j, L in enumerate(lens) if L > l0]
    head_dim = _head_dim(run)
    bases = _bases(table, ((run.info or {}).get("model") or {}).get("rope_base"))
    L = max(lens)
    bound = rope_base_bound(head_dim, L) if head_dim and head_dim >= 4 and head_dim % 2 == 0 else None
    bound_txt = (f"RoPE base bound (Men et al. 2024) for head dim {head_dim} at {L} tokens: holds first at "
                 f"{_fmt(bound['first'])}, for every larger base from {_fmt(bound['all_larger'])}") if bound else \
        "RoPE base bound: the run does not record its model's head dimension"
    if not longer:
        raise RecommendationError(f"no phase is longer than the first ({l0} tokens): there is no long-context "
                                  f"phase to measure. Add one (a [[phases]] table with a longer seq_len) and, to see "
                                  f"the extrapolation gap first, [data] eval_lengths = [{2 * l0}]. {bound_txt}")
    j = longer[0]
    name, P, E, pcfg = table[j]
    df = run.metrics
    far, gap = f"val_pos/{L}/far_loss", f"val_pos/{L}/gap"
    g0, g1 = _at(df, gap, P), _at(df, gap, E)
    if g0 is None or g1 is None:
        raise RecommendationError(
            f"the run has no loss by position at {L} tokens at steps {P} and {E} (the start and end of phase "
            f"{name!r}): it predates the evaluation at every length. Train it again with this version of midtrain "
            f"(midtrain train), or branch from the checkpoint before the phase: midtrain train --from {run.path} "
            f"--step {P} --out NEW. {bound_txt}")
    closed = (g0 - g1) / g0 if g0 > 0 else math.nan
    steps, f = _series(df, far, P, E)
    measured = (f"gap (far - near loss at {L} tokens, far = positions >= {l0}) {_fmt(g0)} nats at step {P} (end of "
                f"phase {table[j - 1][0]!r}), {_fmt(g1)} at step {E} (end of {name!r})"
                + (f": the phase closed {closed:.0%} of it" if g0 > 0 else ": there was no gap to close"))
    if len(f) < 4:
        every = max(1, (E - P) // 8)
        raise RecommendationError(
            f"{measured}. When the far-position loss stopped improving needs at least 4 evaluations inside phase "
            f"{name!r} (it has {len(f)}): set [data] eval_lengths_every = {every} and train again, or branch "
            f"from step {P} (midtrain train --from {run.path} --step {P} --config NEW.toml --out NEW). {bound_txt}")
    sigma = robust_noise_scale(f)
    z = NormalDist().inv_cdf(0.5 + level / 2)
    best = float(f.min())
    at_best = int(steps[int(np.argmin(f))])
    value = int(steps[int(np.argmax(f <= best + sigma))])
    low = int(steps[int(np.argmax(f <= best + z * math.sqrt(2) * sigma))])
    still = at_best == E and value == E
    base = bases[j]
    evidence = {
        "measured": measured,
        "far-position loss": ", ".join(f"{int(s)}: {_fmt(float(v))}" for s, v in zip(steps, f)),
        "noise": f"sigma {_fmt(sigma)} per evaluation (point-to-point scatter of the far loss); the value is the "
                 f"first evaluation within sigma of the best, the range from the first within {z:.2f} x sqrt(2) x "
                 f"sigma to the best (step {at_best})",
        "rope base": bound_txt + (f"; the phase uses {_fmt(float(base))}" if base else ""),
    }
    for Lx in sorted({int(c.split("/")[1]) for c in df.columns if c.startswith("val_pos/") and c.endswith("/gap")}):
        if Lx != L and _at(df, f"val_pos/{Lx}/gap", P) is not None and _at(df, f"val_pos/{Lx}/gap", E) is not None:
            evidence[f"gap at {Lx} tokens"] = (f"{_fmt(_at(df, f'val_pos/{Lx}/gap', P))} -> "
                                               f"{_fmt(_at(df, f'val_pos/{Lx}/gap', E))}")
    patch: dict = {}
    if not still:
        patch = {"phases": {name: {"steps": value - P, "tokens": None}}}
    if bound and base and base < bound["all_larger"]:
        new_base = float(f"{bound['all_larger']:.2g}")
        new_base = new_base if new_base >= bound["all_larger"] else float(f"{bound['all_larger'] * 1.05:.2g}")
        patch.setdefault("phases", {}).setdefault(name, {})["rope_base"] = new_base
    summary = (f"phase {name!r}: the far-position loss at {L} tokens was still improving at its last step {E}; a "
               f"longer phase may help (measure it)" if still else
               f"phase {name!r}: {value - P} steps (the far-position loss at {L} tokens stopped improving at step "
               f"{value}; range {low - P}-{at_best - P})") + f". {measured}"
    return Recommendation(
        name="long_context", value=float(value - P), unit=f"steps (phase {name!r})", low=float(low - P),
        high=math.inf if still else float(at_best - P), level=level, estimate=float(value - P), summary=summary,
        evidence=evidence,
        assumptions=["the far-position loss at the longest phase length is what the long phase is for",
                     "evaluations inside the phase are frequent enough to place the step (eval_lengths_every)",
                     "the RoPE bound is necessary, not sufficient: a base above it can still extrapolate badly"],
        would_change=["denser evaluations (eval_lengths_every), more validation tokens or a replicate seed",
                      "another LR schedule inside the long phase (its decay moves when the loss flattens)",
                      "another RoPE base or scaling method (midtrain sweep --rope)"],
        patch=patch, check=f"midtrain train --from {run.path} --step {P} --config NEW.toml (this patch applied: "
                           f"midtrain recommend {run.path} --write-config NEW.toml)", branch_step=P)
