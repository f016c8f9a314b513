"""Execute the notebooks headless (nbclient + ipykernel), on their small-parameter path: all four,
top to bottom.

Each notebook runs with its own folder as the working directory (as nbmake and Jupyter do);
the run it trains is written to a temporary directory and the executed notebook is kept in
memory only, so nothing is written into the repository. A failing cell fails the test with
the cell's traceback.
"""

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str, env: dict, monkeypatch, timeout: int = 120):
    import nbformat
    from nbclient import NotebookClient

    for k, v in env.items():
        monkeypatch.setenv(k, v)  # the kernel inherits this process's environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: extra threads only contend
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def outputs(nb) -> str:
    text = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(text)


def test_explore_run_notebook(tmp_path, monkeypatch):
    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = execute("explore_run.ipynb", {"MIDTRAIN_NB_STEPS": "24", "MIDTRAIN_NB_SIZE": "micro",
                                       "MIDTRAIN_NB_OUT": str(tmp_path / "run")}, monkeypatch)
    assert (tmp_path / "run" / "metrics.jsonl").stat().st_size > 0
    text = outputs(nb)
    assert "reproduces gns/b_simple" in text  # the theory-check cell ran
    n_figures = sum(1 for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {}))
    assert n_figures == 5  # loss + LR, GNS, representation grid, heatmap, difficulty
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written next to it


def test_attach_hooks_notebook(tmp_path, monkeypatch):
    # Agg: the figures are built but not rasterised (the same plot functions are rendered by the
    # test above); saves a few seconds of the time budget
    nb = execute("attach_hooks.ipynb", {"MIDTRAIN_NB_STEPS": "20", "MIDTRAIN_NB_OUT": str(tmp_path / "run"),
                                        "MPLBACKEND": "Agg"}, monkeypatch)
    text = outputs(nb)
    assert "disabled hooks: none" in text and "floor ln 32" in text
    run_lines = [ln for ln in text.splitlines() if ln.startswith("Run(")]
    assert run_lines and "domains=['pattern', 'random']" in run_lines[0]


def test_recommendations_notebook(tmp_path, monkeypatch):
    from diagnostics import load_run

    before = sorted(p.name for p in NOTEBOOKS.iterdir())
    nb = execute("recommendations.ipynb", {"MIDTRAIN_NB_STEPS": "150", "MIDTRAIN_NB_SIZE": "micro",
                                           "MIDTRAIN_NB_OUT": str(tmp_path / "run"), "MPLBACKEND": "Agg"}, monkeypatch)
    text = outputs(nb)
    assert "lr_decay: " in text and "config patch: " in text          # the recommendation, with its patch
    assert "applied plan minus own recipe at the end of the decay" in text
    probes = sorted(p.name for p in (tmp_path / "run-probes").iterdir())
    assert len(probes) == 2 and all(n.startswith("anneal") for n in probes)
    applied = load_run(tmp_path / "run-applied")
    assert applied.status == "finished" and applied.parent["step"] in [s for s, _ in load_run(tmp_path / "run").checkpoints()]
    assert sorted(p.name for p in NOTEBOOKS.iterdir()) == before  # nothing written next to it


def test_theory_checks_notebook(monkeypatch):
    # each check prints one line (estimate, truth, relative error) and asserts its tolerance in its cell
    nb = execute("theory_checks.ipynb", {"MPLBACKEND": "Agg"}, monkeypatch)
    lines = [ln for ln in outputs(nb).splitlines() if "rel. error" in ln]
    kinds = ["B_simple", "matrix entropy", "effective rank", "alpha-ReQ", "TwoNN", "I(X;T)", "I(T;Y)"]
    assert len(lines) == 23 and all(ln.endswith(" ok") for ln in lines), lines
    assert all(any(ln.startswith(k) for ln in lines) for k in kinds)


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebooks_are_committed_without_outputs(name):
    import nbformat

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")
