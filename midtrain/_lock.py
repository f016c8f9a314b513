"""One process at a time trains a run directory: the lock file ``<run>/lock.json``
(``diagnostics.runs.LOCK_FILE``) holds the training process's pid, host, start time and command line.

``train()`` takes it before it reads the run directory and releases it when it returns or raises.
It is created with a hard link from a complete temporary file, so it is never seen half written. A
lock held by a live process, or by a process on another host (whose liveness cannot be checked
from here), is a ``RunDirError`` naming the holder. A lock whose pid is gone on this host is stale
(a process killed with ``kill -9``): it is taken over with a warning. A lock taken for a new run
directory that start-up then leaves empty removes the directory again on release.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
import warnings

from diagnostics.runs import LOCK_FILE, RunDirError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _read_holder(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


class RunLock:
    """The lock of run directory ``run_dir``, taken by ``acquire``; ``release`` gives it back."""

    def __init__(self, run_dir: str):
        self.run_dir, self.path = run_dir, os.path.join(run_dir, LOCK_FILE)
        self.made_dir, self.held = False, False

    def acquire(self) -> "RunLock":
        self.made_dir = not os.path.isdir(self.run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": list(sys.argv)}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(me, f)
        try:
            for _ in range(3):  # a stale lock taken over, then another try
                try:
                    os.link(tmp, self.path)  # fails if the lock exists: no two holders
                    self.held = True
                    return self
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            os.unlink(tmp)
        raise RunDirError(f"could not take the lock {self.path}: other processes keep taking it.", self.path)

    def _take_over_if_stale(self) -> None:
        holder = _read_holder(self.path)
        if holder is None:  # released meanwhile
            return
        pid, host = holder.get("pid"), holder.get("host")
        who = f"process {pid} on host {host} (since {holder.get('since', '?')})"
        if not isinstance(pid, int) or host != socket.gethostname() or _pid_alive(pid):
            self._cleanup_dir()
            raise RunDirError(
                f"{self.run_dir} is in use: {LOCK_FILE} says {who} is training it. Two processes must not "
                f"write one run. Wait for it to end, or stop it; if it is gone (another host, a crash), delete "
                f"{self.path} and try again. Nothing was changed.", self.path)
        warnings.warn(f"{self.path}: taking over the stale lock of {who}: that process no longer exists.",
                      UserWarning, stacklevel=3)
        if _read_holder(self.path) == holder:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def release(self) -> None:
        if self.held and (_read_holder(self.path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.held = False
        self._cleanup_dir()

    def _cleanup_dir(self) -> None:
        """A directory made for the lock and left empty (start-up failed) is removed again."""
        if self.made_dir:
            try:
                os.rmdir(self.run_dir)
            except OSError:  # not empty: the run started
                pass
