"""The built-in loop end to end: schedule, data mixture, resume, branch, bad input."""

import json
import math
import os

import numpy as np
import pytest
import torch

from diagnostics.runs import RunDirError, load_run
from hooks.monitor import Hook
from midtrain.config import ConfigError, default_config
from midtrain.loop import train
from tests.midtrain.conftest import micro_config


class DomainRecorder(Hook):
    name = "domains"

    def __init__(self):
        self.seen = {}
        self.step = 0

    def on_step_begin(self, step):
        self.step = step

    def on_backward_end(self, batch_size, losses=None, ids=None, domains=None):
        assert losses.shape == (batch_size,) and ids.shape == (batch_size,)
        self.seen.setdefault(self.step, []).extend(domains.tolist())


def test_run_writes_store_and_follows_the_schedule(tmp_path, micro_cfg):
    rec = DomainRecorder()
    res = train(micro_cfg, str(tmp_path / "r"), hooks=[rec], progress=False)
    run = load_run(tmp_path / "r")
    m = run.metrics
    steps = micro_cfg.total_steps()
    assert res.steps_done == steps
    assert os.path.exists(tmp_path / "r" / "run.json")
    # one train row per step, plus the final validation row at step == total
    train_rows = m.dropna(subset=["train/loss"])
    assert list(train_rows["step"]) == list(range(steps))
    # train/lr equals the configured schedule at every step
    for s, lr in zip(train_rows["step"], train_rows["train/lr"]):
        assert lr == pytest.approx(micro_cfg.lr_at(int(s)), rel=1e-12)
    # phase name, tokens, batch sizes are in every record
    phases = [r["train/phase"] for r in run.records if "train/phase" in r]
    assert phases == [micro_cfg.phase_at(s)[1].name for s in range(steps)]
    tok = np.cumsum([micro_cfg.phase_at(s)[1].batch_size * micro_cfg.phase_at(s)[1].seq_len for s in range(steps)])
    assert list(train_rows["train/tokens"]) == list(tok)
    assert set(train_rows["train/batch_tokens"]) == {256.0}
    # validation at step 0 and at the end, for every domain
    for d in ("prose", "code", "math"):
        v = m[f"val/{d}/loss"].dropna()
        assert 0 in set(m.loc[v.index, "step"]) and steps in set(m.loc[v.index, "step"])
        assert math.isfinite(res.val_end[f"val/{d}/loss"])
    # checkpoints at the interval and at phase ends
    assert [s for s, _ in run.checkpoints()] == [5, 8, 10, 14, 15, 18]
    assert run.info["status"] == "finished"
    # the hook saw per-example losses, ids and domains every micro-batch
    assert len(rec.seen) == steps and all(len(v) == 8 or len(v) == 4 for v in rec.seen.values())


def test_sampled_domains_match_each_phase_mixture(tmp_path):
    cfg = micro_config(steps=(30, 30, 1))
    for p in cfg.phases:
        p.batch_size, p.grad_accum = 16, 1
    cfg.model.n_layer = 1
    rec = DomainRecorder()
    train(cfg, str(tmp_path / "r"), hooks=[rec], progress=False)
    names = ["code", "math", "prose"]  # corpus order is sorted by name
    from midtrain.data import default_corpus

    names = list(default_corpus().names())
    for pi, (start, p) in enumerate(zip(cfg.phase_starts(), cfg.phases[:2])):
        doms = np.concatenate([rec.seen[s] for s in range(start, start + p.num_steps())])
        n = len(doms)
        total_w = sum(p.mixture.values())
        for d, w in p.mixture.items():
            frac = np.mean(doms == names.index(d))
            q = w / total_w
            assert abs(frac - q) < 4 * math.sqrt(q * (1 - q) / n) + 1e-9, (p.name, d, frac, q)


def test_resume_equals_uninterrupted(tmp_path):
    cfg = micro_config(steps=(6, 4, 2), checkpoint_every=100)
    full = train(cfg, str(tmp_path / "full"), progress=False)
    half = train(cfg, str(tmp_path / "split"), until_step=6, progress=False)
    assert half.steps_done == 6
    assert load_run(tmp_path / "split").info["status"] == "stopped"
    # a stopped run is evaluated at its last state: what the full run's evaluation at step 6 saw
    full_val6 = load_run(tmp_path / "full").metrics.set_index("step").loc[6]
    assert set(half.val_end) == {c for c in full_val6.index if c.startswith("val/")}
    for k, v in half.val_end.items():
        assert abs(v - full_val6[k]) < 1e-6, k
    assert load_run(tmp_path / "split").metrics.set_index("step").loc[6, list(half.val_end)].notna().all()
    rest = train(cfg, str(tmp_path / "split"), resume=True, progress=False)
    assert rest.start_step == 6
    assert abs(rest.final_loss - full.final_loss) < 1e-6
    for (n, a), b in zip(full.model.state_dict().items(), rest.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), n
    # the resumed run's store has each step exactly once
    a, b = load_run(tmp_path / "full").metrics, load_run(tmp_path / "split").metrics
    assert list(a["step"]) == list(b["step"])
    np.testing.assert_allclose(a["train/loss"], b["train/loss"], atol=1e-6, equal_nan=True)


def test_branch_runs_only_its_own_steps(tmp_path):
    cfg = micro_config()
    train(cfg, str(tmp_path / "parent"), progress=False)
    branch_cfg = micro_config()
    branch_cfg.phases[1].decay, branch_cfg.phases[1].final_lr = "linear", 1e-5  # a different cooldown
    res = train(branch_cfg, str(tmp_path / "branch"), parent=str(tmp_path / "parent"), parent_step=8, progress=False)
    assert res.start_step == 8
    run = load_run(tmp_path / "branch")
    assert run.parent["step"] == 8 and run.parent["run"].endswith("parent")
    steps = run.metrics.dropna(subset=["train/loss"])["step"]
    assert int(steps.min()) == 8 and len(steps) == cfg.total_steps() - 8
    with pytest.raises(ConfigError, match="no checkpoint at step 7"):
        train(branch_cfg, str(tmp_path / "b2"), parent=str(tmp_path / "parent"), parent_step=7, progress=False)


def test_existing_run_is_never_overwritten(tmp_path, micro_cfg):
    out = tmp_path / "r"
    train(micro_cfg, str(out), until_step=5, progress=False)
    before = {p: (out / p).read_bytes() for p in ("run.json", "metrics.jsonl")}
    with pytest.raises(RunDirError, match="already holds a run"):
        train(micro_cfg, str(out), progress=False)
    changed = micro_config(seed=1)
    with pytest.raises(ConfigError, match=r"differs.*seed"):
        train(changed, str(out), resume=True, progress=False)
    assert before == {p: (out / p).read_bytes() for p in ("run.json", "metrics.jsonl")}
    with pytest.raises(RunDirError, match="holds no run"):
        train(micro_cfg, str(tmp_path / "nothing"), resume=True, progress=False)


def test_bad_model_inputs_are_config_errors(tmp_path):
    cfg = micro_config()
    cfg.phases[2].seq_len = 4096
    with pytest.raises(ConfigError, match="beyond what the model supports"):
        train(cfg, str(tmp_path / "a"), progress=False)
    cfg = micro_config()
    cfg.model.preset = "huge"
    with pytest.raises(ConfigError, match="valid presets"):
        train(cfg, str(tmp_path / "b"), progress=False)
    assert not os.listdir(tmp_path)


def test_failing_hook_does_not_stop_training(tmp_path, micro_cfg):
    class Bad(Hook):
        name = "bad"

        def on_grads_ready(self):
            raise ValueError("diagnostic bug")

    with pytest.warns(RuntimeWarning, match="bad"):
        res = train(micro_cfg, str(tmp_path / "r"), hooks=[Bad()], progress=False)
    assert res.steps_done == micro_cfg.total_steps()


def test_skipped_steps_count_the_whole_run_across_resume(tmp_path, monkeypatch):
    """A step with a non-finite gradient norm is skipped (weights untouched) and counted in
    train/skipped_steps; the count is saved in the checkpoint, so a resumed run keeps counting."""
    real_clip = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def clip_with_overflow(params, max_norm, *a, **kw):
        calls["n"] += 1
        norm = real_clip(params, max_norm, *a, **kw)
        return torch.full_like(norm, float("inf")) if calls["n"] in (2, 8) else norm  # steps 1 and 7

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_with_overflow)
    cfg = micro_config(steps=(6, 4, 2), checkpoint_every=100)
    train(cfg, str(tmp_path / "r"), until_step=5, progress=False)
    train(cfg, str(tmp_path / "r"), resume=True, progress=False)
    m = load_run(tmp_path / "r").metrics.set_index("step")["train/skipped_steps"].dropna()
    expected = {s: (s >= 1) + (s >= 7) for s in range(12)}
    assert {int(k): int(v) for k, v in m.items()} == expected
