"""What the report shows: ``SECTIONS``, an explicit list of sections, each a list of items.

An item is one figure or table: its title, the metric patterns it needs (``*`` is one name
segment), the hook or command that writes them, the ``diagnostics.plots`` functions it draws with,
and how to draw it. Before drawing, the report checks each item: a metric the run lacks, or a
``diagnostics.plots`` function this version does not have, leaves the item out with one line saying
which (and what would produce it); a drawing that raises becomes one line saying what failed. The
list is the documentation of the report (docs/report.md has it as a table).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from diagnostics import plots
from diagnostics.report._figures import (compare_gns, compare_loss, compare_lr, data_map, gns_domains,
                                         information_plane, lr_schedule, metric_columns, phase_timeline)
from diagnostics.report._html import Details, Figure, Rec, Table, Text

__all__ = ["Item", "Section", "SECTIONS", "Context"]

_LOOP_EVAL = "the training loop's evaluation (midtrain.loop; another loop: log val/<domain>/loss)"
_GNS = "the GradientNoiseScale hook ([monitor.gns], docs/gns.md)"
_REPR = "the RepresentationProbe hook ([monitor.representation], docs/representation.md)"
_DIFF = "the DifficultyTracker hook ([monitor.difficulty], docs/difficulty.md)"
_LONG = "the loop's evaluation at every phase seq_len and [data] eval_lengths (docs/long_context.md)"


@dataclass
class Context:
    """What the items draw from: the run, the compared runs, and what is computed once for all items
    (the recommendations of ``diagnostics.recommend.recommend_run``, the schedule-law fit)."""
    run: object
    compare: list
    recs: list = field(default_factory=list)        # Recommendation
    not_available: dict = field(default_factory=dict)
    recommend_error: str | None = None               # recommend_run itself failed (bad branches, ...)
    branches: list = field(default_factory=list)     # compared runs passed to recommend_run as branches
    branch_notes: dict = field(default_factory=dict)  # compared run name -> its kind, or why it is not a branch
    law: tuple | None = None                         # (steps, predicted loss, law name) of the run's own curve
    law_note: str = ""

    def rec(self, name: str):
        return next((r for r in self.recs if r.name == name), None)


@dataclass(frozen=True)
class Item:
    title: str
    draw: Callable            # Context -> a matplotlib Figure or Axes, a block, or a list of those
    needs: tuple = ()         # metric patterns, each must match a column holding a finite value
    writer: str = ""          # which hook or command writes them (the line shown when one is missing)
    plots_functions: tuple = ()   # names diagnostics.plots must have (the item is left out, saying so, if not)
    compare: bool = False     # an overlay of the compared runs: only with --compare
    caption: str = ""


@dataclass(frozen=True)
class Section:
    key: str
    title: str
    intro: str
    items: tuple


# ----------------------------------------------------------------------------- run summary

def _last(run, col):
    s = run.metrics[col].dropna() if col in run.metrics.columns else []
    return (float(s.iloc[-1]) if len(s) else float("nan"))


def _summary(ctx: Context):
    run, info = ctx.run, ctx.run.info
    m = run.metrics
    model = info.get("model") or {}
    rows = [["run", f"{run.name} ({run.path})"], ["status", info.get("status", "?")],
            ["created", info.get("created", "?")],
            ["steps", f"{info.get('steps_done', int(m['step'].max()))} of {info.get('total_steps', '?')}"],
            ["tokens", f"{_last(run, 'train/tokens'):.4g}"]]
    if model:
        rows.append(["model", f"{run.config.get('model', {}).get('preset', '?')}: {model.get('n_layer')} layers, "
                              f"{model.get('n_embd')} dims, {info.get('n_params', 0) / 1e6:.2f}M parameters"])
    if info.get("device"):
        rows.append(["device", f"{info.get('device')} ({info.get('dtype', '?')}), {info.get('world_size', 1)} "
                               f"process(es), {info.get('wall_s', float('nan')):.0f} s"])
    if "perf/tokens_per_s" in m.columns:
        rows.append(["throughput", f"median {m['perf/tokens_per_s'].median() / 1e3:.1f}k tokens/s"])
    if run.parent:
        rows.append(["branched from", f"{run.parent.get('run')} at step {run.parent.get('step')}"])
    rows.append(["final train loss", _last(run, "train/loss")])
    for c in metric_columns(m, "val/*/loss"):
        s = m[c].dropna()
        rows.append([f"validation loss, {c.split('/')[1]}",
                     f"{s.iloc[0]:.4f} -> {s.iloc[-1]:.4f} (steps {int(m.loc[s.index[0], 'step'])}.."
                     f"{int(m.loc[s.index[-1], 'step'])})"])
    for d in info.get("disabled_hooks") or []:
        if isinstance(d, dict):
            rows.append([f"hook {d.get('name')} disabled", f"at step {d.get('step')} in {d.get('event')}: "
                                                            f"{d.get('reason')}"])
    out = [Table("summary", None, rows)]
    phases = run.config.get("phases") or []
    if phases:
        starts = info.get("phase_starts") or []
        keys = ["steps", "tokens", "lr", "warmup_steps", "decay", "final_lr", "batch_size", "grad_accum", "seq_len",
                "rope_base", "mixture"]
        out.append(Table("phases (config)", ["phase", "first step"] + keys,
                         [[p.get("name"), starts[i] if i < len(starts) else "?"] + [p.get(k) for k in keys]
                          for i, p in enumerate(phases)]))
    out.append(Details("the run's config (run.json)", json.dumps(run.config, indent=2, default=str)))
    if ctx.compare:
        rows = [[r.name, str(r.path), f"{r.parent.get('run')} @ {r.parent.get('step')}" if r.parent else "",
                 ctx.branch_notes.get(r.name, ""), int(r.metrics["step"].max()), _last(r, "train/loss"),
                 float(np.nanmean([_last(r, c) for c in metric_columns(r.metrics, "val/*/loss")] or [np.nan]))]
                for r in [run] + ctx.compare]
        out.append(Table("runs compared", ["run", "path", "parent", "against this run", "last step",
                                           "final train loss", "final validation loss (mean over domains)"], rows))
    return out


# ----------------------------------------------------------------------------- figures that add to plots'

def _gns(ctx: Context):
    ax = plots.gns(ctx.run)
    rec = ctx.rec("batch_size")
    if rec is not None and np.isfinite(rec.value):
        ax.axhline(rec.value, color="tab:green", ls=":", lw=2.0, gid="recommended_batch",
                   label=f"recommended batch {rec.value:g}")
        if np.isfinite([rec.low, rec.high]).all():
            ax.axhspan(rec.low, rec.high, color="tab:green", alpha=0.12, lw=0, gid="recommended_range",
                       label=f"B_simple {rec.level:.0%} range {rec.low:.3g} - {rec.high:.3g}")
        ax.legend(fontsize="small", ncol=2)
    return ax


def _gns_layers(ctx: Context):
    if not any(c.split("/")[1].startswith("blocks.") for c in metric_columns(ctx.run.metrics, "gns/*/b_simple")):
        raise plots.MissingMetricError("needs the per-layer metrics gns/blocks.<i>/b_simple, written by " + _GNS
                                       + " for a model whose layers it recognises (a numbered stack)", "gns/blocks.*")
    return plots.gns(ctx.run, groups="layers")


def _gns_domains(ctx: Context):
    rec = ctx.rec("batch_size")
    return gns_domains(ctx.run, recommended=rec.value if rec is not None else None)


def _repr_grid(ctx: Context):
    have = [m for m in plots.REPR_METRICS if metric_columns(ctx.run.metrics, f"repr/*/{m}")]
    return plots.representation_grid(ctx.run, metrics=have)


def _lr(ctx: Context):
    rec = ctx.rec("lr_decay")
    anneal = (rec.value, rec.low, rec.high) if rec is not None and rec.unit.startswith("step") else None
    fig = lr_schedule(ctx.run, law=ctx.law, anneal=anneal)
    return [fig, Text(ctx.law_note, "intro")] if ctx.law_note else fig


def _recommendations(ctx: Context):
    if ctx.recommend_error:
        return [Text(f"the recommendations could not be made: {ctx.recommend_error}", "failed")]
    out = [Rec(r.to_dict()) for r in ctx.recs]
    out += [Text(f"{name}: not available -- {why}", "missing") for name, why in ctx.not_available.items()]
    return out


def validation_docs(run) -> list[tuple[str, dict]]:
    """``(path, content)`` of every ``validation.json`` of ``midtrain validate`` on this run: in the folders
    ``RUN-validate*`` beside it (its default ``--out``) whose ``run`` is this run."""
    out = []
    for p in sorted(glob.glob(glob.escape(str(run.path).rstrip("/")) + "-validate*/validation.json")):
        try:
            with open(p, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and os.path.abspath(str(doc.get("run", ""))) == os.path.abspath(run.path):
            out.append((p, doc))
    return out


def _validation(ctx: Context):
    docs = validation_docs(ctx.run)
    if not docs:
        return [Text(f"no validation.json of `midtrain validate {ctx.run.path} --step S` beside this run "
                     f"({ctx.run.path}-validate<S>/): run it to rank the recommended plan against the grid.",
                     "missing")]
    out = []
    for path, doc in docs:
        plans, ranking = doc.get("plans") or {}, doc.get("ranking") or []
        doms = sorted({d for n in ranking for d in (plans.get(n, {}).get("val") or {})})
        rows = []
        for n in ranking:
            p = plans.get(n, {})
            obj = p.get("objective") or {}
            rows.append([p.get("rank"), n, f"{obj.get('mean', float('nan')):.4f} +- {obj.get('std', 0.0):.4f}"]
                        + [f"{p['val'][d]['mean']:.4f} +- {p['val'][d]['std']:.4f}" if d in (p.get("val") or {})
                           else "" for d in doms] + [p.get("description", "")])
        c = doc.get("compute") or {}
        cap = (f"from step {doc.get('step')}, seeds {doc.get('seeds')}; recommended rank {doc.get('recommended_rank')} "
               f"of {len(ranking)}; probes/grid compute {c.get('probe_over_grid')}; {path}")
        out.append(Table(f"midtrain validate (step {doc.get('step')})", ["rank", "plan", "objective (mean +- sd)"]
                         + [f"val {d}" for d in doms] + ["plan"], rows, cap))
        png = os.path.join(os.path.dirname(path), "validation.png")
        if os.path.exists(png):
            with open(png, "rb") as f:
                out.append(Figure(f"validation.png (step {doc.get('step')})", f.read()))
    return out


def _lengths_table(ctx: Context):
    m = ctx.run.metrics
    cols = metric_columns(m, "val_len/*/*/loss")
    lengths = sorted({int(c.split("/")[1]) for c in cols if c.split("/")[1].isdigit()})
    doms = sorted({c.split("/")[2] for c in cols})
    rows = []
    for L in lengths:
        vals = [_last(ctx.run, f"val_len/{L}/{d}/loss") for d in doms]
        rows.append([L] + vals + [_last(ctx.run, f"val_len/{L}/loss")])
    return Table("validation loss by context length (last evaluation)", ["length"] + doms + ["mean"], rows)


def _call_plots(name: str):
    def draw(ctx: Context):
        return getattr(plots, name)(ctx.run)   # present: the item's plots_functions were checked first
    draw.__name__ = name
    return draw


# ----------------------------------------------------------------------------- the list

SECTIONS: tuple[Section, ...] = (
    Section("summary", "Run", "What ran: the run's record (run.json), its phases and its config.", (
        Item("summary", _summary),)),
    Section("phases", "Phase timeline", "Each phase's data mixture, sequence length and tokens per step.", (
        Item("phase timeline", lambda c: phase_timeline(c.run)),)),
    Section("validation", "Validation loss per domain",
            "Held-out loss per domain after each evaluation, the LR on a twin axis (docs/training.md).", (
                Item("validation loss", lambda c: plots.validation_loss(c.run, train=True),
                     plots.validation_loss.requires, _LOOP_EVAL, ("validation_loss",)),
                Item("loss, runs compared", lambda c: compare_loss([c.run] + c.compare), (), _LOOP_EVAL,
                     compare=True))),
    Section("gns", "Gradient noise scale",
            "B_simple against the batch size used, the recommended batch (green), per parameter group and per "
            "data domain (docs/gns.md).", (
                Item("B_simple and the batch", _gns, plots.gns.requires, _GNS, ("gns",)),
                Item("B_simple per layer", _gns_layers, ("gns/*/b_simple",), _GNS,
                     ("gns",)),
                Item("B_simple per domain", _gns_domains, gns_domains.requires,
                     "the GradientNoiseScale hook's per-domain groups (gns/domain/<d>/b_simple, docs/gns.md)"),
                Item("GNS, runs compared", lambda c: compare_gns([c.run] + c.compare), (), _GNS, compare=True))),
    Section("representation", "Representations",
            "Entropy, effective rank, alpha-ReQ and TwoNN dimension per layer; the information plane "
            "(docs/representation.md).", (
                Item("representation grid", _repr_grid, ("repr/*/effective_rank",), _REPR, ("representation_grid",)),
                Item("information plane", lambda c: information_plane(c.run), information_plane.requires,
                     _REPR + " with info_plane on"))),
    Section("difficulty", "Difficulty and learnability",
            "Per-domain loss, learnability, learned/forgotten, and the data map (docs/difficulty.md).", (
                Item("difficulty", lambda c: plots.difficulty(c.run), plots.difficulty.requires, _DIFF, ("difficulty",)),
                Item("data map", lambda c: data_map(c.run), (), _DIFF))),
    Section("schedule", "LR schedule and anneal start",
            "The LR over steps, the train loss with the schedule law fitted to it, the recommended anneal start "
            "and its range (green; docs/recommendations.md).", (
                Item("LR schedule", _lr, lr_schedule.requires, "the training loop (train/lr)"),
                Item("LR, runs compared", lambda c: compare_lr([c.run] + c.compare), (), "the training loop",
                     compare=True))),
    Section("recommendations", "Recommendations",
            "What `midtrain recommend` makes for this run (diagnostics.recommend.recommend_run), with ranges and "
            "evidence; the compared runs that are branches of this run count as its --branches.", (
                Item("recommendations", _recommendations),)),
    Section("validate", "Validation of the recommendations",
            "`midtrain validate` tables: the recommended plan against the run's own recipe, cosine, WSD and "
            "switches, trained from one checkpoint with seeds (docs/recommendations.md).", (
                Item("validation tables", _validation),)),
    Section("long_context", "Long context",
            "Validation loss at every evaluated length, loss by position and the retrieval probe "
            "(docs/long_context.md).", (
                Item("loss by context length", _lengths_table, ("val_len/*/loss",), _LONG),
                Item("loss by position", _call_plots("plot_loss_by_position"), ("val_pos/*/far_loss",),
                     _LONG + " at lengths beyond the first phase's", ("plot_loss_by_position",)),
                Item("retrieval", _call_plots("plot_retrieval"), ("retrieval/*/gain",),
                     "the RetrievalProbe hook ([monitor.retrieval], docs/retrieval.md)", ("plot_retrieval",)))),
)
