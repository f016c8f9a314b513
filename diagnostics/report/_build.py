"""Building the report: load and check the runs, compute once what several items share, draw each
item of ``SECTIONS`` in isolation, assemble the page, write it atomically."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from diagnostics import plots
from diagnostics.recommend import RecommendationError, anneal_fit, branch_kind, recommend_run, sort_branches
from diagnostics.report._figures import metric_columns
from diagnostics.report._html import Failed, Figure, Missing, png_of, render_page, render_section
from diagnostics.report._sections import SECTIONS, Context, Item
from diagnostics.runs import REPORT_FILE, RunDirError, atomic_write, load_run

__all__ = ["ReportError", "load_runs", "prepare", "render_item", "render_report", "write_report"]


class ReportError(ValueError):
    """Bad input for a report (a run without records, an output folder that does not exist, ...)."""


def _check(run, what: str) -> None:
    m = run.metrics
    if not len(m) or len(m.columns) <= 1:
        raise ReportError(f"{what} {run.path} has no recorded metrics (its metrics.jsonl is empty or missing): "
                          "there is nothing to report. Train it first (midtrain train --out DIR), or resume it.")


def load_runs(run_dir, compare=()) -> tuple:
    """``(run, [compared runs])``, loaded and checked: RunDirError for a folder that is not a run or a
    corrupt run.json, ReportError for a run without records or a compared run that is the run itself."""
    run = load_run(run_dir)
    _check(run, "the run")
    others = []
    for c in compare:
        r = load_run(c)
        _check(r, "the compared run")
        if os.path.realpath(r.path) == os.path.realpath(run.path) or any(
                os.path.realpath(r.path) == os.path.realpath(o.path) for o in others):
            raise ReportError(f"--compare {c}: that run is already in the report; name each run once.")
        others.append(r)
    return run, others


def _law_curve(run, anneal_branches):
    """(steps, predicted loss, law name) of the schedule law ``anneal_recommendation`` fits, on the run's own
    curve (each point with its segment's offset)."""
    fit, curves, segs, _, _ = anneal_fit(run, anneal_branches)
    lrs, steps, _ = curves[0]
    pred = np.empty(len(steps))
    for lab in np.unique(segs[0]):
        m = segs[0] == lab
        pred[m] = fit.predict(lrs, segment=int(lab), steps=steps[m])
    return steps, pred, fit.law


def prepare(run, compare=()) -> Context:
    """The Context the items draw from: the compared runs sorted into branches of ``run`` (by
    ``branch_kind``) or not, the recommendations of ``recommend_run(run, branches)``, the schedule law's fit."""
    ctx = Context(run=run, compare=list(compare))
    for c in ctx.compare:
        try:
            kind = branch_kind(run, c)
        except RecommendationError as e:  # ProbeInputError: another run's branch; or a run without phases
            ctx.branch_notes[c.name] = f"not a branch of it: {e}"
            continue
        ctx.branches.append(c)
        ctx.branch_notes[c.name] = f"{kind} branch"
    try:
        ctx.recs, ctx.not_available = recommend_run(run, ctx.branches)
    except RecommendationError as e:
        ctx.recommend_error = str(e)
    except Exception as e:  # noqa: BLE001 -- a failing recommender must not take the report with it
        ctx.recommend_error = f"{type(e).__name__}: {e}"
    rec = ctx.rec("lr_decay")
    if rec is not None and rec.unit.startswith("step"):
        try:
            ctx.law = _law_curve(run, sort_branches(run, ctx.branches)["anneal"])
        except Exception as e:  # noqa: BLE001
            ctx.law_note = f"the schedule law's fit is not drawn: {type(e).__name__}: {e}"
    elif rec is None:
        ctx.law_note = ("no schedule law: " + ctx.not_available.get("lr_decay", ctx.recommend_error or "")).strip()
    return ctx


def _missing(item: Item, ctx: Context) -> str | None:
    """Why ``item`` cannot be drawn for this run (a plots function this version lacks, a metric no run has)."""
    absent = [f for f in item.plots_functions if not hasattr(plots, f)]
    if absent:
        return (f"this version's diagnostics.plots has no {', '.join(absent)}; the figure appears in the report "
                f"once it does (its metrics come from {item.writer})")
    runs = [ctx.run] + ctx.compare if item.compare else [ctx.run]
    for pattern in item.needs:
        if not any(metric_columns(r.metrics, pattern) for r in runs):
            return f"needs the metric {pattern}, written by {item.writer}"
    return None


def _blocks(out, item: Item) -> list:
    items = out if isinstance(out, list) else [out]
    blocks = []
    for x in items:
        fig = getattr(x, "figure", None) if not hasattr(x, "savefig") else x
        if fig is not None and hasattr(fig, "savefig"):
            blocks.append(Figure(item.title, png_of(fig), item.caption))
        else:
            blocks.append(x)
    return blocks


def render_item(item: Item, ctx: Context) -> list:
    """The blocks of one item: its figures and tables; one Missing line; or one Failed line saying what
    raised. Never raises (but for KeyboardInterrupt); closes every figure it opened."""
    if item.compare and not ctx.compare:
        return []
    why = _missing(item, ctx)
    if why:
        return [Missing(item.title, why)]
    import matplotlib.pyplot as plt

    before = set(plt.get_fignums())
    try:
        return _blocks(item.draw(ctx), item)
    except plots.MissingMetricError as e:
        return [Missing(item.title, str(e))]
    except Exception as e:  # noqa: BLE001 -- one figure that fails leaves the rest of the report
        return [Failed(item.title, f"{type(e).__name__}: {e}")]
    finally:
        for n in set(plt.get_fignums()) - before:
            plt.close(n)


def render_report(run, compare=()) -> str:
    """The report of ``run`` (a Run), overlaying the ``compare`` Runs, as one self-contained HTML page."""
    t0 = time.perf_counter()
    ctx = prepare(run, compare)
    parts = []
    for sec in SECTIONS:
        blocks = [b for item in sec.items for b in render_item(item, ctx)]
        parts.append((sec.key, sec.title, render_section(sec.key, sec.title, sec.intro, blocks)))
    names = ", ".join(r.name for r in ctx.compare)
    sub = (f"{run.path} -- status {run.info.get('status', '?')}, step {int(run.metrics['step'].max())}"
           + (f"; compared with {names}" if names else "")
           + f"; report made {time.strftime('%Y-%m-%d %H:%M:%S')} in {time.perf_counter() - t0:.1f} s by midtrain report")
    return render_page(f"midtrain report: {run.name}", sub, parts)


def write_report(run_dir, compare=(), out=None) -> Path:
    """Write the report of the run in ``run_dir`` (compared with the runs in ``compare``) to ``out``
    (default ``RUN/report.html``), atomically. Bad input raises RunDirError or ReportError before
    anything is drawn or written."""
    run, others = load_runs(run_dir, compare)
    out = Path(run.path) / REPORT_FILE if out is None else Path(out)
    if out.is_dir():
        raise ReportError(f"--out {out} is a directory: name the HTML file to write (e.g. {out / REPORT_FILE}).")
    if not out.parent.is_dir():
        raise ReportError(f"--out {out}: its folder {out.parent} does not exist; nothing was written.")
    text = render_report(run, others)
    try:
        atomic_write(out, text)
    except OSError as e:
        raise RunDirError(f"cannot write the report to {out}: {e.strerror or e}; nothing was written.", out) from None
    return out
