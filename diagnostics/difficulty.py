"""Curriculum difficulty: per-example tables, data maps, forgetting, EL2N, learnability, power laws.

Pure math on numpy arrays (and, for the logit-level scores, torch tensors); no model, no loop,
so the same code runs inside ``hooks.DifficultyTracker`` and offline on a saved table or a
run's metrics. Definitions and the papers they come from are in docs/difficulty.md.

    Data Maps     Swayamdipta et al. 2020, "Dataset Cartography" (arXiv 2009.10795), sec. 2:
                  confidence = mean over visits of p(y*|x), variability = std over visits,
                  correctness = fraction of visits predicted correctly. For a language model
                  p(y*|x) is the per-token geometric-mean likelihood of the sequence, exp(-loss).
    Forgetting    Toneva et al. 2019, "An Empirical Study of Example Forgetting" (arXiv 1812.05159),
                  sec. 3: an event is a transition learned -> not learned between two visits.
                  "Learned" here: per-token loss below a stated threshold (``learned_loss``).
    EL2N          Paul et al. 2021, "Deep Learning on a Data Diet" (arXiv 2107.07075), eq. 2:
                  E || softmax(f(x)) - onehot(y) ||_2, here averaged over a sequence's tokens.
    RHO-LOSS      Mindermann et al. 2022 (arXiv 2206.07137), eq. 3: reducible loss =
                  training loss - irreducible (reference-model) loss.
    Learnability  slope of loss against log tokens over a recent window (OLS, with standard
                  error and a one-sided t-test for "still decreasing"); a power law
                  L(t) = E + A t^-alpha (Kaplan et al. 2020, arXiv 2001.08361; Hoffmann et al.
                  2022, arXiv 2203.15556 eq. 2) has dL/dlog t = -alpha (L - E).

Quick tour (well under a second on a CPU)::

    import numpy as np
    from diagnostics.difficulty import ExampleTable, learnability, fit_power_law
    tab = ExampleTable(learned_loss=1.0)
    tab.update(ids=np.array([7, 8, 7]), losses=np.array([2.0, 0.5, 0.8]), domains=np.array([0, 1, 0]))
    tab.to_arrays()["loss_mean"]                 # [1.4, 0.5]  (id 7 was visited twice)
    t = np.geomspace(1e6, 1e9, 200); L = 2.0 + 50 * t ** -0.3
    fit_power_law(t, L).alpha                    # 0.3
    learnability(t, L).slope_log_tokens          # -alpha * (L - E) over the window
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ExampleTable", "UpdateStats", "IdIndex", "hash_ids",
    "data_map_regions", "REGIONS", "roc_auc",
    "Learnability", "ols_slope", "learnability", "PowerLawFit", "fit_power_law", "local_exponent",
    "RingSeries", "DomainEMA", "sequence_scores", "reducible_loss", "domain_curves",
]

# -----------------------------------------------------------------------------
# id -> slot hashing (vectorised open addressing, no Python dict)

_EMPTY = np.iinfo(np.int64).min  # never a valid id (val ids are -1 - id >= -2**63 + 1)


def hash_ids(ids: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser (Steele et al. 2014) of int64 ids -> well-mixed uint64, vectorised.

    Example ids are structured (domain * 2**40 + aligned offset), so a raw modulus would
    cluster; the finaliser spreads every input bit over the output."""
    with np.errstate(over="ignore"):
        z = np.ascontiguousarray(ids, dtype=np.int64).view(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


class IdIndex:
    """id -> slot map: open addressing with linear probing, every operation vectorised.

    Load factor stays <= 1/2 (the table doubles), so probe sequences are short and each
    ``lookup``/``insert`` is a handful of numpy passes over the shrinking set of unresolved ids.
    Memory: 12 bytes per table cell, 2-8 cells per id.
    """

    def __init__(self, capacity: int = 1024):
        self._alloc(max(16, int(capacity)))
        self.size = 0

    def _alloc(self, capacity: int) -> None:
        bits = max(4, int(math.ceil(math.log2(capacity))))
        self.keys = np.full(1 << bits, _EMPTY, dtype=np.int64)
        self.slots = np.full(1 << bits, -1, dtype=np.int32)  # row numbers < 2**31
        self.mask, self.shift = (1 << bits) - 1, np.uint64(64 - bits)

    def _home(self, ids: np.ndarray) -> np.ndarray:
        return (hash_ids(ids) >> self.shift).astype(np.int64)  # top bits: the best-mixed ones

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (int64), -1 where an id is absent."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.full(len(ids), -1, dtype=np.int64)
        pos = self._home(ids)
        active = np.arange(len(ids))
        while active.size:
            p = pos[active]
            k = self.keys[p]
            hit = k == ids[active]
            out[active[hit]] = self.slots[p[hit]]
            cont = ~hit & (k != _EMPTY)
            active = active[cont]
            pos[active] = (pos[active] + 1) & self.mask
        return out

    def insert(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Insert ids that are absent and unique (the caller guarantees both)."""
        ids, slots = np.asarray(ids, dtype=np.int64), np.asarray(slots, dtype=np.int64)
        if 2 * (self.size + len(ids)) > len(self.keys):
            old = self.keys != _EMPTY
            old_ids, old_slots = self.keys[old], self.slots[old]
            self._alloc(4 * (self.size + len(ids)))
            self.size = 0
            self._place(old_ids, old_slots)
        self._place(ids, slots)

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        pos = self._home(ids)
        active = np.arange(len(ids))
        while active.size:
            p = pos[active]
            free = self.keys[p] == _EMPTY
            cand, pc = active[free], p[free]
            self.keys[pc] = ids[cand]  # several candidates on one free cell: one write wins
            won = self.keys[pc] == ids[cand]
            self.slots[pc[won]] = slots[cand[won]]
            placed = np.zeros(len(active), dtype=bool)
            placed[np.flatnonzero(free)[won]] = True
            active = active[~placed]
            pos[active] = (pos[active] + 1) & self.mask
        self.size += len(ids)

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.slots.nbytes


# -----------------------------------------------------------------------------
# the streaming per-example table

_FIELDS = {  # name -> dtype; one row per tracked example (about 60 bytes + index)
    "id": np.int64, "domain": np.int32, "visits": np.int32, "n_learned": np.int32, "forgets": np.int32,
    "loss_mean": np.float64, "loss_m2": np.float64, "conf_mean": np.float64, "conf_m2": np.float64,
    "first_loss": np.float32, "last_loss": np.float32, "learned": np.bool_,
}


@dataclass
class UpdateStats:
    n_seen: int  # losses given
    n_nan: int  # non-finite losses skipped
    n_new: int  # examples added to the table
    n_sampled_out: int  # finite losses of examples outside the hash sample (bounded memory)
    n_forget_events: int  # learned -> not learned transitions in this update


class ExampleTable:
    """Streaming per-example statistics in bounded memory (vectorised; about 100 bytes/example).

    Each row: id, domain, visits, Welford mean and M2 of the loss and of the confidence
    exp(-loss) (Welford 1962; Chan et al. 1979), first and last loss, learned flag (last loss
    < ``learned_loss``), number of learned visits, number of forgetting events.

    Bounded memory: at most ``max_examples`` rows. When a new example would exceed it, the
    table keeps a deterministic hash sample of ids (an id is kept iff the low ``level`` bits
    of its hash are zero; ``level`` goes up by one, halving the sample, until the rows fit).
    Every kept id's statistics stay exact; ``sample_rate = 2**-level``.

    Visits of one id inside one ``update`` are applied in array order (a batch sampled with
    replacement may hold an example twice), so the result equals one-at-a-time updates.
    """

    def __init__(self, learned_loss: float = 1.0, max_examples: int | None = 1_000_000, capacity: int = 1024):
        if not learned_loss > 0:
            raise ValueError(f"learned_loss must be a positive per-token loss in nats, got {learned_loss}.")
        if max_examples is not None and max_examples < 1:
            raise ValueError(f"max_examples must be positive or None, got {max_examples}.")
        self.learned_loss, self.max_examples = float(learned_loss), max_examples
        self.n, self.level = 0, 0
        self.cols = {k: np.zeros(max(16, capacity), dtype=t) for k, t in _FIELDS.items()}
        self.index = IdIndex(2 * capacity)
        self.n_forgotten = 0  # examples with >= 1 forgetting event
        self.n_forgettable = 0  # examples learned at some visit that was not their last
        self.n_nan = 0
        self.n_visits = 0

    # -- helpers ----------------------------------------------------------------
    def __len__(self) -> int:
        return self.n

    @property
    def sample_rate(self) -> float:
        return 2.0 ** -self.level

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.cols.values()) + self.index.nbytes

    def _in_sample(self, ids: np.ndarray) -> np.ndarray:
        if self.level == 0:
            return np.ones(len(ids), dtype=bool)
        return (hash_ids(ids) & np.uint64((1 << self.level) - 1)) == 0

    def _grow(self, need: int) -> None:
        cap = len(self.cols["id"])
        if need <= cap:
            return
        new = max(need, 2 * cap)
        if self.max_examples is not None:
            new = max(need, min(new, self.max_examples))
        for k, c in self.cols.items():
            g = np.zeros(new, dtype=c.dtype)
            g[: self.n] = c[: self.n]
            self.cols[k] = g

    def _raise_level(self) -> None:
        """Halve the hash sample: drop the rows whose id leaves it, compact, rebuild the index."""
        self.level += 1
        keep = self._in_sample(self.cols["id"][: self.n])
        m = int(keep.sum())
        for c in self.cols.values():
            c[:m] = c[: self.n][keep]
        self.n = m
        self.index = IdIndex(2 * len(self.cols["id"]))
        self.index.insert(self.cols["id"][: self.n], np.arange(self.n))
        self._recount()

    def _recount(self) -> None:
        c, n = self.cols, self.n
        self.n_forgotten = int((c["forgets"][:n] > 0).sum())
        self.n_forgettable = int(((c["n_learned"][:n] >= 2) | ((c["n_learned"][:n] == 1) & ~c["learned"][:n])).sum())

    # -- the update ----------------------------------------------------------------
    def update(self, ids, losses, domains=None) -> UpdateStats:
        """Add one visit per element: ``ids`` (n,) int, ``losses`` (n,) per-token loss (nats),
        ``domains`` (n,) int or None (domain 0). Non-finite losses are skipped and counted."""
        ids = np.asarray(ids)
        losses = np.asarray(losses, dtype=np.float64)
        doms = np.zeros(len(ids), dtype=np.int32) if domains is None else np.asarray(domains)
        if ids.ndim != 1 or losses.ndim != 1 or doms.ndim != 1 or not (len(ids) == len(losses) == len(doms)):
            raise ValueError(
                "ExampleTable.update needs 1-d ids, losses and domains of one length, got shapes "
                f"ids {ids.shape}, losses {losses.shape}, domains {doms.shape}.")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"ids must be integers (int64 example ids), got dtype {ids.dtype}.")
        ids = ids.astype(np.int64, copy=False)
        n_seen = len(ids)
        ok = np.isfinite(losses)
        n_nan = int(n_seen - ok.sum())
        self.n_nan += n_nan
        if n_nan:
            ids, losses, doms = ids[ok], losses[ok], doms[ok]
        n_finite = len(ids)
        keep = self._in_sample(ids)
        ids, losses, doms = ids[keep], losses[keep], doms[keep]
        if not len(ids):
            return UpdateStats(n_seen, n_nan, 0, n_finite, 0)

        # unique ids of this update, and each element's occurrence rank within its id
        while True:
            uniq, first, inverse, counts = np.unique(ids, return_index=True, return_inverse=True,
                                                     return_counts=True)
            slot_u = self.index.lookup(uniq)
            new = slot_u < 0
            n_new = int(new.sum())
            if self.max_examples is None or self.n + n_new <= self.max_examples:
                break
            self._raise_level()  # bounded memory: keep a hash sample half as large
            keep = self._in_sample(ids)
            ids, losses, doms = ids[keep], losses[keep], doms[keep]
        inverse = inverse.reshape(-1)
        if not len(ids):
            return UpdateStats(n_seen, n_nan, 0, n_finite, 0)
        if n_new:
            new_slots = np.arange(self.n, self.n + n_new)
            self._grow(self.n + n_new)
            for c in self.cols.values():
                c[new_slots] = 0
            self.cols["id"][new_slots] = uniq[new]
            self.cols["domain"][new_slots] = doms[first[new]]
            self.index.insert(uniq[new], new_slots)
            slot_u[new] = new_slots
            self.n += n_new
        slots = slot_u[inverse]  # (n,) slot of every element
        if counts.max() == 1:
            rounds = [np.arange(len(ids))]
        else:  # rank of each element among the earlier elements with the same id
            order = np.argsort(inverse, kind="stable")
            starts = np.cumsum(counts) - counts
            rank = np.empty(len(ids), dtype=np.int64)
            rank[order] = np.arange(len(ids)) - np.repeat(starts, counts)
            rounds = [np.flatnonzero(rank == r) for r in range(int(counts.max()))]
        events = 0
        for idx in rounds:  # ids are unique within a round: plain fancy-index updates are exact
            events += self._visit(slots[idx], losses[idx])
        self.n_visits += len(ids)
        return UpdateStats(n_seen, n_nan, n_new, n_finite - len(ids), events)

    def _visit(self, s: np.ndarray, x: np.ndarray) -> int:
        c = self.cols
        n = c["visits"][s] + 1
        c["visits"][s] = n
        # Welford: mean_n = mean + (x - mean) / n ; M2_n = M2 + (x - mean)(x - mean_n)
        for name, v in (("loss", x), ("conf", np.exp(-x))):
            mean = c[f"{name}_mean"][s]
            delta = v - mean
            mean = mean + delta / n
            c[f"{name}_mean"][s] = mean
            c[f"{name}_m2"][s] += delta * (v - mean)
        first_visit = n == 1
        c["first_loss"][s[first_visit]] = x[first_visit]
        c["last_loss"][s] = x
        learned_prev = c["learned"][s] & ~first_visit
        learned_now = x < self.learned_loss
        forget = learned_prev & ~learned_now  # Toneva et al. 2019: learned -> not learned
        n_learned_prev = c["n_learned"][s]
        # an example becomes forgettable when it is revisited after its first learned visit
        self.n_forgettable += int(((n_learned_prev == 1) & learned_prev).sum())
        self.n_forgotten += int((forget & (c["forgets"][s] == 0)).sum())
        c["forgets"][s] += forget
        c["n_learned"][s] = n_learned_prev + learned_now
        c["learned"][s] = learned_now
        return int(forget.sum())

    # -- reading -------------------------------------------------------------------
    @property
    def frac_forgotten(self) -> float:
        """Examples with >= 1 forgetting event / examples that could have had one (learned at a
        visit that was not their last). NaN before any example qualifies."""
        return self.n_forgotten / self.n_forgettable if self.n_forgettable else float("nan")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The table as named columns (what is saved under arrays/): data-map coordinates included.

        confidence = mean exp(-loss) over visits; variability = population std of exp(-loss)
        over visits (Swayamdipta et al. use np.std); correctness = learned visits / visits."""
        c, n = self.cols, self.n
        v = np.maximum(c["visits"][:n], 1).astype(np.float64)
        return {
            "id": c["id"][:n].copy(), "domain": c["domain"][:n].copy(), "visits": c["visits"][:n].copy(),
            "loss_mean": c["loss_mean"][:n].copy(), "loss_std": np.sqrt(c["loss_m2"][:n] / v),
            "confidence": c["conf_mean"][:n].copy(), "variability": np.sqrt(c["conf_m2"][:n] / v),
            "correctness": c["n_learned"][:n] / v, "first_loss": c["first_loss"][:n].copy(),
            "last_loss": c["last_loss"][:n].copy(), "learned": c["learned"][:n].copy(),
            "forgetting_events": c["forgets"][:n].copy(),
        }

    def lookup(self, ids) -> np.ndarray:
        """Row index of each id (-1 where not tracked)."""
        return self.index.lookup(np.asarray(ids, dtype=np.int64))

    def state_dict(self) -> dict[str, Any]:
        return {"learned_loss": self.learned_loss, "max_examples": self.max_examples, "level": self.level,
                "n_nan": self.n_nan, "n_visits": self.n_visits,
                "cols": {k: c[: self.n].copy() for k, c in self.cols.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learned_loss, self.max_examples = float(state["learned_loss"]), state["max_examples"]
        self.level, self.n_nan, self.n_visits = int(state["level"]), int(state["n_nan"]), int(state["n_visits"])
        n = len(state["cols"]["id"])
        self.n = 0
        self.cols = {k: np.zeros(max(16, n), dtype=t) for k, t in _FIELDS.items()}
        for k, t in _FIELDS.items():
            self.cols[k][:n] = np.asarray(state["cols"][k], dtype=t)
        self.n = n
        self.index = IdIndex(2 * max(16, n))
        self.index.insert(self.cols["id"][:n], np.arange(n))
        self._recount()


# -----------------------------------------------------------------------------
# data maps and ranking

REGIONS = ("easy", "ambiguous", "hard")


def data_map_regions(confidence, variability, confidence_threshold: float | None = None,
                     variability_threshold: float | None = None) -> np.ndarray:
    """Data-map regions (Swayamdipta et al. 2020, sec. 2.1, fig. 1): 0 easy, 1 ambiguous, 2 hard.

    ambiguous: variability >= ``variability_threshold`` (default: above the 2/3 quantile, i.e.
    the top third, as in the paper's 33% subsets); among the rest, easy-to-learn if confidence >=
    ``confidence_threshold`` (default: the median confidence of the rest), else hard-to-learn.
    Pass absolute thresholds to compare maps across runs."""
    conf, var = np.asarray(confidence, dtype=np.float64), np.asarray(variability, dtype=np.float64)
    if conf.shape != var.shape:
        raise ValueError(f"confidence {conf.shape} and variability {var.shape} must have one shape.")
    out = np.zeros(conf.shape, dtype=np.int8)
    if conf.size == 0:
        return out
    if variability_threshold is None:
        amb = var > np.quantile(var, 2 / 3)  # strict: ties at the quantile (e.g. many zeros) stay out
    else:
        amb = var >= variability_threshold
    rest = ~amb
    ct = confidence_threshold
    if ct is None:
        ct = np.median(conf[rest]) if rest.any() else 0.5
    out[amb] = 1
    out[rest & (conf < ct)] = 2
    return out


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U / (n1 n0),
    ties counted half). 1.0: every positive scores above every negative."""
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc needs both positive and negative labels.")
    _, inv, counts = np.unique(s, return_inverse=True, return_counts=True)
    r = (np.cumsum(counts) - (counts - 1) / 2.0)[inv.reshape(-1)]  # 1-based ranks, ties averaged
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


# -----------------------------------------------------------------------------
# learnability: slopes, the diminishing-returns test, power laws


def ols_slope(x, y) -> tuple[float, float, float]:
    """Least-squares line y = a + b x: returns (b, se(b), a); se from the residual variance
    with n - 2 degrees of freedom (NaN when n < 3 or x is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan"), float("nan"), float("nan")
    xm, ym = x.mean(), y.mean()
    dx = x - xm
    sxx = float(dx @ dx)
    if sxx <= 0:
        return float("nan"), float("nan"), float("nan")
    b = float(dx @ (y - ym)) / sxx
    a = ym - b * xm
    if n < 3:
        return b, float("nan"), a
    resid = y - a - b * x
    return b, math.sqrt(float(resid @ resid) / (n - 2) / sxx), a


@dataclass
class Learnability:
    """Rate of loss decrease of one domain over a recent window (see ``learnability``)."""

    slope_per_token: float  # dL/dt, nats per token
    slope_per_token_se: float
    slope_log_tokens: float  # dL/dln t, nats per e-fold of tokens
    slope_log_tokens_se: float
    t_stat: float  # slope_log_tokens / se
    p_value: float  # one-sided P(T <= t) under H0: slope >= 0 (no decrease)
    diminishing: bool  # decrease not significant at ``level`` (diminishing returns)
    level: float
    n: int
    defined: bool

    @property
    def value(self) -> float:
        """Learnability = -dL/dln t (positive while the domain is still being learned)."""
        return -self.slope_log_tokens

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "value": self.value}


def learnability(tokens, losses, window: int | None = None, level: float = 0.05, min_points: int = 8) -> Learnability:
    """Slopes of loss against tokens and against ln(tokens) over the last ``window`` points.

    Least squares with standard errors (``ols_slope``). Diminishing returns: the one-sided
    t-test of H0 "slope >= 0" is not rejected at ``level`` (p >= level), i.e. the data give
    no significant evidence that more tokens still lower the loss. The test treats the points
    as independent: feed raw per-step losses, not an EMA (smoothing correlates residuals
    and shrinks the standard error).

    For L = E + A t^-alpha the log slope is -alpha (L - E) (``local_exponent`` inverts it)."""
    from scipy.special import stdtr

    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape:
        raise ValueError(f"tokens {t.shape} and losses {y.shape} must have one shape.")
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    if window is not None:
        t, y = t[-window:], y[-window:]
    n = len(t)
    nan = float("nan")
    if n < max(3, min_points) or np.ptp(t) <= 0:
        return Learnability(nan, nan, nan, nan, nan, nan, False, level, n, False)
    b, se, _ = ols_slope(t, y)
    bl, sel, _ = ols_slope(np.log(t), y)
    if sel > 0:
        ts = bl / sel
        p = float(stdtr(n - 2, ts))
    else:  # a perfect line: the sign decides
        ts = -math.inf if bl < 0 else (math.inf if bl > 0 else 0.0)
        p = 0.0 if bl < 0 else 1.0
    return Learnability(b, se, bl, sel, ts, p, bool(p >= level), level, n, True)


@dataclass
class PowerLawFit:
    """L(t) = E + A t^-alpha (Kaplan et al. 2020 eq. 1.x form; Hoffmann et al. 2022 eq. 2)."""

    E: float
    A: float
    alpha: float
    alpha_se: float
    rmse: float
    n: int

    def predict(self, tokens) -> np.ndarray:
        return self.E + self.A * np.asarray(tokens, dtype=np.float64) ** -self.alpha


def fit_power_law(tokens, losses, alpha_bounds: tuple[float, float] = (1e-3, 3.0)) -> PowerLawFit:
    """Least-squares fit of L = E + A t^-alpha with E, A >= 0.

    Variable projection: for fixed alpha the model is linear in (E, A), solved by non-negative
    least squares; the residual is then minimised over alpha (a log-spaced grid, then a bounded
    scalar search). alpha_se comes from the Gauss-Newton covariance at the optimum."""
    from scipy.optimize import minimize_scalar, nnls

    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0)
    t, y = t[ok], y[ok]
    n = len(t)
    if n < 4 or np.ptp(t) <= 0:
        raise ValueError(f"fit_power_law needs at least 4 points with distinct positive tokens, got {n}.")
    t0 = float(t.min())
    u = t / t0  # >= 1: keeps u^-alpha in (0, 1] for every alpha

    def solve(alpha):
        X = np.stack([np.ones(n), u ** -alpha], axis=1)  # (n, 2)
        coef, rnorm = nnls(X, y)
        return coef, rnorm ** 2

    grid = np.geomspace(*alpha_bounds, 120)
    rss = np.array([solve(a)[1] for a in grid])
    i = int(np.argmin(rss))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = minimize_scalar(lambda a: solve(a)[1], bounds=(lo, hi), method="bounded", options={"xatol": 1e-8})
    alpha = float(res.x) if res.fun <= rss[i] else float(grid[i])
    (E, A1), r = solve(alpha)
    # Gauss-Newton covariance of (E, A1, alpha): J = [1, u^-a, -A1 ln(u) u^-a]
    ua = u ** -alpha
    J = np.stack([np.ones(n), ua, -A1 * np.log(u) * ua], axis=1)
    dof = max(n - 3, 1)
    try:
        cov = np.linalg.inv(J.T @ J) * (r / dof)
        alpha_se = float(math.sqrt(max(cov[2, 2], 0.0)))
    except np.linalg.LinAlgError:
        alpha_se = float("nan")
    return PowerLawFit(float(E), float(A1 * t0 ** alpha), alpha, alpha_se, float(math.sqrt(r / n)), n)


def local_exponent(tokens, losses, E: float) -> tuple[float, float]:
    """Local power-law exponent -dln(L - E)/dln t by least squares, with its standard error.
    Points with L <= E are dropped."""
    t, y = np.asarray(tokens, dtype=np.float64), np.asarray(losses, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > E)
    b, se, _ = ols_slope(np.log(t[ok]), np.log(y[ok] - E))
    return -b, se


# -----------------------------------------------------------------------------
# small streaming containers used by the hook


class RingSeries:
    """The last ``capacity`` (x, y) points, preallocated (bounded memory)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}.")
        self.capacity = int(capacity)
        self.x = np.zeros(self.capacity)
        self.y = np.zeros(self.capacity)
        self.pos = 0  # next write position
        self.size = 0  # points held (<= capacity)
        self.total = 0  # points ever added

    def append(self, x: float, y: float) -> None:
        self.x[self.pos], self.y[self.pos] = x, y
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)
        self.total += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) oldest first."""
        if self.size < self.capacity:
            return self.x[: self.size].copy(), self.y[: self.size].copy()
        order = np.roll(np.arange(self.capacity), -self.pos)
        return self.x[order], self.y[order]

    def state_dict(self) -> dict[str, Any]:
        x, y = self.arrays()
        return {"capacity": self.capacity, "x": x, "y": y, "total": self.total}

    @classmethod
    def from_state(cls, s: dict[str, Any]) -> "RingSeries":
        r = cls(s["capacity"])
        for x, y in zip(np.asarray(s["x"]), np.asarray(s["y"])):
            r.append(float(x), float(y))
        r.total = int(s["total"])
        return r


class DomainEMA:
    """Bias-corrected EMAs of one scalar per domain (Kingma & Ba 2015, sec. 3)."""

    def __init__(self, decay: float = 0.9):
        if not 0 <= decay < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}.")
        self.decay = float(decay)
        self.ema = np.zeros(0)
        self.k = np.zeros(0, dtype=np.int64)

    def _fit(self, d: int) -> None:
        if d > len(self.ema):
            self.ema = np.concatenate([self.ema, np.zeros(d - len(self.ema))])
            self.k = np.concatenate([self.k, np.zeros(d - len(self.k), dtype=np.int64)])

    def update(self, domain_idx: np.ndarray, values: np.ndarray) -> None:
        domain_idx = np.asarray(domain_idx, dtype=np.int64)
        if domain_idx.size:
            self._fit(int(domain_idx.max()) + 1)
        self.ema[domain_idx] = self.decay * self.ema[domain_idx] + (1 - self.decay) * np.asarray(values)
        self.k[domain_idx] += 1

    def value(self, d: int) -> float:
        if d >= len(self.k) or self.k[d] == 0:
            return float("nan")
        return float(self.ema[d] / (1 - self.decay ** self.k[d]))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "ema": self.ema.copy(), "k": self.k.copy()}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.decay, self.ema, self.k = float(s["decay"]), np.asarray(s["ema"], float), np.asarray(s["k"], np.int64)


# -----------------------------------------------------------------------------
# logit-level scores (torch) and offline helpers


def sequence_scores(logits, targets, ignore_index: int = -100, el2n: bool = True):
    """Per-sequence mean token loss and EL2N from logits (torch).

    logits (B, T, V), targets (B, T) long; tokens with target == ignore_index are left out.
    loss_b = mean_t -log p(y_t); el2n_b = mean_t || softmax(z_t) - onehot(y_t) ||_2
    (Paul et al. 2021 eq. 2), using ||p - e_y||^2 = sum_v p_v^2 - 2 p_y + 1.
    Returns (loss (B,), el2n (B,) or None, n_tokens (B,)), float32; a sequence without
    targets gets loss 0 and el2n 0."""
    import torch

    B, T, V = logits.shape
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    valid = targets != ignore_index  # (B, T)
    tgt = torch.where(valid, targets, torch.zeros_like(targets))
    logp_y = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)  # (B, T)
    w = valid.float()
    n_tok = w.sum(-1)  # (B,)
    denom = n_tok.clamp(min=1)
    loss = -(logp_y * w).sum(-1) / denom  # (B,)
    out_el2n = None
    if el2n:
        p = logp.exp()
        sq = (p * p).sum(-1) - 2 * logp_y.exp() + 1  # (B, T)
        out_el2n = (sq.clamp(min=0).sqrt() * w).sum(-1) / denom
    return loss, out_el2n, n_tok


def reducible_loss(loss, reference_loss):
    """RHO-LOSS reducible loss (Mindermann et al. 2022, eq. 3): training loss minus the
    irreducible loss a reference model reaches on the same example."""
    return np.asarray(loss, dtype=np.float64) - np.asarray(reference_loss, dtype=np.float64)


def domain_curves(metrics, domain: str):
    """Loss curves of one domain from a run's metrics DataFrame (``Run.metrics``): columns
    step, tokens (train/tokens), train_ema (difficulty/<d>/loss), probe (difficulty/<d>/probe_loss),
    val (val/<d>/loss), learnability; rows where any of them is present."""
    import pandas as pd

    cols = {"tokens": "train/tokens", "train_ema": f"difficulty/{domain}/loss",
            "probe": f"difficulty/{domain}/probe_loss", "val": f"val/{domain}/loss",
            "learnability": f"difficulty/{domain}/learnability"}
    out = pd.DataFrame({"step": metrics["step"]})
    for k, c in cols.items():
        out[k] = metrics[c] if c in metrics.columns else np.nan
    keep = out[["train_ema", "probe", "val"]].notna().any(axis=1)
    return out[keep].reset_index(drop=True)
