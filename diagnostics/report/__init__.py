"""One self-contained HTML page of a run (``midtrain report RUN``): the front door of the report
(docs/report.md).

    _sections  ``SECTIONS``: the explicit list of what the report shows, section by section, each item
               with the metrics it needs, the hook or command that writes them and the
               ``diagnostics.plots`` functions it draws with; ``Context`` (what the items share)
    _figures   the figures ``diagnostics.plots`` does not draw: ``phase_timeline``, ``gns_domains``,
               ``information_plane``, ``data_map``, ``lr_schedule`` (with the schedule law and the
               anneal start) and the overlays of several runs (``compare_loss``, ``compare_gns``,
               ``compare_lr``)
    _html      the page: figures as PNG ``data:`` URIs, one inline style sheet, no script, nothing
               fetched from anywhere
    _build     ``write_report`` / ``render_report``: load and check the runs, compute the
               recommendations once (``diagnostics.recommend.recommend_run``), draw every item in
               isolation (a missing metric or a figure that raises is one line, never the end of the
               report), write the file atomically

    from diagnostics.report import write_report
    write_report("runs/a", compare=["runs/a-cool"])      # runs/a/report.html
"""

from diagnostics.report._build import ReportError, load_runs, prepare, render_item, render_report, write_report
from diagnostics.report._figures import (compare_gns, compare_loss, compare_lr, data_map, gns_domains,
                                         information_plane, lr_schedule, phase_timeline)
from diagnostics.report._sections import SECTIONS, Context, Item, Section, validation_docs

__all__ = ["write_report", "render_report", "ReportError", "load_runs", "prepare", "render_item", "SECTIONS",
           "Section", "Item", "Context", "validation_docs", "phase_timeline", "gns_domains", "information_plane",
           "data_map", "lr_schedule", "compare_loss", "compare_gns", "compare_lr"]
