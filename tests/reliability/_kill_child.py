"""Child process of tests/reliability/test_kill.py: one `midtrain train` of the micro recipe that may be
killed with SIGKILL at a chosen point, or by the parent at any moment.

    python tests/reliability/_kill_child.py RUN_DIR [--kill ckpt:K | metrics:S]

--kill ckpt:K     SIGKILL inside the K-th checkpoint write this process makes, with half of the
                  checkpoint's bytes in the temporary file (a real torn write)
--kill metrics:S  SIGKILL inside the write of step S's record to metrics.jsonl, half of its line written
It resumes RUN_DIR when it holds a run (run.json), else starts it.
"""

from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from diagnostics.runs import RUN_JSON  # noqa: E402
from tests.midtrain.conftest import micro_config  # noqa: E402

STEPS = (10, 8, 6)


def config():
    return micro_config(steps=STEPS, checkpoint_every=4, eval_every=6)


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_in_checkpoint(k: int) -> None:
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **kw):
        if hasattr(f, "write") and isinstance(obj, dict) and "model" in obj:
            calls["n"] += 1
            if calls["n"] == k:
                buf = io.BytesIO()
                real_save(obj, buf, *a, **kw)
                data = buf.getvalue()
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                _die()
        return real_save(obj, f, *a, **kw)

    torch.save = save


def _kill_in_metrics(step: int) -> None:
    from diagnostics import runs

    real_log = runs.RunWriter.log

    def log(self, record):
        if record.get("step") == step and "train/loss" in record:
            path = Path(self.path) / runs.METRICS_FILE
            with open(path, "a", encoding="utf-8") as f:  # half a line, as a killed write leaves it
                f.write('{"step": %d, "train/lo' % step)
                f.flush()
                os.fsync(f.fileno())
            _die()
        return real_log(self, record)

    runs.RunWriter.log = log


def main(argv: list[str]) -> int:
    torch.set_num_threads(1)
    run_dir = argv[0]
    if len(argv) > 2 and argv[1] == "--kill":
        what, n = argv[2].split(":")
        (_kill_in_checkpoint if what == "ckpt" else _kill_in_metrics)(int(n))
    from midtrain.loop import train

    resume = os.path.exists(os.path.join(run_dir, RUN_JSON))
    train(config(), run_dir, resume=resume, progress=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
