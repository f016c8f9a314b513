"""The run directory's constants, errors and file helpers (atomic writes, run.json and
metrics.jsonl parsing, value cleaning), shared by ``diagnostics.runs``' writer and reader.
The one owner of the run directory's file names, including checkpoints' (``checkpoint_name``).
Import the public names from ``diagnostics.runs``.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import re
import sys
import tempfile
import time
import warnings
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1

RUN_JSON = "run.json"
METRICS_FILE = "metrics.jsonl"
ARRAYS_DIR = "arrays"
CHECKPOINTS_DIR = "checkpoints"
RECOMMENDATIONS_FILE = "recommendations.json"
REPORT_FILE = "report.html"
WANDB_ID_FILE = "wandb.json"  # only with the wandb mirror: its run id, so a resume logs into the same run
LOCK_FILE = "lock.json"  # while a process trains the run: its pid and host (midtrain/_lock.py)

_CHECKPOINT_RE = re.compile(r"^step_(\d+)\.pt$")  # reads back what checkpoint_name writes
_ARRAY_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")
_VAL_LOSS_RE = re.compile(r"^val/([^/]+)/loss$")
# keys a caller may not set through ``extra`` (create); ``update_info`` refuses only schema_version
_RESERVED_CREATE = ("schema_version", "config", "parent")


class RunDirError(Exception):
    """A run directory is missing, incomplete or malformed; the message names the file (and line)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line


class RunDirWarning(UserWarning):
    """Something in a run directory was repaired or skipped (e.g. a truncated last line), records
    waited in memory or were lost, or steps are missing."""


class RunStoreError(OSError):
    """Records could not be written to ``metrics.jsonl``; the message names the file, how many
    records are missing, the first missing step and the last write error."""

    def __init__(self, message: str, path: str | os.PathLike | None = None,
                 first_missing_step: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.first_missing_step = first_missing_step


# ----------------------------------------------------------------------------- helpers

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _jsonable(obj: Any) -> Any:
    """``json.dumps(default=...)``: the few non-JSON types configs commonly hold."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    raise TypeError(f"values of type {type(obj).__name__} cannot be stored in {RUN_JSON} "
                    f"(use str, numbers, bools, None, lists or dicts)")


def _dumps_info(info: dict) -> str:
    return json.dumps(info, indent=2, default=_jsonable) + "\n"


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint taken after ``step`` optimizer steps, in ``CHECKPOINTS_DIR``."""
    return f"step_{step:07d}.pt"


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: str | bytes | None = None, writer=None) -> None:
    """Write ``path`` via a hidden temp file in the same directory and ``os.replace``.

    Readers see either the old file or the new one, never a partial write. The
    temp file is removed if anything fails. ``writer(fileobj)`` may be given
    instead of ``data`` (binary mode). Every file midtrain writes whole goes through here.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        binary = writer is not None or isinstance(data, bytes)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as f:
            if writer is not None:
                writer(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode open() would
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_info(path: Path, text: str) -> None:
    """Replace ``run.json`` atomically. A directory that refuses new files (read-only for this
    user, ``chattr +i``) may still let ``run.json`` itself be rewritten: then it is rewritten in
    place, so that a failed run can still say so; the original error is raised if that fails too."""
    try:
        atomic_write(path, text)
    except PermissionError as e:
        try:
            with open(path, "r+", encoding="utf-8") as f:
                f.write(text)
                f.truncate()
                f.flush()
                os.fsync(f.fileno())
        except OSError:
            raise e from None


class _MetricsFile:
    """``metrics.jsonl`` opened for appending, with a bounded memory buffer for the records that
    cannot be written yet (a full disk, an immutable file): they are written, in order, by the
    next append that succeeds. When more than ``max_pending`` records wait, the newest is dropped
    and counted as lost. A write that stops part-way is cut back to the last whole line before
    anything else is appended."""

    def __init__(self, path: Path, max_pending: int):
        if not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self.path, self.max_pending = path, max_pending
        self.file = open(path, "ab", buffering=0)
        self._size = os.fstat(self.file.fileno()).st_size  # bytes of whole lines on disk
        self._torn = False  # a failed write may have left part of a line after _size
        self.pending: deque[tuple[int, bytes]] = deque()
        self.delayed = self.lost = 0
        self._waited = 0  # records pending through a failed write: delayed once written
        self.first_lost: int | None = None
        self.error: str | None = None  # the last write error
        self._failing = False

    def append(self, step: int, line: bytes) -> None:
        self.pending.append((step, line))
        if not self.drain() and len(self.pending) > self.max_pending:
            self._lose(self.pending.pop()[0], warn=True)
            self._waited = len(self.pending)

    def drain(self) -> bool:
        """Try to write every waiting record; True when none waits."""
        if not self.pending:
            return True
        data = b"".join(line for _, line in self.pending)
        try:
            if self._torn:
                os.ftruncate(self.file.fileno(), self._size)
            self._torn = True
            view = memoryview(data)
            while view:
                view = view[self.file.write(view):]
        except OSError as e:
            self.error, self._waited = f"{type(e).__name__}: {e}", len(self.pending)
            if not self._failing:
                self._failing = True
                warnings.warn(f"cannot write {self.path} ({self.error}); keeping the records in memory "
                              f"(up to {self.max_pending}) and retrying with every record", RunDirWarning,
                              stacklevel=4)
            return False
        self._torn, self._size = False, self._size + len(data)
        if self._failing:
            waited, self._failing, self._waited = self._waited, False, 0
            self.delayed += waited
            warnings.warn(f"{self.path} is writable again: {waited} records that waited in memory "
                          f"were written" + (f"; {self.lost} were lost" if self.lost else ", none lost"),
                          RunDirWarning, stacklevel=4)
        self.pending.clear()
        return True

    def retry(self, seconds: float) -> bool:
        """Retry writing the waiting records for up to ``seconds``; True when none waits."""
        deadline, pause = time.monotonic() + seconds, 0.05
        while not self.drain():
            if time.monotonic() + pause > deadline:
                return False
            time.sleep(pause)
            pause = min(1.0, 2 * pause)
        return True

    def give_up(self) -> None:
        """Count the records still waiting as lost."""
        while self.pending:  # the caller reports it (RunWriter.check raises, close warns)
            self._lose(self.pending.popleft()[0], warn=False)
        self._waited = 0

    def _lose(self, step: int, warn: bool) -> None:
        if warn and not self.lost:
            warnings.warn(f"{self.path}: records from step {step} on are lost: the file cannot be written "
                          f"({self.error}) and {self.max_pending} records already wait in memory",
                          RunDirWarning, stacklevel=5)
        self.lost += 1
        self.first_lost = step if self.first_lost is None else min(self.first_lost, step)

    def first_missing_step(self) -> int | None:
        steps = [s for s in (self.first_lost, self.pending[0][0] if self.pending else None) if s is not None]
        return min(steps) if steps else None

    def failure_message(self) -> str:
        n = self.lost + len(self.pending)
        return (f"{self.path}: {n} record{'s' if n != 1 else ''} could not be written, the first at step "
                f"{self.first_missing_step()} ({self.error})")

    def report(self) -> dict | None:
        """What went wrong while writing (for run.json's ``metrics_store``), or None if nothing did."""
        if self.error is None:
            return None
        return {"delayed_records": self.delayed, "lost_records": self.lost,
                "first_missing_step": self.first_missing_step(), "last_error": self.error}

    def close(self) -> None:
        try:
            os.fsync(self.file.fileno())
        except OSError:
            pass  # the records were handed to the OS; a failing fsync is reported by the next write
        finally:
            self.file.close()


def step_ranges(steps: list[int]) -> str:
    """``[(3, 4), (7, 7)]`` as ``"3-4, 7"``."""
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in steps)


def _step_gaps(steps: list[int], info: dict) -> list[tuple[int, int]]:
    """The missing steps ``[(first, last), ...]`` of a run that logs every step, given its sorted
    distinct record steps (docs/run_directory.md, "Gaps"). A run of the built-in loop (``total_steps``
    in run.json) expects every step from its first (0, or the parent's step for a branch) through
    its last record, and through ``steps_done`` once ``finished`` or ``stopped``. Another loop's run
    is compared step to step only if most of its consecutive steps differ by one; a run that logs
    every n-th step has no expected steps in between."""
    if isinstance(info.get("total_steps"), int):
        parent = info.get("parent")
        first = parent.get("step", 0) if isinstance(parent, dict) else 0
        last = steps[-1] if steps else None
        done = info.get("steps_done")
        if info.get("status") in ("finished", "stopped") and isinstance(done, int):
            last = done if last is None else max(last, done)
        if last is None:
            return []
        bounds = [first - 1, *steps, last + 1]
    else:
        if len(steps) < 2 or sum(b - a == 1 for a, b in zip(steps, steps[1:])) * 2 <= len(steps) - 1:
            return []
        bounds = steps
    return [(a + 1, b - 1) for a, b in zip(bounds, bounds[1:]) if b - a > 1]


def _versions() -> dict[str, str | None]:
    """Package versions from installed metadata (does not import torch)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("midtrain", "torch", "numpy", "pandas"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    torch = sys.modules.get("torch")  # already imported by the caller: its exact build string
    if torch is not None:
        out["torch"] = getattr(torch, "__version__", out["torch"])
        out["cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    return out


def _read_info(path: Path) -> dict:
    """Read and validate ``path/run.json``; RunDirError naming what is missing or broken."""
    if not path.exists():
        raise RunDirError(f"run directory {path} does not exist", path)
    if not path.is_dir():
        raise RunDirError(f"{path} is not a directory (expected a run directory holding {RUN_JSON})", path)
    info_path = path / RUN_JSON
    if not info_path.is_file():
        raise RunDirError(f"{info_path} is missing: {path} is not a run directory "
                          f"(`midtrain train --out {path}` makes one, as does a Monitor given "
                          f"run_dir={str(path)!r})", info_path)
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{info_path} is corrupt: {e}", info_path) from e
    if not isinstance(info, dict):
        raise RunDirError(f"{info_path} is corrupt: expected a JSON object, got {type(info).__name__}",
                          info_path)
    version = info.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RunDirError(f"{info_path} has no integer 'schema_version'", info_path)
    if version > SCHEMA_VERSION:
        raise RunDirError(f"{info_path} has schema_version {version}, newer than this midtrain "
                          f"understands ({SCHEMA_VERSION}); upgrade midtrain to read it", info_path)
    if not isinstance(info.get("config", {}), dict):
        raise RunDirError(f"{info_path}: 'config' must be a JSON object", info_path)
    return info


def _parse_metrics(path: Path) -> tuple[list[dict], list[str], str | None]:
    """Parse ``metrics.jsonl``.

    Returns ``(records, lines, dropped)``: the records, their raw lines (same
    order, without newlines) and the text of a dropped truncated last line
    (``None`` if there was none). Blank lines are skipped. A last line without
    a trailing newline that does not parse is the mark of a killed writer and
    is dropped; any other bad line raises RunDirError naming file and line.
    """
    if not path.exists():
        return [], [], None
    data = path.read_bytes()  # decoded line by line: a bad byte is reported with its line
    pieces = data.split(b"\n")
    complete = data.endswith(b"\n") or data == b""
    if complete:
        pieces = pieces[:-1]  # the "" after the final newline
    records, lines, dropped = [], [], None
    for lineno, raw in enumerate(pieces, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if lineno == len(pieces) and not complete:  # a killed writer can cut a character in two
                dropped = raw.decode("utf-8", errors="replace")
                break
            raise RunDirError(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                              f"{e.start + 1}); the file was damaged or written by another program",
                              path, lineno) from e
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(pieces) and not complete:
                dropped = line
                break
            raise RunDirError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno})",
                              path, lineno) from e
        if not isinstance(rec, dict):
            raise RunDirError(f"{path}:{lineno}: a record must be a JSON object, got "
                              f"{type(rec).__name__}", path, lineno)
        step = rec.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise RunDirError(f"{path}:{lineno}: record has no integer 'step' "
                              f"(got {step!r})", path, lineno)
        records.append(rec)
        lines.append(line)
    return records, lines, dropped


def _clean_value(key: str, value: Any) -> Any:
    """A record value as a plain JSON scalar, or TypeError naming the key."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    hint = " (call .item() on a 0-d tensor/array)" if hasattr(value, "item") else ""
    raise TypeError(f"record value for {key!r} has type {type(value).__name__}; values must be "
                    f"numbers, bools, strings or None{hint}")
