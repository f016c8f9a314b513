"""What the bad-input tests share: a micro run config as a plain dict (what a TOML file holds), its
TOML text, and the check that the CLI refused an input the way docs promise (exit 2, one paragraph
on stderr, no traceback, no run left behind)."""

from __future__ import annotations

import copy
import os
from typing import Any

from midtrain.cli import main
from midtrain.config import _toml_key, _toml_value

_TABLES = ("model", "data", "optim", "wandb")


def micro_dict(**phase: Any) -> dict[str, Any]:
    """A one-phase run of a one-layer model on the built-in data, hooks off: about a second to train.
    ``phase`` overrides keys of the phase (a value of ``...`` deletes the key)."""
    d: dict[str, Any] = {
        "seed": 0, "eval_every": 5, "checkpoint_every": 5,
        "model": {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 64},
        "data": {"eval_batches": 1, "eval_batch_size": 2},
        "monitor": {"gns": {"enabled": False}, "representation": {"enabled": False},
                    "difficulty": {"enabled": False}},
        "phases": [{"name": "p", "steps": 2, "mixture": {"prose": 1.0}, "batch_size": 2, "seq_len": 16}],
    }
    for k, v in phase.items():
        if v is ...:
            d["phases"][0].pop(k, None)
        else:
            d["phases"][0][k] = v
    return d


def patched(d: dict[str, Any], **tables: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` with ``tables`` merged in: ``patched(d, data={"eval_batches": 0}, top={"seed": 1})``."""
    d = copy.deepcopy(d)
    for name, kv in tables.items():
        if name == "top":
            d.update(kv)
        elif name.startswith("monitor_"):
            d["monitor"].setdefault(name[len("monitor_"):], {}).update(kv)
        else:
            d.setdefault(name, {}).update(kv)
    return d


def toml_text(d: dict[str, Any]) -> str:
    """TOML for a config dict (top-level keys, tables, ``[monitor.<hook>]`` tables, ``[[phases]]``)."""

    def inline(k: str, v: Any) -> bool:  # written as `key = value` at the top, not as a table
        if k == "phases":
            return not (isinstance(v, list) and v and all(isinstance(p, dict) for p in v))
        return k not in (*_TABLES, "monitor") or not isinstance(v, dict)

    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d.items() if inline(k, v)]
    for t in _TABLES:
        if isinstance(d.get(t), dict):
            lines += ["", f"[{t}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in d[t].items()]
    monitor = d.get("monitor") if isinstance(d.get("monitor"), dict) else {}
    scalars = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in monitor.items() if not isinstance(v, dict)]
    lines += ["", "[monitor]", *scalars] if scalars else []
    for hook, opts in monitor.items():
        if isinstance(opts, dict):
            lines += ["", f"[monitor.{_toml_key(hook)}]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in opts.items()]
    for p in d.get("phases", []) if not inline("phases", d.get("phases")) else ():
        lines += ["", "[[phases]]"] + [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in p.items()]
    return "\n".join(lines) + "\n"


def write_config(path, d: dict[str, Any]) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write(toml_text(d))
    return str(path)


def no_run_left(out) -> bool:
    """Nothing a fresh start would trip over: no directory, or one without run.json / metrics.jsonl."""
    return not os.path.exists(os.path.join(out, "run.json")) and not os.path.exists(os.path.join(out, "metrics.jsonl"))


def assert_refused(rc: int, err: str, *needles: str) -> None:
    """Exit 2 with one paragraph on stderr that names every needle, and no traceback."""
    assert rc == 2, f"exit {rc}, stderr:\n{err}"
    assert err.startswith("midtrain: error:"), err
    assert "Traceback" not in err, err
    assert "\n\n" not in err.strip(), f"more than one paragraph:\n{err}"
    flat = " ".join(err.split())  # the message is wrapped at 100 columns
    for n in needles:
        assert n in flat, f"{n!r} not named in:\n{err}"


def train_cli(cfg_file: str, out, *extra: str) -> int:
    return main(["train", "--config", cfg_file, "--out", str(out), "--quiet", *extra])
