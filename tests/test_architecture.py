"""The architecture of docs/architecture.md, checked: layers, no cycles, private modules stay private,
every name the docs show imports, the old module paths warn, nothing cites a document outside the repo.

Static (``ast``, no new dependency): every import statement of every module of the three packages,
at module level or inside a function (a lazy import is still a dependency), is an edge of the graph.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("diagnostics", "hooks", "midtrain")            # bottom to top
LAYER = {p: i for i, p in enumerate(PACKAGES)}              # diagnostics 0 < hooks 1 < midtrain 2
MAX_LINES = 650                                             # "no file over about 600 lines"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Modules of this project that ``name`` imports (resolved to the longest known module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if t in MODULES:
                out.add(t)
    out.discard(name)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_the_graph_sees_the_packages():
    assert {"diagnostics", "hooks", "midtrain", "diagnostics.gns", "hooks.monitor", "midtrain.loop"} <= set(MODULES)
    assert "diagnostics.gns._two_batch" in GRAPH["diagnostics.gns"]


def test_no_import_runs_up_a_layer():
    bad = [f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
           if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]]]
    assert not bad, "imports must go midtrain -> hooks -> diagnostics:\n" + "\n".join(sorted(bad))


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    assert not _cycles(GRAPH), f"import cycles: {_cycles(GRAPH)}"


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_private_modules_are_imported_only_inside_their_package():
    """``pkg._mod`` is private to ``pkg``: other packages use ``pkg``'s front door."""
    bad = []
    for m, ts in GRAPH.items():
        for t in ts:
            parts = t.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    owner = ".".join(parts[:i])
                    if not (m == owner or m.startswith(owner + ".")):
                        bad.append(f"{m} imports {t} (private to {owner})")
                    break
    assert not bad, "\n".join(sorted(bad))


def test_no_module_level_getattr():
    """A module ``__getattr__`` hides what a module exports (it was used to dodge a cycle)."""
    bad = [m for m, p in MODULES.items()
           if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in ast.parse(p.read_text()).body)]
    assert not bad, bad


def test_no_file_is_too_long():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines (split them by what they own): {long}"


# -- what the docs show -------------------------------------------------------------------------

def _doc_texts() -> dict[str, str]:
    texts = {"README.md": (ROOT / "README.md").read_text()}
    for p in sorted((ROOT / "docs").glob("*.md")):
        texts[str(p.relative_to(ROOT))] = p.read_text()
    for p in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(p.read_text())["cells"]
        texts[str(p.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    return texts


_FROM = re.compile(r"from ((?:diagnostics|hooks|midtrain)(?:\.\w+)*) import (\([\w ,\n]+\)|[\w ,]+)")
_DOTTED = re.compile(r"(?<![\w./-])((?:diagnostics|hooks|midtrain)(?:\.\w+)+)")


def _resolve(dotted: str):
    """Import the longest module prefix of ``dotted`` and get the rest as attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for a in parts[i:]:
            obj = getattr(obj, a)
        return obj
    raise ModuleNotFoundError(dotted)


def _shown_names() -> list[tuple[str, str]]:
    shown = []
    for where, text in _doc_texts().items():
        for mod, names in _FROM.findall(text):
            for n in (x.strip() for x in names.strip("()").replace("\n", ",").split(",")):
                if n and n.isidentifier():
                    shown.append((where, f"{mod}.{n}"))
        for dotted in _DOTTED.findall(text):
            if not dotted.endswith((".py", ".md", ".toml", ".json", ".jsonl")):
                shown.append((where, dotted))
    return sorted(set(shown))


def test_every_name_the_docs_show_imports_without_a_deprecation():
    shown = _shown_names()
    assert len(shown) > 40  # the scan really reads the docs
    bad = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for where, dotted in shown:
            try:
                _resolve(dotted)
            except (ImportError, AttributeError, DeprecationWarning) as e:
                bad.append(f"{where}: {dotted} ({type(e).__name__}: {e})")
    assert not bad, "names shown in the docs that do not import:\n" + "\n".join(bad)


# -- the old flat diagnostics module paths (one release) -----------------------------------------

MOVED = {
    "diagnostics.spectra": ("diagnostics.representation", "matrix_entropy"),
    "diagnostics.twonn": ("diagnostics.representation", "twonn_dimension"),
    "diagnostics.infoplane": ("diagnostics.representation", "information_plane"),
    "diagnostics.readout": ("diagnostics.representation", "readout_loss"),
    "diagnostics.phases": ("diagnostics.representation", "detect_compression_onset"),
    "diagnostics.difficulty_table": ("diagnostics.difficulty", "ExampleTable"),
    "diagnostics.ema": ("diagnostics.stats", "BiasCorrectedEMA"),
    "diagnostics.pegrad": ("diagnostics.gns.pegrad", "linear_sq_norms"),
    "diagnostics.schedule_laws": ("diagnostics.schedule", "fit_annealing_law"),
    "diagnostics.recommend_lr": ("diagnostics.recommend", "lr_decay_recommendation"),
    "diagnostics.recommend_branches": ("diagnostics.recommend", "critical_batch_recommendation"),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_warn_and_give_the_same_objects(old):
    import sys

    new, name = MOVED[old]
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=re.escape(new)):
        mod = importlib.import_module(old)
    assert getattr(mod, name) is getattr(importlib.import_module(new), name)


def test_nothing_cites_a_document_outside_the_repo():
    bad = []
    for p in ROOT.rglob("*"):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in (".git", ".venv", "runs", "wandb") or not p.is_file() or p == Path(__file__):
            continue
        if p.suffix in (".py", ".md", ".ipynb", ".toml", ".sh", ".cfg", ".txt") or p.name == "run":
            text = p.read_text(errors="replace")
            for pat in ("DESIGN section", "DESIGN.md", "../shared"):
                if pat in text:
                    bad.append(f"{rel}: {pat}")
    assert not bad, "cite docs/architecture.md instead:\n" + "\n".join(bad)
