"""Streaming state of curriculum difficulty: the per-example table and small bounded series.

Vectorised numpy, bounded memory, resumable (``state_dict``); used by ``hooks.DifficultyTracker``
and public through ``diagnostics.difficulty`` (import from there). Definitions: docs/difficulty.md.

    ExampleTable  one row per example id: visits, Welford mean/M2 of the loss and of the
                  confidence exp(-loss) (Welford 1962; Chan et al. 1979), first/last loss,
                  learned flag, forgetting events (Toneva et al. 2019, arXiv 1812.05159);
                  a deterministic hash sample bounds the rows.
    IdIndex       id -> row map: vectorised open addressing on splitmix64-mixed ids.
    RingSeries    the last ``capacity`` (x, y) points of a curve.

The per-domain loss EMAs are ``diagnostics.stats.BiasCorrectedEMA`` (one per domain, in the hook);
``emas_from_state`` reads their checkpointed state (and the former ``DomainEMA`` layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from diagnostics.stats import BiasCorrectedEMA

__all__ = ["ExampleTable", "UpdateStats", "IdIndex", "hash_ids", "RingSeries", "emas_from_state"]

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
    replacement may hold an example twice), and rows are kept in order of first visit, so the
    table equals one-at-a-time updates however the visits are grouped into ``update`` calls.
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
        if n_new:  # rows in order of first visit, so the table does not depend on how updates are grouped
            new_u = np.flatnonzero(new)
            new_u = new_u[np.argsort(first[new_u], kind="stable")]
            new_slots = np.arange(self.n, self.n + n_new)
            self._grow(self.n + n_new)
            for c in self.cols.values():
                c[new_slots] = 0
            self.cols["id"][new_slots] = uniq[new_u]
            self.cols["domain"][new_slots] = doms[first[new_u]]
            self.index.insert(uniq[new_u], new_slots)
            slot_u[new_u] = new_slots
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


def emas_from_state(s: Mapping[str, Any]) -> tuple[float, dict[int, BiasCorrectedEMA]]:
    """(decay, {domain: BiasCorrectedEMA}) from the "ema" entry of a DifficultyTracker state, in
    either layout:

    version 2: {"decay", "domains": {d: BiasCorrectedEMA.state_dict()}};
    version 1 (checkpoints written before the tracker used BiasCorrectedEMA, by the former
    ``DomainEMA``): {"decay", "ema": (D,) biased EMAs m_d, "k": (D,) update counts}. It holds the
    same two numbers per domain (m = BiasCorrectedEMA.biased, k = n_updates); domains with k = 0
    were never updated and get no EMA. The checkpoint's decay wins over the constructor's, as before."""
    decay = float(s["decay"])
    if "domains" in s:
        emas = {}
        for d, es in s["domains"].items():
            emas[int(d)] = e = BiasCorrectedEMA(decay)
            e.load_state_dict(es)
        return decay, emas
    m, k = np.asarray(s["ema"], dtype=np.float64), np.asarray(s["k"], dtype=np.int64)
    if m.shape != k.shape or m.ndim != 1:
        raise ValueError(f"malformed per-domain EMA state (ema {m.shape}, k {k.shape}).")
    emas = {}
    for d in np.flatnonzero(k).tolist():
        emas[d] = e = BiasCorrectedEMA(decay)
        e.load_state_dict({"decay": decay, "biased": float(m[d]), "n_updates": int(k[d])})
    return decay, emas
