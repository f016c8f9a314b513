"""Figures of a run: one function per figure, each declaring the metrics it needs.

    from diagnostics import load_run, plots
    run = load_run("runs/demo")
    plots.validation_loss(run)                       # val/<domain>/loss, the LR on a twin axis
    plots.gns(run, unit="tokens")                    # B_simple (total, per group) vs the batch size
    plots.representation_heatmap(run, "effective_rank")   # layer x probe step
    plots.representation_grid(run)                  # entropy, effective rank, alpha-ReQ, TwoNN per layer
    plots.difficulty(run)                            # per-domain loss, learnability, learned/forgotten
    plots.plot_loss_by_position(run)                 # loss by position at each phase end (long context)
    plots.plot_retrieval(run)                        # retrieval gain by depth, one panel per length

Every function takes a :class:`~diagnostics.runs.Run` (``load_run``) or its ``metrics``
DataFrame, and an optional matplotlib ``ax`` (the figure-level ``*_grid`` / ``difficulty``:
an optional ``fig``), draws there (or on a new figure) and returns the Axes / Figure. Phases
are shaded (from ``run.info["phase_starts"]`` / ``["phase_names"]``, or, for a bare
DataFrame, from its ``train/phase`` column). Each function's ``requires`` attribute lists the
metric patterns it needs with its default arguments (``*`` is one name segment: a domain, a
layer, a group); a run lacking one raises :class:`MissingMetricError` naming the metric and
the hook that writes it. Every plotted line carries the metric name as its ``gid``
(``line.get_gid()``), so its data can be found again. What the metrics mean:
docs/gns.md, docs/representation.md, docs/difficulty.md; names: docs/run_directory.md.

matplotlib's backend is left to the caller (Jupyter: inline; scripts without a display:
``matplotlib.use("Agg")`` first). No global style is changed: new figures are made under
``seaborn.axes_style("whitegrid")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd
import seaborn as sns

__all__ = ["MissingMetricError", "phases_of", "shade_phases", "validation_loss", "gns",
           "representation", "representation_heatmap", "representation_grid", "difficulty_loss",
           "learnability", "learned_forgotten", "difficulty", "plot_loss_by_position", "plot_retrieval"]

REPR_METRICS = ("entropy", "effective_rank", "alpha_req", "twonn_id")

_WRITERS = {  # area prefix -> who writes it, for the error message
    "train/": "the training loop (midtrain.loop, or Monitor.on_step_end(step, loss=, lr=, tokens=))",
    "val/": "the training loop's evaluation (midtrain.loop: step 0, every eval_every, phase starts, end)",
    "gns/": "the GradientNoiseScale hook (docs/gns.md)",
    "repr/": "the RepresentationProbe hook (docs/representation.md)",
    "difficulty/": "the DifficultyTracker hook (docs/difficulty.md)",
    "val_pos/": "the training loop's evaluation at every length (midtrain.evaluate, docs/long_context.md)",
    "retrieval/": "the retrieval probe hook (hook name retrieval, docs/long_context.md)",
}


class MissingMetricError(LookupError):
    """A figure needs a metric the run does not have (or has only as NaN). ``.metric`` is the pattern."""

    def __init__(self, message: str, metric: str):
        super().__init__(message)
        self.metric = metric


def _requires(*patterns):
    def deco(fn):
        fn.requires = patterns
        return fn
    return deco


# ----------------------------------------------------------------------------- data access

@dataclass
class _Source:
    df: pd.DataFrame      # one row per step, "step" column
    phases: list          # [(start, end, name)], clipped to the steps present
    name: str
    domains: list         # every domain named by a val/ or difficulty/ column, sorted


def _pattern_re(pattern: str) -> re.Pattern:
    return re.compile("^" + "/".join("[^/]+" if p == "*" else re.escape(p) for p in pattern.split("/")) + "$")


def _source(data) -> _Source:
    if isinstance(data, _Source):
        return data
    if isinstance(data, pd.DataFrame):
        df, info, name = data, {}, "this DataFrame"
    elif hasattr(data, "metrics") and hasattr(data, "info"):
        df, info, name = data.metrics, data.info or {}, f"run {getattr(data, 'name', '?')!r}"
    else:
        raise TypeError(f"plots take a Run (diagnostics.load_run) or its metrics DataFrame, got {type(data).__name__}")
    if "step" not in df.columns:
        raise ValueError(f"{name} has no 'step' column: pass run.metrics (one row per step)")
    df = df.sort_values("step", kind="stable").reset_index(drop=True)
    doms = {m.group(1) for c in df.columns if (m := re.match(r"^(?:val|difficulty)/([^/]+)/", c))}
    return _Source(df, phases_of(df, info), name, sorted(doms))


def phases_of(data, info: dict | None = None) -> list[tuple[int, int, str]]:
    """``[(start, end, name)]`` of the phases, clipped to the steps of the run's metrics.

    From ``info["phase_starts"]`` / ``["phase_names"]`` (``run.info``, written by the built-in
    loop) when given, else from the ``train/phase`` column; ``[]`` when neither is there.
    """
    if hasattr(data, "metrics") and info is None:
        data, info = data.metrics, data.info
    df = data
    if not len(df):
        return []
    lo, hi = int(df["step"].min()), int(df["step"].max())
    info = info or {}
    starts, names = info.get("phase_starts"), info.get("phase_names")
    spans = []
    if starts and names and len(starts) == len(names):
        ends = list(starts[1:]) + [max(int(info.get("total_steps") or hi), hi)]
        spans = list(zip(starts, ends, names))
    elif "train/phase" in df.columns:
        col = df[["step", "train/phase"]].dropna()
        if len(col):
            change = col["train/phase"].ne(col["train/phase"].shift())
            firsts = col[change]
            ends = list(firsts["step"].iloc[1:]) + [hi]
            spans = list(zip(firsts["step"], ends, firsts["train/phase"]))
    out = []
    for s, e, n in spans:
        s, e = max(int(s), lo), min(int(e), hi)
        if e > s:
            out.append((s, e, str(n)))
    return out


def _columns(src: _Source, pattern: str) -> list[str]:
    """Columns matching ``pattern`` that hold at least one finite number, in column order."""
    rx = _pattern_re(pattern)
    out = []
    for c in src.df.columns:
        if rx.match(c):
            v = pd.to_numeric(src.df[c], errors="coerce").to_numpy(dtype=float)
            if np.isfinite(v).any():
                out.append(c)
    return out


def _need(src: _Source, pattern: str, figure: str, hint: str = "") -> list[str]:
    cols = _columns(src, pattern)
    if cols:
        return cols
    area = pattern.split("/", 1)[0] + "/"
    writer = _WRITERS.get(area, "the run")
    present = sorted(c for c in src.df.columns if c.startswith(area))
    nan_only = [c for c in present if _pattern_re(pattern).match(c)]
    seen = (f"it has {len(present)} {area}* metrics, e.g. {present[:6]}" if present
            else f"it has no {area}* metric at all: is the hook enabled?")
    why = f"({nan_only} hold only NaN) " if nan_only else ""
    raise MissingMetricError(
        f"plots.{figure} needs the metric {pattern!r}, written by {writer}, but {src.name} has none "
        f"{why}-- {seen}.{(' ' + hint) if hint else ''}", pattern)


def _series(src: _Source, col: str) -> pd.Series:
    s = pd.to_numeric(src.df.set_index("step")[col], errors="coerce")
    return s[np.isfinite(s.to_numpy(dtype=float))]


def _seg(col: str, i: int = 1) -> str:
    return col.split("/")[i]


def _colors(src: _Source) -> dict:
    pal = sns.color_palette("tab10", max(len(src.domains), 1))
    return dict(zip(src.domains, pal))


def _axes(ax, figsize=(7.0, 4.0)):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt
    with sns.axes_style("whitegrid"):
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _figure(fig, n: int, width: float = 4.6, height: float = 3.6):
    import matplotlib.pyplot as plt
    with sns.axes_style("whitegrid"):
        if fig is None:
            fig = plt.figure(figsize=(width * n, height), layout="constrained")
        axes = fig.subplots(1, n, squeeze=False)[0]
    return fig, list(axes)


def _line(ax, s: pd.Series, gid: str, **kw):
    (line,) = ax.plot(s.index.to_numpy(), s.to_numpy(dtype=float), **kw)
    line.set_gid(gid)
    return line


def shade_phases(ax, data, *, columns=None, label=True) -> list:
    """Shade each phase of ``data`` (a Run, a DataFrame, or ``[(start, end, name)]``) on ``ax``.

    ``columns``: for a categorical step axis (a heatmap) the steps of its columns, in order;
    phase starts are then drawn as lines at column boundaries instead of shaded spans.
    Returns the artists (each with gid ``"phase:<name>"``).
    """
    from matplotlib.patches import Rectangle

    phases = data if isinstance(data, list) else _source(data).phases
    trans = ax.get_xaxis_transform()  # x in data units, y in axes fraction
    pal = sns.color_palette("pastel", max(len(phases), 1))
    artists = []
    for i, (start, end, name) in enumerate(phases):
        if columns is not None:
            x0 = float(np.searchsorted(np.asarray(columns), start))
            art = ax.axvline(x0, color="white", lw=2.0, ls="-")
            art.set_gid(f"phase:{name}")
            x_text = x0
        else:
            art = Rectangle((start, 0.0), end - start, 1.0, transform=trans, color=pal[i], alpha=0.35,
                            lw=0, zorder=0, gid=f"phase:{name}")
            ax.add_patch(art)
            x_text = start
        artists.append(art)
        if label:  # inside the top of the axes (above it for a heatmap, whose cells fill it)
            y, va = (1.0, "bottom") if columns is not None else (0.995, "top")
            # clipped to the axes (so a zoomed view, set_xlim, shows no stray labels), except a heatmap's above it
            ax.text(x_text, y, f" {name}", transform=trans, ha="left", va=va, fontsize="x-small",
                    color="0.35", clip_on=columns is None)
    return artists


# ----------------------------------------------------------------------------- loss and LR

@_requires("val/*/loss", "train/lr")
def validation_loss(data, ax=None, *, lr: bool = True, train: bool = False):
    """Per-domain validation loss (nats/token) over steps, the learning rate on a twin axis.

    How to read it: each line is one domain's held-out loss after ``step`` updates. A domain
    that keeps falling while the LR anneals is still being learned; the drop at an LR decay
    is the annealing gain (docs/training.md). ``train=True`` adds the (noisier) training loss.
    The LR axis is the figure's other Axes (``ax.figure.axes``; its line has gid ``train/lr``).
    """
    src = _source(data)
    cols = _need(src, "val/*/loss", "validation_loss")
    lr_col = _need(src, "train/lr", "validation_loss", "Pass lr=False to draw the loss alone.")[0] if lr else None
    ax = _axes(ax)
    colors = _colors(src)
    shade_phases(ax, src.phases)
    if train and "train/loss" in src.df.columns:
        _line(ax, _series(src, "train/loss"), "train/loss", color="0.6", lw=0.8, alpha=0.7, label="train")
    for c in cols:
        d = _seg(c)
        _line(ax, _series(src, c), c, marker="o", ms=3, color=colors.get(d), label=d)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"validation loss per domain -- {src.name}", fontsize="medium")
    handles, labels = ax.get_legend_handles_labels()
    if lr_col:
        twin = ax.twinx()
        twin.grid(False)
        h = _line(twin, _series(src, lr_col), lr_col, color="0.2", ls="--", lw=1.0, label="LR")
        twin.set_ylabel("learning rate")
        twin.set_ylim(bottom=0)
        handles, labels = handles + [h], labels + ["LR"]
    ax.legend(handles, labels, fontsize="small", loc="best")
    return ax


# ----------------------------------------------------------------------------- gradient noise scale

_UNITS = {"sequences": ("gns/b_simple", "train/batch_size"), "tokens": ("gns/b_simple_tokens", "train/batch_tokens")}


@_requires("gns/b_simple", "train/batch_size")
def gns(data, ax=None, *, unit: str = "sequences", groups=True, batch: bool = True):
    """The simple noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018) over steps,
    total and per parameter group, against the batch size actually used (log scale).

    ``unit``: "sequences" (``gns/b_simple`` vs ``train/batch_size``) or "tokens"
    (``gns/b_simple_tokens`` vs ``train/batch_tokens``; a group's B_simple is multiplied by the
    step's tokens per example ``gns/b_simple_tokens / gns/b_simple``, else ``train/seq_len``, and
    its line gets gid ``gns/<group>/b_simple_tokens``). ``groups``: True (every group but the
    per-layer ``blocks.<i>``), "layers" (those only), "all", a list of group names, or False.

    How to read it: where B_simple lies above the batch line, a larger batch would still cut
    the steps needed almost proportionally; far below it, extra examples per step are mostly
    wasted. Read the trend (it rises as the loss falls); under Adam it can sit well below the
    empirical critical batch size (Merrill et al. 2025) -- docs/gns.md.
    """
    if unit not in _UNITS:
        raise ValueError(f"unit must be 'sequences' or 'tokens', got {unit!r}")
    src = _source(data)
    total_col, batch_col = _UNITS[unit]
    total = _need(src, total_col, "gns")[0]
    bcol = _need(src, batch_col, "gns", "Pass batch=False to draw B_simple alone.")[0] if batch else None
    group_cols = [c for c in _columns(src, "gns/*/b_simple")]
    names = [_seg(c) for c in group_cols]
    if groups is True:
        keep = [n for n in names if not n.startswith("blocks.")]
    elif groups == "layers":
        keep = [n for n in names if n.startswith("blocks.")]
    elif groups == "all":
        keep = names
    elif groups is False or groups is None:
        keep = []
    else:
        keep = list(groups)
        missing = [g for g in keep if g not in names]
        if missing:
            raise MissingMetricError(f"plots.gns: no gns/<group>/b_simple for groups {missing} in {src.name}; "
                                     f"its groups: {names}", f"gns/{missing[0]}/b_simple")
    ax = _axes(ax)
    shade_phases(ax, src.phases)
    _line(ax, _series(src, total), total, color="black", lw=2.0, label="all parameters")
    if unit == "tokens" and keep:
        df = src.df.set_index("step")
        tpe = pd.to_numeric(df["gns/b_simple_tokens"], errors="coerce") / pd.to_numeric(df["gns/b_simple"], errors="coerce")
        if "train/seq_len" in df.columns:
            tpe = tpe.where(np.isfinite(tpe), pd.to_numeric(df["train/seq_len"], errors="coerce"))
    pal = sns.color_palette("husl", max(len(keep), 1))
    for g, color in zip(keep, pal):
        s = _series(src, f"gns/{g}/b_simple")
        gid = f"gns/{g}/b_simple"
        if unit == "tokens":
            s = (s * tpe.reindex(s.index)).dropna()
            gid += "_tokens"
        _line(ax, s, gid, color=color, lw=1.0, alpha=0.85, label=g)
    if bcol:
        _line(ax, _series(src, bcol), bcol, color="tab:red", ls="--", lw=1.5, drawstyle="steps-post",
              label=f"batch size ({bcol})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"B_simple ({unit})")
    ax.set_title(f"gradient noise scale -- {src.name}", fontsize="medium")
    ax.legend(fontsize="small", ncol=2 if len(keep) > 4 else 1)
    return ax


# ----------------------------------------------------------------------------- representation

def _repr_pattern(metric: str, domain: str | None) -> str:
    return f"repr/*/{domain}/{metric}" if domain else f"repr/*/{metric}"


def _layer_table(src: _Source, metric: str, domain, layers, figure: str) -> pd.DataFrame:
    """Layers x probe steps of ``repr/<layer>[/<domain>]/<metric>`` (layers in logged order)."""
    cols = _need(src, _repr_pattern(metric, domain), figure,
                 f"Metrics it can draw: {REPR_METRICS + ('mi_xt', 'mi_ty', 'readout_loss')}.")
    if layers is not None:
        by_layer = {_seg(c): c for c in cols}
        missing = [lay for lay in layers if lay not in by_layer]
        if missing:
            raise MissingMetricError(f"plots.{figure}: no {_repr_pattern(metric, domain)} for layers {missing} "
                                     f"in {src.name}; its layers: {list(by_layer)}", _repr_pattern(metric, domain))
        cols = [by_layer[lay] for lay in layers]
    table = src.df.set_index("step")[cols].apply(pd.to_numeric, errors="coerce")
    table = table[np.isfinite(table.to_numpy(dtype=float)).any(axis=1)]
    table.columns = [_seg(c) for c in cols]
    return table.T  # (layers, steps)


@_requires("repr/*/effective_rank")
def representation(data, metric: str = "effective_rank", ax=None, *, domain: str | None = None, layers=None):
    """One representation metric over steps, one line per probed layer (dark = shallow).

    ``metric``: entropy, effective_rank, alpha_req, twonn_id, mi_xt, mi_ty, readout_loss, ...
    (``repr/<layer>/<metric>``; with ``domain`` the per-domain ``repr/<layer>/<domain>/<metric>``).
    How to read it: a rise in entropy / effective rank is expansion (the layer spreads the
    tokens over more directions), a later fall is compression; alpha-ReQ moves the other way
    (a steeper spectrum decay is a lower effective dimension) -- docs/representation.md.
    """
    src = _source(data)
    table = _layer_table(src, metric, domain, layers, "representation")
    ax = _axes(ax)
    shade_phases(ax, src.phases)
    pal = sns.color_palette("viridis", len(table))
    for (layer, row), color in zip(table.iterrows(), pal):
        s = row.dropna()
        _line(ax, s, f"repr/{layer}/{domain + '/' if domain else ''}{metric}", marker="o", ms=3, color=color,
              label=layer)
    ax.set_xlabel("step")
    ax.set_ylabel(metric + (f" ({domain})" if domain else ""))
    ax.set_title(f"{metric} per layer -- {src.name}", fontsize="medium")
    ax.legend(fontsize="x-small")
    return ax


@_requires("repr/*/effective_rank")
def representation_heatmap(data, metric: str = "effective_rank", ax=None, *, domain: str | None = None,
                           layers=None, cmap: str = "viridis"):
    """A layer x probe-step heatmap of one representation metric (rows in model order).

    Columns are the probe steps (not evenly spaced: the built-in loop probes at 1, 2, 4, ... and
    then every ``eval_every``); white lines mark phase starts. The cells are the values of
    ``repr/<layer>/<metric>``; the QuadMesh's array is that table, row by row. Reading it:
    colour changing along a row is a layer's representation expanding or compressing over
    training; down a column, how the metric changes with depth at one step (Skean et al. 2025).
    """
    src = _source(data)
    table = _layer_table(src, metric, domain, layers, "representation_heatmap")
    ax = _axes(ax, figsize=(max(6.0, 0.35 * table.shape[1] + 3), max(2.5, 0.45 * table.shape[0] + 1.5)))
    sns.heatmap(table, ax=ax, cmap=cmap, cbar_kws={"label": metric}, mask=~np.isfinite(table.to_numpy(dtype=float)))
    shade_phases(ax, src.phases, columns=list(table.columns))
    ax.set_xlabel("probe step")
    ax.set_ylabel("layer")
    ax.set_title(f"{metric}{' (' + domain + ')' if domain else ''} by layer and step -- {src.name}",
                 fontsize="medium", pad=12)
    return ax


@_requires(*(f"repr/*/{m}" for m in REPR_METRICS))
def representation_grid(data, metrics=REPR_METRICS, fig=None, *, kind: str = "lines", domain=None, layers=None):
    """One panel per representation metric (default: entropy, effective rank, alpha-ReQ, TwoNN
    intrinsic dimension), as lines per layer (``kind="lines"``) or heatmaps (``"heatmap"``).
    A run probed with ``twonn=False`` lacks ``twonn_id``: pass ``metrics`` without it."""
    if kind not in ("lines", "heatmap"):
        raise ValueError(f"kind must be 'lines' or 'heatmap', got {kind!r}")
    src = _source(data)
    for m in metrics:  # check all first: no half-drawn figure
        _layer_table(src, m, domain, layers, "representation_grid")
    draw = representation if kind == "lines" else representation_heatmap
    fig, axes = _figure(fig, len(metrics), width=4.6 if kind == "lines" else 5.5)
    for m, ax in zip(metrics, axes):
        draw(src, m, ax, domain=domain, layers=layers)
        ax.set_title(m, fontsize="medium", pad=12)
    fig.suptitle(f"representation metrics -- {src.name}", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- difficulty

@_requires("difficulty/*/loss")
def difficulty_loss(data, ax=None, *, probe: bool = True):
    """Per-domain training loss (bias-corrected EMA of the per-example losses, solid) and, with
    ``probe``, the loss of each domain's fixed probe sequences (dashed, when logged).

    How to read it: the gap between a domain's curves is how much the training stream differs
    from held-out text of that domain; a domain whose probe loss falls before it is trained on
    is learned through transfer -- docs/difficulty.md."""
    src = _source(data)
    cols = _need(src, "difficulty/*/loss", "difficulty_loss")
    ax = _axes(ax)
    colors = _colors(src)
    shade_phases(ax, src.phases)
    for c in cols:
        d = _seg(c)
        _line(ax, _series(src, c), c, color=colors.get(d), label=d)
    if probe:
        for c in _columns(src, "difficulty/*/probe_loss"):
            d = _seg(c)
            _line(ax, _series(src, c), c, color=colors.get(d), ls="--", marker=".", label=f"{d} (probe)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loss per domain", fontsize="medium")
    ax.legend(fontsize="x-small")
    return ax


@_requires("difficulty/*/learnability")
def learnability(data, ax=None, *, band: bool = True, probe: bool = True):
    """Learnability -dL/d ln(domain tokens) per domain, with a +-1 standard-error band
    (``learnability_se``), and (``probe``) the held-out ``probe_learnability`` as markers.

    How to read it: the nats of loss a domain still loses per e-fold of its tokens. Near zero
    (``diminishing`` = 1) more of that domain buys little -- the time to switch or upweight
    another; the training-stream value includes memorisation of repeated examples, the probe
    value does not -- docs/difficulty.md."""
    src = _source(data)
    cols = _need(src, "difficulty/*/learnability", "learnability",
                 "It is logged once a domain has min_points (8) loss readings in its window.")
    ax = _axes(ax)
    colors = _colors(src)
    shade_phases(ax, src.phases)
    ax.axhline(0.0, color="0.3", lw=0.8)
    for c in cols:
        d = _seg(c)
        s = _series(src, c)
        _line(ax, s, c, color=colors.get(d), label=d)
        se_col = f"difficulty/{d}/learnability_se"
        if band and se_col in src.df.columns:
            se = pd.to_numeric(src.df.set_index("step")[se_col], errors="coerce").reindex(s.index)
            ok = np.isfinite(se.to_numpy(dtype=float))
            poly = ax.fill_between(s.index[ok], (s - se)[ok], (s + se)[ok], color=colors.get(d), alpha=0.2, lw=0)
            poly.set_gid(se_col)
    if probe:
        for c in _columns(src, "difficulty/*/probe_learnability"):
            d = _seg(c)
            _line(ax, _series(src, c), c, color=colors.get(d), ls="none", marker="D", ms=4, label=f"{d} (probe)")
    ax.set_xlabel("step")
    ax.set_ylabel("-dL / d ln tokens (nats)")
    ax.set_title("learnability per domain", fontsize="medium")
    ax.legend(fontsize="x-small")
    return ax


@_requires("difficulty/*/frac_learned")
def learned_forgotten(data, ax=None):
    """Fraction of each domain's probe sequences learned (loss < ``learned_loss``), and the
    fraction of tracked training examples with at least one forgetting event
    (``difficulty/frac_forgotten``, black dashed, when logged; Toneva et al. 2019).

    How to read it: a rising fraction learned means the domain is being absorbed; a rise in
    forgotten after a mixture switch means the new mixture displaces what was learned before
    (keep some old data in the mix) -- docs/difficulty.md."""
    src = _source(data)
    cols = _need(src, "difficulty/*/frac_learned", "learned_forgotten")
    ax = _axes(ax)
    colors = _colors(src)
    shade_phases(ax, src.phases)
    for c in cols:
        d = _seg(c)
        _line(ax, _series(src, c), c, color=colors.get(d), marker="o", ms=3, label=f"{d} learned")
    if _columns(src, "difficulty/frac_forgotten"):
        _line(ax, _series(src, "difficulty/frac_forgotten"), "difficulty/frac_forgotten", color="black",
              ls="--", label="forgotten (all)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction")
    ax.set_title("learned / forgotten", fontsize="medium")
    ax.legend(fontsize="x-small")
    return ax


@_requires("difficulty/*/loss")
def difficulty(data, fig=None):
    """Three panels: :func:`difficulty_loss`, :func:`learnability`, :func:`learned_forgotten`.

    Needs the per-domain loss; a panel whose metric the run does not have yet (learnability
    needs several readings, frac_learned a probe step) says so instead of failing."""
    src = _source(data)
    _need(src, "difficulty/*/loss", "difficulty")
    fig, axes = _figure(fig, 3)
    for fn, ax in zip((difficulty_loss, learnability, learned_forgotten), axes):
        try:
            fn(src, ax)
        except MissingMetricError as e:
            ax.text(0.5, 0.5, f"no {e.metric}\nin this run", transform=ax.transAxes, ha="center", va="center",
                    color="0.4")
            ax.set_title(fn.__name__, fontsize="medium")
    fig.suptitle(f"curriculum difficulty -- {src.name}", fontsize="medium")
    return fig


# ----------------------------------------------------------------------------- long context (docs/long_context.md)

@_requires("val_pos/*/near_loss")
def plot_loss_by_position(run, ax=None, *, length: int | None = None, steps=None):
    """Loss by position at ``length`` (default: the longest phase length with arrays) at each phase end (the
    boundaries and the final step; ``steps`` to choose), from the arrays ``val_pos_<L>_step_<N>``: one curve
    per step, per-token loss averaged in position buckets, all domains pooled; a dotted line at L0.

    How to read it: left of L0 the model sees distances it trained on; right of it the far positions. A
    curve that rises right of L0 is the extrapolation gap (``val_pos/<L>/gap``); the long-context phase
    should bring it down to or below the left part."""
    src = _source(run)
    _need(src, "val_pos/*/near_loss", "plot_loss_by_position", "Evaluation at every length (midtrain.evaluate).")
    if not hasattr(run, "load_array"):
        raise TypeError("plot_loss_by_position reads arrays: pass a Run (diagnostics.load_run), not a DataFrame")
    found = {}
    for name in run.arrays():
        if (m := re.fullmatch(r"val_pos_(\d+)_step_(\d+)", name)):
            found.setdefault(int(m.group(1)), []).append(int(m.group(2)))
    if not found:
        raise MissingMetricError(f"plots.plot_loss_by_position needs arrays val_pos_<L>_step_<N>; {src.name} has none",
                                 "val_pos_*_step_*")
    phase_lens = [int(p.get("seq_len") or 0) for p in (run.config or {}).get("phases") or []]
    if length is None:
        length = max([L for L in found if L in phase_lens] or found)
    if length not in found:
        raise MissingMetricError(f"no loss by position at length {length}; lengths with arrays: {sorted(found)}",
                                 f"val_pos_{length}_step_*")
    ends = {e for _, e, _ in src.phases} | {int(src.df["step"].max())}
    chosen = sorted(s for s in found[length] if (s in ends if steps is None else s in set(steps)))
    ax = _axes(ax)
    pal = sns.color_palette("viridis", max(len(chosen), 1))
    names = {e: n for _, e, n in src.phases}
    for c, s in zip(pal, chosen):
        a = run.load_array(f"val_pos_{length}_step_{s}")
        x = (a["bucket_start"] + a["bucket_end"]) / 2.0
        _line(ax, pd.Series(a["loss"], index=x), f"val_pos_{length}_step_{s}", color=c, marker="o", ms=3,
              label=f"step {s}" + (f" (end of {names[s]})" if s in names else ""))
    if phase_lens and phase_lens[0] < length:
        ax.axvline(phase_lens[0], color="0.3", ls=":", lw=1.0)
    ax.set_xlabel("position in the sequence (bucket centre)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"loss by position at {length} tokens -- {src.name}", fontsize="medium")
    ax.legend(fontsize="x-small")
    return ax


@_requires("retrieval/*/*/gain")
def plot_retrieval(run, fig=None, *, lengths=None):
    """Retrieval gain (nats) over training, one panel per context length, one line per depth (darker =
    deeper), from ``retrieval/<L>/depth_<d>/gain`` (the ``retrieval`` hook).

    How to read it: the gain is how much cheaper the planted key is to predict when it appeared earlier at
    that depth; above zero the model uses context that far back. Depths beyond L0 should rise during the
    long-context phase; a depth that stays at zero is out of the model's reach."""
    src = _source(run)
    cols = _need(src, "retrieval/*/*/gain", "plot_retrieval")
    by_len: dict = {}
    for c in (c for c in cols if _seg(c, 2).startswith("depth_")):
        by_len.setdefault(int(_seg(c)), []).append(c)
    chosen = sorted(by_len) if lengths is None else [L for L in sorted(by_len) if L in set(lengths)]
    fig, axes = _figure(fig, max(1, len(chosen)))
    for ax, L in zip(axes, chosen):
        shade_phases(ax, src.phases)
        cs = sorted(by_len[L], key=lambda c: int(_seg(c, 2)[len("depth_"):]))
        pal = sns.color_palette("crest", len(cs))
        for color, c in zip(pal, cs):
            _line(ax, _series(src, c), c, color=color, marker="o", ms=3, label=_seg(c, 2).replace("_", " "))
        ax.axhline(0.0, color="0.3", lw=0.8)
        ax.set_xlabel("step")
        ax.set_ylabel("retrieval gain (nats)")
        ax.set_title(f"{L} tokens", fontsize="medium")
        ax.legend(fontsize="x-small")
    fig.suptitle(f"retrieval gain by depth -- {src.name}", fontsize="medium")
    return fig
