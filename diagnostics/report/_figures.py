"""The report's figures that ``diagnostics.plots`` does not draw: the phase timeline, per-domain GNS,
the information plane, the data map, the LR schedule with the fitted law, and the overlays of
several runs (``--compare``).

Same conventions as ``diagnostics.plots``: each function takes a Run (or, for the overlays, a list
of Runs), draws on a new figure, returns it, names what it needs in ``requires`` and raises
``plots.MissingMetricError`` (with the metric and the hook that writes it) when a run lacks it.
Every line carries its metric name as ``gid`` (overlays: ``"<run name>:<metric>"``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import seaborn as sns

from diagnostics import plots
from diagnostics.plots import MissingMetricError, _line, _pattern_re, _requires  # the figures' shared helpers

__all__ = ["metric_columns", "phase_timeline", "gns_domains", "information_plane", "data_map", "lr_schedule",
           "compare_loss", "compare_gns", "compare_lr", "DATA_MAP_ARRAY"]

DATA_MAP_ARRAY = "difficulty_examples"   # the DifficultyTracker's per-example table (hooks/difficulty.py)
_REGIONS = ("easy", "ambiguous", "hard")  # diagnostics.difficulty.REGIONS, the codes 0, 1, 2 of its "region"


def metric_columns(df: pd.DataFrame, pattern: str) -> list[str]:
    """Columns of ``df`` matching ``pattern`` (``*`` is one name segment) with at least one finite value."""
    rx = _pattern_re(pattern)
    out = []
    for c in df.columns:
        if rx.match(c) and np.isfinite(pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=float)).any():
            out.append(c)
    return out


def _need(run, pattern: str, figure: str, writer: str) -> list[str]:
    cols = metric_columns(run.metrics, pattern)
    if not cols:
        raise MissingMetricError(f"{figure} needs {pattern!r}, written by {writer}; run {run.name!r} has none", pattern)
    return cols


def _series(run, col: str) -> pd.Series:
    s = pd.to_numeric(run.metrics.set_index("step")[col], errors="coerce")
    return s[np.isfinite(s.to_numpy(dtype=float))]


def _fig(nrows: int = 1, ncols: int = 1, width: float = 7.0, height: float = 4.0, **kw):
    import matplotlib.pyplot as plt
    with sns.axes_style("whitegrid"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", squeeze=False, **kw)
    return fig, list(axes.ravel())


# ----------------------------------------------------------------------------- one run

def phase_timeline(run):
    """The phases over steps: each phase's data mixture (stacked, from the config) and the sequence
    length and batch (tokens per step) the loop recorded. For a run of another loop without phases in
    its config, the phases come from ``train/phase`` and the mixture panel says there is none."""
    phases = plots.phases_of(run)
    if not phases:
        raise MissingMetricError("the phase timeline needs phases: run.json's phase_starts/phase_names (the "
                                 "built-in loop) or a train/phase column (Monitor.on_step_end(..., phase=...))",
                                 "train/phase")
    cfg = {p.get("name"): p for p in (run.config.get("phases") or [])}
    fig, (ax_mix, ax_len) = _fig(2, 1, width=10.0, height=4.6, sharex=True)
    doms = sorted({d for p in cfg.values() for d in (p.get("mixture") or {})})
    pal = dict(zip(doms, sns.color_palette("tab10", max(len(doms), 1))))
    if doms:
        bottom = {(s, e): 0.0 for s, e, _ in phases}
        for d in doms:
            for s, e, name in phases:
                mix = cfg.get(name, {}).get("mixture") or {}
                w = float(mix.get(d, 0.0)) / (float(sum(mix.values())) or 1.0)
                ax_mix.fill_between([s, e], bottom[(s, e)], bottom[(s, e)] + w, color=pal[d], lw=0,
                                    label=d if s == phases[0][0] else None, gid=f"mixture:{name}:{d}")
                bottom[(s, e)] += w
        ax_mix.set_ylim(0, 1)
        ax_mix.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax_mix.text(0.5, 0.5, "no mixture in the config (not a run of the built-in loop)",
                    transform=ax_mix.transAxes, ha="center", va="center", color="0.4")
    for s, _, name in phases:
        ax_mix.axvline(s, color="black", lw=1.0)
        ax_mix.text(s, 1.02, f" {name}", transform=ax_mix.get_xaxis_transform(), fontsize="small", va="bottom")
    ax_mix.set_ylabel("mixture weight")
    seq = metric_columns(run.metrics, "train/seq_len")
    bt = metric_columns(run.metrics, "train/batch_tokens")
    if seq:
        _line(ax_len, _series(run, seq[0]), seq[0], color="tab:blue", drawstyle="steps-post", label="sequence length")
        ax_len.set_ylabel("sequence length (tokens)")
        ax_len.set_ylim(bottom=0)
    if bt:
        twin = ax_len.twinx()
        twin.grid(False)
        _line(twin, _series(run, bt[0]), bt[0], color="tab:red", ls="--", drawstyle="steps-post",
              label="tokens per step")
        twin.set_ylabel("tokens per step (dashed)")
        twin.set_ylim(bottom=0)
    plots.shade_phases(ax_len, phases, label=False)
    ax_len.set_xlabel("step")
    fig.suptitle(f"phases -- {run.name}", fontsize="medium")
    return fig


@_requires("gns/domain/*/b_simple")
def gns_domains(run, *, recommended: float | None = None):
    """B_simple per data domain (``gns/domain/<d>/b_simple``) against the whole batch's
    (``gns/b_simple``) and the batch size used; ``recommended`` draws the recommended batch."""
    cols = _need(run, "gns/domain/*/b_simple", "the per-domain noise scale",
                 "the GradientNoiseScale hook from the per-example norms grouped by the loop's domains (docs/gns.md)")
    fig, (ax,) = _fig()
    plots.shade_phases(ax, run)
    if metric_columns(run.metrics, "gns/b_simple"):
        _line(ax, _series(run, "gns/b_simple"), "gns/b_simple", color="black", lw=2.0, label="all domains")
    pal = sns.color_palette("tab10", len(cols))
    for c, color in zip(cols, pal):
        _line(ax, _series(run, c), c, color=color, lw=1.2, label=c.split("/")[2])
    if metric_columns(run.metrics, "train/batch_size"):
        _line(ax, _series(run, "train/batch_size"), "train/batch_size", color="tab:red", ls="--",
              drawstyle="steps-post", label="batch size")
    if recommended is not None:
        ax.axhline(recommended, color="tab:green", ls=":", lw=1.5, label=f"recommended batch {recommended:g}",
                   gid="recommended")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple (sequences)")
    ax.set_title(f"gradient noise scale per domain -- {run.name}", fontsize="medium")
    ax.legend(fontsize="small")
    return fig


@_requires("repr/*/mi_xt", "repr/*/mi_ty")
def information_plane(run):
    """The information plane: I(X;T) (x) against I(T;Y) (y) of each probed layer, one path per layer
    through the probe steps, its points coloured by step (Shwartz-Ziv and Tishby 2017; the matrix-based
    estimators of docs/representation.md). A path that moves left late in training is compression."""
    writer = "the RepresentationProbe hook (info_plane=True, docs/representation.md)"
    xs = _need(run, "repr/*/mi_xt", "the information plane", writer)
    ys = set(_need(run, "repr/*/mi_ty", "the information plane", writer))
    layers = [c.split("/")[1] for c in xs if f"repr/{c.split('/')[1]}/mi_ty" in ys]
    if not layers:
        raise MissingMetricError("the information plane needs repr/<layer>/mi_xt and mi_ty of the same layer", "mi_ty")
    fig, (ax,) = _fig(width=7.5, height=5.0)
    df = run.metrics.set_index("step")
    pal = sns.color_palette("viridis", len(layers))
    steps_all = df.index.to_numpy(dtype=float)
    norm = (float(steps_all.min()), float(max(steps_all.max(), steps_all.min() + 1)))
    sc = None
    for layer, color in zip(layers, pal):
        t = df[[f"repr/{layer}/mi_xt", f"repr/{layer}/mi_ty"]].apply(pd.to_numeric, errors="coerce").dropna()
        (ln,) = ax.plot(t.iloc[:, 0], t.iloc[:, 1], color=color, lw=1.0, label=layer)
        ln.set_gid(f"repr/{layer}/mi")
        sc = ax.scatter(t.iloc[:, 0], t.iloc[:, 1], c=t.index.to_numpy(dtype=float), cmap="magma", vmin=norm[0],
                        vmax=norm[1], s=18, zorder=3, edgecolors="none")
        ax.annotate(layer, (t.iloc[-1, 0], t.iloc[-1, 1]), fontsize="x-small", color=color)
    if sc is not None:
        fig.colorbar(sc, ax=ax, label="step")
    ax.set_xlabel("I(X;T) (bits)")
    ax.set_ylabel("I(T;Y) (bits)")
    ax.set_title(f"information plane -- {run.name}", fontsize="medium")
    ax.legend(fontsize="x-small", loc="lower right")
    return fig


def data_map(run, array: str = DATA_MAP_ARRAY):
    """The data map (Swayamdipta et al. 2020) of the tracked training examples: variability (x)
    against confidence (y), coloured by domain, and the share of each domain's examples in the easy,
    ambiguous and hard regions (docs/difficulty.md). From ``arrays/<array>.npz`` of the DifficultyTracker."""
    if array not in run.arrays():
        raise MissingMetricError(f"the data map needs arrays/{array}.npz, written by the DifficultyTracker hook "
                                 f"(docs/difficulty.md); run {run.name!r} has no such array", f"arrays/{array}")
    a = run.load_array(array)
    need = ("confidence", "variability", "domain", "region")
    if any(k not in a for k in need):
        raise MissingMetricError(f"arrays/{array}.npz lacks {[k for k in need if k not in a]}", f"arrays/{array}")
    names = [str(x) for x in a["domain_names"]] if "domain_names" in a else []
    dom = np.asarray(a["domain"], dtype=int)
    label = np.array([names[i] if 0 <= i < len(names) else str(i) for i in dom])
    doms = sorted(set(label))
    pal = dict(zip(doms, sns.color_palette("tab10", max(len(doms), 1))))
    fig, (ax, bx) = _fig(1, 2, width=11.0, height=4.4, gridspec_kw={"width_ratios": [3, 2]})
    for d in doms:
        m = label == d
        pc = ax.scatter(a["variability"][m], a["confidence"][m], s=8, alpha=0.6, color=pal[d], label=d)
        pc.set_gid(f"data_map:{d}")
    ax.set_xlabel("variability (std of the example's probability over visits)")
    ax.set_ylabel("confidence (mean probability)")
    ax.set_title(f"data map ({len(dom)} examples)", fontsize="medium")
    ax.legend(fontsize="x-small", markerscale=2)
    region = np.asarray(a["region"], dtype=int)
    shares = np.array([[np.mean(region[label == d] == r) for r in range(len(_REGIONS))] for d in doms])
    left = np.zeros(len(doms))
    for r, (name, color) in enumerate(zip(_REGIONS, ("tab:green", "tab:orange", "tab:red"))):
        bx.barh(doms, shares[:, r], left=left, color=color, label=name, gid=f"region:{name}")
        left += shares[:, r]
    bx.set_xlim(0, 1)
    bx.set_xlabel("share of the domain's examples")
    bx.set_title("regions", fontsize="medium")
    bx.legend(fontsize="x-small", loc="lower right")
    fig.suptitle(f"data map -- {run.name}", fontsize="medium")
    return fig


@_requires("train/lr")
def lr_schedule(run, *, law=None, anneal=None):
    """The learning rate over steps with the phases; the train loss and, given ``law`` (``(steps,
    predicted loss, label)``), the schedule law's fit of it on a twin axis; given ``anneal``
    (``(step, low, high)``), the recommended anneal start and its range."""
    lr = _need(run, "train/lr", "the LR schedule", "the training loop (Monitor.on_step_end(step, lr=...))")[0]
    fig, (ax,) = _fig(width=9.0, height=4.2)
    plots.shade_phases(ax, run)
    h = [_line(ax, _series(run, lr), lr, color="tab:blue", lw=1.5, label="LR")]
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("step")
    if anneal is not None:
        step, low, high = anneal
        h.append(ax.axvline(step, color="tab:green", lw=2.0, ls="--", label=f"recommended anneal start {step:g}",
                            gid="anneal_start"))
        if low is not None and high is not None and np.isfinite([low, high]).all() and high > low:
            (rng,) = ax.plot([low, high], [0.93, 0.93], transform=ax.get_xaxis_transform(), color="tab:green",
                             lw=6, alpha=0.5, solid_capstyle="butt", label=f"its range {low:g} - {high:g}")
            rng.set_gid("anneal_range")
            h.append(rng)
    if metric_columns(run.metrics, "train/loss"):
        twin = ax.twinx()
        twin.grid(False)
        loss = _series(run, "train/loss")
        h.append(_line(twin, loss, "train/loss", color="0.55", lw=0.7, alpha=0.8, label="train loss"))
        if law is not None:
            steps, pred, name = law
            (ln,) = twin.plot(steps, pred, color="black", lw=1.5, label=f"{name} fit")
            ln.set_gid("law")
            h.append(ln)
        lo, hi = np.nanpercentile(loss.to_numpy(dtype=float), [1, 99])
        twin.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
        twin.set_ylabel("train loss (nats/token)")
    ax.legend(h, [x.get_label() for x in h], fontsize="small", loc="upper right")
    ax.set_title(f"LR schedule and the schedule law -- {run.name}", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- several runs

def _run_colors(runs) -> list:
    return sns.color_palette("tab10", max(len(runs), 1))


def _overlay(ax, runs, col: str, **kw) -> int:
    n = 0
    for run, color in zip(runs, _run_colors(runs)):
        if col in run.metrics.columns and metric_columns(run.metrics, col):
            _line(ax, _series(run, col), f"{run.name}:{col}", color=color, label=run.name, **kw)
            n += 1
    return n


def _check_any(runs, pattern: str, figure: str, writer: str) -> None:
    if not any(metric_columns(r.metrics, pattern) for r in runs):
        raise MissingMetricError(f"{figure} needs {pattern!r}, written by {writer}; none of the runs has it", pattern)


@_requires("val/*/loss")
def compare_loss(runs):
    """Train loss (rolling median) and each domain's validation loss, one colour per run."""
    _check_any(runs, "val/*/loss", "the validation overlay", "the training loop's evaluation")
    doms = sorted({c.split("/")[1] for r in runs for c in metric_columns(r.metrics, "val/*/loss")})
    fig, axes = _fig(1, 1 + len(doms), width=3.6 * (1 + len(doms)), height=3.6)
    for run, color in zip(runs, _run_colors(runs)):
        if metric_columns(run.metrics, "train/loss"):
            s = _series(run, "train/loss")
            s = s.rolling(max(1, len(s) // 40), min_periods=1, center=True).median()
            _line(axes[0], s, f"{run.name}:train/loss", color=color, lw=1.0, label=run.name)
    axes[0].set_title("train loss (rolling median)", fontsize="medium")
    axes[0].set_ylabel("nats/token")
    for d, ax in zip(doms, axes[1:]):
        _overlay(ax, runs, f"val/{d}/loss", marker="o", ms=2.5, lw=1.0)
        ax.set_title(f"validation loss: {d}", fontsize="medium")
    for ax in axes:
        ax.set_xlabel("step")
    axes[0].legend(fontsize="x-small")
    fig.suptitle("runs compared: loss", fontsize="medium")
    return fig


@_requires("gns/b_simple")
def compare_gns(runs):
    """B_simple (``gns/b_simple``, solid) and the batch size (dashed) of each run."""
    _check_any(runs, "gns/b_simple", "the GNS overlay", "the GradientNoiseScale hook")
    fig, (ax,) = _fig(width=8.0, height=4.0)
    _overlay(ax, runs, "gns/b_simple", lw=1.3)
    for run, color in zip(runs, _run_colors(runs)):
        if metric_columns(run.metrics, "train/batch_size"):
            _line(ax, _series(run, "train/batch_size"), f"{run.name}:train/batch_size", color=color, ls="--",
                  lw=1.0, drawstyle="steps-post")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("B_simple / batch size (sequences)")
    ax.set_title("runs compared: gradient noise scale (solid) and batch size (dashed)", fontsize="medium")
    ax.legend(fontsize="x-small")
    return fig


@_requires("train/lr")
def compare_lr(runs):
    """The learning rate of each run over steps."""
    _check_any(runs, "train/lr", "the LR overlay", "the training loop")
    fig, (ax,) = _fig(width=8.0, height=3.6)
    _overlay(ax, runs, "train/lr", lw=1.3)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.set_ylim(bottom=0)
    ax.set_title("runs compared: learning rate", fontsize="medium")
    ax.legend(fontsize="x-small")
    return fig
