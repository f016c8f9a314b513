"""Monitor: the event dispatcher a training loop talks to.

Any loop, three calls (docs/architecture.md, "The event contract"). The events are marked ``# <--``::

    monitor = Monitor(model, [SomeHook()], run_dir="runs/demo")
    for step in range(steps):
        for micro in micro_batches:
            losses = model(micro.x, micro.y, reduction="none")[1]    # per-example (optional)
            (losses.mean() / n_micro).backward()
            monitor.on_backward_end(micro.size, losses=losses,      # <-- BACKWARD_END
                                    ids=micro.ids, domains=micro.domains)
        monitor.on_grads_ready()                                    # <-- GRADS_READY (before clipping)
        clip_grad_norm_(...); optimizer.step(); optimizer.zero_grad()
        monitor.on_step_end(step, loss=..., lr=..., tokens=...)     # <-- STEP_END: writes one record

Rules the Monitor enforces:

- A hook that raises never stops training: it is warned about once and disabled
  for the rest of the run (``strict=True`` re-raises instead, for tests).
- A hook says per step whether it runs (``Hook.scheduled(step)``); unscheduled
  hooks receive no events, so they cost nothing.
- Scalars passed to ``on_step_end`` are written under ``train/<name>`` unless
  the name already has an area (``val/prose/loss``); hooks' metrics are merged
  into the same record; sinks (run store, stdout, wandb) receive that record.

What hooks do to training: by default nothing. They read what the step computes anyway
(forward and tensor hooks that return nothing, ``.grad`` before clipping) and run their
probes under ``no_grad`` in eval mode, restoring the model's mode. Two opt-in settings
change the step itself:

- ``PerExampleGradNorms(bookkeeping=True)``, and ``GradientNoiseScale(bookkeeping=True)``
  on the steps it measures with per-example norms: while its hooks are attached, a
  float32 / float64 ``nn.Linear`` whose per-example gradients are materialised gets its
  weight gradient as their sum instead of autograd's GEMM. Equal up to float summation
  order (about 1e-7 relative in float32), so the run is no longer bit-identical to one
  without the hook.
- ``GradientNoiseScale(mode="ddp")`` registers a DDP communication hook in ``attach``:
  every bucket is all-reduced by torch's ``allreduce_hook`` (divide by the world size,
  then sum: the average DDP computes without a hook) instead of DDP's built-in
  reduction, and on measured steps the local bucket norms are read first. DDP cannot
  remove a communication hook, so it stays for the rest of the run, also after the
  hook is detached or disabled; a DDP model that already has one is refused.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from hooks.sinks import MemorySink, NullSink, RunStoreSink, Sink, StdoutSink  # noqa: F401  (re-exported)


def non_zero_rank() -> bool:
    """True on a torch.distributed rank other than 0: hooks that measure on one rank (probes,
    per-example tables) are not scheduled there; the other ranks train on."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


class Hook:
    """Base class for measurement hooks. Override what you need.

    ``name`` prefixes nothing by itself: hooks return metric names in the
    public schema (``gns/b_simple``, ``repr/blocks.3.resid_post/entropy``).
    """

    name: str = "hook"

    def attach(self, model, monitor: "Monitor") -> None:
        """Called once when the Monitor is built (register tensor/module hooks here)."""

    def detach(self) -> None:
        """Remove every hook registered in ``attach``."""

    def scheduled(self, step: int) -> bool:
        """Whether this hook measures at ``step`` (events are skipped otherwise)."""
        return True

    def on_step_begin(self, step: int) -> None:
        pass

    def on_backward_end(self, batch_size: int, losses=None, ids=None, domains=None) -> None:
        pass

    def on_grads_ready(self) -> None:
        pass

    def on_step_end(self, step: int, scalars: dict[str, Any]) -> dict[str, float]:
        """Return this step's metrics (merged into the step's record)."""
        return {}

    def summary(self) -> dict[str, Any]:
        """The hook's results so far, by metric name: numbers, except where a hook says otherwise
        (``RepresentationProbe`` puts its list of detected compression events, one dict each,
        under ``repr/events``). ``Monitor.summary`` merges every live hook's."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _area(name: str) -> str:
    return name if "/" in name else f"train/{name}"


class Monitor:
    """Dispatches the loop's events to hooks and writes one record per step.

    Args:
        model: the module being trained (hooks attach to it; under
            ``torch.compile`` pass the uncompiled module ``_orig_mod``).
        hooks: measurement hooks.
        run_dir: a run directory to append records to (created if it holds no
            run yet). Alternatively pass ``sinks``.
        sinks: explicit sinks; default: the run store if ``run_dir`` is given.
        strict: re-raise hook errors instead of disabling the hook.
        enabled: ``False`` on non-zero DDP ranks that should not write.
        ddp_model: the DistributedDataParallel wrapper of ``model``, if any: hooks that
            need it (a DDP communication hook, registered before the first backward) read
            ``monitor.ddp_model`` in ``attach``.
    """

    def __init__(self, model=None, hooks: Iterable[Hook] = (), run_dir=None, sinks=None,
                 strict: bool = False, enabled: bool = True, ddp_model=None):
        self.model = model
        self.ddp_model = ddp_model
        self.hooks: list[Hook] = list(hooks)
        self.strict = strict
        self.enabled = enabled
        self.sinks: list[Sink] = list(sinks) if sinks is not None else []
        self._own_store = run_dir is not None and sinks is None and enabled  # sets run.json status on exit
        if self._own_store:
            from diagnostics.runs import RunWriter
            import os

            if os.path.exists(os.path.join(run_dir, "run.json")):
                self.sinks.append(RunStoreSink(RunWriter.resume(run_dir)))
            else:
                self.sinks.append(RunStoreSink(RunWriter.create(run_dir, config={})))
        self.disabled: dict[str, str] = {}
        self.failed_sinks: dict[str, str] = {}  # sink class name -> error; such a sink gets no more records
        self.step: int | None = None
        self._armed = False
        self._active: list[Hook] = []
        self.last_record: dict[str, Any] = {}
        for h in self.hooks:
            self._call(h, "attach", model, self)

    # -- fault isolation -----------------------------------------------------
    def _call(self, hook: Hook, event: str, *args, **kwargs):
        if hook.name in self.disabled and not self.strict:
            return None
        try:
            return getattr(hook, event)(*args, **kwargs)
        except Exception as e:  # a diagnostic must never kill training
            if self.strict:
                raise
            self.disabled[hook.name] = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"midtrain: hook {hook.name!r} raised in {event} ({type(e).__name__}: {e}); "
                "it is disabled for the rest of this run. Training continues.",
                RuntimeWarning,
                stacklevel=3,
            )
            try:
                hook.detach()
            except Exception:
                pass
            return None

    def _live(self) -> list[Hook]:
        return [h for h in self.hooks if h.name not in self.disabled]

    # -- events ----------------------------------------------------------------
    def on_step_begin(self, step: int) -> None:
        """Optional: announce the step so hooks can arm themselves. If a loop never
        calls it, the first ``on_backward_end`` of a step does it implicitly."""
        self.step, self._armed = step, True
        self._active = [h for h in self._live() if self._call(h, "scheduled", step)]
        for h in self._active:
            self._call(h, "on_step_begin", step)

    def on_backward_end(self, batch_size: int, *, losses=None, ids=None, domains=None) -> None:
        """After each micro-batch's backward. ``losses`` are per-example losses."""
        if not self._armed:
            self.on_step_begin(self.step or 0)
        for h in self._active:
            if h.name not in self.disabled:
                self._call(h, "on_backward_end", batch_size, losses=losses, ids=ids, domains=domains)

    def on_grads_ready(self) -> None:
        """Accumulated gradients are in ``.grad``, before clipping and the optimizer step."""
        if not self._armed:
            self.on_step_begin(self.step or 0)
        for h in self._active:
            if h.name not in self.disabled:
                self._call(h, "on_grads_ready")

    def on_step_end(self, step: int, **scalars) -> dict[str, Any]:
        """Collect the loop's scalars and the hooks' metrics into one record and write it."""
        if not self._armed or self.step != step:
            self.on_step_begin(step)
        record: dict[str, Any] = {"step": int(step)}
        for k, v in scalars.items():
            if v is None:
                continue
            if hasattr(v, "item"):
                v = v.item()
            record[_area(k)] = v
        for h in self._active:
            if h.name in self.disabled:
                continue
            out = self._call(h, "on_step_end", step, record)
            if out:
                for k, v in out.items():
                    record[k] = float(v) if not isinstance(v, (str, bool)) else v
        self.write(record)
        self.step, self._armed = step + 1, False
        return record

    def write(self, record: dict[str, Any]) -> None:
        """Send a record to every sink (used directly for records outside a step, e.g. final val)."""
        self.last_record = record
        if not self.enabled:
            return
        for s in list(self.sinks):
            try:
                s.log_dict(record)
            except Exception as e:  # a failing sink (network, disk) never stops training
                if self.strict:
                    raise
                self.sinks.remove(s)
                name = type(s).__name__
                self.failed_sinks[name] = f"{type(e).__name__}: {e}"
                warnings.warn(f"midtrain: sink {name} raised while writing step {record.get('step')} "
                              f"({type(e).__name__}: {e}); it receives no more records. Training "
                              f"continues{'; the other sinks still write' if self.sinks else ''}.",
                              RuntimeWarning, stacklevel=2)
                try:
                    s.close()
                except Exception:
                    pass

    # -- state -------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Every live hook's ``summary`` merged into one dict (``Hook.summary`` says what it holds)."""
        out: dict[str, Any] = {}
        for h in self._live():
            out.update(self._call(h, "summary") or {})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"hooks": {h.name: h.state_dict() for h in self.hooks}, "disabled": dict(self.disabled)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for h in self.hooks:
            if h.name in state.get("hooks", {}):
                self._call(h, "load_state_dict", state["hooks"][h.name])

    def close(self, status: str | None = None) -> None:
        """Detach the hooks and close the sinks; a ``status`` (e.g. "finished") goes to every sink's
        ``close`` (``Sink``), so the run store writes it to ``run.json``. Used as a context manager,
        a Monitor that made its own run store (``run_dir=``) sets "finished", "failed" or
        "interrupted" by how the block ended."""
        for h in self.hooks:
            try:
                h.detach()
            except Exception:
                pass
        for s in self.sinks:
            try:
                s.close() if status is None else s.close(status=status)
            except Exception as e:
                if self.strict:
                    raise
                warnings.warn(f"midtrain: sink {type(s).__name__} failed to close ({type(e).__name__}: {e})",
                              RuntimeWarning, stacklevel=2)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        status = None
        if self._own_store:
            status = ("finished" if exc_type is None else
                      "interrupted" if issubclass(exc_type, KeyboardInterrupt) else "failed")
        self.close(status=status)
