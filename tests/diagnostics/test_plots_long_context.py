"""diagnostics.plots.plot_loss_by_position and plot_retrieval on synthetic run directories: every line is
exactly the arrays / metrics written, named by its gid; what is missing is named."""

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diagnostics import plots  # noqa: E402
from diagnostics.plots import MissingMetricError  # noqa: E402
from diagnostics.runs import RunWriter, load_run  # noqa: E402

CONFIG = {"phases": [{"name": "short", "seq_len": 32}, {"name": "long", "seq_len": 64}]}


def write_run(path, *, arrays=True, retrieval=True):
    w = RunWriter.create(path, CONFIG)
    w.update_info(total_steps=20, phase_starts=[0, 10], phase_names=["short", "long"])
    rng = np.random.default_rng(0)
    for s in range(21):
        rec = {"step": s, "train/loss": 3.0}
        if s in (10, 20):
            for L in (32, 64, 128):
                rec[f"val_pos/{L}/near_loss"] = 3.0
                if arrays:
                    start = np.arange(0, L, L // 16)
                    w.save_array(f"val_pos_{L}_step_{s}", bucket_start=start, bucket_end=start + L // 16,
                                 loss=rng.normal(3, 0.1, 16), tokens=np.full(16, 8.0))
        if retrieval and s % 5 == 0:
            for L in (64, 128):
                for d in (16, 48, 100):
                    if d < L:
                        rec[f"retrieval/{L}/depth_{d}/gain"] = 0.01 * s * (L - d) / L
        w.log(rec)
    w.close("finished")
    return load_run(path)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_loss_by_position_draws_the_arrays_at_each_phase_end(tmp_path):
    run = write_run(tmp_path / "r")
    ax = plots.plot_loss_by_position(run)            # default: the longest phase length, 64
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    assert set(lines) == {"val_pos_64_step_10", "val_pos_64_step_20"}
    a = run.load_array("val_pos_64_step_20")
    x, y = lines["val_pos_64_step_20"].get_data()
    assert np.array_equal(y, a["loss"]) and np.array_equal(x, (a["bucket_start"] + a["bucket_end"]) / 2)
    assert any(ln.get_xdata()[0] == 32 for ln in ax.get_lines() if not ln.get_gid())   # L0 marked
    ax = plots.plot_loss_by_position(run, length=128, steps=[20])
    assert [ln.get_gid() for ln in ax.get_lines() if ln.get_gid()] == ["val_pos_128_step_20"]
    with pytest.raises(MissingMetricError, match="lengths with arrays"):
        plots.plot_loss_by_position(run, length=256)
    with pytest.raises(MissingMetricError, match="val_pos_<L>_step_<N>"):
        plots.plot_loss_by_position(write_run(tmp_path / "n", arrays=False))


def test_retrieval_one_panel_per_length_one_line_per_depth(tmp_path):
    run = write_run(tmp_path / "r")
    fig = plots.plot_retrieval(run)
    assert [ax.get_title() for ax in fig.axes] == ["64 tokens", "128 tokens"]
    got = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}
    assert set(got) == {"retrieval/64/depth_16/gain", "retrieval/64/depth_48/gain", "retrieval/128/depth_16/gain",
                        "retrieval/128/depth_48/gain", "retrieval/128/depth_100/gain"}
    m = run.metric("retrieval/128/depth_100/gain")
    x, y = got["retrieval/128/depth_100/gain"].get_data()
    assert np.array_equal(x, m.index.to_numpy()) and np.allclose(y, m.to_numpy())
    fig = plots.plot_retrieval(run, lengths=[128])
    assert len(fig.axes) == 1
    with pytest.raises(MissingMetricError, match="retrieval"):
        plots.plot_retrieval(write_run(tmp_path / "n", retrieval=False))
