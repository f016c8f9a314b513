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

- A hook never stops training: one that raises, or returns what the Monitor cannot use, is
  warned about once and disabled for the rest of the run (``strict=True`` raises instead, for
  tests). Returned values are checked inside that isolation: ``on_step_end`` must return a dict
  (or None) of non-empty string names other than ``"step"`` to a number, bool, string, None ("not
  measured") or a one-element tensor / array; anything else disables the hook and none of that
  step's metrics of it are kept. ``scheduled`` must have a truth value, ``summary`` and
  ``state_dict`` must return dicts (a hook whose ``state_dict`` fails is left out of the state).
- ``on_step_end`` hands each hook its own copy of the record so far: what a hook changes in it
  never reaches the record written, nor the next hook.
- A disabled hook is recorded: ``monitor.disabled_hooks`` (also under ``monitor/disabled_hooks``
  in ``Monitor.summary``), one dict per hook (name, class, step, event, reason), which the run
  store's ``run.json`` also keeps under ``disabled_hooks`` (appended to, across resumes).
- Hook names are unique: they key the checkpoint state and the disabled list. Hooks that keep
  their class's ``name`` (two ``RepresentationProbe``s, or hooks without a name of their own,
  ``"hook"``) are numbered in list order: the first keeps the name, later ones get ``_2``,
  ``_3``, ... (set on ``hook.name``), so a single instance keeps its checkpoint key. A name set to
  something else (``GradientNoiseScale(name="gns_a")``) that two hooks share is refused with a
  ``ValueError`` naming it, as is one hook object passed twice (the framework adapters check
  when they are built).
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

import numbers
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterable

from hooks._common import check_domains
from hooks.sinks import MemorySink, NullSink, RunStoreSink, Sink, StdoutSink  # noqa: F401  (re-exported)


def non_zero_rank() -> bool:
    """True on a torch.distributed rank other than 0: hooks that measure on one rank (probes,
    per-example tables) are not scheduled there; the other ranks train on. A probe that runs forward
    passes of the trained model asks ``probe_role`` instead (a sharded model's forward is a collective)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


PROBE_ROLES = ("measure", "forward", "skip")


def probe_role(monitor=None) -> str:
    """What a probe (a hook that runs its own forward passes of the trained model) does on this process:

    - ``"measure"``: rank 0, or one process: run the forward passes, compute, report, write;
    - ``"forward"``: another rank of a sharded model (``monitor.sharded``, FSDP2): run the same forward
      passes at the same steps (each is a collective: rank 0 alone would wait for ever), compute and
      report nothing;
    - ``"skip"``: another rank of a replicated model (DDP): nothing (not scheduled).

    A probe keeps the Monitor it is attached to and asks with it (``probe_role(self._monitor)``)."""
    if not non_zero_rank():
        return "measure"
    return "forward" if getattr(monitor, "sharded", False) else "skip"


class Hook:
    """Base class for measurement hooks. Override what you need.

    ``name`` prefixes nothing by itself: hooks return metric names in the
    public schema (``gns/b_simple``, ``repr/blocks.3.resid_post/entropy``).
    It keys the hook's checkpoint state and the Monitor's disabled list, so
    the Monitor makes it unique (module docstring, "Hook names are unique").
    """

    name: str = "hook"
    # steps at which the run's phases end (the record of step s describes the model after s updates,
    # so the end of a phase of steps [a, b) is step b) and the last step, set by
    # ``Monitor.set_boundaries``; probes that run on a cadence also run there. Empty: no loop said.
    boundaries: frozenset = frozenset()
    # True for hooks that measure the model on their own fixed data (probes): they can also run at a
    # record without a training step, the end of the run (``Monitor.on_run_end``)
    measures_model: bool = False

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


# -- what a hook returns, checked (inside the Monitor's isolation) ----------------------------

def _metric_value(key: str, v: Any) -> Any:
    """A returned metric value as a record value, or TypeError / ValueError saying what is wrong."""
    if callable(getattr(v, "item", None)) and not isinstance(v, numbers.Real):  # a tensor, a numpy array
        n = v.numel() if callable(getattr(v, "numel", None)) else getattr(v, "size", 1)
        if n != 1:
            raise ValueError(f"metric {key!r} is a {type(v).__name__} with {n} elements, not one number "
                             "(.item(), .mean())")
        v = v.item()
    if v is None or isinstance(v, (str, bool)):
        return v
    if isinstance(v, numbers.Real):
        return float(v)
    raise TypeError(f"metric {key!r} is a {type(v).__name__}, not a number, bool, string, None or "
                    "one-element tensor")


def _metrics(out: Any) -> dict[str, Any]:
    """``on_step_end``'s return as record entries: a dict (or None) of names to scalars."""
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"a {type(out).__name__}, not a dict of metric name -> number")
    clean = {}
    for k, v in out.items():
        if not isinstance(k, str) or not k:
            raise TypeError(f"metric names must be non-empty strings, got {k!r}")
        if k == "step":
            raise ValueError("a hook may not set 'step' (the Monitor writes the step of the record)")
        clean[k] = _metric_value(k, v)
    return clean


def _mapping(out: Any) -> dict[str, Any]:
    """``summary`` / ``state_dict``'s return: a dict (None: empty)."""
    if out is None:
        return {}
    if not isinstance(out, Mapping):
        raise TypeError(f"a {type(out).__name__}, not a dict")
    return dict(out)


def unique_hook_names(hooks: list[Hook]) -> list[Hook]:
    """``hooks``, each with a name no other has (module docstring, "Hook names are unique"): hooks that
    keep their class's name are numbered in list order (the first keeps it, then ``_2``, ``_3``, ...);
    other names set twice, and a hook object passed twice, are a ValueError."""
    if len({id(h) for h in hooks}) != len(hooks):
        twice = sorted({f"{h.name!r} ({type(h).__name__})" for h in hooks if sum(g is h for g in hooks) > 1})
        raise ValueError(f"the same hook object is passed twice: {', '.join(twice)}; build one hook per use")
    own = [h for h in hooks if h.name != getattr(type(h), "name", None)]
    dup = sorted({h.name for h in own if sum(g.name == h.name for g in own) > 1})
    if dup:
        who = "; ".join(f"{n!r} ({', '.join(type(h).__name__ for h in own if h.name == n)})" for n in dup)
        raise ValueError(f"hook names must be unique (they key the hooks' checkpoint state and the disabled "
                         f"list); set more than once: {who}. Give each hook its own name.")
    taken, own_ids = {h.name for h in own}, {id(h) for h in own}
    for h in hooks:
        if id(h) in own_ids:
            continue
        name, i = h.name, 1
        while name in taken:
            i += 1
            name = f"{h.name}_{i}"
        taken.add(name)
        if name != h.name:
            h.name = name
    return hooks


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
        sharded: the model is sharded over the ranks (FSDP2, ``fully_shard``), so its forward is a
            collective: probes run their forward passes on every rank (``probe_role``) and gradient
            norms sum the ranks' shards. None (default): detected (an FSDP2 module in ``model``).
            Shard the model before building the Monitor.
    """

    def __init__(self, model=None, hooks: Iterable[Hook] = (), run_dir=None, sinks=None,
                 strict: bool = False, enabled: bool = True, ddp_model=None, sharded: bool | None = None):
        from hooks._distributed import is_sharded

        self.model = model
        self.ddp_model = ddp_model
        self.sharded = is_sharded(model) if sharded is None else bool(sharded)
        self.hooks: list[Hook] = unique_hook_names(list(hooks))  # before anything is written
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
        self.disabled: dict[str, str] = {}  # hook name -> error; such a hook gets no more events
        self.disabled_hooks: list[dict[str, Any]] = []  # one dict per disabled hook: name, class, step, event, reason
        self.failed_sinks: dict[str, str] = {}  # sink class name -> error; such a sink gets no more records
        self.step: int | None = None
        self.boundaries: frozenset = frozenset()   # set_boundaries
        self._armed = False
        self._active: list[Hook] = []
        self.last_record: dict[str, Any] = {}
        for h in self.hooks:
            self._call(h, "attach", model, self)

    # -- fault isolation -----------------------------------------------------
    def _call(self, hook: Hook, event: str, *args, check: Callable[[Any], Any] | None = None,
              even_disabled: bool = False, **kwargs):
        """``hook.<event>(*args, **kwargs)``, then its result through ``check`` (the value as the Monitor
        uses it, or an error), both isolated: a failure disables the hook and gives None."""
        if hook.name in self.disabled and not self.strict and not even_disabled:
            return None
        try:
            out = getattr(hook, event)(*args, **kwargs)
        except Exception as e:  # a diagnostic must never kill training
            if self.strict:
                raise
            self._disable(hook, event, f"{type(e).__name__}: {e}")
            return None
        if check is None:
            return out
        try:
            return check(out)
        except Exception as e:  # TypeError / ValueError of the checks, RuntimeError of bool(tensor)
            what = f"returned a value the Monitor cannot use ({type(e).__name__}: {e})"
            if self.strict:
                raise (TypeError if isinstance(e, TypeError) else ValueError)(
                    f"hook {hook.name!r} ({type(hook).__name__}) {what} in {event}") from e
            self._disable(hook, event, what)
            return None

    def _disable(self, hook: Hook, event: str, reason: str) -> None:
        """Disable ``hook`` for the rest of the run: warn, detach it, record why (``disabled_hooks``)."""
        if hook.name in self.disabled:
            return
        self.disabled[hook.name] = reason
        entry = {"name": hook.name, "class": type(hook).__name__, "step": self.step, "event": event,
                 "reason": reason}
        self.disabled_hooks.append(entry)
        warnings.warn(f"midtrain: hook {hook.name!r} ({type(hook).__name__}) failed in {event} at step "
                      f"{self.step}: {reason}; it is disabled for the rest of this run. Training continues.",
                      RuntimeWarning, stacklevel=4)
        try:
            hook.detach()
        except Exception:
            pass
        self._record_disabled(entry)

    def _record_disabled(self, entry: dict[str, Any]) -> None:
        """Append ``entry`` to ``disabled_hooks`` in the run store's ``run.json``, if there is one."""
        from hooks._common import run_writer

        writer = run_writer(self) if self.enabled else None
        if writer is None or not hasattr(writer, "update_info"):
            return
        try:
            writer.update_info(disabled_hooks=list(writer.info.get("disabled_hooks") or []) + [entry])
        except Exception as e:  # the record stays in monitor.disabled_hooks
            warnings.warn(f"midtrain: could not record the disabled hook {entry['name']!r} in run.json "
                          f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=5)

    def set_boundaries(self, steps: Iterable[int]) -> None:
        """Tell the hooks the steps where phases end and the run ends (``Hook.boundaries``): the built-in
        loop passes each later phase's first step and the last step (whose record it writes with
        ``on_step_end`` after the last update). Probes (``RepresentationProbe``, the
        ``DifficultyTracker`` probe set) also measure there. Loops that never call it lose nothing."""
        marks = []
        for s in steps:
            if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0:
                raise ValueError(f"set_boundaries: steps must be integers >= 0, got {s!r}")
            marks.append(int(s))
        self.boundaries = frozenset(marks)
        for h in self.hooks:
            h.boundaries = self.boundaries

    def _live(self) -> list[Hook]:
        return [h for h in self.hooks if h.name not in self.disabled]

    # -- events ----------------------------------------------------------------
    def on_step_begin(self, step: int) -> None:
        """Optional: announce the step so hooks can arm themselves. If a loop never
        calls it, the first ``on_backward_end`` of a step does it implicitly."""
        self.step, self._armed = step, True
        self._active = [h for h in self._live() if self._call(h, "scheduled", step, check=bool)]
        for h in self._active:
            self._call(h, "on_step_begin", step)

    def on_backward_end(self, batch_size: int, *, losses=None, ids=None, domains=None) -> None:
        """After each micro-batch's backward. ``losses`` are per-example losses; ``domains`` one domain
        per example, integer indices or names (``hooks._common.check_domains``; each hook maps names
        through its own ``domain_names``, new names appended in order of first appearance). A
        ``domains`` that is neither is a TypeError / ValueError here, before any hook sees it."""
        if domains is not None:
            shape = getattr(losses, "shape", None)
            n = int(shape[0]) if shape is not None and len(shape) == 1 else (
                int(batch_size) if isinstance(batch_size, numbers.Integral) else None)
            check_domains(domains, n)
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
            out = self._call(h, "on_step_end", step, dict(record), check=_metrics)  # its own copy
            if out:
                record.update(out)
        self.write(record)
        self.step, self._armed = step + 1, False
        return record

    def on_run_end(self, step: int, **scalars) -> dict[str, Any]:
        """The record after the last update (the built-in loop's final evaluation, ``step = total_steps``):
        like ``on_step_end``, but only hooks with ``measures_model = True`` (probes on their own data:
        ``RepresentationProbe``, ``DifficultyTracker``) that are scheduled at ``step`` run
        (``on_step_begin``, then ``on_step_end``); the others get no event, as no training step ran."""
        self.step, self._armed = step, True
        self._active = [h for h in self._live()
                        if h.measures_model and self._call(h, "scheduled", step, check=bool)]
        for h in self._active:
            self._call(h, "on_step_begin", step)
        return self.on_step_end(step, **scalars)

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
        """Every live hook's ``summary`` merged into one dict (``Hook.summary`` says what it holds), and,
        once a hook was disabled, ``monitor/disabled_hooks``: ``self.disabled_hooks``."""
        out: dict[str, Any] = {}
        for h in self._live():
            out.update(self._call(h, "summary", check=_mapping) or {})
        if self.disabled_hooks:
            out["monitor/disabled_hooks"] = [dict(d) for d in self.disabled_hooks]
        return out

    def state_dict(self) -> dict[str, Any]:
        """Every hook's ``state_dict`` by hook name (a disabled hook's as it was; one that fails is left out)."""
        states = {}
        for h in self.hooks:
            state = self._call(h, "state_dict", check=_mapping, even_disabled=True)
            if state is not None:
                states[h.name] = state
        return {"hooks": states, "disabled": dict(self.disabled)}

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
