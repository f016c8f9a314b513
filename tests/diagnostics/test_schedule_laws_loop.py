"""The schedule laws on the built-in loop's own runs (benchmarks/schedule_laws_loop.py on a small budget):
fitted on a constant-LR run and a cosine run, the joint fit predicts a WSD run of the same loop.

Three 60-step runs of a 2-layer model (about 20 s on one busy core, 10 s idle): marked slow, the
benchmark runs the same code at 300 steps and prints the numbers (docs/validation.md)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
KW = dict(warmup=20, lr=3e-3, decay_fraction=0.2, wsd_shape="1-sqrt", seed=0, batch=16, seq=64, n_layer=2, n_embd=64)


def _bench():
    spec = importlib.util.spec_from_file_location("schedule_laws_loop_bench", ROOT / "benchmarks" / "schedule_laws_loop.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_constant_and_cosine_runs_predict_a_wsd_run(tmp_path, one_thread):
    b = _bench()
    curves = b.run_curves(str(tmp_path), 60, **KW)
    lrs, s, y = curves["wsd"]
    const = curves["constant"]
    stable = lrs[s - 1] == lrs.max()
    # the premise: same seed, same batches: the WSD run is the constant run until its decay starts
    assert stable.sum() > 0 and (~stable).sum() > 0
    np.testing.assert_array_equal(y[stable], const[2][: stable.sum()])
    rows = {r["law"]: r for r in b.evaluate(curves, smooth=11, fits=(("annealing", "least_squares"),
                                                                      ("multi_power", "least_squares")))}
    for law, r in rows.items():
        # measured at 60 steps: 0.58% against the smoothed loss, 1.74% against the logged (single-batch) loss
        assert r["mre_smooth"] < 0.015, law
        assert r["mre"] < 0.03, law
        assert abs(r["final_pred"] - r["final"]) / r["final"] < 0.03, law
