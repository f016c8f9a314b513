"""The run directory: the one data format every part of midtrain shares.

A run directory holds one training run (docs/architecture.md, "The run directory")::

    runs/<name>/run.json              schema version, name, created time, config, versions,
                                      host, parent (for branches), status fields
    runs/<name>/metrics.jsonl         append-only, one JSON object per line, flushed per write
    runs/<name>/arrays/<name>.npz     spectra, per-example tables, ...
    runs/<name>/checkpoints/          step_0000100.pt, ... (written by the training loop)
    runs/<name>/recommendations.json
    runs/<name>/report.html

Writing (the loop, the Monitor's run-store sink)::

    with RunWriter.create("runs/demo", config={"lr": 3e-4}) as w:
        w.log({"step": 0, "train/loss": 5.54, "train/lr": 3e-4})
        w.log({"step": 0, "val/code/loss": 5.61})       # same step: merged on read
        w.save_array("spectra_step0", eigvals=np.ones(8))
        w.update_info(status="finished")

Reading (analyses, plots, notebooks)::

    run = load_run("runs/demo")
    run.metrics                  # DataFrame, one row per step, "step" column first
    run.metric("train/loss")     # Series indexed by step

Records in ``metrics.jsonl`` are flat ``name -> number | bool | str | None``
with an int ``"step"``; names follow the public schema (``train/loss``,
``val/<domain>/loss``, ``gns/b_simple``, ...). Non-finite floats are written
as Python's ``json`` module writes them by default -- the bare tokens ``NaN``,
``Infinity`` and ``-Infinity`` -- so a diverged loss round-trips exactly.
That is not strict JSON: read the file with Python's ``json.loads`` (which
accepts them), pandas, or ``jq``-alikes that allow NaN.

Crash safety: ``run.json`` and arrays are replaced atomically (write a temp
file, then ``os.replace``), so readers see the old or the new file, never half
of one. ``metrics.jsonl`` is append-only; a process killed mid-write leaves at
most a truncated last line, which ``load_run`` drops with a warning and
``RunWriter.resume`` removes before appending.

Write failures: a record that cannot be appended (a full disk, an immutable file) waits in memory
and is written, in order, with the next record that can be (at most ``max_pending`` wait; beyond
that records are lost and counted). ``close`` retries for ``close_retry_s`` seconds; a run whose
records could not all be written ends with status ``failed`` and an ``error`` naming
``metrics.jsonl`` and the first missing step (docs/run_directory.md, "Write failures").

This module imports neither torch nor anything from ``hooks``/``midtrain``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import numbers
import os
import platform
import socket
import sys
import warnings
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from diagnostics._run_io import (  # noqa: F401  (constants and errors are public here)
    SCHEMA_VERSION, RUN_JSON, METRICS_FILE, ARRAYS_DIR, CHECKPOINTS_DIR, RECOMMENDATIONS_FILE,
    REPORT_FILE, WANDB_ID_FILE, LOCK_FILE, _CHECKPOINT_RE, _ARRAY_NAME_RE, _VAL_LOSS_RE, _RESERVED_CREATE,
    RunDirError,
    RunDirWarning, RunStoreError, _now, _dumps_info, atomic_write, checkpoint_name, _versions, _read_info,
    _parse_metrics, _clean_value, _write_info, _MetricsFile, _step_gaps, step_ranges,
)


def _normalize_parent(parent: Any) -> dict | None:
    if parent is None:
        return None
    if isinstance(parent, dict):
        run, step = parent.get("run"), parent.get("step")
    elif isinstance(parent, (tuple, list)) and len(parent) == 2:
        run, step = parent
    else:
        raise TypeError("parent must be {'run': path, 'step': int} or (path, step)")
    if isinstance(run, Run):
        run = run.path
    if not isinstance(run, (str, os.PathLike)):
        raise TypeError(f"parent run must be a path, got {type(run).__name__}")
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise TypeError(f"parent step must be an int, got {step!r}")
    return {"run": os.fspath(run), "step": int(step)}


# ----------------------------------------------------------------------------- writing

class RunWriter:
    """Writes one run directory. Build it with :meth:`create` or :meth:`resume`.

    Attributes:
        path: the run directory.
        info: the current contents of ``run.json`` (update with :meth:`update_info`).
        max_pending: how many records may wait in memory while ``metrics.jsonl`` cannot be
            written (default 10 000; ``create(..., max_pending=N)`` / ``resume`` set it per run).
        close_retry_s: how long :meth:`close` and :meth:`check` (``wait=True``) keep retrying
            records that still wait (default 10 s).
    """

    max_pending = 10_000
    close_retry_s = 10.0

    def __init__(self, path: str | os.PathLike, info: dict, *, max_pending: int | None = None):
        self.path = Path(path)
        self.info = info
        self._metrics_path = self.path / METRICS_FILE
        self._metrics = _MetricsFile(self._metrics_path, max_pending or self.max_pending)
        self._loss_noted = False

    @property
    def _file(self):
        """The open ``metrics.jsonl`` (binary, unbuffered)."""
        return self._metrics.file

    @_file.setter
    def _file(self, f) -> None:
        self._metrics.file = f

    # -- construction ---------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, config: dict, *, parent=None,
               extra: dict | None = None, max_pending: int | None = None) -> "RunWriter":
        """Start a new run in ``path`` (made if needed).

        Args:
            path: the run directory. Refused if it already holds ``run.json``
                (or a ``metrics.jsonl``); nothing on disk is changed then.
            config: the run's configuration (JSON-serialisable dict; Paths,
                dataclasses and numpy values are converted).
            parent: for a branch, ``{"run": parent_dir, "step": S}`` or
                ``(parent_dir, S)``: the run and step it was branched from.
            extra: more top-level ``run.json`` fields (e.g. ``name``, ``device``).
            max_pending: records kept in memory while ``metrics.jsonl`` cannot be written.
        """
        path = Path(path)
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        if path.exists() and not path.is_dir():
            raise RunDirError(f"cannot create a run at {path}: it exists and is not a directory", path)
        for existing in (RUN_JSON, METRICS_FILE):
            if (path / existing).exists():
                raise RunDirError(
                    f"Refusing to create a run in {path}: {path / existing} already exists, so this "
                    f"directory already holds a run and creating another would overwrite or mix its "
                    f"records. Nothing was changed. Choose a new run name, delete the old directory "
                    f"if it is no longer needed, or continue it with RunWriter.resume({str(path)!r}).",
                    path / existing)
        extra = dict(extra or {})
        clash = [k for k in _RESERVED_CREATE if k in extra]
        if clash:
            raise ValueError(f"extra may not set {clash}; pass config/parent as arguments")
        info = {
            "schema_version": SCHEMA_VERSION,
            "name": path.name,
            "created": _now(),
            "status": "running",
            "config": config,
            "parent": _normalize_parent(parent),
            "versions": _versions(),
            "host": socket.gethostname(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pid": os.getpid(),
            "argv": list(sys.argv),
        }
        info.update(extra)
        text = _dumps_info(info)  # TypeError for unserialisable config before touching the disk
        info = json.loads(text)   # what readers will see (Paths as str, ...)
        for sub in ("", ARRAYS_DIR, CHECKPOINTS_DIR):
            (path / sub).mkdir(parents=True, exist_ok=True)
        atomic_write(path / RUN_JSON, text)
        (path / METRICS_FILE).touch()
        return cls(path, info, max_pending=max_pending)

    @classmethod
    def resume(cls, path: str | os.PathLike, step: int | None = None, *,
               max_pending: int | None = None) -> "RunWriter":
        """Open an existing run for appending.

        A truncated last line left by a killed process is removed (with a
        warning). If ``step`` is given -- the step of the checkpoint training
        resumes from -- records with ``step > step`` are dropped first (see
        :meth:`truncate_after`), so re-run steps are not logged twice.
        ``run.json`` gets ``status="running"`` and an entry in ``resumes``, which keeps the
        previous status and, moved there, its ``error`` and ``metrics_store``: the resumed run
        records the missing steps again.
        """
        path = Path(path)
        info = _read_info(path)
        cls._rewrite_metrics(path / METRICS_FILE, step)
        writer = cls(path, info, max_pending=max_pending)
        entry = {"step": step, "time": _now(), "previous_status": info.get("status"),
                 **{k: info.pop(k) for k in ("error", "metrics_store") if k in info}}
        resumes = list(info.get("resumes", [])) + [entry]
        writer.update_info(status="running", resumes=resumes)
        return writer

    @staticmethod
    def _rewrite_metrics(metrics: Path, step: int | None) -> None:
        if step is not None and (not isinstance(step, numbers.Integral) or isinstance(step, bool)):
            raise TypeError(f"step must be an int, got {step!r}")
        records, lines, dropped = _parse_metrics(metrics)
        if dropped is not None:
            warnings.warn(f"{metrics}: dropping truncated last line ({len(dropped)} characters), "
                          f"left by an interrupted write", RunDirWarning, stacklevel=3)
        keep = lines if step is None else [ln for r, ln in zip(records, lines) if r["step"] <= step]
        text = "".join(ln + "\n" for ln in keep)
        # rewrite only if something changes (dropped records, partial tail, missing newline, blanks)
        if metrics.exists() and metrics.read_text(encoding="utf-8") != text:
            atomic_write(metrics, text)
        elif not metrics.exists():
            metrics.touch()

    # -- writing --------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a flat dict with an int ``"step"``) as one JSON line, flushed.

        If ``metrics.jsonl`` cannot be written, the record waits in memory (with a warning) and
        is written with the next record that can be; see :attr:`pending` and :attr:`lost`."""
        self._check_open()
        if not isinstance(record, dict):
            raise TypeError(f"record must be a dict, got {type(record).__name__}")
        step = record.get("step")
        if not isinstance(step, numbers.Integral) or isinstance(step, (bool, np.bool_)):
            raise TypeError(f"record must contain an int 'step', got {step!r}")
        clean = {"step": int(step)}
        for key, value in record.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"record keys must be non-empty strings, got {key!r}")
            if key != "step":
                clean[key] = _clean_value(key, value)
        self._metrics.append(clean["step"], (json.dumps(clean) + "\n").encode("utf-8"))  # NaN / Infinity tokens
        if self._metrics.lost and not self._loss_noted:  # say so in run.json now, if it can be written
            self._loss_noted = True
            with contextlib.suppress(OSError):
                self.update_info(metrics_store=self._metrics.report())

    @property
    def pending(self) -> int:
        """Records waiting in memory because ``metrics.jsonl`` could not be written yet."""
        return len(self._metrics.pending)

    @property
    def lost(self) -> int:
        """Records that will never reach ``metrics.jsonl`` (the memory buffer was full)."""
        return self._metrics.lost

    def flush(self, retry_s: float = 0.0) -> bool:
        """Write the records waiting in memory, retrying for up to ``retry_s`` seconds. True when
        every record logged so far is in ``metrics.jsonl`` (none waits, none was lost)."""
        self._check_open()
        return self._metrics.retry(retry_s) and not self._metrics.lost

    def check(self, *, wait: bool = False) -> None:
        """Raise :class:`RunStoreError` if a record was lost; with ``wait``, also if records still
        wait after retrying for ``close_retry_s`` seconds (they then count as lost)."""
        if wait and not self._metrics.retry(self.close_retry_s):
            self._metrics.give_up()
        if self._metrics.lost:
            raise RunStoreError(self._metrics.failure_message(), self._metrics_path,
                                self._metrics.first_missing_step())

    def truncate_after(self, step: int) -> None:
        """Drop every logged record with ``step > step`` (atomic rewrite of ``metrics.jsonl``)."""
        self._check_open()
        if not self.flush():
            raise RunStoreError(self._metrics.failure_message(), self._metrics_path,
                                self._metrics.first_missing_step())
        self._metrics.close()
        try:
            self._rewrite_metrics(self._metrics_path, step)
        finally:
            self._metrics = _MetricsFile(self._metrics_path, self._metrics.max_pending)

    def save_array(self, name: str, **arrays) -> Path:
        """Save numpy-convertible arrays to ``arrays/<name>.npz`` (atomic; replaces an old one)."""
        self._check_open()
        if not isinstance(name, str) or not _ARRAY_NAME_RE.match(name):
            raise ValueError(f"array name {name!r} must be letters, digits, '_', '.', '-' "
                             f"(no path separators, no leading dot)")
        if not arrays:
            raise ValueError("save_array needs at least one array, e.g. save_array(name, values=x)")
        converted = {}
        for key, value in arrays.items():
            arr = np.asarray(value)
            if arr.dtype == object:
                raise TypeError(f"array {key!r} has dtype object and cannot be stored without pickle")
            converted[key] = arr
        target = self.path / ARRAYS_DIR / f"{name}.npz"
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, writer=lambda f: np.savez(f, **converted))
        return target

    def update_info(self, **kv) -> dict:
        """Update top-level ``run.json`` fields (e.g. ``status="finished"``) atomically.

        Returns the new info. ``schema_version`` cannot be changed. An
        ``updated`` timestamp is set on every call.
        """
        if "schema_version" in kv:
            raise ValueError("schema_version is fixed by the writer and cannot be updated")
        new = {**self.info, **kv, "updated": _now()}
        text = _dumps_info(new)  # serialise first: a TypeError leaves the file untouched
        _write_info(self.path / RUN_JSON, text)
        self.info = json.loads(text)
        return self.info

    # -- lifetime -------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._metrics.file.closed

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"RunWriter for {self.path} is closed")

    def close(self, status: str | None = None) -> None:
        """Write what waits (retrying for ``close_retry_s`` seconds), fsync and close ``metrics.jsonl``;
        optionally set ``status`` in ``run.json``. Idempotent.

        If records could not be written, ``status`` becomes ``"failed"`` with an ``error`` naming
        ``metrics.jsonl`` and the first missing step (an ``error`` already set with status
        ``failed`` is kept), and a :class:`RunDirWarning` says so; ``metrics_store`` in
        ``run.json`` counts the records that waited and those lost."""
        if self.closed:
            if status is not None:
                self.update_info(status=status)
            return
        store = self._metrics
        if not store.retry(self.close_retry_s):
            store.give_up()
        kv: dict[str, Any] = {} if status is None else {"status": status}
        if store.report() is not None:
            kv["metrics_store"] = store.report()
        if store.lost:
            if self.info.get("status") != "failed":
                kv["error"] = store.failure_message()
                warnings.warn(f"{store.failure_message()}; the run's status is set to failed", RunDirWarning,
                              stacklevel=2)
            kv["status"] = "failed"
        try:
            store.close()
        finally:
            if kv:
                self.update_info(**kv)

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """On an exception set ``status`` to "interrupted" (Ctrl-C) or "failed" (with ``error``)."""
        if exc_type is None:
            self.close()
        elif issubclass(exc_type, KeyboardInterrupt):
            self.close(status="interrupted")
        else:
            self.update_info(error=f"{exc_type.__name__}: {exc}")
            self.close(status="failed")

    def __repr__(self) -> str:
        return f"RunWriter({str(self.path)!r}, {'closed' if self.closed else 'open'})"


# ----------------------------------------------------------------------------- reading

class Run:
    """A run directory loaded for analysis. Build it with :func:`load_run`.

    Attributes:
        path: the run directory.
        info: ``run.json`` as a dict.
        config: ``info["config"]``.
        records: the raw records of ``metrics.jsonl``, in file order.
    """

    def __init__(self, path: Path, info: dict, records: list[dict]):
        self.path = Path(path)
        self.info = info
        self.config: dict = info.get("config") or {}
        self.records = records

    @property
    def name(self) -> str:
        return self.info.get("name") or self.path.name

    @property
    def parent(self) -> dict | None:
        """``{"run": path, "step": S}`` for a branch, else None."""
        return self.info.get("parent")

    @property
    def status(self) -> str | None:
        return self.info.get("status")

    def parent_run(self) -> "Run | None":
        """Load the parent run (path as stored, else relative to this run's folder's parent)."""
        if self.parent is None:
            return None
        p = Path(self.parent["run"])
        if not p.is_absolute() and not p.exists() and (self.path.parent / p).exists():
            p = self.path.parent / p
        return load_run(p)

    # -- metrics ----------------------------------------------------------------
    @cached_property
    def metrics(self):
        """One row per step (sorted), "step" column first, one column per metric.

        Records of the same step are merged, later values winning; ``None``
        values mean "not measured" and do not overwrite. Numeric (and bool)
        columns are float64 with NaN where a step lacks the metric; columns
        holding strings keep their values.
        """
        import pandas as pd

        rows: dict[int, dict] = {}
        columns: dict[str, None] = {"step": None}  # insertion-ordered set
        kinds: dict[str, set] = {}
        for rec in self.records:
            row = rows.setdefault(rec["step"], {"step": rec["step"]})
            for key, value in rec.items():
                if key == "step" or value is None:
                    continue
                row[key] = value
                columns.setdefault(key)
                kinds.setdefault(key, set()).add("num" if isinstance(value, (int, float)) else "other")
        ordered = [rows[s] for s in sorted(rows)]
        data = {"step": np.array([r["step"] for r in ordered], dtype=np.int64)}
        nan = float("nan")
        for key, kind in kinds.items():
            if kind == {"num"}:  # column-wise build: much faster than DataFrame(list of dicts)
                data[key] = np.array([r.get(key, nan) for r in ordered], dtype=np.float64)
            else:
                data[key] = pd.Series([r.get(key) for r in ordered])  # str dtype if all strings
        return pd.DataFrame(data, columns=list(columns))

    def metric(self, name: str, dropna: bool = True):
        """The Series of one metric indexed by step (rows where it is NaN/missing dropped)."""
        if name not in self.metrics.columns or name == "step":
            close = difflib.get_close_matches(name, [c for c in self.metrics.columns if c != "step"], n=5)
            hint = f"; close matches: {close}" if close else ""
            raise KeyError(f"metric {name!r} not in run {self.name}{hint}")
        series = self.metrics.set_index("step")[name]
        return series.dropna() if dropna else series

    def gaps(self) -> list[tuple[int, int]]:
        """The steps missing from ``metrics.jsonl``, as ``[(first, last), ...]`` (both included).

        Only a run that logs every step has expected steps: a run of the built-in loop (every
        step from its first, 0 or the parent's step, through its last record, and through
        ``steps_done`` once finished or stopped), or another loop's run whose consecutive steps
        mostly differ by one. A run that logs every n-th step has no gaps by this rule
        (docs/run_directory.md, "Gaps")."""
        return _step_gaps(sorted({r["step"] for r in self.records}), self.info)

    def metric_names(self) -> list[str]:
        return [c for c in self.metrics.columns if c != "step"]

    def domains(self) -> list[str]:
        """Sorted domain names seen in ``val/<domain>/loss`` columns."""
        return sorted(m.group(1) for c in self.metrics.columns if (m := _VAL_LOSS_RE.match(c)))

    # -- files ------------------------------------------------------------------
    def arrays(self) -> list[str]:
        """Sorted names of the saved arrays (``arrays/<name>.npz``)."""
        folder = self.path / ARRAYS_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name[:-4] for p in folder.iterdir()
                      if p.name.endswith(".npz") and not p.name.startswith(".") and p.is_file())

    def load_array(self, name: str) -> dict[str, np.ndarray]:
        """The arrays saved under ``name`` as a dict of numpy arrays."""
        file = self.path / ARRAYS_DIR / f"{name}.npz"
        if not file.is_file():
            raise KeyError(f"no array {name!r} in {self.path / ARRAYS_DIR}; saved arrays: {self.arrays()}")
        try:
            with np.load(file, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, ...
            raise RunDirError(f"{file} is corrupt: {e}", file) from e

    def checkpoints(self) -> list[tuple[int, Path]]:
        """``(step, path)`` of every ``checkpoints/step_<step>.pt``, sorted by step."""
        folder = self.path / CHECKPOINTS_DIR
        if not folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _CHECKPOINT_RE.match(p.name))]
        return sorted(found)

    def latest_checkpoint(self) -> tuple[int, Path] | None:
        ckpts = self.checkpoints()
        return ckpts[-1] if ckpts else None

    def recommendations(self) -> Any:
        """Parsed ``recommendations.json``, or None if the run has none yet."""
        file = self.path / RECOMMENDATIONS_FILE
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunDirError(f"{file} is corrupt: {e}", file) from e

    def __repr__(self) -> str:
        df = self.metrics
        steps = "no steps"
        if len(df):
            steps = f"steps {df['step'].iloc[0]}..{df['step'].iloc[-1]} ({len(df)} rows)"
        parts = [repr(str(self.path)), f"name={self.name!r}", f"status={self.status!r}", steps,
                 f"{len(df.columns) - 1} metrics"]
        if self.domains():
            parts.append(f"domains={self.domains()}")
        if self.parent:
            parts.append(f"parent={self.parent['run']!r}@{self.parent['step']}")
        n_ckpt, n_arr = len(self.checkpoints()), len(self.arrays())
        parts += [f"{n_ckpt} checkpoints", f"{n_arr} arrays"]
        return f"Run({', '.join(parts)})"


def load_run(path: str | os.PathLike) -> Run:
    """Load a run directory written by :class:`RunWriter`.

    Raises RunDirError if the directory or ``run.json`` is missing, if
    ``run.json`` is corrupt, or if a line of ``metrics.jsonl`` is malformed
    (the message names the file and line). A truncated last line -- a process
    killed mid-write -- is dropped with a :class:`RunDirWarning`; a missing ``metrics.jsonl`` and
    steps missing from it (:meth:`Run.gaps`) are also warned about.
    """
    path = Path(path)
    info = _read_info(path)
    metrics = path / METRICS_FILE
    records, _, dropped = _parse_metrics(metrics)
    if dropped is not None:
        warnings.warn(f"{metrics}: ignoring truncated last line ({len(dropped)} characters), "
                      f"probably left by an interrupted write", RunDirWarning, stacklevel=2)
    run = Run(path, info, records)
    if not metrics.exists():
        warnings.warn(f"{metrics} is missing: the run has no records", RunDirWarning, stacklevel=2)
    elif gaps := run.gaps():
        warnings.warn(f"{metrics}: steps {step_ranges(gaps)} are missing ({sum(b - a + 1 for a, b in gaps)} "
                      f"steps; Run.gaps() lists them)", RunDirWarning, stacklevel=2)
    return run
