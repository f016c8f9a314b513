"""Bad input gets a message, not a traceback, and leaves nothing behind (issue 11: item 5, "Tracebacks
where a message belongs", "Wrong values accepted silently").

Every refusal: exit 2, one paragraph on stderr naming the field (or file, or option), no traceback,
and no run directory that a fresh start would trip over."""

from __future__ import annotations

import os
import warnings

import pytest

from midtrain.cli import main
from tests.reliability._inputs import assert_refused, micro_dict, no_run_left, patched, train_cli, write_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _refused(tmp_path, capsys, d, *needles, extra=()):
    out = tmp_path / "run"
    rc = train_cli(write_config(tmp_path / "c.toml", d), out, *extra)
    assert_refused(rc, capsys.readouterr().err, *needles)
    assert no_run_left(out)
    return out


# -- item 5: errors found at start-up leave no run directory behind -------------------------------

def _text_data(tmp_path, name: str, text: str) -> str:
    d = tmp_path / name
    d.mkdir()
    (d / "a.txt").write_text(text)
    return str(d)


@pytest.mark.parametrize("case", ["phase_batch_size_0", "eval_batch_size_0", "eval_batches_0", "tiny_corpus"])
def test_start_up_error_leaves_no_run_and_the_fixed_config_starts_fresh(tmp_path, capsys, case):
    good = micro_dict()
    if case == "phase_batch_size_0":
        bad, needle = micro_dict(batch_size=0), "batch_size"
    elif case == "eval_batch_size_0":
        bad, needle = patched(good, data={"eval_batch_size": 0}), "eval_batch_size"
    elif case == "eval_batches_0":
        bad, needle = patched(good, data={"eval_batches": 0}), "eval_batches"
    else:  # a corpus shorter than one sequence (seq_len + 1 tokens), hooks off
        small = _text_data(tmp_path, "small", "hello world")
        bad = patched(micro_dict(mixture={"text": 1.0}), data={"path": small})
        good = patched(bad, data={"path": _text_data(tmp_path, "big", "hello world, " * 200)})
        needle = "seq_len"
    out = _refused(tmp_path, capsys, bad, needle)
    # the user fixes the config and starts again into the same --out: not refused
    assert train_cli(write_config(tmp_path / "fixed.toml", good), out, "--until", "1") == 0, capsys.readouterr().err


# -- tracebacks where a message belongs ------------------------------------------------------------

@pytest.mark.parametrize("d, needles", [
    (micro_dict(lr=float("nan")), ["lr", "nan"]),
    (micro_dict(lr=float("inf")), ["lr", "inf"]),
    (micro_dict(lr="fast"), ["lr", "fast"]),
    (patched(micro_dict(), top={"seed": "abc"}), ["seed", "abc"]),
    (micro_dict(mixture="prose"), ["mixture", "prose"]),
    (patched(micro_dict(), optim={"beta2": 1.5}), ["beta2", "1.5"]),
    (patched(micro_dict(), top={"device": "tpu"}), ["device", "tpu"]),
    (micro_dict(steps=..., tokens=1000, batch_size=0), ["batch_size"]),
    (micro_dict(steps=..., tokens=1000, seq_len=0), ["seq_len"]),
    # found by test_fuzz.py: a traceback from the model at the phase switch, and from int("") in the builder
    (micro_dict(rope_base=1.0), ["rope_base", "1.0"]),
    (patched(micro_dict(), monitor_difficulty={"enabled": True, "probe_size": ""}), ["[monitor.difficulty]", "probe_size"]),
], ids=["lr_nan", "lr_inf", "lr_str", "seed_str", "mixture_str", "beta2", "device", "tokens_bs0", "tokens_seq0",
        "phase_rope_base_1", "probe_size_str"])
def test_bad_value_is_a_message(tmp_path, capsys, d, needles):
    _refused(tmp_path, capsys, d, *needles)


def test_device_option_is_checked(tmp_path, capsys):
    _refused(tmp_path, capsys, micro_dict(), "device", "tpu", extra=("--device", "tpu"))


def test_unknown_hook_option_lists_the_valid_ones(tmp_path, capsys):
    d = patched(micro_dict(), monitor_gns={"enabled": True, "mdoe": "microbatch"})
    _refused(tmp_path, capsys, d, "[monitor.gns]", "mdoe", "mode", "every", "ema")


def test_resume_without_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_refused(main(["train", "--resume", "--quiet"]), capsys.readouterr().err, "--resume", "--out")
    assert not os.listdir(tmp_path)


def test_config_dump_into_a_missing_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert_refused(main(["config", "--dump", "missing_dir/x.toml"]), capsys.readouterr().err, "missing_dir/x.toml")
    assert not os.listdir(tmp_path)


def test_recommend_write_config_into_a_missing_directory(tmp_path, capsys):
    """Refused before anything is written (it was a traceback after recommendations.json was saved)."""
    out = tmp_path / "run"
    assert train_cli(write_config(tmp_path / "c.toml", micro_dict()), out) == 0
    capsys.readouterr()
    rc = main(["recommend", str(out), "--write-config", str(tmp_path / "missing_dir" / "rec.toml")])
    assert_refused(rc, capsys.readouterr().err, "missing_dir", "--write-config")
    assert not (out / "recommendations.json").exists() and not (tmp_path / "missing_dir").exists()


# -- wrong values accepted silently ----------------------------------------------------------------

@pytest.mark.parametrize("d, needles", [
    (micro_dict(steps="240"), ["steps", "'240'"]),
    (micro_dict(steps=240.5), ["steps", "240.5"]),
    (micro_dict(steps=True), ["steps", "true (a boolean)"]),
    (patched(micro_dict(), optim={"grad_clip": -1}), ["grad_clip", "-1"]),
    (patched(micro_dict(), data={"val_fraction": 1.0}), ["val_fraction", "1.0"]),
    ({**micro_dict(), "phases": []}, ["[[phases]]"]),
], ids=["steps_str", "steps_float", "steps_bool", "grad_clip_negative", "val_fraction_1", "phases_empty"])
def test_wrong_value_is_refused(tmp_path, capsys, d, needles):
    _refused(tmp_path, capsys, d, *needles)


def test_val_fraction_on_the_built_in_data_is_warned_about(tmp_path, capsys):
    d = patched(micro_dict(), data={"val_fraction": 0.2})
    with pytest.warns(UserWarning, match=r"val_fraction .*built-in"):
        assert train_cli(write_config(tmp_path / "c.toml", d), tmp_path / "run", "--until", "1") == 0


def test_config_without_phases_runs_the_default_recipe_and_says_so(tmp_path, capsys):
    d = micro_dict()
    del d["phases"]
    f = write_config(tmp_path / "c.toml", d)
    with pytest.warns(UserWarning, match=r"no \[\[phases\]\].*default recipe"):
        assert main(["config", "--config", f]) == 0
    assert 'name = "pretrain"' in capsys.readouterr().out
    with warnings.catch_warnings():  # a config with phases: no warning
        warnings.simplefilter("error")
        assert main(["config", "--config", write_config(tmp_path / "p.toml", micro_dict())]) == 0
