"""DifficultyTracker's reducible loss against a reference checkpoint, end to end: the built-in loop,
the TOML / CLI options, and a missing, corrupt or incompatible reference (a warning, never a dead run).

The slow reference: load each checkpoint by hand (GPTConfig from run.json, the state dict, the RoPE
base) and score the probe sequences one at a time with a float64 log-softmax."""

import warnings

import numpy as np
import pytest
import torch

from diagnostics.runs import load_run
from hooks import DifficultyTracker, Monitor, NullSink
from midtrain.cli import main
from midtrain.config import ConfigError, dumps_toml, load_toml
from midtrain.data import default_corpus, val_batches
from midtrain.hookset import build_hooks, load_reference_model
from midtrain.loop import train
from midtrain.model import GPT, GPTConfig
from tests.midtrain.conftest import micro_config

DOMAINS = ("prose", "code", "math")
PROBE_SIZE = 16  # the builder's default


def _cfg(**kw):
    cfg = micro_config(**kw)
    for name in ("gns", "representation"):  # only the tracker: keep the tests about it (and fast)
        setattr(cfg.monitor, name, {"enabled": False})
    return cfg


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ref_run(tmp_path_factory, one_thread):
    """A finished reference run with another seed and a wider model (n_embd 48, not 32): the reference
    may be any architecture with the same vocabulary. Its last checkpoint ran phase 3 (RoPE base 40000)."""
    cfg = _cfg(seed=1)
    cfg.model.n_embd = 48
    out = tmp_path_factory.mktemp("ref") / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, str(out), progress=False, strict_hooks=True)
    return out


def _load_by_hand(run_dir, step: int) -> GPT:
    ck = torch.load(run_dir / "checkpoints" / f"step_{step:07d}.pt", map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**load_run(run_dir).info["model"]))
    model.load_state_dict(ck["model"])
    model.set_rope_base(ck["rope_base"])
    return model.eval()


@torch.no_grad()
def _slow_probe_losses(model: GPT, tokens_x: torch.Tensor, tokens_y: torch.Tensor) -> np.ndarray:
    """Mean per-token loss of each probe sequence, one sequence per forward, float64 log-softmax."""
    out = []
    for x, y in zip(tokens_x, tokens_y):
        logits = model(x[None])[0][0].double()  # (T, V)
        out.append(-torch.log_softmax(logits, -1).gather(-1, y[:, None]).mean().item())
    return np.array(out)


def test_reducible_loss_equals_current_minus_reference_probe_loss(tmp_path, ref_run, one_thread):
    corpus = default_corpus()
    cfg = _cfg()
    cfg.monitor.difficulty = {"reference_checkpoint": str(ref_run), "probe_every": 1}  # a run dir: its latest
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the reference must load and run without a warning
        train(cfg, str(tmp_path / "run"), progress=False, strict_hooks=True)
    run = load_run(tmp_path / "run")
    m = run.metrics.set_index("step")
    steps = sorted(s for s, _ in run.checkpoints())
    assert steps == [5, 8, 10, 14, 15, 18]
    ref_step = max(s for s, _ in load_run(ref_run).checkpoints())
    reference = _load_by_hand(ref_run, ref_step)
    assert reference.config.n_embd == 48 and reference.config.rope_base == 40000.0

    probes = {d: val_batches(corpus, d, 32, PROBE_SIZE, 1)[0] for d in DOMAINS}
    ref_loss = {d: _slow_probe_losses(reference, b.x, b.y) for d, b in probes.items()}
    for step in range(cfg.total_steps()):  # a probe every step, with a reference every time
        for d in DOMAINS:
            assert np.isfinite(m.loc[step, f"difficulty/{d}/reducible_loss"]), (step, d)
    # the probe at step s scores the weights before update s -- the model the loop's validation at step s
    # sees -- i.e. checkpoint s (with step s's RoPE base: a checkpoint at a phase end holds the old one)
    for done in [s for s in steps if s < cfg.total_steps()]:
        current = _load_by_hand(tmp_path / "run", done)
        base = cfg.phase_at(done)[1].rope_base
        if base is not None:
            current.set_rope_base(base)
        for d, b in probes.items():
            cur = _slow_probe_losses(current, b.x, b.y)
            rec = m.loc[done]
            assert rec[f"difficulty/{d}/probe_loss"] == pytest.approx(cur.mean(), rel=1e-5, abs=1e-5)
            assert rec[f"difficulty/{d}/reducible_loss"] == pytest.approx(cur.mean() - ref_loss[d].mean(),
                                                                         rel=1e-5, abs=1e-5), (done, d)
    # the saved table holds the last probe's per-sequence losses, reference included (domain order):
    # the probe of the final record (step total_steps, the end of the run: Monitor.on_run_end)
    a = run.load_array("difficulty_examples")
    np.testing.assert_allclose(a["probe_reference_loss"], np.concatenate([ref_loss[d] for d in DOMAINS]),
                               rtol=1e-5, atol=1e-5)
    assert a["probe_loss"].mean() - a["probe_reference_loss"].mean() == pytest.approx(
        np.mean([m.loc[cfg.total_steps(), f"difficulty/{d}/reducible_loss"] for d in DOMAINS]), abs=1e-5)


def test_reference_from_toml_and_from_the_cli(tmp_path, ref_run, one_thread, capsys):
    ckpt = str(load_run(ref_run).checkpoints()[-1][1])
    cfg = _cfg(steps=(3, 2, 1))
    cfg.monitor.difficulty = {"reference_checkpoint": ckpt, "probe_every": 2}
    toml = tmp_path / "c.toml"
    toml.write_text(dumps_toml(cfg))
    assert 'reference_checkpoint = "' in toml.read_text() and load_toml(toml).to_dict() == cfg.to_dict()
    # the builder hands the tracker a lazy loader; it loads on the first probe, on the model's device
    tracker = next(h for h in build_hooks(load_toml(toml), GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16)),
                                          default_corpus()) if isinstance(h, DifficultyTracker))
    assert callable(tracker.reference) and not isinstance(tracker.reference, torch.nn.Module)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["train", "--config", str(toml), "--out", str(tmp_path / "a"), "--quiet"]) == 0
        plain = tmp_path / "plain.toml"
        plain.write_text(dumps_toml(_cfg(steps=(3, 2, 1))))
        assert main(["train", "--config", str(plain), "--reference", str(ref_run), "--out", str(tmp_path / "b"),
                     "--quiet"]) == 0
    a, b = load_run(tmp_path / "a"), load_run(tmp_path / "b")
    assert a.config["monitor"]["difficulty"]["reference_checkpoint"] == ckpt
    assert b.config["monitor"]["difficulty"]["reference_checkpoint"] == str(ref_run)
    for run in (a, b):
        assert all(np.isfinite(run.metrics[f"difficulty/{d}/reducible_loss"].dropna()).all() for d in DOMAINS)
        assert run.metrics["difficulty/code/reducible_loss"].notna().sum() >= 2  # steps 0 and 5 (eval_every) at least
    # the two name the same checkpoint (a file; a run directory's latest): the same first reducible loss
    assert a.metrics["difficulty/code/reducible_loss"].iloc[0] == pytest.approx(
        b.metrics["difficulty/code/reducible_loss"].iloc[0], rel=1e-6)


@pytest.mark.parametrize("kind", ["missing", "corrupt", "empty_run", "wrong_vocab"])
def test_a_bad_reference_is_a_clear_warning_and_training_goes_on(tmp_path, ref_run, one_thread, kind):
    """strict_hooks=True: the tracker itself must not raise (the Monitor would disable it, or in strict
    mode kill the run); only the reducible loss is lost, every other signal is reported."""
    cfg = _cfg(steps=(3, 2, 1))
    if kind == "missing":
        path, needle = str(tmp_path / "nope.pt"), "neither a checkpoint file nor a run directory"
    elif kind == "corrupt":
        path, needle = str(tmp_path / "bad.pt"), "cannot be read.*corrupted"
        (tmp_path / "bad.pt").write_bytes(b"not a checkpoint" * 10)
    elif kind == "empty_run":
        path, needle = str(tmp_path / "empty"), "without checkpoints"
        c0 = _cfg(steps=(3, 2, 1))
        c0.checkpoint_every = 100
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(c0, path, progress=False, until_step=1, hooks=[])
        for f in (tmp_path / "empty" / "checkpoints").iterdir():
            f.unlink()
    else:  # a real checkpoint of another vocabulary: size mismatch of the embedding
        path, needle = str(ref_run), r"does not hold a midtrain model for this corpus \(vocabulary 300\)"
        with pytest.raises(ConfigError, match=needle):
            load_reference_model(path, 300)
        tr = DifficultyTracker(probe={"x": torch.randint(0, 256, (4, 9))}, reference=lambda: load_reference_model(path, 300))
        mon = Monitor(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16)), [tr], sinks=[NullSink()], strict=True)
        with pytest.warns(RuntimeWarning, match=needle):
            rec = mon.on_step_end(0)
        assert "difficulty/x/probe_loss" in rec and "difficulty/x/reducible_loss" not in rec
        assert tr.reference_error and "vocabulary 300" in tr.reference_error
        return
    cfg.monitor.difficulty = {"reference_checkpoint": path}
    with pytest.warns(RuntimeWarning, match=needle):
        res = train(cfg, str(tmp_path / "run"), progress=False, strict_hooks=True)
    assert res.steps_done == cfg.total_steps()
    m = load_run(tmp_path / "run").metrics
    assert not any(c.endswith("/reducible_loss") for c in m.columns)
    assert m["difficulty/code/probe_loss"].notna().sum() >= 2  # the probe set is still scored
    assert np.isfinite(m["difficulty/prose/loss"].iloc[-2]) and m["difficulty/examples_tracked"].max() > 0
    assert load_run(tmp_path / "run").info["status"] == "finished"


def test_a_reference_that_fails_to_run_is_dropped_once(one_thread):
    """A reference whose forward fails (too short a context for the probe) costs only the reducible loss."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=1, n_head=2, n_embd=16))
    short = GPT(GPTConfig(vocab_size=32, block_size=4, n_layer=1, n_head=2, n_embd=16))
    tr = DifficultyTracker(probe={"a": torch.randint(0, 32, (3, 9))}, probe_every=1, reference=short)
    mon = Monitor(model, [tr], sinks=[NullSink()], strict=True)
    with pytest.warns(RuntimeWarning, match="reference model for the reducible loss cannot be used"):
        rec = mon.on_step_end(0)
    assert "difficulty/a/probe_loss" in rec and "difficulty/a/reducible_loss" not in rec
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once; not retried every probe
        rec = mon.on_step_end(1)
    assert "difficulty/a/probe_loss" in rec and not mon.disabled
    with pytest.raises(ValueError, match="module or a callable"):
        DifficultyTracker(reference="runs/x")
