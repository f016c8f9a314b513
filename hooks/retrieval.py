"""RetrievalProbe: does the model use context d tokens back? A passkey probe without generation.

For each context length L and depth d, ``n_keys`` random keys of ``key_len`` tokens (drawn once, from
a seeded generator) are planted d tokens before their repeat at the end of held-out text of the run's
own domains; the mean loss on the repeated key's tokens 2..K with the key planted earlier, against
the same contexts where the earlier occurrence is replaced by other random tokens, gives the
**retrieval gain** = unplanted - planted (nats). The layout and the math are
``diagnostics.retrieval`` (docs/retrieval.md); planted and unplanted contexts of all depths of one
length go through the model in one no-grad, eval-mode forward (``batch_size`` splits it).

    probe = RetrievalProbe(val_ids, lengths=[256], depths=[16, 64, 128, 200], every=50, far_from=128)
    monitor = Monitor(model, [probe], run_dir="runs/demo")      # probes at the step's start

The model is called as ``model(x)`` with x (B, L) token ids and must return logits (B, L, V), or a
tuple / dict / ``ModelOutput`` whose first tensor they are. Metric keys (docs/run_directory.md):

    retrieval/<L>/depth_<d>/gain    unplanted - planted loss of the repeated key (nats)
    retrieval/<L>/gain              mean over the depths measured at length L
    retrieval/gain_far              mean gain over depths >= far_from at the longest length (with far_from)
    retrieval/probe_time_s          wall time of the whole probe

and, with a run writer, the array ``retrieval_step_<N>``: ``lengths`` (nL,), ``depths`` (nD,: every
depth measured at some length), ``gain``, ``planted``, ``unplanted`` (nL, nD; NaN where a depth does
not fit a length), ``key_len`` and ``n_keys``.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Iterable, Optional, Union

import numpy as np
import torch
import torch.nn as nn

from diagnostics.retrieval import check_depths, draw_keys, key_logits, plant_keys, repeated_key_loss, retrieval_gain
from hooks._common import first_tensor, run_writer, unwrap
from hooks.monitor import Hook, probe_role

__all__ = ["RetrievalProbe", "default_depths"]

Data = Union[torch.Tensor, dict, Callable[[int], Any]]


def default_depths(length: int, key_len: int = 8, n_depths: int = 6, min_depth: int = 16) -> list[int]:
    """``n_depths`` depths evenly spaced from ``min_depth`` (at least ``key_len``) to ``length - key_len``,
    rounded to whole tokens (duplicates dropped)."""
    hi = length - key_len
    lo = max(key_len, min(min_depth, hi))
    if n_depths < 1:
        raise ValueError(f"n_depths must be >= 1, got {n_depths}")
    if n_depths == 1:
        return [hi]
    return sorted({int(round(v)) for v in np.linspace(lo, hi, n_depths)})


def _as_ids(t: Any, where: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(np.asarray(t))
    if t.is_floating_point() or t.is_complex() or t.dim() != 2:
        raise ValueError(f"{where}: held-out text must be a 2-D tensor of integer token ids (N, T), got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    return t.detach().cpu().long()


def _contexts(data: Data, length: int, n_keys: int) -> torch.Tensor:
    """(n_keys, length) held-out token ids: the first ``length`` tokens of the sequences, domains taken
    in turn (round robin), sequences reused when there are fewer than ``n_keys``."""
    got = data(length) if callable(data) and not isinstance(data, torch.Tensor) else data
    parts = got if isinstance(got, dict) else {None: got}
    seqs = []
    for name, t in parts.items():
        where = "data" if name is None else f"data of domain {name!r}"
        t = _as_ids(t, where)
        if t.shape[0] == 0:
            continue
        if t.shape[1] < length:
            raise ValueError(f"{where}: sequences of {t.shape[1]} tokens are shorter than the context length "
                             f"{length}; give longer held-out sequences or a shorter length")
        seqs.append(t[:, :length])
    if not seqs:
        raise ValueError(f"no held-out sequence for length {length}: the data are empty")
    rows = [s[i] for i in range(max(len(s) for s in seqs)) for s in seqs if i < len(s)]  # round robin
    return torch.stack([rows[i % len(rows)] for i in range(n_keys)])


class RetrievalProbe(Hook):
    """Retrieval gain by context length and depth (module docstring for keys and array).

    Args:
        data: held-out token ids: a (N, T) tensor, a dict domain -> (N_d, T_d) tensor (keys go to the
            domains in turn), or a callable ``length -> either``, called once per length at set-up.
            Each context is the first L tokens of a sequence (T >= L).
        lengths: context lengths L to probe.
        depths: distances d from each repeated key token back to its planted copy; at each length the
            depths with key_len <= d <= L - key_len are probed (a depth that fits no length, or is
            below key_len, is a ValueError). None: per length, ``default_depths(L, key_len,
            n_depths, min_depth)``.
        key_len, n_keys: tokens per key; keys (and contexts) averaged per (L, d).
        key_tokens: the token ids keys are drawn from (None: every id that occurs in the contexts).
        every, steps: probe at steps divisible by ``every`` (None: never) and at the given ``steps``.
        far_from: depths >= this count as "far" for ``retrieval/gain_far`` (e.g. the first phase's
            sequence length); None: not reported.
        batch_size: sequences per forward (None: one forward per length).
        autocast: bf16 autocast on CUDA (None: on when the model is on CUDA).
        seed: the keys' generator. save_arrays, writer: where ``retrieval_step_<N>`` goes.
        model: attach without a Monitor (then call ``probe``).
    """

    name = "retrieval"

    def __init__(self, data: Data, lengths: Iterable[int], depths: Optional[Iterable[int]] = None, *,
                 key_len: int = 8, n_keys: int = 4, n_depths: int = 6, min_depth: int = 16,
                 key_tokens: Optional[Any] = None, every: Optional[int] = 100, steps: Iterable[int] = (),
                 far_from: Optional[int] = None, batch_size: Optional[int] = None, autocast: Optional[bool] = None,
                 seed: int = 0, save_arrays: bool = True, writer: Any = None, model: Optional[nn.Module] = None):
        for k, v in (("key_len", key_len), ("n_keys", n_keys), ("n_depths", n_depths), ("min_depth", min_depth)):
            if isinstance(v, bool) or not isinstance(v, int) or v < (2 if k == "key_len" else 1):
                raise ValueError(f"{k} must be an integer >= {2 if k == 'key_len' else 1}, got {v!r}")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
            raise ValueError(f"every must be a positive integer or None, got {every!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
        lengths = sorted({int(L) for L in lengths})
        if not lengths:
            raise ValueError("lengths is empty: give the context lengths to probe")
        short = [L for L in lengths if L < 2 * key_len]
        if short:
            raise ValueError(f"length(s) {short} cannot hold a key of {key_len} tokens and its repeat "
                             f"(need >= {2 * key_len})")
        self.key_len, self.n_keys, self.seed = key_len, n_keys, seed
        self.every, self.steps = every, frozenset(int(s) for s in steps)
        self.far_from, self.batch_size, self.autocast = far_from, batch_size, autocast
        self.save_arrays, self.writer = save_arrays, writer
        if depths is None:
            self.depths = {L: default_depths(L, key_len, n_depths, min_depth) for L in lengths}
        else:
            depths = list(depths)
            self.depths = {L: check_depths(L, key_len, depths) for L in lengths}
            fits = set().union(*self.depths.values())
            lost = sorted({int(d) for d in depths} - fits)
            if lost:
                raise ValueError(f"depth(s) {lost} fit no context length: at length L a depth must be <= L - "
                                 f"key_len = {max(lengths) - key_len} for the longest ({max(lengths)})")
        self.lengths = lengths
        ctx = {L: _contexts(data, L, n_keys) for L in lengths}
        pool = torch.cat([c.reshape(-1) for c in ctx.values()]) if key_tokens is None else _pool(key_tokens)
        self.keys, self.others = draw_keys(n_keys, key_len, pool, seed)
        self.inputs = {L: plant_keys(ctx[L], self.keys, self.others, self.depths[L]).reshape(-1, L) for L in lengths}
        self.history: list[dict[str, Any]] = []
        self._early: Optional[tuple[int, dict]] = None
        self.model: Optional[nn.Module] = None
        self._monitor = None  # the Monitor attached to: its ``sharded`` decides the probe's role
        if model is not None:
            self.model = unwrap(model)

    # -- wiring ----------------------------------------------------------------------------------
    @property
    def role(self) -> str:
        """``hooks.monitor.probe_role``: "measure", "forward" (a sharded model's other rank: forwards only) or "skip"."""
        return probe_role(self._monitor)

    def attach(self, model, monitor) -> None:
        self._monitor = monitor
        if model is not None:
            self.model = unwrap(model)
        if self.writer is None:
            self.writer = run_writer(monitor)

    def set_writer(self, writer) -> None:
        self.writer = writer

    def scheduled(self, step: int) -> bool:
        if self.role == "skip":
            return False  # DDP: rank 0 measures, the others train on (sharded: every rank runs the forwards)
        return step in self.steps or (self.every is not None and step % self.every == 0)

    def on_step_begin(self, step: int) -> None:
        """Probe before the step's update (the state the loop's validation of this step sees)."""
        self._early = (step, self.probe(step)) if self.scheduled(step) else None

    def on_step_end(self, step: int, scalars: dict) -> dict[str, float]:
        early, self._early = self._early, None
        if early is not None and early[0] == step:
            return early[1]
        return self.probe(step) if self.scheduled(step) else {}  # no on_step_begin: after the update

    # -- the probe -------------------------------------------------------------------------------
    def probe(self, step: Optional[int] = None) -> dict[str, float]:
        """Run one probe now; returns the metrics (with ``step``: also kept in ``history`` and saved)."""
        if self.model is None:
            raise RuntimeError("RetrievalProbe has no model: add it to a Monitor or pass model=...")
        t0 = time.perf_counter()
        model = self.model
        device = next(model.parameters(), torch.zeros(())).device
        use_amp = self.autocast if self.autocast is not None else device.type == "cuda"
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
        modes = [(m, m.training) for m in model.modules()]
        res = {}
        try:
            model.eval()
            with torch.no_grad(), amp:
                for L in self.lengths:
                    res[L] = retrieval_gain(self._losses(model, L, device))
        finally:
            for m, was in modes:
                m.training = was
        if self.role == "forward":  # another rank of a sharded model: its forwards were its part
            return {}
        out = self._metrics(res)
        if step is not None:
            self._record(int(step), out, res)
        out["retrieval/probe_time_s"] = time.perf_counter() - t0
        return out

    def _losses(self, model: nn.Module, L: int, device) -> torch.Tensor:
        """(2, n_depths, n_keys) repeated-key losses at length L, from the model's logits."""
        x = self.inputs[L]
        K, V0 = self.key_len, int(self.keys.max()) + 1
        bs = self.batch_size or x.shape[0]
        parts = []
        for i in range(0, x.shape[0], bs):
            xb = x[i:i + bs].to(device)
            logits = first_tensor(model(xb))
            if (logits is None or not torch.is_floating_point(logits) or logits.dim() != 3
                    or tuple(logits.shape[:2]) != tuple(xb.shape) or logits.shape[-1] < V0):
                shape = None if logits is None else tuple(logits.shape)
                raise ValueError(f"the model's output {shape} is not logits (B, L, V) = ({xb.shape[0]}, {L}, >= "
                                 f"{V0}) for input ids {tuple(xb.shape)}: RetrievalProbe needs model(x) -> logits "
                                 "or a tuple whose first element they are")
            parts.append(key_logits(logits, K))
            del logits
        lk = torch.cat(parts).reshape(2, len(self.depths[L]), self.n_keys, K - 1, -1)
        return repeated_key_loss(lk, self.keys).cpu()

    def _metrics(self, res: dict) -> dict[str, float]:
        out: dict[str, float] = {}
        for L, r in res.items():
            for d, g in zip(self.depths[L], r["gain"].tolist()):
                out[f"retrieval/{L}/depth_{d}/gain"] = g
            out[f"retrieval/{L}/gain"] = float(r["gain"].mean())
        if self.far_from is not None:
            L = self.lengths[-1]
            far = [g for d, g in zip(self.depths[L], res[L]["gain"].tolist()) if d >= self.far_from]
            if far:
                out["retrieval/gain_far"] = float(np.mean(far))
        return out

    def _record(self, step: int, out: dict, res: dict) -> None:
        self.history = [h for h in self.history if h["step"] < step]  # resumed / branched: forget later steps
        self.history.append({"step": step, **out})
        if not (self.save_arrays and self.writer is not None):
            return
        depths = sorted(set().union(*(self.depths[L] for L in self.lengths)))
        grid = {k: np.full((len(self.lengths), len(depths)), np.nan) for k in ("gain", "planted", "unplanted")}
        for i, L in enumerate(self.lengths):
            for k in grid:
                for d, v in zip(self.depths[L], res[L][k].tolist()):
                    grid[k][i, depths.index(d)] = v
        prefix = "retrieval" if self.name == type(self).name else self.name  # a second probe keeps its own
        self.writer.save_array(f"{prefix}_step_{step}", lengths=np.array(self.lengths), depths=np.array(depths),
                               key_len=np.array(self.key_len), n_keys=np.array(self.n_keys), **grid)

    # -- state -----------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """The latest probe's gains (``retrieval/*`` without the probe time)."""
        if not self.history:
            return {}
        return {k: v for k, v in self.history[-1].items() if k.startswith("retrieval/")}

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state.get("history", [])]


def _pool(key_tokens: Any) -> torch.Tensor:
    t = torch.as_tensor(key_tokens).reshape(-1)
    if t.is_floating_point():
        raise ValueError("key_tokens must be integer token ids")
    return t.long()
