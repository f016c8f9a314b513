"""DifficultyTracker: per-example and per-domain difficulty and learnability during training.

What it follows (definitions and references in docs/difficulty.md; the math is in
``diagnostics.difficulty``):

- a streaming per-example table (id, domain, visits, Welford mean/M2 of the loss and of the
  confidence exp(-loss), first/last loss, learned flag, forgetting events) in bounded memory:
  Data Maps (Swayamdipta et al. 2020) and forgetting events (Toneva et al. 2019);
- per-domain bias-corrected EMAs of the training loss and the learnability of each domain:
  the slope of loss against ln(tokens of that domain) over a recent window, with its
  standard error and a diminishing-returns test;
- every ``probe_every`` steps, a fixed probe set per domain (including domains that only
  later phases train on) scored under ``no_grad`` in eval mode: mean loss, fraction learned,
  EL2N (Paul et al. 2021) and, with a reference model, the RHO-LOSS reducible loss
  (Mindermann et al. 2022). It is scored at the step's start (``on_step_begin``), before the
  step's optimizer update -- the parameters the built-in loop's validation at that step sees, so
  ``difficulty/<d>/probe_loss`` and ``val/<d>/loss`` of one record compare one model -- and
  reported with the step's other metrics at ``on_step_end``.

Any loop (the Monitor's events are marked)::

    tracker = DifficultyTracker(domain_names=["prose", "code"], probe={"prose": P0, "code": P1})
    monitor = Monitor(model, [tracker], run_dir="runs/demo")
    for step in range(steps):
        logits = model(x)                                  # (B, T, V)
        losses = per_example_loss(logits, y)               # (B,) token-weighted per sequence
        losses.mean().backward()
        monitor.on_backward_end(len(x), losses=losses.detach(), ids=ids, domains=doms)  # <--
        monitor.on_grads_ready(); opt.step(); opt.zero_grad()
        monitor.on_step_end(step, loss=losses.mean(), tokens=tokens_so_far)            # <--

(On a probe step the Monitor's step start -- ``monitor.on_step_begin(step)``, or else the first
``on_backward_end`` -- scores the probe set before the update.)

``P0`` is a (N, T+1) long tensor of token ids: x = P[:, :-1], y = P[:, 1:]. The built-in loop
builds probes from the corpus's validation split (``midtrain.hookset``).

Metrics (the public schema; <d> is a domain name). The per-step inputs stay queued on the device
and are applied (exactly, step by step) every ``stats_every`` steps, when the training-stream
metrics are reported; probe metrics come every ``probe_every`` steps:

    difficulty/<d>/loss                 bias-corrected EMA of the domain's per-example train loss
    difficulty/<d>/learnability         -dL/dln(domain tokens) over the last ``window`` steps (nats;
                                        every ``stats_every`` steps)
    difficulty/<d>/learnability_se      its standard error
    difficulty/<d>/diminishing          1.0 when the decrease is not significant at ``level``
    difficulty/<d>/probe_loss           mean per-token loss on the domain's probe set (before the
                                        step's update, as val/<d>/loss)
    difficulty/<d>/probe_learnability   -dL/dln(total tokens) of probe_loss over the probe history
    difficulty/<d>/frac_learned         fraction of probe sequences with loss < learned_loss
    difficulty/<d>/el2n                 mean EL2N score of the probe sequences
    difficulty/<d>/reducible_loss       mean(probe loss - reference loss) (only with a reference)
    difficulty/frac_forgotten           examples with >= 1 forgetting event / examples that could have one
    difficulty/examples_tracked         rows in the per-example table
    difficulty/sample_rate              fraction of ids the bounded table keeps (1.0 until it is full)
    difficulty/nan_losses               non-finite per-example losses skipped so far
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from diagnostics.difficulty import (ExampleTable, RingSeries, data_map_regions, emas_from_state, learnability,
                                    sequence_scores)
from diagnostics.stats import BiasCorrectedEMA
from hooks._common import domain_indices, run_writer, warn_once
from hooks._difficulty_scoring import score_sequences
from hooks.monitor import Hook, probe_role

__all__ = ["DifficultyTracker", "per_example_loss"]


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                     shift: bool = False) -> torch.Tensor:
    """Token-weighted per-sequence losses (B,) from logits, for loops that only have logits.

    logits (B, T, V); labels (B, T); tokens whose label is ``ignore_index`` are left out and
    each sequence's loss is the mean over its remaining tokens (0 if none remain).
    ``shift=True`` for Hugging Face causal LMs, whose labels are the inputs: logits[:, :-1]
    then predict labels[:, 1:]. Differentiable (can be the training loss too)."""
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"per_example_loss needs logits (B, T, V) and labels (B, T), got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}.")
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    loss, _, _ = sequence_scores(logits, labels, ignore_index=ignore_index, el2n=False)
    return loss  # (B,)


def _to_numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64 if dtype == np.float64 else torch.int64).numpy()
    return np.asarray(x, dtype=dtype)


def _length(x, what: str) -> int:
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    if len(shape) != 1:
        raise ValueError(f"DifficultyTracker needs per-example {what} of shape (B,), got shape {shape}"
                         + ("; compute per-sequence losses (reduction='none' or hooks.per_example_loss)."
                            if what == "losses" else "."))
    return shape[0]


class DifficultyTracker(Hook):
    """Per-example and per-domain difficulty and learnability (metric table in the module doc).

    Args:
        domain_names: names of the domain indices passed as ``domains`` (default "domain<i>";
            with ``domains=None`` every example is in domain 0, named "all" by default).
            ``domains`` may also be names: a name's index is its position here, a new name is
            appended (order of first appearance).
        probe: {domain name: (N, T+1) long tensor of token ids}, fixed probe sequences scored
            every ``probe_every`` steps (also for domains not trained on yet).
        learned_loss: per-token loss (nats) below which an example counts as learned
            (frac_learned, correctness, forgetting events). 1.0 means a geometric-mean target
            probability of e^-1 = 0.37 per token.
        ema_decay: decay of the per-domain training-loss EMAs.
        window: steps (points) per domain in the learnability regression.
        level: significance level of the diminishing-returns test.
        reference: a fixed reference model (same tokenizer) for the reducible loss -- a module,
            or a zero-argument callable returning one (loaded at the first probe and moved to
            the trained model's device; ``midtrain.hookset`` passes a checkpoint loader). A
            reference that cannot be loaded or run is warned about once (RuntimeWarning, reason
            kept in ``reference_error``) and dropped: reducible_loss is then not reported, every
            other signal continues.
        max_examples: row budget of the per-example table (bounded memory, see ExampleTable).
        track_examples: False keeps only per-domain signals.
        writer: anything with ``save_array(name, **arrays)`` (diagnostics.RunWriter; default:
            the run store of the Monitor the hook is attached to, if it has one) -- or
        save_fn: a callback ``save_fn(name, **arrays)``; the table is saved as
            ``arrays/<array_name>.npz`` every ``save_every`` steps and when the hook detaches.
        probe_batch_size: sequences per probe forward pass.
        autocast: bf16 autocast for probe forwards (default: on CUDA only).
        ignore_index: target value ignored in probe scoring.
        min_points: points a domain needs before its learnability is reported.
        stats_every: steps between reports of the training-stream metrics (EMAs, learnability, table
            counts). In between, each step's losses, ids and domains stay queued on the device;
            they are applied step by step (same numbers as per-step updates) with one host copy.
    """

    name = "difficulty"

    def __init__(self, domain_names=None, probe: Mapping[str, torch.Tensor] | None = None, probe_every: int = 100,
                 learned_loss: float = 1.0, ema_decay: float = 0.9, window: int = 200, level: float = 0.05,
                 reference: torch.nn.Module | Callable[[], torch.nn.Module] | None = None, max_examples: int | None = 1_000_000,
                 track_examples: bool = True, writer=None, save_fn: Callable[..., Any] | None = None,
                 save_every: int | None = None, array_name: str | None = None,
                 probe_batch_size: int = 32, autocast: bool | None = None, ignore_index: int = -1,
                 min_points: int = 8, stats_every: int = 10):
        for k, v in (("probe_every", probe_every), ("window", window), ("probe_batch_size", probe_batch_size),
                     ("stats_every", stats_every)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"DifficultyTracker: {k} must be a positive integer, got {v!r}.")
        if save_every is not None and (not isinstance(save_every, int) or save_every < 1):
            raise ValueError(f"DifficultyTracker: save_every must be a positive integer or None, got {save_every!r}.")
        if not 0 < level < 1:
            raise ValueError(f"DifficultyTracker: level must be in (0, 1), got {level}.")
        if not 0 <= ema_decay < 1:
            raise ValueError(f"DifficultyTracker: ema_decay must be in [0, 1), got {ema_decay}.")
        self.domain_names: list[str] = list(domain_names) if domain_names is not None else []
        self.probe: dict[str, torch.Tensor] = {}
        for d, t in (probe or {}).items():
            t = torch.as_tensor(t)
            if t.dim() != 2 or t.shape[1] < 2 or t.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"DifficultyTracker: probe[{d!r}] must be an integer (N, T+1) tensor of token ids "
                                 f"with T >= 1, got {t.dtype} {tuple(t.shape)}.")
            self.probe[str(d)] = t.long()
            self._dom(str(d))
        self.probe_every, self.window, self.level, self.min_points = probe_every, window, level, min_points
        self.stats_every = stats_every
        self.learned_loss = float(learned_loss)
        if reference is not None and not callable(reference):
            raise ValueError(f"DifficultyTracker: reference must be a module or a callable returning one, "
                             f"got {type(reference).__name__}.")
        self.reference, self.track_examples = reference, track_examples
        self.reference_error: str | None = None
        self._ref_model = None  # the loaded reference, until every probe domain is scored
        self.writer, self.save_fn, self.save_every, self._array_name = writer, save_fn, save_every, array_name
        self.probe_batch_size, self.autocast, self.ignore_index = probe_batch_size, autocast, ignore_index
        self._table = ExampleTable(learned_loss=learned_loss, max_examples=max_examples) if track_examples else None
        self.ema_decay = float(ema_decay)
        self.ema: dict[int, BiasCorrectedEMA] = {}  # domain -> EMA of its per-step mean train loss
        self.series: dict[int, RingSeries] = {}  # domain -> (domain tokens, per-step mean loss)
        self.probe_series: dict[str, RingSeries] = {}  # domain -> (total tokens, probe mean loss)
        self.domain_tokens = np.zeros(len(self.domain_names))
        self.total_tokens = 0.0
        self.token_unit = "tokens"
        self.n_losses = 0
        self.n_nan = 0
        self.model = None
        self._pending: list[tuple] = []  # (losses, ids, domains, n) per micro-batch, still on the device
        self._steps: list[tuple[int, float | None]] = []  # (len(_pending) at the step's end, train/tokens)
        self._warned: set[str] = set()
        self._ref_cache: dict[str, np.ndarray] = {}
        self._last_probe: dict[str, dict[str, np.ndarray]] = {}
        self._early_probe: tuple[int, dict[str, Any]] | None = None  # (step, measurement) from on_step_begin
        self._monitor = None  # the Monitor attached to: its ``sharded`` decides the probe's role
        self._last_metrics: dict[str, float] = {}
        self._dirty = False

    # -- bookkeeping ----------------------------------------------------------------
    def _dom(self, name: str) -> int:
        if name not in self.domain_names:
            self.domain_names.append(name)
        return self.domain_names.index(name)

    def _name(self, d: int) -> str:
        while d >= len(self.domain_names):
            self.domain_names.append(f"domain{len(self.domain_names)}")
        return self.domain_names[d]

    def _warn_once(self, key: str, msg: str, category=UserWarning) -> None:
        warn_once(self._warned, key, f"DifficultyTracker: {msg}", category, stacklevel=4)

    @property
    def role(self) -> str:
        """``hooks.monitor.probe_role`` of this process: "measure", "forward" (a sharded model's other rank) or "skip"."""
        return probe_role(self._monitor)

    def attach(self, model, monitor) -> None:
        self._monitor = monitor  # sharded (FSDP2): every rank scores the probe set, rank 0 records (role)
        self.model = model
        if self.writer is None and self.save_fn is None:  # default: the Monitor's run store
            self.writer = run_writer(monitor)

    # -- events -------------------------------------------------------------------------
    measures_model = True   # the probe set: also at the run's end (Monitor.on_run_end)

    def scheduled(self, step: int) -> bool:
        return self.role != "skip"  # DDP: rank 0 keeps the table and scores the probes

    def _probe_step(self, step: int) -> bool:
        return bool(self.probe) and self.model is not None and (
            step % self.probe_every == 0 or step in self.boundaries)  # also where phases end (Monitor.set_boundaries)

    def on_step_begin(self, step: int) -> None:
        """On a probe step, score the probe set now, before this step's optimizer update: the same
        parameters the loop's validation at this step sees (``midtrain.loop`` evaluates before the
        step's update), so ``difficulty/<d>/probe_loss`` and ``val/<d>/loss`` of one record measure
        one model. The metrics are reported in this step's ``on_step_end``. (The Monitor also calls
        this at the first ``on_backward_end`` of a step the loop did not announce -- still before the
        update.)"""
        if self.role == "forward":  # another rank of a sharded model: forwards only
            for tokens in (self.probe or {}).values() if self._probe_step(step) else ():
                self._eval(self.model, tokens)
            return
        self._early_probe = (step, self._measure_probe()) if self._probe_step(step) else None

    def on_backward_end(self, batch_size: int, losses=None, ids=None, domains=None) -> None:
        """Queue this micro-batch (no device sync: the queue moves to the host every ``stats_every`` steps)."""
        if self.role == "forward":
            return  # rank 0 keeps the table (of its own examples, as under DDP)
        if losses is None:
            self._warn_once("losses", "no per-example losses were given to on_backward_end; only the probe "
                                      "set is scored. Pass losses of shape (B,) (reduction='none').")
            return
        n = _length(losses, "losses")
        domains = domain_indices(domains, self.domain_names)  # names: positions in domain_names (appended if new)
        for what, x in (("ids", ids), ("domains", domains)):
            if x is not None and _length(x, what) != n:
                raise ValueError(f"DifficultyTracker: {what} has length {_length(x, what)} but losses has length "
                                 f"{n}; pass one {what[:-1]} per example.")
        if ids is None and self.track_examples:
            self._warn_once("ids", "no example ids were given; tracking per domain only (no per-example table, "
                                   "data maps or forgetting events).")
        if isinstance(losses, torch.Tensor):
            losses = losses.detach()
        self._pending.append((losses, ids, domains, n))

    def _host(self, entries: list[tuple]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Concatenate queued micro-batches and bring them to the host: (losses float64, ids int64 or
        None, domains int64 or None), one entry per example. Tensors on one device go in a single
        transfer (losses' float64 bits stacked with ids and domains); a micro-batch without ids or
        domains gets a -1 placeholder (masked out by the caller)."""
        lens = [e[3] for e in entries]
        tensors = all(isinstance(x, torch.Tensor) for e in entries for x in e[:3] if x is not None)
        has_ids = any(e[1] is not None for e in entries)
        has_doms = any(e[2] is not None for e in entries)
        if tensors:
            dev = entries[0][0].device
            if all(x.device == dev for e in entries for x in e[:3] if x is not None):
                def cat(i: int, dtype) -> torch.Tensor:  # one concatenation, one dtype conversion
                    xs = [e[i].reshape(-1) if e[i] is not None else torch.full((n,), -1, dtype=dtype, device=dev)
                          for e, n in zip(entries, lens)]
                    x = torch.cat(xs) if len(xs) > 1 else xs[0]
                    return x.to(dtype)

                rows = [cat(0, torch.float64).view(torch.int64)]
                if has_ids:
                    rows.append(cat(1, torch.int64))
                if has_doms:
                    rows.append(cat(2, torch.int64))
                host = torch.stack(rows).cpu().numpy() if len(rows) > 1 else rows[0].cpu().numpy()[None]
                losses = host[0].view(np.float64)
                return losses, host[1] if has_ids else None, host[-1] if has_doms else None
        fill = lambda x, n, dt: _to_numpy(x, dt).reshape(-1) if x is not None else np.full(n, -1, dt)  # noqa: E731
        losses = np.concatenate([_to_numpy(e[0], np.float64).reshape(-1) for e in entries])
        ids = np.concatenate([fill(e[1], n, np.int64) for e, n in zip(entries, lens)]) if has_ids else None
        doms = np.concatenate([fill(e[2], n, np.int64) for e, n in zip(entries, lens)]) if has_doms else None
        return losses, ids, doms

    def on_step_end(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
        if self.role == "forward":
            return {}
        tokens = scalars.get("train/tokens")
        self._steps.append((len(self._pending), None if tokens is None else float(tokens)))
        stats = step % self.stats_every == 0
        probe = self._probe_step(step)
        metrics: dict[str, float] = {}
        if not (stats or probe):
            # nothing to report: the step's losses stay queued (on the device) until the next
            # stats step, so an ordinary step costs a list append (updates are exact in any grouping)
            if self.save_every and (step + 1) % self.save_every == 0:
                self.save()
            return metrics
        self._flush()
        for d in sorted(self.ema):
            metrics[f"difficulty/{self._name(d)}/loss"] = self.ema[d].value
        if stats:
            for name, lr in self.learnability().items():
                if lr.defined:
                    metrics[f"difficulty/{name}/learnability"] = lr.value
                    metrics[f"difficulty/{name}/learnability_se"] = lr.slope_log_tokens_se
                    metrics[f"difficulty/{name}/diminishing"] = float(lr.diminishing)
        if probe:
            early, self._early_probe = self._early_probe, None
            # measured at this step's start (before the update); a caller that never announced the
            # step (on_step_end alone, no Monitor) gets it scored now, after the update
            meas = early[1] if early is not None and early[0] == step else self._measure_probe()
            metrics.update(self._record_probe(meas))
        if self._table is not None:
            ff = self._table.frac_forgotten
            if ff == ff:
                metrics["difficulty/frac_forgotten"] = ff
            metrics["difficulty/examples_tracked"] = float(len(self._table))
            metrics["difficulty/sample_rate"] = self._table.sample_rate
        metrics["difficulty/nan_losses"] = float(self.n_nan)
        self._last_metrics.update(metrics)
        if self.save_every and (step + 1) % self.save_every == 0:
            self.save()
        return metrics

    def _flush(self) -> None:
        """Apply every queued step, in order, exactly as if each had been applied at its own step:
        the table update is order-preserving (``ExampleTable.update``), and the per-step domain
        means, token split, EMAs and regression points are computed per step below."""
        steps = self._steps
        done = steps[-1][0] if steps else 0  # queued micro-batches that belong to ended steps
        entries, self._pending, self._steps = self._pending[:done], self._pending[done:], []
        if not sum(e[3] for e in entries):  # no per-example losses (or only empty micro-batches)
            for _, tokens in steps:  # a loop without per-example losses: only the token count moves
                if tokens is not None:
                    self.total_tokens = tokens
            return
        losses, ids, doms = self._host(entries)
        lens = np.array([e[3] for e in entries], dtype=np.int64)
        ends = np.array([c for c, _ in steps], dtype=np.int64)  # micro-batches queued by each step's end
        upto = np.concatenate([[0], np.cumsum(lens)])[ends]  # examples queued by each step's end
        per_step = np.diff(np.concatenate([[0], upto]))  # (K,) examples of each step
        K, M = len(steps), len(losses)
        step_of = np.repeat(np.arange(K), per_step)  # (M,)

        if doms is None or any(e[2] is None for e in entries):  # without domains: domain 0
            doms = np.zeros(M, dtype=np.int64) if doms is None else \
                np.where(np.repeat([e[2] is not None for e in entries], lens), doms, 0)
            if not self.domain_names:
                self.domain_names.append("all")
        if doms.min() < 0:
            raise ValueError(f"DifficultyTracker: domain indices must be >= 0, got {int(doms.min())}.")
        D = max(int(doms.max()) + 1, len(self.domain_names))
        self._name(D - 1)
        if len(self.domain_tokens) < D:
            self.domain_tokens = np.concatenate([self.domain_tokens, np.zeros(D - len(self.domain_tokens))])
        ok = np.isfinite(losses)
        self.n_nan += int(M - ok.sum())
        self.n_losses += M
        if ids is not None and self._table is not None:
            with_id = np.repeat([e[1] is not None for e in entries], lens)
            if with_id.all():
                self._table.update(ids, losses, doms)  # skips the same non-finite losses
            else:
                self._table.update(ids[with_id], losses[with_id], doms[with_id])
            self._dirty = True

        key = step_of * D + doms  # (M,) step-major, so each step's bincount sums in its own order
        count = np.bincount(key, minlength=K * D).reshape(K, D).astype(np.float64)
        fcount = np.bincount(key[ok], minlength=K * D).reshape(K, D)
        fsum = np.bincount(key[ok], weights=losses[ok], minlength=K * D).reshape(K, D)
        for k, (_, tokens) in enumerate(steps):
            n = per_step[k]
            if n == 0:  # a step without per-example losses
                if tokens is not None:
                    self.total_tokens = tokens
                continue
            # tokens of this step, split over domains by their share of the examples
            if tokens is not None and np.isfinite(tokens):
                step_tokens = max(tokens - self.total_tokens, 0.0)
                self.total_tokens = tokens
            else:
                self.token_unit = "examples"
                step_tokens = float(n)
                self.total_tokens += n
            before = self.domain_tokens[:D].copy()
            self.domain_tokens[:D] += step_tokens * count[k] / n
            present = np.flatnonzero(fcount[k])
            means = fsum[k, present] / fcount[k, present]  # per-step mean loss of each domain present
            for d, m in zip(present.tolist(), means.tolist()):
                e = self.ema.get(d)
                if e is None:
                    e = self.ema[d] = BiasCorrectedEMA(self.ema_decay)
                e.update(m)
                # the loss was measured after `before[d]` tokens of the domain
                s = self.series.get(d)
                if s is None:  # (not setdefault: that would allocate a series every call)
                    s = self.series[d] = RingSeries(self.window)
                s.append(before[d], m)

    @property
    def table(self) -> ExampleTable | None:
        """The per-example table, brought up to date with every step that has ended."""
        self._flush()
        return self._table

    def learnability(self) -> dict[str, Any]:
        """Learnability of every domain with training data: {name: diagnostics Learnability}."""
        self._flush()
        return {self._name(d): learnability(*s.arrays(), level=self.level, min_points=self.min_points)
                for d, s in self.series.items()}

    # -- the probe set ---------------------------------------------------------------------
    def _eval(self, model, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return score_sequences(model, tokens, self.probe_batch_size, self.autocast, self.ignore_index)

    def _reference_losses(self, model) -> dict[str, np.ndarray]:
        """Per-sequence reference losses of every probe domain, scored once (the reference is fixed).

        A reference that fails to load or to run costs only the reducible loss: it is dropped
        with one warning, never raised (the Monitor would disable the whole tracker)."""
        if self.reference is None or self.reference_error is not None:
            return {}
        missing = [n for n in self.probe if n not in self._ref_cache]
        if not missing:
            return self._ref_cache
        try:
            ref = self._ref_model
            if ref is None:
                if isinstance(self.reference, torch.nn.Module):
                    ref = self.reference
                else:  # a loader: load now, on the trained model's device, frozen
                    ref = self.reference()
                    if not isinstance(ref, torch.nn.Module):
                        raise TypeError(f"the reference loader returned {type(ref).__name__}, not a module")
                    p = next(iter(model.parameters()), None) if model is not None else None
                    ref = ref.to(p.device if p is not None else "cpu").eval().requires_grad_(False)
                self._ref_model = ref
            for name in missing:
                loss = self._eval(ref, self.probe[name])[0]
                if loss.shape != (len(self.probe[name]),) or not np.isfinite(loss).all():
                    raise ValueError(f"non-finite or misshaped reference losses on the {name!r} probe set")
                self._ref_cache[name] = loss
        except Exception as e:  # noqa: BLE001 -- any failure of the reference is a diagnostic failure
            self.reference_error = f"{type(e).__name__}: {e}"
            self._ref_model, self._ref_cache = None, {}
            self._warn_once("reference", f"the reference model for the reducible loss cannot be used "
                                         f"({self.reference_error}); difficulty/<domain>/reducible_loss is not "
                                         "reported. Every other difficulty signal continues.", RuntimeWarning)
            return {}
        if not isinstance(self.reference, torch.nn.Module):
            self._ref_model = None  # every domain is scored: free the loaded copy (memory on the device)
        return self._ref_cache

    def _measure_probe(self, model=None) -> dict[str, Any]:
        """Score every probe domain now (no_grad, eval mode, training mode restored); record nothing.

        Returns {"tokens": train tokens the scored parameters have seen, "scores": {name: (loss,
        el2n)}, "ref": {name: reference loss}}; ``_record_probe`` turns it into metrics."""
        model = model or self.model
        self._flush()  # total_tokens up to date (the probe history's x)
        ref = dict(self._reference_losses(model))
        scores = {name: self._eval(model, tokens) for name, tokens in self.probe.items()}
        return {"tokens": self.total_tokens, "scores": scores, "ref": ref}

    def _record_probe(self, meas: dict[str, Any]) -> dict[str, float]:
        """Metrics of a measurement; appends it to the probe history and keeps its arrays."""
        out: dict[str, float] = {}
        ref_losses = meas["ref"]
        for name, (loss, el2n) in meas["scores"].items():
            rec = {"loss": loss, "el2n": el2n}
            out[f"difficulty/{name}/probe_loss"] = float(loss.mean())
            out[f"difficulty/{name}/frac_learned"] = float((loss < self.learned_loss).mean())
            out[f"difficulty/{name}/el2n"] = float(el2n.mean())
            if name in ref_losses:
                rec["reference_loss"] = ref_losses[name]
                out[f"difficulty/{name}/reducible_loss"] = float((loss - ref_losses[name]).mean())
            s = self.probe_series.get(name)
            if s is None:
                s = self.probe_series[name] = RingSeries(self.window)
            s.append(meas["tokens"], float(loss.mean()))
            lr = learnability(*s.arrays(), level=self.level, min_points=4)
            if lr.defined:
                out[f"difficulty/{name}/probe_learnability"] = lr.value
            self._last_probe[name] = rec
        self._dirty = True
        return out

    def score_probe(self, model=None) -> dict[str, float]:
        """Score every domain's probe set now (no_grad, eval mode, training mode restored) and
        record it in the probe history. (The Monitor's events score it at the start of a probe step,
        see ``on_step_begin``.)"""
        return self._record_probe(self._measure_probe(model))

    # -- results --------------------------------------------------------------------------
    def data_map(self) -> dict[str, np.ndarray]:
        """The per-example table's columns plus data-map ``region`` (0 easy, 1 ambiguous, 2 hard;
        ``diagnostics.difficulty.REGIONS``)."""
        table = self.table
        if table is None:
            raise ValueError("this DifficultyTracker keeps no per-example table (track_examples=False).")
        a = table.to_arrays()
        # easy vs hard: mean confidence above the learned level exp(-learned_loss) (absolute, so maps of
        # different runs compare); ambiguous: the top third by variability (Swayamdipta et al. 2020)
        a["region"] = data_map_regions(a["confidence"], a["variability"],
                                       confidence_threshold=float(np.exp(-self.learned_loss)))
        return a

    @property
    def array_name(self) -> str:
        """``difficulty_examples`` (or the ``array_name`` given); a second tracker in one Monitor, renamed
        ``difficulty_2``, saves ``difficulty_2_examples`` so that the two never overwrite each other."""
        if self._array_name:
            return self._array_name
        return "difficulty_examples" if self.name == type(self).name else f"{self.name}_examples"

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything saved under arrays/<array_name>.npz."""
        out: dict[str, np.ndarray] = {}
        if self.table is not None:  # (brought up to date)
            out.update(self.data_map())
            out["sample_rate"] = np.array(self._table.sample_rate)
        out["domain_names"] = np.array(self.domain_names, dtype=str)
        out["domain_tokens"] = self.domain_tokens.copy()
        out["learned_loss"] = np.array(self.learned_loss)
        if self._last_probe:
            names = list(self._last_probe)
            out["probe_domain"] = np.concatenate([np.full(len(self._last_probe[n]["loss"]), self._dom(n))
                                                  for n in names])
            for k in ("loss", "el2n", "reference_loss"):
                if all(k in self._last_probe[n] for n in names):
                    out[f"probe_{k}"] = np.concatenate([self._last_probe[n][k] for n in names])
        return out

    def save(self) -> None:
        """Write the arrays through the writer / callback (no-op without one or when unchanged)."""
        if self.writer is None and self.save_fn is None:
            return
        self._flush()
        if not self._dirty:
            return
        arrays = self.arrays()
        if self.writer is not None:
            if getattr(self.writer, "closed", False):
                return
            self.writer.save_array(self.array_name, **arrays)
        else:
            self.save_fn(self.array_name, **arrays)
        self._dirty = False

    def detach(self) -> None:
        self.save()

    def summary(self) -> dict[str, float]:
        return {k: v for k, v in self._last_metrics.items()
                if k.endswith(("/learnability", "/frac_learned", "/probe_loss", "frac_forgotten"))}

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        self._flush()  # every ended step is in the state (a half-done step's micro-batches are not)
        return {
            "version": 2,  # 2: "ema" holds one BiasCorrectedEMA state per domain (1: DomainEMA arrays)
            "domain_names": list(self.domain_names),
            "table": self._table.state_dict() if self._table is not None else None,
            "ema": {"decay": self.ema_decay, "domains": {int(d): e.state_dict() for d, e in self.ema.items()}},
            "series": {int(d): s.state_dict() for d, s in self.series.items()},
            "probe_series": {n: s.state_dict() for n, s in self.probe_series.items()},
            "domain_tokens": self.domain_tokens.copy(),
            "total_tokens": self.total_tokens, "token_unit": self.token_unit,
            "n_losses": self.n_losses, "n_nan": self.n_nan,
            "last_probe": {n: {k: v.copy() for k, v in r.items()} for n, r in self._last_probe.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.domain_names = list(state["domain_names"])
        self._pending, self._steps, self._early_probe = [], [], None
        if state.get("table") is not None:
            if self._table is None:
                self._table = ExampleTable(learned_loss=self.learned_loss)
            self._table.load_state_dict(state["table"])
        self.ema_decay, self.ema = emas_from_state(state["ema"])
        self.series = {int(d): RingSeries.from_state(s) for d, s in state["series"].items()}
        self.probe_series = {n: RingSeries.from_state(s) for n, s in state["probe_series"].items()}
        self.domain_tokens = np.asarray(state["domain_tokens"], dtype=np.float64).copy()
        self.total_tokens, self.token_unit = float(state["total_tokens"]), state["token_unit"]
        self.n_losses, self.n_nan = int(state["n_losses"]), int(state["n_nan"])
        self._last_probe = {n: {k: np.asarray(v) for k, v in r.items()} for n, r in state.get("last_probe", {}).items()}
