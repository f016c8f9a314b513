"""kill -9 at chosen and at random moments, then --resume: the run ends with every step recorded once
and the same numbers as a run that was never interrupted (the fault-injection suite of issue 11).

Each kill is a real SIGKILL of a child process (tests/reliability/_kill_child.py): inside a checkpoint
write with half the checkpoint in the temporary file, inside a metrics.jsonl append with half a line
written, and at moments drawn at random (seeded) while the child trains.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from diagnostics.runs import RunDirWarning, load_run

CHILD = Path(__file__).with_name("_kill_child.py")
ROOT = Path(__file__).resolve().parents[2]


def _run(run_dir: Path, *extra: str, kill_after: float | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(CHILD), str(run_dir), *extra], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    if p.returncode not in (0, -signal.SIGKILL):
        raise AssertionError(f"child exited {p.returncode}:\n{err[-3000:]}")
    return p.returncode


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, in a child process like the others."""
    d = tmp_path_factory.mktemp("kill") / "ref"
    assert _run(d) == 0
    return load_run(d)


def _assert_same_run(run_dir: Path, ref) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunDirWarning)  # a dropped truncated line, before the resume
        run = load_run(run_dir)
    assert run.info["status"] == "finished"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r["step"] for r in lines if "train/loss" in r]
    assert steps == sorted(set(steps)) == list(range(ref.info["total_steps"])), "a step missing or twice"
    assert run.gaps() == []
    a, b = ref.metrics.set_index("step"), run.metrics.set_index("step")
    assert list(a.index) == list(b.index)
    for col in [c for c in a.columns if c.startswith(("train/loss", "val/", "gns/b_simple", "train/lr"))]:
        np.testing.assert_allclose(b[col].to_numpy(float), a[col].to_numpy(float), rtol=0, atol=1e-6,
                                   equal_nan=True, err_msg=col)


def _finished(d: Path) -> bool:
    p = d / "run.json"
    return p.exists() and json.loads(p.read_text()).get("status") == "finished"


@pytest.mark.parametrize("kill", ["ckpt:2", "ckpt:4", "metrics:13"])  # ckpt:4 resumes at the phase switch (step 10)
def test_kill_inside_a_write_then_resume(tmp_path, reference, kill):
    d = tmp_path / "r"
    assert _run(d, "--kill", kill) == -signal.SIGKILL
    if kill.startswith("ckpt"):  # the torn checkpoint is a temporary file, never a checkpoint
        names = os.listdir(d / "checkpoints")
        assert [n for n in names if n.endswith(".tmp")] and all(
            n.startswith(".") for n in names if not n.startswith("step_"))
        assert len([n for n in names if n.startswith("step_")]) == int(kill.split(":")[1]) - 1
    else:
        assert not (d / "metrics.jsonl").read_text().endswith("\n")  # half a line left behind
    assert _run(d) == 0
    _assert_same_run(d, reference)


def test_kill_at_random_moments_then_resume(tmp_path, reference):
    """Three SIGKILLs at seeded random moments of one run (wherever they land: start-up, a step, an
    evaluation, a checkpoint), each followed by a resume; then the run is finished."""
    rng = random.Random(11)
    d = tmp_path / "r"
    t0 = time.perf_counter()
    _run(tmp_path / "timing")
    full = time.perf_counter() - t0
    killed = 0
    for _ in range(3):
        if _finished(d):
            break
        killed += _run(d, kill_after=rng.uniform(0.35, 0.95) * full) == -signal.SIGKILL
    if not _finished(d):
        assert _run(d) == 0
    assert killed >= 1
    _assert_same_run(d, reference)
