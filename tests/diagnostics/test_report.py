"""diagnostics.report and `midtrain report` on small hand-written runs: each section follows the
metrics the run has (a missing one is one line naming its hook), a figure that raises is one line,
the long-context items wait for their plots functions, --compare overlays runs, bad input writes
nothing. The real run in a real browser: tests/test_report_browser.py."""

import base64
import json
import re

import matplotlib

matplotlib.use("Agg")  # headless; set before pyplot is imported

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from diagnostics import load_run, plots  # noqa: E402
from diagnostics.report import (SECTIONS, compare_loss, data_map, gns_domains, information_plane,  # noqa: E402
                                lr_schedule, prepare, render_item, render_report, write_report)
from diagnostics.runs import RunWriter  # noqa: E402
from midtrain.cli import main  # noqa: E402

STEPS = 30
DOMAINS = ("code", "prose")


def make_run(path, extra=None, *, parent=None, steps=STEPS, seed=0, arrays=None):
    """A run of "another loop": train/* every step, val/<d>/loss every 5, two phases by train/phase."""
    rng = np.random.default_rng(seed)
    with RunWriter.create(path, config={"lr": 1e-3}, parent=parent) as w:
        for s in range(steps):
            rec = {"step": s, "train/loss": 5.0 - 0.05 * s + 0.05 * rng.standard_normal(),
                   "train/lr": 1e-3 * min(1.0, (steps - s) / 10), "train/batch_size": 8,
                   "train/phase": "a" if s < steps // 2 else "b"}
            if s % 5 == 0:
                rec.update({f"val/{d}/loss": 5.0 - (0.03 + 0.01 * i) * s for i, d in enumerate(DOMAINS)})
            for name, fn in (extra or {}).items():
                v = fn(s)
                if v is not None:
                    rec[name] = v
            w.log(rec)
        for name, arr in (arrays or {}).items():
            w.save_array(name, **arr)
    return load_run(path)


def section(html: str, key: str) -> str:
    m = re.search(rf'<section id="{key}">(.*?)</section>', html, re.S)
    assert m, f"no section {key}"
    return m.group(1)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def bare(tmp_path):
    return make_run(tmp_path / "bare")


def test_each_section_follows_the_metrics_and_names_the_missing_hook(tmp_path, bare):
    html = render_report(bare)
    assert [k for k in re.findall(r'<section id="(\w+)">', html)] == [s.key for s in SECTIONS]
    assert section(html, "validation").count("<img ") == 1
    assert section(html, "phases").count("<img ") == 1          # from train/phase
    for key, hook in (("gns", "GradientNoiseScale"), ("representation", "RepresentationProbe"),
                      ("difficulty", "DifficultyTracker")):
        sec = section(html, key)
        assert "<img " not in sec and 'class="missing"' in sec and hook in sec, key
    assert 'class="failed"' not in html
    # the recommendations that cannot be made say why, one line each
    rec = section(html, "recommendations")
    assert rec.count('class="missing"') >= 3 and "batch_size: not available" in rec
    # with the GNS metrics the noise-scale figure appears
    gns = make_run(tmp_path / "gns", {"gns/b_simple": lambda s: 4.0 + 0.1 * s, "gns/mlp/b_simple": lambda s: 3.0})
    sec = section(render_report(gns), "gns")
    assert sec.count("<img ") == 1 and "gns/domain/*/b_simple" in sec   # per domain: still missing


def test_a_figure_that_raises_is_one_line_and_the_rest_is_drawn(tmp_path, bare, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom in validation_loss")

    monkeypatch.setattr(plots, "validation_loss", boom)
    out = tmp_path / "r.html"
    write_report(bare.path, out=out)
    html = out.read_text()
    sec = section(html, "validation")
    assert 'class="failed"' in sec and "RuntimeError: boom in validation_loss" in sec and "<img " not in sec
    assert section(html, "phases").count("<img ") == 1 and section(html, "schedule").count("<img ") == 1


def test_long_context_items_wait_for_their_plots_functions(tmp_path, monkeypatch):
    lengths = {"val_len/64/loss": 3.0, "val_len/64/code/loss": 2.9, "val_len/128/loss": 3.4,
               "val_len/128/code/loss": 3.3, "val_pos/128/far_loss": 3.6, "retrieval/128/gain": 0.2}
    run = make_run(tmp_path / "lc", {k: (lambda s, v=v: v if s % 10 == 0 else None) for k, v in lengths.items()})
    item = {i.title: i for s in SECTIONS for i in s.items}
    ctx = prepare(run)
    for name in ("plot_loss_by_position", "plot_retrieval"):
        monkeypatch.delattr(plots, name, raising=False)
    for title, fn in (("loss by position", "plot_loss_by_position"), ("retrieval", "plot_retrieval")):
        (b,) = render_item(item[title], ctx)
        assert type(b).__name__ == "Missing" and f"diagnostics.plots has no {fn}" in b.why
    (table,) = render_item(item["loss by context length"], ctx)
    assert table.header == ["length", "code", "mean"] and table.rows == [[64, 2.9, 3.0], [128, 3.3, 3.4]]
    calls = []

    def fake(r):
        calls.append(r)
        fig, ax = plt.subplots()
        ax.plot([0, 1], [1, 0])
        return ax

    for name in ("plot_loss_by_position", "plot_retrieval"):
        monkeypatch.setattr(plots, name, fake, raising=False)
    for title in ("loss by position", "retrieval"):
        (b,) = render_item(item[title], ctx)
        assert type(b).__name__ == "Figure" and b.png.startswith(b"\x89PNG")
    assert calls == [run, run]
    # present functions, absent metrics: the line names the metric and who writes it
    (b,) = render_item(item["retrieval"], prepare(make_run(tmp_path / "none")))
    assert "retrieval/*/gain" in b.why and "RetrievalProbe" in b.why


def test_compare_overlays_every_run_and_lists_them(tmp_path, bare):
    other = make_run(tmp_path / "other", parent=(bare.path, 10), seed=1)
    fig = compare_loss([bare, other])
    lines = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    for r in (bare, other):
        for d in DOMAINS:
            s = r.metric(f"val/{d}/loss")
            ln = lines[f"{r.name}:val/{d}/loss"]
            np.testing.assert_array_equal(ln.get_xdata(), s.index.to_numpy())
            np.testing.assert_array_equal(ln.get_ydata(), s.to_numpy())
    html = render_report(bare, [other])
    for key in ("validation", "gns", "schedule"):
        assert "runs compared" in section(html, key) or key == "gns"
    assert section(html, "validation").count("<img ") == 2 and section(html, "schedule").count("<img ") == 2
    assert "gns/b_simple" in section(html, "gns")   # no run has it: the overlay says so
    summ = section(html, "summary")
    assert "runs compared" in summ and "other" in summ and "not a branch of it" in summ
    # without --compare there is no overlay
    assert "runs compared" not in section(render_report(bare), "validation")


def test_cli_writes_one_self_contained_file_to_the_run_by_default(bare, capsys):
    assert main(["report", str(bare.path)]) == 0
    out = bare.path / "report.html"
    assert f"wrote {out}" in capsys.readouterr().out
    html = out.read_text()
    assert "<script" not in html and "<link" not in html
    assert not re.search(r'(?:src|href)="(?!data:|#)', html)          # nothing fetched from anywhere
    imgs = re.findall(r'<img src="data:image/png;base64,([^"]+)"', html)
    assert len(imgs) == html.count("<img ") >= 3
    assert all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in imgs)


def test_bad_input_exits_2_and_writes_nothing(tmp_path, bare, capsys):
    (tmp_path / "empty").mkdir()
    corrupt = make_run(tmp_path / "corrupt").path
    (corrupt / "run.json").write_text("{not json")
    norecords = tmp_path / "norecords"
    RunWriter.create(norecords, config={}).close()
    cases = {"not a run": [str(tmp_path / "empty")], "no folder": [str(tmp_path / "nope")],
             "corrupt run.json": [str(corrupt)], "no records": [str(norecords)],
             "out folder missing": [str(bare.path), "--out", str(tmp_path / "no" / "r.html")],
             "out is a folder": [str(bare.path), "--out", str(tmp_path)],
             "compare not a run": [str(bare.path), "--compare", str(tmp_path / "empty")],
             "compare itself": [str(bare.path), "--compare", str(bare.path)]}
    for why, args in cases.items():
        before = sorted(p for p in tmp_path.rglob("*"))
        assert main(["report", *args]) == 2, why
        err = capsys.readouterr().err
        assert err.startswith("midtrain: error:"), why
        assert sorted(p for p in tmp_path.rglob("*")) == before, why
    assert not list(tmp_path.rglob("*.html"))


def test_figures_draw_exactly_the_run_s_data(tmp_path):
    mi = {f"repr/{lay}/{q}": (lambda s, k=k, j=j: 0.1 * k + 0.01 * s + j if s % 10 == 0 else None)
          for k, lay in enumerate(("blocks.0", "final_norm")) for j, q in enumerate(("mi_xt", "mi_ty"))}
    dom = {f"gns/domain/{d}/b_simple": (lambda s, i=i: 2.0 + i + 0.1 * s) for i, d in enumerate(DOMAINS)}
    n = 40
    rng = np.random.default_rng(0)
    table = {"confidence": rng.random(n), "variability": 0.3 * rng.random(n), "domain": np.arange(n) % 2,
             "region": np.arange(n) % 3, "domain_names": np.array(DOMAINS)}
    run = make_run(tmp_path / "figs", {**mi, **dom}, arrays={"difficulty_examples": table})
    fig = information_plane(run)
    got = {ln.get_gid(): ln for ln in fig.axes[0].get_lines()}
    for lay in ("blocks.0", "final_norm"):
        np.testing.assert_allclose(got[f"repr/{lay}/mi"].get_xdata(), run.metric(f"repr/{lay}/mi_xt").to_numpy())
        np.testing.assert_allclose(got[f"repr/{lay}/mi"].get_ydata(), run.metric(f"repr/{lay}/mi_ty").to_numpy())
    fig = gns_domains(run, recommended=16)
    got = {ln.get_gid(): ln for ln in fig.axes[0].get_lines()}
    for d in DOMAINS:
        np.testing.assert_allclose(got[f"gns/domain/{d}/b_simple"].get_ydata(),
                                   run.metric(f"gns/domain/{d}/b_simple").to_numpy())
    assert got["recommended"].get_ydata()[0] == 16
    fig = data_map(run)
    pts = {c.get_gid(): c.get_offsets() for c in fig.axes[0].collections}
    for i, d in enumerate(DOMAINS):
        m = table["domain"] == i
        np.testing.assert_allclose(pts[f"data_map:{d}"], np.c_[table["variability"][m], table["confidence"][m]])
    bars = {p.get_gid() for p in fig.axes[1].patches}
    assert bars == {"region:easy", "region:ambiguous", "region:hard"}
    widths = np.array([p.get_width() for p in fig.axes[1].patches]).reshape(3, 2)   # region x domain
    np.testing.assert_allclose(widths.sum(axis=0), 1.0)
    law = (np.arange(1, STEPS), np.linspace(5, 3.5, STEPS - 1), "annealing")
    fig = lr_schedule(run, law=law, anneal=(20.0, 15.0, 25.0))
    got = {ln.get_gid(): ln for ax in fig.axes for ln in ax.get_lines()}
    np.testing.assert_array_equal(got["law"].get_ydata(), law[1])
    np.testing.assert_array_equal(got["train/lr"].get_ydata(), run.metric("train/lr").to_numpy())
    assert got["anneal_start"].get_xdata()[0] == 20.0 and list(got["anneal_range"].get_xdata()) == [15.0, 25.0]
    # the report picks every one of them up: no missing line left for these items
    html = render_report(run)
    assert "information plane</b>: left out" not in html and "B_simple per domain</b>: left out" not in html
    assert "data map</b>: left out" not in html


def test_validation_tables_of_this_run_only(tmp_path, bare):
    doc = {"run": str(bare.path.resolve()), "step": 10, "seeds": [0, 1], "ranking": ["own", "recommended"],
           "recommended_rank": 2, "compute": {"probe_over_grid": 0.2},
           "plans": {"own": {"rank": 1, "description": "the run's recipe", "objective": {"mean": 3.0, "std": 0.01},
                             "val": {"code": {"mean": 2.9, "std": 0.02}}},
                     "recommended": {"rank": 2, "description": "rec", "objective": {"mean": 3.1, "std": 0.02},
                                     "val": {"code": {"mean": 3.0, "std": 0.01}}}}}
    for name, run in (("bare-validate10", str(bare.path.resolve())), ("bare-validate20", "/elsewhere")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "validation.json").write_text(json.dumps({**doc, "run": run}))
    item = next(i for s in SECTIONS for i in s.items if i.title == "validation tables")
    (table,) = render_item(item, prepare(bare))
    assert [r[:2] for r in table.rows] == [[1, "own"], [2, "recommended"]]
    assert table.rows[0][2] == "3.0000 +- 0.0100" and "bare-validate10" in table.caption
