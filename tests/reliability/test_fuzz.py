"""Property-based fuzz of `midtrain train`'s inputs (issue 11, "Done when"): every generated config
and data directory either trains or exits 2 with one paragraph naming the field, file or line, and no
traceback; a refused input leaves no run behind.

Configs are a valid micro run with a few keys set to values a user might type (wrong types, NaN,
negative, zero, unknown keys, deleted keys, a second phase); most are refused by validation, which is
cheap. Those that validate train one step (``--until 1``) on a one-layer model. Data: a ``[data] path``
directory or file with generated content (empty, binary garbage, non-UTF-8, bad JSON lines, token
files of odd sizes, tiny). Sizes (layers, widths, batch, sequence length) stay small: a config that is
valid but asks for more memory than the machine has is not what this looks for. Deterministic
(``derandomize``); ``MIDTRAIN_FUZZ_EXAMPLES=N`` multiplies the examples by N for a longer search.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import tempfile
import warnings

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.reliability._inputs import micro_dict, no_run_left, toml_text, train_cli  # noqa: E402

_SCALE = int(os.environ.get("MIDTRAIN_FUZZ_EXAMPLES", "1"))


def _settings(n: int):
    return settings(max_examples=n * _SCALE, deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _check(rc: int, err: str, out: str, names: set[str]) -> None:
    """Trained (a run that says so), or refused: exit 2, one paragraph naming one of ``names``, no run left."""
    event("trained" if rc == 0 else "refused")  # pytest --hypothesis-show-statistics shows the split
    assert "Traceback" not in err, err
    if rc in (0, 3):  # 3: trained, and stopped as diverged (lr = 1e300 is a legal, if hopeless, value)
        with open(os.path.join(out, "run.json")) as f:
            assert json.load(f)["status"] in (("stopped", "finished") if rc == 0 else ("diverged",))
        return
    assert rc == 2, f"exit {rc}: {err}"
    assert err.startswith("midtrain: error:") and "\n\n" not in err.strip(), err
    flat = " ".join(err.split())  # the message is wrapped at 100 columns
    assert any(n in flat for n in names), f"none of {sorted(names)} named in: {err}"
    assert no_run_left(out), f"a refused input left a run in {out}"


def _run(d: dict, tmp: str) -> tuple[int, str, str]:
    """Write ``d`` as TOML into folder ``tmp`` and train it one step; (exit status, stderr, --out)."""
    cfg, out = os.path.join(tmp, "c.toml"), os.path.join(tmp, "run")
    with open(cfg, "w", encoding="utf-8") as f:
        f.write(toml_text(d))
    err = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        rc = train_cli(cfg, out, "--until", "1")
    return rc, err.getvalue(), out


# -- configs -----------------------------------------------------------------------------------------

_SMALL = st.integers(-2, 8)  # shapes and batch sizes: wrong or small, never a memory blow-up
_WORDS = ["", "abc", "240", "tpu", "cpu", "auto", "cuda", "prose", "math", "cosine", "1-sqrt", "exponential",
          "linear", "constant", "float32", "bfloat16", "tiny", "gpt2", "nowhere", "microbatch"]
_ANY = st.one_of(
    _SMALL,
    st.sampled_from([2**31, 2**62, -2**63]),
    st.sampled_from([0.0, 0.5, 1.0, 1.5, -1.0, 1e-3, 1e3, 1e300, float("nan"), float("inf"), float("-inf")]),
    st.booleans(),
    st.sampled_from(_WORDS),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(["prose", "code", "math", "x"]),
                    st.one_of(st.integers(-1, 2), st.sampled_from([0.5, float("nan"), float("inf")]), st.booleans(),
                              st.just("a")), max_size=3),
)
_SHAPES = {"n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "seq_len", "eval_batches",
           "eval_batch_size"}
_KEYS = {
    "top": ["seed", "device", "dtype", "compile", "eval_every", "checkpoint_every", "log_every", "phases", "model",
            "monitor", "zzz_unknown"],
    "model": ["preset", "n_layer", "n_head", "n_embd", "block_size", "rope_base", "tie_weights", "dropout", "zzz_unknown"],
    "data": ["val_fraction", "eval_batches", "eval_batch_size", "path", "zzz_unknown"],
    "optim": ["weight_decay", "beta1", "beta2", "eps", "grad_clip", "zzz_unknown"],
    "monitor.gns": ["enabled", "every", "mode", "ema", "zzz_unknown"],
    "monitor.representation": ["enabled", "every", "max_tokens", "probe_sequences", "zzz_unknown"],
    "monitor.difficulty": ["enabled", "probe_every", "probe_size", "zzz_unknown"],
    "phase": ["name", "steps", "tokens", "mixture", "lr", "warmup_steps", "decay", "decay_fraction", "final_lr",
              "batch_size", "grad_accum", "seq_len", "rope_base", "zzz_unknown"],
}
_WHERE = sorted(_KEYS)


@st.composite
def _edit(draw):
    """One edit of the micro config: (where, key, value); value None deletes the key (phases only)."""
    where = draw(st.sampled_from(_WHERE))
    key = draw(st.sampled_from(_KEYS[where]))
    if where == "phase" and draw(st.integers(0, 9)) == 0:
        return where, key, None
    value = draw(_SMALL if key in _SHAPES else _ANY)
    return where, key, value


def _apply(d: dict, edits) -> set[str]:
    """Apply ``edits`` to ``d``; the names a message about them may use."""
    names = set()
    for where, key, value in edits:
        names.add(key)
        if where == "top":
            d[key] = value
        elif where == "phase":
            if not isinstance(d.get("phases"), list) or not d["phases"] or not isinstance(d["phases"][-1], dict):
                continue
            if value is None:
                d["phases"][-1].pop(key, None)
            else:
                d["phases"][-1][key] = value
            names.add(str(d["phases"][-1].get("name")))
        elif where.startswith("monitor."):
            if isinstance(d.get("monitor"), dict) and isinstance(d["monitor"].get(where[8:]), dict):
                d["monitor"][where[8:]][key] = value
                names.add(where)
        elif isinstance(d.get(where), dict):
            d[where][key] = value
            names.add(f"[{where}]")
    return names


@_settings(400)
@given(edits=st.lists(_edit(), min_size=1, max_size=3), two_phases=st.booleans())
def test_generated_configs_train_or_are_refused_by_name(edits, two_phases):
    d = micro_dict()
    if two_phases:  # a second phase: edits to "phase" go to it
        d["phases"].append({**copy.deepcopy(d["phases"][0]), "name": "q", "mixture": {"code": 1.0}})
    names = _apply(d, edits)
    with tempfile.TemporaryDirectory(prefix="midtrain-fuzz-") as tmp:
        rc, err, out = _run(d, tmp)
        _check(rc, err, out, names | {"config file"})


# -- data files --------------------------------------------------------------------------------------

_TEXT = st.one_of(
    st.binary(max_size=64),                                                         # garbage, maybe empty
    st.text(max_size=40).map(lambda t: t.encode("utf-8")),
    st.builds(lambda t, n: (t * n).encode("utf-8"), st.text(min_size=1, max_size=12), st.integers(1, 200)),
    st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=16), st.integers(1, 200)),
    st.just(b"\xff\xfe not utf-8 \xc3\x28" * 20),
)
_TOKENS = st.one_of(st.binary(max_size=40),                                         # odd sizes, too short
                    st.integers(0, 800).flatmap(lambda n: st.binary(min_size=2 * n, max_size=2 * n)))
_JSONL_LINE = st.one_of(
    st.builds(lambda t, n: json.dumps({"text": t * n}), st.text(max_size=12), st.integers(1, 100)),
    st.builds(lambda t, dom: json.dumps({"text": t * 30, "domain": dom}), st.text(min_size=1, max_size=8),
              st.sampled_from(["a", "b", "", " a", "x/y"])),
    st.sampled_from(['{"text": 3}', "[1, 2]", "{not json", '"just a string"', "", '{"txt": "x"}']),
    st.text(max_size=20),
)


@st.composite
def _layout(draw):
    """(files: {relative path: bytes}, what the path names: "" the folder or a file name, domains to mix)."""
    kind = draw(st.sampled_from(["txt", "domains", "jsonl", "jsonl_dir", "bin", "bin_val", "bin_file", "empty",
                                 "csv"]))
    if kind == "txt":
        return {f"f{i}.txt": draw(_TEXT) for i in range(draw(st.integers(1, 3)))}, "", ["text"]
    if kind == "domains":
        return {"a/x.md": draw(_TEXT), "b/y.txt": draw(_TEXT)}, "", draw(st.sampled_from([["a"], ["a", "b"], ["c"]]))
    if kind in ("jsonl", "jsonl_dir"):
        lines = draw(st.lists(_JSONL_LINE, min_size=0, max_size=5))
        raw = "\n".join(lines).encode("utf-8") + draw(st.sampled_from([b"", b"\n", b"\n\xff\xfe\n"]))
        return {"d.jsonl": raw}, "d.jsonl" if kind == "jsonl" else "", draw(st.sampled_from([["text"], ["a"]]))
    if kind in ("bin", "bin_val", "bin_file"):
        files = {"train.bin" if kind != "bin_file" else "t.bin": draw(_TOKENS)}
        if kind == "bin_val":
            files["val.bin"] = draw(_TOKENS)
        return files, "t.bin" if kind == "bin_file" else "", ["text"]
    if kind == "csv":
        return {"d.csv": b"a,b\n1,2\n"}, "d.csv", ["text"]
    return {}, "", ["text"]


@_settings(200)
@given(layout=_layout(), val_fraction=st.sampled_from([0.05, 0.0, 0.5]), hooks=st.booleans())
def test_generated_data_trains_or_is_refused_by_name(layout, val_fraction, hooks):
    files, target, domains = layout
    with tempfile.TemporaryDirectory(prefix="midtrain-fuzz-") as root:
        _train_on(root, files, target, domains, val_fraction, hooks)


def _train_on(root: str, files: dict, target: str, domains: list, val_fraction: float, hooks: bool) -> None:
    for rel, content in files.items():
        path = os.path.join(root, "data", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)
    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    data_path = os.path.join(root, "data", target)
    d = micro_dict(seq_len=8, mixture={dom: 1.0 for dom in domains})
    d["data"].update(path=data_path, val_fraction=val_fraction)
    for opts in d["monitor"].values():
        opts["enabled"] = hooks
    rc, err, out = _run(d, root)
    _check(rc, err, out, {os.path.join(root, "data"), "seq_len", "val_fraction", "mixture", "domain"})
