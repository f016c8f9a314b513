"""diagnostics.plots on a real tiny run of the built-in loop: every figure draws exactly the
run's metrics, shades its phases, and names the metric it lacks."""

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from diagnostics import load_run, plots  # noqa: E402
from diagnostics.plots import MissingMetricError  # noqa: E402

PHASES = [(0, 12, "pretrain"), (12, 20, "midtrain"), (20, 24, "long_context")]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = micro_config(steps=(12, 8, 4))
        # readings often enough that learnability exists in 24 steps
        cfg.monitor.difficulty = {"stats_every": 4, "min_points": 3, "probe_size": 4}
        cfg.monitor.representation = {"probe_sequences": 2, "max_tokens": 96}
        out = tmp_path_factory.mktemp("plots") / "run"
        train(cfg, str(out), progress=False, strict_hooks=True)
    finally:
        torch.set_num_threads(old)
    return load_run(out)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def lines(fig_or_ax) -> dict:
    """gid -> Line2D over every Axes of the figure."""
    fig = getattr(fig_or_ax, "figure", fig_or_ax)
    return {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines() if ln.get_gid()}


def assert_line_is(line, series: pd.Series):
    np.testing.assert_array_equal(line.get_xdata(), series.index.to_numpy())
    np.testing.assert_array_equal(line.get_ydata(), series.to_numpy())


def phase_spans(ax) -> list:
    return [(p.get_x(), p.get_x() + p.get_width(), p.get_gid()) for p in ax.patches
            if (p.get_gid() or "").startswith("phase:")]


def test_validation_loss_draws_each_domain_and_the_lr(run):
    ax = plots.validation_loss(run, train=True)
    got = lines(ax)
    assert run.domains() == ["code", "math", "prose"]
    for d in run.domains():
        assert_line_is(got[f"val/{d}/loss"], run.metric(f"val/{d}/loss"))
    assert_line_is(got["train/lr"], run.metric("train/lr"))
    assert_line_is(got["train/loss"], run.metric("train/loss"))
    lr_axes = [a for a in ax.figure.axes if got["train/lr"] in a.get_lines()]
    assert lr_axes and lr_axes[0] is not ax  # the twin axis
    assert run.info["phase_starts"] == [0, 12, 20]
    assert phase_spans(ax) == [(s, e, f"phase:{n}") for s, e, n in PHASES]
    assert plots.phases_of(run) == PHASES
    # the legend names the domains and the LR
    assert {t.get_text() for t in ax.get_legend().get_texts()} >= {"code", "math", "prose", "LR"}


def test_gns_total_groups_and_batch_in_both_units(run):
    ax = plots.gns(run)
    got = lines(ax)
    assert_line_is(got["gns/b_simple"], run.metric("gns/b_simple"))
    assert_line_is(got["train/batch_size"], run.metric("train/batch_size"))
    groups = [c.split("/")[1] for c in run.metric_names() if c.startswith("gns/") and c.endswith("/b_simple")
              and c.count("/") == 2]
    kinds = [g for g in groups if not g.startswith("blocks.")]
    assert {"embeddings", "attention", "mlp"} <= set(kinds) and {"blocks.0", "blocks.1"} <= set(groups)
    for g in kinds:
        assert_line_is(got[f"gns/{g}/b_simple"], run.metric(f"gns/{g}/b_simple"))
    assert "gns/blocks.0/b_simple" not in got  # per-layer groups only on request
    assert ax.get_yscale() == "log"
    assert phase_spans(ax) == [(s, e, f"phase:{n}") for s, e, n in PHASES]

    layers = lines(plots.gns(run, groups="layers"))
    assert set(layers) == {"gns/b_simple", "train/batch_size", "gns/blocks.0/b_simple", "gns/blocks.1/b_simple"}

    tok = lines(plots.gns(run, unit="tokens", groups=["attention"]))
    assert_line_is(tok["gns/b_simple_tokens"], run.metric("gns/b_simple_tokens"))
    assert_line_is(tok["train/batch_tokens"], run.metric("train/batch_tokens"))
    # the loop's tokens per example is the step's sequence length (seq_len 32, then 64)
    expect = (run.metric("gns/attention/b_simple") * run.metric("train/seq_len")).dropna()
    assert set(run.metric("train/seq_len")) == {32.0, 64.0}
    np.testing.assert_array_equal(tok["gns/attention/b_simple_tokens"].get_xdata(), expect.index)
    np.testing.assert_allclose(tok["gns/attention/b_simple_tokens"].get_ydata(), expect.to_numpy(), rtol=1e-12)

    with pytest.raises(MissingMetricError, match="nope"):
        plots.gns(run, groups=["nope"])
    with pytest.raises(ValueError, match="unit"):
        plots.gns(run, unit="bytes")


def repr_table(run, metric, domain=None):
    seg = f"{domain}/{metric}" if domain else metric
    cols = [c for c in run.metric_names() if c.startswith("repr/") and c.count("/") == seg.count("/") + 2
            and c.endswith("/" + seg)]
    t = run.metrics.set_index("step")[cols].dropna(how="all")
    t.columns = [c.split("/")[1] for c in cols]
    return t.T


@pytest.mark.parametrize("metric,domain", [("effective_rank", None), ("twonn_id", None), ("entropy", "math")])
def test_representation_heatmap_cells_are_the_metrics(run, metric, domain):
    ax = plots.representation_heatmap(run, metric, domain=domain)
    want = repr_table(run, metric, domain)
    assert list(want.index) == ["blocks.0.resid_post", "blocks.1.resid_post", "final_norm"]  # model order
    cells = np.asarray(ax.collections[0].get_array()).reshape(want.shape)
    np.testing.assert_array_equal(cells, want.to_numpy())
    assert [t.get_text() for t in ax.get_yticklabels()] == list(want.index)
    assert [int(t.get_text()) for t in ax.get_xticklabels()] == list(want.columns)
    # phase starts at column boundaries: the probes also measure at each phase boundary (steps 12 and 20,
    # Monitor.set_boundaries), so each phase's line is at the left edge of its own first column
    starts = {ln.get_gid(): ln.get_xdata()[0] for ln in ax.get_lines()}
    cols = list(want.columns)
    assert 12 in cols and 20 in cols
    assert starts["phase:midtrain"] == cols.index(12) and starts["phase:long_context"] == cols.index(20)


def test_representation_lines_and_grid(run):
    got = lines(plots.representation(run, "alpha_req"))
    want = repr_table(run, "alpha_req")
    assert len(got) == 3
    for layer, row in want.iterrows():
        assert_line_is(got[f"repr/{layer}/alpha_req"], row.dropna())

    fig = plots.representation_grid(run)
    got = lines(fig)
    assert len(fig.axes) == 4
    for m in plots.REPR_METRICS:
        for layer, row in repr_table(run, m).iterrows():
            assert_line_is(got[f"repr/{layer}/{m}"], row.dropna())
    fig = plots.representation_grid(run, ("entropy", "mi_ty"), kind="heatmap")
    heatmaps = [a for a in fig.axes if a.get_label() != "<colorbar>"]
    assert [a.get_title() for a in heatmaps] == ["entropy", "mi_ty"] and all(a.collections for a in heatmaps)


def test_difficulty_panels_draw_the_metrics(run):
    fig = plots.difficulty(run)
    got = lines(fig)
    for d in run.domains():
        for key in ("loss", "probe_loss", "learnability", "frac_learned"):
            assert_line_is(got[f"difficulty/{d}/{key}"], run.metric(f"difficulty/{d}/{key}"))
    # +-1 standard error band around learnability
    ax = plots.learnability(run)
    band = [c for c in ax.collections if c.get_gid() == "difficulty/code/learnability_se"]
    assert len(band) == 1
    ys = np.concatenate([p.vertices[:, 1] for p in band[0].get_paths()])
    s, se = run.metric("difficulty/code/learnability"), run.metric("difficulty/code/learnability_se")
    assert np.isclose(ys.max(), (s + se).max()) and np.isclose(ys.min(), (s - se).min())

    # frac_forgotten is drawn when the run has it (this short run does not: add it to the frame)
    assert "difficulty/frac_forgotten" not in got
    df = run.metrics.copy()
    df["difficulty/frac_forgotten"] = np.where(df["step"] % 4 == 0, df["step"] / 100.0, np.nan)
    ax = plots.learned_forgotten(df)
    want = df.set_index("step")["difficulty/frac_forgotten"].dropna()
    assert_line_is(lines(ax)["difficulty/frac_forgotten"], want)
    # the DataFrame's phases come from its train/phase column
    assert phase_spans(ax) == [(s, e, f"phase:{n}") for s, e, n in PHASES]

    # a panel whose metric is not there yet says so, the others still draw
    no_learn = run.metrics.drop(columns=[c for c in run.metrics.columns if "learnability" in c])
    fig = plots.difficulty(no_learn)
    texts = [t.get_text() for t in fig.axes[1].texts]
    assert any("difficulty/*/learnability" in t for t in texts)
    assert "difficulty/code/loss" in lines(fig)


FIGURES = [plots.validation_loss, plots.gns, plots.representation, plots.representation_heatmap,
           plots.representation_grid, plots.difficulty_loss, plots.learnability, plots.learned_forgotten,
           plots.difficulty]


@pytest.mark.parametrize("fn", FIGURES, ids=lambda f: f.__name__)
def test_every_figure_draws_and_names_each_metric_it_lacks(run, fn):
    assert fn(run) is not None
    assert fn.requires
    for pattern in fn.requires:
        rx = plots._pattern_re(pattern)
        dropped = run.metrics.drop(columns=[c for c in run.metrics.columns if rx.match(c)])
        with pytest.raises(MissingMetricError, match=pattern.replace("*", r"\*")) as e:
            fn(dropped)
        assert e.value.metric == pattern
        # NaN-only counts as missing too, and the message says so
        nan_only = run.metrics.copy()
        for c in nan_only.columns:
            if rx.match(c):
                nan_only[c] = np.nan
        with pytest.raises(MissingMetricError, match="hold only NaN"):
            fn(nan_only)
    plt.close("all")


def test_error_messages_and_options(run):
    with pytest.raises(MissingMetricError) as e:
        plots.gns(run.metrics.drop(columns=[c for c in run.metrics.columns if c.startswith("gns/")]))
    msg = str(e.value)
    assert "'gns/b_simple'" in msg and "GradientNoiseScale" in msg and "is the hook enabled" in msg
    with pytest.raises(MissingMetricError, match="lr=False"):
        plots.validation_loss(run.metrics.drop(columns=["train/lr"]))
    ax = plots.validation_loss(run.metrics.drop(columns=["train/lr"]), lr=False)
    assert "train/lr" not in lines(ax)
    with pytest.raises(MissingMetricError, match="repr/\\*/bogus"):
        plots.representation(run, "bogus")
    with pytest.raises(MissingMetricError, match="layers"):
        plots.representation(run, layers=["blocks.7.resid_post"])
    with pytest.raises(TypeError, match="Run"):
        plots.validation_loss({"step": [0]})
    # a branch's frame starts mid-run: phases are clipped to its steps
    late = run.metrics[run.metrics["step"] >= 14]
    assert plots.phases_of(late, run.info) == [(14, 20, "midtrain"), (20, 24, "long_context")]
    # an Axes passed in is drawn on and returned
    fig, ax = plt.subplots()
    assert plots.difficulty_loss(run, ax) is ax


def test_phase_labels_are_clipped_to_a_zoomed_view():
    """A zoomed line plot (set_xlim) shows no label of a phase outside the view and does not grow its
    tight bounding box for them (the labels were drawn unclipped before); a heatmap's labels stay above it."""
    fig, ax = plt.subplots()
    ax.plot([0, 24], [1, 0])
    plots.shade_phases(ax, PHASES)
    ax.set_xlim(14, 24)
    fig.canvas.draw()
    labels = {t.get_text().strip(): t for t in ax.texts}
    assert all(t.get_clip_on() for t in labels.values())
    renderer = fig.canvas.get_renderer()
    bbox_axes = ax.get_window_extent(renderer)
    assert ax.get_tightbbox(renderer).x0 >= bbox_axes.x0 - 60  # only the y tick labels to the left, no stray text
    fig2, ax2 = plt.subplots()
    plots.shade_phases(ax2, PHASES, columns=[0, 4, 8, 12, 16, 20])
    assert not any(t.get_clip_on() for t in ax2.texts)
