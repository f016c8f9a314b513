"""Where the Monitor's records go: the ``Sink`` protocol and every sink.

``RunStoreSink`` appends to a run directory (``diagnostics.runs``; the built-in loop and
``Monitor(run_dir=...)`` use it), ``StdoutSink`` prints a line every few steps, ``MemorySink`` keeps
the records in a list (notebooks, tests), ``NullSink`` drops them, and ``WandbSink`` mirrors them to
Weights & Biases.

The run directory is the one data format; wandb is a mirror of it, never the only copy
(docs/architecture.md, "The run directory"). ``WandbSink`` sends each Monitor record to a wandb
run::

    from hooks import Monitor, GradientNoiseScale
    from hooks.sinks import WandbSink
    monitor = Monitor(model, [GradientNoiseScale()], run_dir="runs/demo",
                      sinks=None)                               # the run store, as usual
    monitor.sinks.append(WandbSink(project="midtrain", run_dir="runs/demo", mode="offline"))

``mode="offline"`` writes ``wandb/offline-run-*`` under ``dir`` without an API key (upload later
with ``wandb sync``); ``"online"`` needs ``wandb login`` (or ``WANDB_API_KEY``); ``"disabled"``
gives wandb's no-op run. wandb is imported only when a sink is built: ``pip install
"midtrain[wandb]"``. With ``run_dir`` the wandb run id is kept in ``<run_dir>/wandb.json`` so a
resumed run (``midtrain train --resume``) continues the same wandb run.

A failure while logging (network, quota) never stops training: the Monitor warns once and stops
sending to that sink; the run store keeps every record. The run store itself does not raise for a
write failure (a full disk, an immutable file), so the Monitor never drops it for one: the record
waits in memory and is written with the next one that can be, and records that never reach the
file are counted and make the run's status ``failed`` (docs/run_directory.md, "Write failures").
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Protocol

from diagnostics.runs import WANDB_ID_FILE, atomic_write

__all__ = ["Sink", "RunStoreSink", "StdoutSink", "MemorySink", "NullSink", "WandbSink", "WANDB_ID_FILE"]

_MODES = ("online", "offline", "disabled")


class Sink(Protocol):
    """Where records go (torchtune's metric-logger seam).

    ``close(status)``: ``status`` says how the run ended ("finished", "failed", "interrupted", or
    what ``Monitor.close(status=...)`` was given). A sink that keeps a run status records it
    (``RunStoreSink``: ``run.json``); the others ignore it. The Monitor passes it only when it has
    one, so a sink whose ``close`` takes no argument works wherever no status is given.
    """

    def log_dict(self, record: dict[str, Any]) -> None: ...

    def close(self, status: str | None = None) -> None: ...


class RunStoreSink:
    """Appends every record to ``metrics.jsonl`` of a run directory (``RunWriter.log``: a record that
    cannot be written yet waits in memory; ``close`` retries and sets status ``failed`` for records
    that never reached the file)."""

    def __init__(self, writer):
        self.writer = writer  # diagnostics.runs.RunWriter

    def log_dict(self, record):
        self.writer.log(record)

    def close(self, status: str | None = None):
        """Close the run writer; a ``status`` is written to ``run.json`` (None: left as it is)."""
        self.writer.close(status=status)


class StdoutSink:
    """Prints one compact line every ``every`` steps (for plain scripts)."""

    def __init__(self, every: int = 10, keys: Iterable[str] | None = None, stream=None):
        self.every, self.keys, self.stream = every, list(keys) if keys else None, stream or sys.stdout

    def log_dict(self, record):
        if record.get("step", 0) % self.every:
            return
        items = [(k, v) for k, v in record.items() if k != "step" and (self.keys is None or k in self.keys)]
        parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in items]
        print(f"step {record.get('step')}: " + " ".join(parts), file=self.stream, flush=True)

    def close(self, status: str | None = None):
        pass


class MemorySink:
    """Keeps every record in ``self.records`` (a list of dicts): for notebooks and tests."""

    def __init__(self):
        self.records: list[dict[str, Any]] = []

    def log_dict(self, record):
        self.records.append(dict(record))

    def close(self, status: str | None = None):
        pass


class NullSink:
    """Drops everything (nanoGPT's DummyWandb): keeps tests and quiet runs simple."""

    def log_dict(self, record):
        pass

    def close(self, status: str | None = None):
        pass


def _import_wandb():
    try:
        import wandb
    except ImportError as e:
        raise ImportError("the wandb sink needs the wandb package: pip install \"midtrain[wandb]\" "
                          "(or pip install wandb); the run store keeps every record without it") from e
    return wandb


class WandbSink:
    """Mirrors Monitor records to a wandb run.

    Args:
        project: wandb project (default: wandb's own default / ``WANDB_PROJECT``).
        name: run name shown in the UI (default: the run directory's name).
        mode: "online" | "offline" | "disabled" (default: wandb's, i.e. ``WANDB_MODE`` or online).
        run_dir: the midtrain run directory: the wandb id is saved there to resume the same run,
            and wandb writes its own files under ``<run_dir>/wandb`` unless ``dir`` is given.
        config: the run's configuration (a dict; the built-in loop passes its TrainConfig).
        run: an already started wandb run to log into instead (then nothing is initialised and
            ``close`` leaves it open).
        **init_kwargs: passed to ``wandb.init`` (entity, tags, group, notes, ...).

    Each record's ``step`` becomes wandb's step; the other keys are logged as they are (metric names
    ``area/quantity`` group into wandb sections by their first component).
    """

    def __init__(self, project: str | None = None, *, name: str | None = None, mode: str | None = None,
                 run_dir: str | os.PathLike | None = None, config: dict[str, Any] | None = None,
                 run=None, **init_kwargs):
        if mode is not None and mode not in _MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(_MODES)}, got {mode!r}")
        self._own = run is None
        self.last_step: int | None = None
        self.skipped = 0  # records older than wandb's current step (it refuses to go back)
        if run is not None:
            self.run = run
            return
        wandb = _import_wandb()
        run_dir = os.fspath(run_dir) if run_dir is not None else None
        kwargs: dict[str, Any] = {"project": project, "name": name, "mode": mode, "config": config}
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            kwargs["name"] = name or os.path.basename(os.path.abspath(run_dir))
            kwargs["dir"] = init_kwargs.pop("dir", run_dir)
            prev = _read_id(run_dir)
            if prev:
                kwargs.update(id=prev, resume="allow")
        kwargs.update(init_kwargs)
        self.run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
        if run_dir is not None and getattr(self.run, "id", None) and mode != "disabled":
            _write_id(run_dir, str(self.run.id), project)

    def log_dict(self, record: dict[str, Any]) -> None:
        step = record.get("step")
        data = {k: _value(v) for k, v in record.items() if k != "step"}
        data = {k: v for k, v in data.items() if v is not None}
        if step is None:
            self.run.log(data)
            return
        step = int(step)
        if self.last_step is not None and step < self.last_step:
            self.skipped += 1  # e.g. a branch replaying earlier steps: wandb would drop it anyway
            return
        self.last_step = step
        self.run.log(data, step=step)

    def close(self, status: str | None = None) -> None:
        """Finish the wandb run this sink started (one given as ``run=`` stays open); ``status``
        is not sent to wandb."""
        if self._own and self.run is not None:
            self.run.finish()
            self.run = None


def _value(v):
    """Numbers (NaN / inf included), bools and strings go through; a tensor or array scalar as its
    ``.item()``; anything else is dropped."""
    if isinstance(v, (bool, str, int, float)):
        return v
    if hasattr(v, "item"):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            return None
    return None


def _read_id(run_dir: str) -> str | None:
    path = os.path.join(run_dir, WANDB_ID_FILE)
    try:
        with open(path) as f:
            got = json.load(f).get("id")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable wandb id file ({type(e).__name__}: {e}); delete it to "
                         "start a new wandb run") from None
    return got if isinstance(got, str) and got else None


def _write_id(run_dir: str, run_id: str, project: str | None) -> None:
    atomic_write(os.path.join(run_dir, WANDB_ID_FILE), json.dumps({"id": run_id, "project": project}))
