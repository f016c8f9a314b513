"""Evaluation of the built-in loop: the fixed validation set, the per-domain validation loss, and the
evaluation at every sequence length with the loss by position (docs/long_context.md).

Two evaluations, one ``Evaluator``:

- ``val/<domain>/loss`` at L0 (the first phase's seq_len) on the fixed validation set, at step 0, every
  ``eval_every`` steps, at each phase start and at the end (as before long context was measured).
- At every length L in ``eval_lengths(cfg)`` (L0, every other distinct phase seq_len, the ``[data]
  eval_lengths`` extras): ``val_len/<L>/<domain>/loss``, ``val_len/<L>/loss`` and the loss by position
  (``val_pos/<L>/near_loss``, ``far_loss``, ``gap``, ``slope``; the array ``val_pos_<L>_step_<N>``), at each
  phase boundary (a phase's first step after the first phase: the state at the end of the phase before),
  at the final step and every ``[data] eval_lengths_every`` steps when that is > 0. At L0 it reuses the
  validation set (one forward pass gives both); at a longer L it uses held-out chunks of half its tokens
  per domain (``LONG_TOKEN_FRACTION``: ``eval_batch_size * eval_batches * L0 / (2 L)`` sequences, at least
  one), so that the evaluation at every length stays a small part of training (benchmarks/long_context_cost.py).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from diagnostics.stats import ols_slope
from midtrain import data as data_mod
from midtrain.config import TrainConfig

POSITION_BUCKETS = 16  # equal-width position buckets of the loss-by-position arrays (fewer when L < 16)
# tokens per domain of the set at a length L > L0, as a fraction of the L0 set's: the set is fixed, so the
# curves over training compare like with like; half keeps 3 due steps of the default run under 2% of training
LONG_TOKEN_FRACTION = 0.5


def val_batches(cfg: TrainConfig, corpus) -> dict[str, list]:
    """The fixed evaluation set: ``eval_batches`` validation batches per domain at the first phase's seq_len."""
    eval_seq = cfg.phases[0].seq_len
    return {d: data_mod.val_batches(corpus, d, eval_seq, cfg.data.eval_batch_size, cfg.data.eval_batches)
            for d in corpus.names()}


def eval_lengths(cfg: TrainConfig) -> list[int]:
    """The lengths evaluated at phase boundaries: L0 (the first phase's seq_len) first, then every other
    distinct phase seq_len and ``[data] eval_lengths`` extra, ascending."""
    l0 = cfg.phases[0].seq_len
    return [l0] + sorted(({p.seq_len for p in cfg.phases} | set(cfg.data.eval_lengths)) - {l0})


def length_batches(cfg: TrainConfig, corpus) -> dict[int, dict[str, list]]:
    """Held-out batches at every length of ``eval_lengths`` but L0 (which reuses ``val_batches``): per
    domain, ``LONG_TOKEN_FRACTION * eval_batch_size * eval_batches * L0 / L`` evenly spaced validation chunks
    (at least one). A domain whose validation split is shorter than L + 1 tokens is
    left out at that length and one warning says so (and where fewer chunks than asked exist); a length
    no domain can serve is dropped (same warning). Training is never refused for it."""
    l0, d = cfg.phases[0].seq_len, cfg.data
    out, notes = {}, []
    for L in eval_lengths(cfg)[1:]:
        n_seq = max(1, int(LONG_TOKEN_FRACTION * d.eval_batch_size * d.eval_batches * l0 / L))
        bs = min(d.eval_batch_size, n_seq)
        sets = {}
        for name in corpus.names():
            try:
                sets[name] = data_mod.val_batches(corpus, name, L, bs, math.ceil(n_seq / bs))
            except data_mod.DataError as e:
                notes.append(f"length {L}: domain {name!r} left out ({e})")
                continue
            got = sum(b.size for b in sets[name])
            if got < n_seq:
                notes.append(f"length {L}: domain {name!r} has {got} validation chunks of {n_seq} asked")
        if sets:
            out[L] = sets
        else:
            notes.append(f"length {L}: no domain has L + 1 = {L + 1} validation tokens; not evaluated")
    if notes:
        warnings.warn("evaluation at every length: " + "; ".join(notes) + ".", UserWarning, stacklevel=2)
    return out


@torch.no_grad()
def position_sums(model, batches: list, device, autocast) -> tuple[np.ndarray, np.ndarray]:
    """(summed next-token loss, token count) per position, float64 arrays of length T, over ``batches``
    (targets -1 are ignored)."""
    tot = cnt = None
    for b in batches:
        b = b.to(device)
        with autocast:
            logits, _ = model(b.x)
        y = b.y
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1,
                               reduction="none").view(y.shape)  # (B, T)
        s, c = loss.double().sum(0).cpu().numpy(), (y != -1).sum(0).double().cpu().numpy()
        tot, cnt = (s, c) if tot is None else (tot + s, cnt + c)
    return tot, cnt


def _mean_loss(s: np.ndarray, c: np.ndarray) -> float:
    """Token-weighted mean loss from per-position loss sums and token counts (0 tokens: 0)."""
    return float(s.sum()) / max(1.0, float(c.sum()))


@torch.no_grad()
def evaluate(model, val: dict[str, list], device, autocast) -> dict[str, float]:
    """Token-weighted mean val loss per domain: ``{"val/<domain>/loss": float}``."""
    was_training = model.training
    model.eval()
    try:
        out = {}
        for name, batches in val.items():
            out[f"val/{name}/loss"] = _mean_loss(*position_sums(model, batches, device, autocast))
    finally:
        model.train(was_training)
    return out


def bucket_edges(L: int, n_buckets: int = POSITION_BUCKETS) -> np.ndarray:
    """``n + 1`` integer edges of ``n = min(n_buckets, L)`` equal-width position buckets over [0, L)."""
    n = min(n_buckets, L)
    return (np.arange(n + 1) * L) // n


def position_summary(L: int, l0: int, sums: dict[str, tuple[np.ndarray, np.ndarray]],
                     n_buckets: int = POSITION_BUCKETS) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """The loss by position at length ``L`` from per-domain (loss sum, count) per position: the scalars
    ``val_len/<L>/<domain>/loss``, ``val_len/<L>/loss`` (mean over domains), ``val_pos/<L>/near_loss``
    (positions < l0, all domains pooled token-weighted), ``far_loss`` (positions >= l0, when L > l0),
    ``gap`` (far - near) and ``slope`` (OLS slope of the bucket losses against log2 of the bucket's mean
    context length, position + 1: loss change per doubling of the context), and the arrays (bucket_start,
    bucket_end, loss, tokens, loss_<domain>)."""
    out: dict[str, float] = {}
    for name, (s, c) in sums.items():
        out[f"val_len/{L}/{name}/loss"] = _mean_loss(s, c)
    out[f"val_len/{L}/loss"] = float(np.mean([out[f"val_len/{L}/{n}/loss"] for n in sums]))
    S = np.sum([s for s, _ in sums.values()], axis=0)
    C = np.sum([c for _, c in sums.values()], axis=0)
    near = min(l0, L)
    out[f"val_pos/{L}/near_loss"] = _mean_loss(S[:near], C[:near])
    if L > l0:
        out[f"val_pos/{L}/far_loss"] = _mean_loss(S[l0:], C[l0:])
        out[f"val_pos/{L}/gap"] = out[f"val_pos/{L}/far_loss"] - out[f"val_pos/{L}/near_loss"]
    edges = bucket_edges(L, n_buckets)
    start, end = edges[:-1], edges[1:]
    bs, bc = np.add.reduceat(S, start), np.add.reduceat(C, start)
    loss = np.where(bc > 0, bs / np.maximum(bc, 1.0), np.nan)
    arrays = {"bucket_start": start, "bucket_end": end, "loss": loss, "tokens": bc}
    for name, (s, c) in sums.items():
        ds, dc = np.add.reduceat(s, start), np.add.reduceat(c, start)
        arrays[f"loss_{name}"] = np.where(dc > 0, ds / np.maximum(dc, 1.0), np.nan)
    ok = np.isfinite(loss)
    if ok.sum() >= 2:
        out[f"val_pos/{L}/slope"] = ols_slope(np.log2((start + end + 1) / 2.0)[ok], loss[ok])[0]
    return out, arrays


class Evaluator:
    """What the loop evaluates and when (module docstring); built before anything is written, so a domain
    too short for L0 is refused (``data_mod.DataError``) and one too short for a longer length is warned
    about before the run directory exists."""

    def __init__(self, cfg: TrainConfig, corpus):
        self.val = val_batches(cfg, corpus)
        self.longer = length_batches(cfg, corpus)
        self.l0 = cfg.phases[0].seq_len
        self.eval_every = cfg.eval_every
        self.every_len = cfg.data.eval_lengths_every
        starts = cfg.phase_starts()
        self.phase_starts, self.boundaries = set(starts), set(starts[1:])

    def due(self, step: int) -> bool:
        """Whether ``step`` evaluates anything (before its update)."""
        return step % self.eval_every == 0 or step in self.phase_starts or self.lengths_due(step)

    def lengths_due(self, step: int) -> bool:
        return step in self.boundaries or (self.every_len > 0 and step % self.every_len == 0)

    @torch.no_grad()
    def __call__(self, model, step: int, device, autocast, writer=None, *, final: bool = False) -> dict[str, float]:
        """The records of the evaluation at ``step`` (``val/...``; at every length too when due or
        ``final``); the loss-by-position arrays go to ``writer`` (rank 0's RunWriter; None: not saved)."""
        if not (final or self.lengths_due(step)):
            return evaluate(model, self.val, device, autocast)
        was_training = model.training
        model.eval()
        try:
            at_l0 = {d: position_sums(model, b, device, autocast) for d, b in self.val.items()}
            out = {f"val/{d}/loss": _mean_loss(s, c) for d, (s, c) in at_l0.items()}
            for L, sums in [(self.l0, at_l0)] + [
                    (L, {d: position_sums(model, b, device, autocast) for d, b in sets.items()})
                    for L, sets in self.longer.items()]:
                scalars, arrays = position_summary(L, self.l0, sums)
                out.update(scalars)
                if writer is not None:
                    writer.save_array(f"val_pos_{L}_step_{step}", **arrays)
        finally:
            model.train(was_training)
        return out
