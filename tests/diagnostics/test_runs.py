"""Run directory: write / append / read round trips and every failure mode of load_run."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import diagnostics
from diagnostics import Run, RunDirError, RunWriter, load_run
from diagnostics import runs as runs_mod
from diagnostics.runs import SCHEMA_VERSION, RunDirWarning


def snapshot(root: Path) -> dict:
    """Every file under root with its bytes (to check 'nothing changed on disk')."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def make_run(path, records=(), config=None, **kw):
    with RunWriter.create(path, config or {"lr": 3e-4}, **kw) as w:
        for r in records:
            w.log(r)
    return path


# ----------------------------------------------------------------------------- writing + reading

def test_exports():
    assert diagnostics.load_run is load_run and diagnostics.RunWriter is RunWriter
    assert diagnostics.Run is Run and diagnostics.RunDirError is RunDirError


def test_create_log_load_round_trip_with_nan_and_inf(tmp_path):
    path = tmp_path / "demo"
    with RunWriter.create(path, {"lr": 3e-4, "out": Path("x/y"), "phases": ("a", "b")}) as w:
        assert w.info["status"] == "running"
        w.log({"step": 0, "train/loss": 5.5, "train/lr": 0.0, "train/tokens": 1024, "note": "warmup"})
        w.log({"step": 1, "train/loss": float("nan"), "gns/b_simple": float("inf"),
               "gns/grad_sq": float("-inf"), "flag": True, "skipped": None})
        w.log({"step": np.int64(2), "train/loss": np.float32(1.25), "train/tokens": np.int32(7)})
    assert all((path / d).is_dir() for d in ("arrays", "checkpoints"))
    assert (path / "metrics.jsonl").read_text().count("\n") == 3  # one line per record

    run = load_run(path)
    assert run.name == "demo" and run.path == path and run.parent is None
    assert run.config == {"lr": 3e-4, "out": "x/y", "phases": ["a", "b"]}
    assert run.info["schema_version"] == SCHEMA_VERSION
    assert {"created", "versions", "host", "python"} <= set(run.info)
    assert len(run.records) == 3 and run.records[1]["skipped"] is None

    df = run.metrics
    assert list(df.columns)[0] == "step" and df["step"].tolist() == [0, 1, 2]
    assert df["step"].dtype == np.int64
    assert df["train/loss"].dtype == np.float64 and df["train/tokens"].dtype == np.float64
    loss = df["train/loss"].tolist()
    assert loss[0] == 5.5 and math.isnan(loss[1]) and loss[2] == 1.25
    assert df.loc[1, "gns/b_simple"] == math.inf and df.loc[1, "gns/grad_sq"] == -math.inf
    assert df.loc[0, "note"] == "warmup" and pd.isna(df.loc[1, "note"])
    assert df.loc[1, "flag"] == 1.0
    assert run.metric("train/loss").to_dict() == {0: 5.5, 2: 1.25}  # NaN row dropped
    assert len(run.metric("train/loss", dropna=False)) == 3
    assert "demo" in repr(run) and "3 rows" in repr(run)


def test_same_step_records_merge_later_wins(tmp_path):
    path = make_run(tmp_path / "r", [
        {"step": 10, "train/loss": 2.0, "train/lr": 1e-3},
        {"step": 0, "train/loss": 3.0},
        {"step": 10, "val/code/loss": 2.5, "val/prose/loss": 2.7},
        {"step": 10, "train/loss": 1.9, "train/lr": None},  # None does not erase
    ])
    run = load_run(path)
    df = run.metrics
    assert df["step"].tolist() == [0, 10]  # sorted, one row per step
    row = df.set_index("step").loc[10]
    assert row["train/loss"] == 1.9 and row["train/lr"] == 1e-3 and row["val/code/loss"] == 2.5
    assert run.domains() == ["code", "prose"]
    assert len(run.records) == 4


def test_empty_run_loads(tmp_path):
    run = load_run(make_run(tmp_path / "empty"))
    assert list(run.metrics.columns) == ["step"] and len(run.metrics) == 0
    assert run.domains() == [] and run.arrays() == [] and run.checkpoints() == []
    assert run.latest_checkpoint() is None and "no steps" in repr(run)


def test_metric_unknown_name_suggests(tmp_path):
    run = load_run(make_run(tmp_path / "r", [{"step": 0, "train/loss": 1.0}]))
    with pytest.raises(KeyError, match="train/loss"):
        run.metric("train/los")


def test_parent_and_extra(tmp_path):
    parent = make_run(tmp_path / "base", [{"step": 5, "train/loss": 1.0}])
    child = make_run(tmp_path / "branch", parent={"run": parent, "step": 5},
                     extra={"name": "bs64", "device": "cpu"})
    run = load_run(child)
    assert run.parent == {"run": str(parent), "step": 5}
    assert run.name == "bs64" and run.info["device"] == "cpu"
    assert run.parent_run().metric("train/loss").to_dict() == {5: 1.0}
    with pytest.raises(ValueError, match="config"):
        RunWriter.create(tmp_path / "bad", {}, extra={"config": {}})


# ----------------------------------------------------------------------------- log validation

@pytest.mark.parametrize("record, match", [
    ({"train/loss": 1.0}, "step"),
    ({"step": 1.0}, "step"),
    ({"step": True}, "step"),
    ({"step": 1, "train/hist": [1, 2]}, "train/hist"),
    ({"step": 1, "train/x": np.zeros(2)}, "train/x"),
    ({"step": 1, "train/c": 1j}, "train/c"),
])
def test_log_rejects_bad_records(tmp_path, record, match):
    with RunWriter.create(tmp_path / "r", {}) as w:
        with pytest.raises(TypeError, match=match):
            w.log(record)
    assert (tmp_path / "r" / "metrics.jsonl").read_text() == ""  # nothing half-written


def test_closed_writer_refuses(tmp_path):
    w = RunWriter.create(tmp_path / "r", {})
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        w.log({"step": 0})


def test_context_manager_marks_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with RunWriter.create(tmp_path / "r", {}) as w:
            w.log({"step": 0, "train/loss": 1.0})
            raise RuntimeError("boom")
    run = load_run(tmp_path / "r")
    assert run.status == "failed" and "boom" in run.info["error"]
    assert run.metric("train/loss").to_dict() == {0: 1.0}


# ----------------------------------------------------------------------------- create / resume

def test_create_refuses_existing_run_and_changes_nothing(tmp_path):
    path = make_run(tmp_path / "r", [{"step": 0, "train/loss": 1.0}])
    before = snapshot(path)
    with pytest.raises(RunDirError, match="already exists.*RunWriter.resume"):
        RunWriter.create(path, {"lr": 1.0})
    assert snapshot(path) == before


def test_create_unserialisable_config_touches_nothing(tmp_path):
    with pytest.raises(TypeError, match="object"):
        RunWriter.create(tmp_path / "r", {"model": object()})
    assert not (tmp_path / "r").exists()


def test_resume_appends(tmp_path):
    path = make_run(tmp_path / "r", [{"step": 0, "train/loss": 3.0}])
    with RunWriter.resume(path) as w:
        w.log({"step": 1, "train/loss": 2.0})
    run = load_run(path)
    assert run.metric("train/loss").to_dict() == {0: 3.0, 1: 2.0}
    assert run.info["resumes"][-1]["step"] is None and run.status == "running"


def test_resume_truncates_records_after_step(tmp_path):
    path = make_run(tmp_path / "r", [{"step": s, "train/loss": 10.0 - s} for s in range(6)]
                    + [{"step": 3, "val/code/loss": 9.0}, {"step": 5, "val/code/loss": 8.0}])
    with RunWriter.resume(path, step=3) as w:  # checkpoint at step 3: steps 4, 5 will be re-run
        w.log({"step": 4, "train/loss": 0.5})
    run = load_run(path)
    assert [r["step"] for r in run.records] == [0, 1, 2, 3, 3, 4]
    assert run.metric("train/loss").to_dict() == {0: 10.0, 1: 9.0, 2: 8.0, 3: 7.0, 4: 0.5}
    assert run.metric("val/code/loss").to_dict() == {3: 9.0}
    assert run.info["resumes"][-1]["step"] == 3
    assert not [p for p in path.iterdir() if p.name.startswith(".")]  # no temp files left


def test_writer_truncate_after(tmp_path):
    with RunWriter.create(tmp_path / "r", {}) as w:
        for s in range(4):
            w.log({"step": s, "train/loss": float(s)})
        w.truncate_after(1)
        w.log({"step": 2, "train/loss": -1.0})
    assert load_run(tmp_path / "r").metric("train/loss").to_dict() == {0: 0.0, 1: 1.0, 2: -1.0}


def test_resume_missing_run_errors(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        RunWriter.resume(tmp_path / "nope")


# ----------------------------------------------------------------------------- malformed files

def test_truncated_last_line_tolerated_with_warning(tmp_path):
    path = make_run(tmp_path / "r", [{"step": 0, "train/loss": 1.0}, {"step": 1, "train/loss": 0.5}])
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "train/lo')  # killed mid-write
    with pytest.warns(RunDirWarning, match="truncated last line"):
        run = load_run(path)
    assert run.metrics["step"].tolist() == [0, 1]
    # resuming repairs the file so the next record starts on its own line
    with pytest.warns(RunDirWarning, match="truncated"):
        w = RunWriter.resume(path)
    w.log({"step": 2, "train/loss": 0.25})
    w.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_run(path).metric("train/loss").to_dict() == {0: 1.0, 1: 0.5, 2: 0.25}


def test_non_utf8_bytes_name_the_file_and_line(tmp_path, capsys):
    """Bytes that are not UTF-8 inside metrics.jsonl are malformed content like any other: the error
    names the file and line (it was a raw UnicodeDecodeError from load_run, show and recommend)."""
    from midtrain.cli import main

    path = make_run(tmp_path / "r")
    (path / "metrics.jsonl").write_bytes(b'{"step": 0, "a": 1}\n{"step": 1, "a": \xff\xfe2}\n{"step": 2, "a": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: not UTF-8 text \(byte 0xff at column 18\)") as e:
        load_run(path)
    assert e.value.line == 2
    for cmd in ("show", "recommend"):
        assert main([cmd, str(path)]) == 2
        err = capsys.readouterr().err
        assert "metrics.jsonl:2: not UTF-8" in err and "Traceback" not in err
    # a character cut in two at the very end is a killed writer's mark: dropped like a truncated line
    (path / "metrics.jsonl").write_bytes(b'{"step": 0, "a": 1}\n{"step": 1, "a": "\xc3')
    with pytest.warns(RunDirWarning, match="truncated last line"):
        assert load_run(path).metrics["step"].tolist() == [0]


def test_last_line_without_newline_but_valid_is_kept(tmp_path):
    path = make_run(tmp_path / "r", [{"step": 0, "a": 1.0}])
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "a": 2.0}')
    assert load_run(path).metric("a").to_dict() == {0: 1.0, 1: 2.0}


def test_malformed_middle_line_names_line_number(tmp_path):
    path = make_run(tmp_path / "r")
    (path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a": \n{"step": 2, "a": 3}\n')
    with pytest.raises(RunDirError, match=r"metrics\.jsonl:2: malformed JSON") as e:
        load_run(path)
    assert e.value.line == 2 and e.value.path == path / "metrics.jsonl"
    # a complete (newline-terminated) but broken last line is also an error, not a truncation
    (path / "metrics.jsonl").write_text('{"step": 0, "a": 1}\n{"step": 1, "a": \n')
    with pytest.raises(RunDirError, match=r":2:"):
        load_run(path)
    before = snapshot(path)
    with pytest.raises(RunDirError, match=r":2:"):
        RunWriter.resume(path, step=0)
    assert snapshot(path) == before


@pytest.mark.parametrize("line, match", [
    ("[1, 2]", "JSON object"),
    ('{"a": 1}', "integer 'step'"),
    ('{"step": "3"}', "integer 'step'"),
])
def test_record_not_object_or_without_step(tmp_path, line, match):
    path = make_run(tmp_path / "r")
    (path / "metrics.jsonl").write_text('{"step": 0}\n' + line + "\n")
    with pytest.raises(RunDirError, match=f"metrics.jsonl:2: .*{match}"):
        load_run(path)


def test_corrupt_run_json(tmp_path):
    path = make_run(tmp_path / "r")
    (path / "run.json").write_text('{"schema_version": 1, "conf')
    with pytest.raises(RunDirError, match=r"run\.json is corrupt"):
        load_run(path)
    (path / "run.json").write_text("[1]")
    with pytest.raises(RunDirError, match=r"run\.json"):
        load_run(path)
    (path / "run.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(RunDirError, match="newer"):
        load_run(path)


def test_missing_dir_or_run_json(tmp_path):
    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    with pytest.raises(RunDirError, match=r"run\.json is missing"):
        load_run(tmp_path / "plain")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="not a directory"):
        load_run(tmp_path / "file")


# ----------------------------------------------------------------------------- arrays, checkpoints, info

def test_arrays_round_trip(tmp_path):
    with RunWriter.create(tmp_path / "r", {}) as w:
        eig = np.linspace(1, 0, 7)
        w.save_array("spectra_step100", eigvals=eig, steps=np.arange(3, dtype=np.int32))
        w.save_array("table", ids=[1, 2, 3])
        w.save_array("table", ids=[4, 5])  # replaces
        with pytest.raises(ValueError, match="name"):
            w.save_array("../escape", x=eig)
        with pytest.raises(TypeError, match="object"):
            w.save_array("bad", x=np.array([{}, []], dtype=object))
    run = load_run(tmp_path / "r")
    assert run.arrays() == ["spectra_step100", "table"]
    got = run.load_array("spectra_step100")
    np.testing.assert_array_equal(got["eigvals"], eig)
    assert got["steps"].dtype == np.int32
    assert run.load_array("table")["ids"].tolist() == [4, 5]
    with pytest.raises(KeyError, match="spectra_step100"):
        run.load_array("missing")
    (tmp_path / "r" / "arrays" / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(RunDirError, match="broken.npz"):
        run.load_array("broken")


def test_checkpoints_listing(tmp_path):
    path = make_run(tmp_path / "r")
    for name in ("step_0000100.pt", "step_0000020.pt", "step_0001000.pt", "notes.txt",
                 "step_0000200.pt.tmp", "latest.pt"):
        (path / "checkpoints" / name).write_bytes(b"")
    run = load_run(path)
    assert [s for s, _ in run.checkpoints()] == [20, 100, 1000]
    assert run.checkpoints()[0][1] == path / "checkpoints" / "step_0000020.pt"
    assert run.latest_checkpoint() == (1000, path / "checkpoints" / "step_0001000.pt")


def test_update_info_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r"
    w = RunWriter.create(path, {"lr": 1.0})
    w.update_info(status="finished", best_step=10)
    info = json.loads((path / "run.json").read_text())
    assert info["status"] == "finished" and info["best_step"] == 10 and info["config"] == {"lr": 1.0}

    # a failure at the rename leaves the old, valid file and no temp file behind
    def boom(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(runs_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        w.update_info(status="crashed")
    monkeypatch.undo()
    assert json.loads((path / "run.json").read_text())["status"] == "finished"
    assert sorted(p.name for p in path.iterdir()) == ["arrays", "checkpoints", "metrics.jsonl", "run.json"]

    with pytest.raises(TypeError):
        w.update_info(thing=object())
    with pytest.raises(ValueError, match="schema_version"):
        w.update_info(schema_version=2)
    w.close(status="done")
    assert load_run(path).status == "done"


def test_runs_module_does_not_import_torch():
    code = ("import importlib.util, sys; "
            f"s = importlib.util.spec_from_file_location('runs', {runs_mod.__file__!r}); "
            "m = importlib.util.module_from_spec(s); s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONWARNINGS": ""})


def test_atomic_write_gives_the_mode_open_would(tmp_path):
    """A file written whole (run.json, a report) is readable like one open() makes (0666 less the umask),
    not 0600 as its temp file was: a report served by a web server as another user can be read."""
    import os
    import stat

    from diagnostics.runs import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.txt").st_mode) == 0o644
