"""RoPE scaling methods (midtrain/rope.py, midtrain/model.py; docs/training.md "RoPE scaling").

Each method is checked against its paper's formula written out here slowly, one position and one
frequency pair at a time in float64 Python, to 1e-6; factor 1 is plain RoPE bit for bit; a phase's
rope_scaling is validated, applied at the phase switch and kept by checkpoints (resume, branch).
"""

import math
import os

import pytest
import torch

from midtrain.checkpoint import checkpoint_path, load_checkpoint
from midtrain.cli import main
from midtrain.config import ConfigError, dumps_toml, load_toml
from midtrain.loop import train
from midtrain.model import GPT, GPTConfig, apply_rope, rope_cos_sin

from .conftest import micro_config

TOL = 1e-6


# -- the papers' formulas, slowly --------------------------------------------------------------------

def plain_theta(d, base):
    """Su et al. 2021, sec. 3.2.2: theta_i = base^(-2(i-1)/d), i = 1..d/2 (here 0-based)."""
    return [base ** (-2.0 * i / d) for i in range(d // 2)]


def reference_angles(method, T, d, base, s=1.0, L=None, alpha=1.0, beta=32.0):
    """angle[m][i] and the factor both q and k are multiplied by, from each paper's definition."""
    theta = plain_theta(d, base)
    gain, gammas = 1.0, []
    if method == "plain":
        freqs, pos = theta, [float(m) for m in range(T)]
    elif method == "pi":    # Chen et al. 2023: f'(x, m) = f(x, m L / L'), s = L' / L
        freqs, pos = theta, [m / s for m in range(T)]
    elif method == "ntk":   # Peng et al. 2023, sec. 3.1: b' = b s^(|D| / (|D| - 2))
        freqs, pos = plain_theta(d, base * s ** (d / (d - 2))), [float(m) for m in range(T)]
    elif method == "yarn":  # Peng et al. 2023, sec. 3.2 (NTK-by-parts) and 3.4 (temperature)
        freqs = []
        for th in theta:
            wavelength = 2 * math.pi / th
            r = L / wavelength
            if r < alpha:
                gamma = 0.0
            elif r > beta:
                gamma = 1.0
            else:
                gamma = (r - alpha) / (beta - alpha)
            gammas.append(gamma)
            freqs.append((1 - gamma) * th / s + gamma * th)
        pos = [float(m) for m in range(T)]
        gain = 0.1 * math.log(s) + 1.0   # sqrt(1 / t)
    else:
        raise AssertionError(method)
    return [[pos[m] * freqs[i] for i in range(d // 2)] for m in range(T)], gain, gammas


def reference_rotate(x, angles, gain):
    """Rotate-half pairs (x_i, x_{i + d/2}) by each angle, one position and one pair at a time."""
    T, d = len(x), len(x[0])
    h = d // 2
    out = [[0.0] * d for _ in range(T)]
    for m in range(T):
        for i in range(h):
            c, sn = math.cos(angles[m][i]) * gain, math.sin(angles[m][i]) * gain
            out[m][i] = x[m][i] * c - x[m][i + h] * sn
            out[m][i + h] = x[m][i] * sn + x[m][i + h] * c
    return out


CASES = [  # (method, scaling table, reference kwargs)
    ("pi", {"type": "pi", "factor": 4.0}, dict(s=4.0)),
    ("pi", {"type": "linear", "factor": 2.5}, dict(s=2.5)),
    ("ntk", {"type": "ntk", "factor": 4.0}, dict(s=4.0)),
    ("ntk", {"type": "ntk", "factor": 3.0}, dict(s=3.0)),
    ("yarn", {"type": "yarn", "factor": 4.0, "original_max_position": 512}, dict(s=4.0, L=512)),
    ("yarn", {"type": "yarn", "factor": 2.0, "original_max_position": 128, "alpha": 2.0, "beta": 16.0},
     dict(s=2.0, L=128, alpha=2.0, beta=16.0)),
]


@pytest.mark.parametrize("d,base", [(32, 10000.0), (16, 300.0)])
@pytest.mark.parametrize("method,table,kw", CASES)
def test_each_method_matches_its_formula(method, table, kw, d, base):
    T = 300
    angles, gain, gammas = reference_angles(method, T, d, base, **kw)
    cos, sin = rope_cos_sin(T, d, base, scaling=table)
    ref_cos = torch.tensor([[math.cos(a) * gain for a in row] for row in angles], dtype=torch.float64)
    ref_sin = torch.tensor([[math.sin(a) * gain for a in row] for row in angles], dtype=torch.float64)
    assert cos.dtype == torch.float32 and cos.shape == (T, d // 2)
    torch.testing.assert_close(cos.double(), ref_cos, atol=TOL, rtol=0)
    torch.testing.assert_close(sin.double(), ref_sin, atol=TOL, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(T, d, generator=gen, dtype=torch.float64) * 2 - 1
    ref = torch.tensor(reference_rotate(x.tolist(), angles, gain), dtype=torch.float64)
    got = apply_rope(x.float(), cos, sin).double()
    torch.testing.assert_close(got, ref, atol=TOL, rtol=0)
    # the method changes the rotation: far from plain RoPE
    plain = torch.tensor(reference_rotate(x.tolist(), reference_angles("plain", T, d, base)[0], 1.0))
    assert (got - plain).abs().max() > 0.1
    if method == "yarn" and d == 32 and base == 10000.0:   # all three parts of the ramp are exercised
        assert min(gammas) == 0.0 and max(gammas) == 1.0 and any(0 < g < 1 for g in gammas)


def test_yarn_scales_the_attention_logits_by_one_over_t():
    """With the same frequencies, YaRN's logits q.k are those without temperature times 1/t."""
    d, T, s = 32, 64, 8.0
    table = {"type": "yarn", "factor": s, "original_max_position": 64}
    q, k = torch.randn(T, d, dtype=torch.float64).float(), torch.randn(T, d).float()
    cos, sin = rope_cos_sin(T, d, 1e4, scaling=table)
    gain = 0.1 * math.log(s) + 1.0
    bare_cos, bare_sin = cos.double() / gain, sin.double() / gain
    logits = apply_rope(q, cos, sin).double() @ apply_rope(k, cos, sin).double().T
    bare = apply_rope(q.double(), bare_cos, bare_sin) @ apply_rope(k.double(), bare_cos, bare_sin).T
    one_over_t = gain ** 2
    torch.testing.assert_close(logits, bare * one_over_t, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("table", [
    {"type": "pi", "factor": 1.0}, {"type": "linear", "factor": 1}, {"type": "ntk", "factor": 1.0},
    {"type": "yarn", "factor": 1.0, "original_max_position": 16}, {"type": "none"}, None])
def test_factor_one_is_plain_rope_exactly(table):
    for d, base in ((32, 10000.0), (16, 300.0)):
        plain = rope_cos_sin(200, d, base)
        scaled = rope_cos_sin(200, d, base, scaling=table)
        assert torch.equal(plain[0], scaled[0]) and torch.equal(plain[1], scaled[1])
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32)
    model = GPT(cfg)
    idx = torch.randint(0, 64, (2, 48))
    before = model(idx)[0]
    model.set_rope_scaling(table)
    assert torch.equal(model(idx)[0], before)


def test_model_applies_the_scaling_and_checks_it():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=32))
    idx = torch.randint(0, 64, (2, 40))
    before = model(idx)[0]
    table = {"type": "yarn", "factor": 2.0, "original_max_position": 32}
    model.set_rope_scaling(table)
    assert model.config.rope_scaling == {**table, "alpha": 1.0, "beta": 32.0}
    cos, sin = model.rotary(40, "cpu")
    want = rope_cos_sin(40, 16, 10000.0, scaling=table)
    assert torch.equal(cos, want[0]) and torch.equal(sin, want[1])
    assert not torch.allclose(model(idx)[0], before)
    # a bad table changes nothing
    for bad in ({"type": "ntk"}, {"type": "pi", "factor": 0.5}, {"type": "rope2"}):
        with pytest.raises(ValueError):
            model.set_rope_scaling(bad)
        assert model.config.rope_scaling["type"] == "yarn" and model.rotary.scaling["type"] == "yarn"
    with pytest.raises(ValueError, match="rope base"):
        model.set_rope(base=0.5, scaling={"type": "pi", "factor": 2.0})
    assert model.rotary.scaling["type"] == "yarn" and model.config.rope_base == 10000.0
    model.set_rope(None, None)   # a phase that sets neither keeps both
    assert model.rotary.scaling["type"] == "yarn"
    model.set_rope(500.0, {"type": "none"})
    assert model.config.rope_scaling is None and model.rotary.base == 500.0
    with pytest.raises(ValueError, match="head_dim > 2"):
        GPTConfig(n_head=2, n_embd=4, rope_scaling={"type": "ntk", "factor": 2.0})


# -- config -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("table,words", [
    ({"type": "rope2", "factor": 2.0}, ["type", "rope2", "pi, ntk, yarn"]),
    ({"factor": 2.0}, ["type", "None"]),
    ({"type": "pi", "factor": 0.5}, ["factor", ">= 1", "0.5"]),
    ({"type": "pi"}, ["needs factor"]),
    ({"type": "pi", "factor": 2.0, "original_max_position": 64}, ["unknown key", "original_max_position"]),
    ({"type": "ntk", "factor": 2.0, "scale": 3}, ["unknown key", "scale"]),
    ({"type": "yarn", "factor": 2.0}, ["needs original_max_position"]),
    ({"type": "yarn", "factor": 2.0, "original_max_position": 0}, ["original_max_position", "positive"]),
    ({"type": "yarn", "factor": 2.0, "original_max_position": 32.5}, ["original_max_position"]),
    ({"type": "yarn", "factor": 2.0, "original_max_position": 32, "alpha": 40.0}, ["alpha < beta"]),
    ({"type": "pi", "factor": True}, ["factor", "finite number"]),
    ({"type": "pi", "factor": float("inf")}, ["factor", "finite number"]),
    ({"type": "none", "factor": 2.0}, ["unknown key", "factor"]),
    ("yarn", ["rope_scaling", "table"]),
])
def test_config_errors_name_the_key(table, words):
    cfg = micro_config()
    cfg.phases[2].rope_scaling = table
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    msg = str(e.value)
    assert "long_context" in msg and "rope_scaling" in msg
    for w in words:
        assert w in msg, (w, msg)


def test_config_toml_round_trip_and_cli_refusal(tmp_path):
    cfg = micro_config()
    cfg.phases[2].rope_scaling = {"type": "yarn", "factor": 2.0, "original_max_position": 32}
    cfg.validate()
    assert "rope_scaling" not in cfg.to_dict()["phases"][0]     # unset: run.json as before
    text = dumps_toml(cfg)
    assert 'rope_scaling = { type = "yarn", factor = 2.0, original_max_position = 32 }' in text
    (tmp_path / "c.toml").write_text(text)
    assert load_toml(tmp_path / "c.toml").phases[2].rope_scaling == cfg.phases[2].rope_scaling
    (tmp_path / "bad.toml").write_text(text.replace('type = "yarn"', 'type = "longrope"'))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "bad.toml"), "--out", str(out), "--quiet"]) == 2
    assert not out.exists()


# -- the loop and checkpoints ------------------------------------------------------------------------

def _quiet(cfg):
    for opts in vars(cfg.monitor).values():   # no hooks: this is about the model's rotary state
        opts["enabled"] = False
    return cfg


def _rotary_state(model):
    r = model.rotary
    return r.base, r.scaling, r(64, "cpu")


def test_phase_scaling_applied_and_kept_by_resume_and_branch(tmp_path):
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position": 32}
    cfg = _quiet(micro_config(steps=(4, 4, 4), checkpoint_every=100))
    cfg.phases[1].rope_scaling = yarn          # midtrain: yarn; long_context (base 40000) keeps it
    whole = train(cfg, str(tmp_path / "whole"))
    base, scaling, (cos, sin) = _rotary_state(whole.model)
    assert base == 40000.0 and scaling == {**yarn, "alpha": 1.0, "beta": 32.0}
    assert torch.equal(cos, rope_cos_sin(64, 16, 40000.0, scaling=yarn)[0])
    # stopped inside long_context (which sets no scaling), then resumed: the checkpoint keeps yarn
    part = str(tmp_path / "part")
    train(cfg, part, until_step=10)
    assert load_checkpoint(checkpoint_path(part, 10))["rope_scaling"] == scaling
    resumed = train(cfg, part, resume=True)
    assert resumed.start_step == 10
    b2, s2, (cos2, sin2) = _rotary_state(resumed.model)
    assert (b2, s2) == (base, scaling) and torch.equal(cos2, cos) and torch.equal(sin2, sin)
    sd, sd2 = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)   # and the run continued bit for bit
    # a branch from step 8 (the end of midtrain, under yarn) into long_context keeps it too
    branch = train(cfg, str(tmp_path / "branch"), parent=str(tmp_path / "whole"), parent_step=8, until_step=9)
    assert _rotary_state(branch.model)[1] == scaling
    # a phase that turns it off
    cfg.phases[2].rope_scaling = {"type": "none"}
    off = train(cfg, str(tmp_path / "off"), parent=str(tmp_path / "whole"), parent_step=8, until_step=9)
    assert off.model.config.rope_scaling is None and off.model.rotary.scaling is None


# -- midtrain sweep --rope ----------------------------------------------------------------------------

def test_parse_rope_grammar():
    from midtrain.sweep import parse_rope

    got = {c.name: (c.base, c.scaling) for c in parse_rope(
        ["b300=base:300", "plain=none", "pi2=pi:2", "lin=linear:3", "ntk4=ntk:4", "y2=yarn:2", "y2L=yarn:2:128",
         "mix=base:1e3+ntk:2"])}
    assert got == {"b300": (300.0, {"type": "none"}), "plain": (None, {"type": "none"}),
                   "pi2": (None, {"type": "pi", "factor": 2.0}), "lin": (None, {"type": "linear", "factor": 3.0}),
                   "ntk4": (None, {"type": "ntk", "factor": 4.0}), "y2": (None, {"type": "yarn", "factor": 2.0}),
                   "y2L": (None, {"type": "yarn", "factor": 2.0, "original_max_position": 128}),
                   "mix": (1000.0, {"type": "ntk", "factor": 2.0})}
    for bad, words in (("x=rope:2", "unknown method 'rope'"), ("x=pi:0.5", "factor >= 1"), ("x=pi", "factor"),
                       ("x=base:1", "base > 1"), ("x=base:300+base:400", "one base"), ("x=pi:2+ntk:2", "one base"),
                       ("x=yarn:2:0", "yarn"), ("x=yarn:nan", "yarn"), ("x=none:2", "nothing"),
                       ("pi:2", "NAME=SPEC"), ("a b=pi:2", "NAME=SPEC")):
        with pytest.raises(ConfigError, match=words):
            parse_rope([bad])
    with pytest.raises(ConfigError, match="distinct"):
        parse_rope(["a=pi:2", "a=ntk:2"])


def test_sweep_rope_end_to_end(tmp_path, capsys):
    from diagnostics.recommend import branch_kind
    from diagnostics.runs import load_run

    cfgf = tmp_path / "c.toml"
    cfgf.write_text(dumps_toml(_quiet(micro_config(steps=(8, 6, 4), checkpoint_every=4, eval_every=2))))
    parent = str(tmp_path / "p")
    assert main(["train", "--config", str(cfgf), "--out", parent, "--quiet", "--until", "14"]) == 0
    prefix = str(tmp_path / "sw")
    sweep = ["sweep", parent, "--out-prefix", prefix, "--quiet"]
    # refusals (exit 2), nothing written
    for bad in (["--step", "14", "--rope", "x=rope:2"], ["--step", "5", "--rope", "x=pi:2"],
                ["--rope", "x=pi:2"], ["--step", "14", "--rope", "x=pi:2", "--batch-sizes", "4,8"],
                ["--step", "14", "--rope", "a=base:1000", "b=base:1e3"], ["--step", "14", "--rope", "x=pi:0.5"],
                ["--step", "14", "--rope", "x=pi:2", "--tokens", "100000000"]):
        assert main(sweep + bad) == 2, bad
    assert not os.path.exists(prefix)
    capsys.readouterr()
    specs = ["base300=base:300", "pi2=pi:2", "yarn2=yarn:2", "mix=base:1e3+ntk:2"]
    assert main(sweep + ["--step", "14", "--steps", "2", "--evals", "2", "--rope", *specs]) == 0
    out = capsys.readouterr().out
    assert "branch rope-yarn2 (yarn:2): rope_base 10000, scaling yarn x2 (L=32); 2 steps after step 14" in out
    assert "rope-mix: mean validation loss" in out
    want = {"base300": (300.0, {"type": "none"}, None),   # the parent's base at step 14 is midtrain's, 1e4
            "pi2": (10000.0, {"type": "pi", "factor": 2.0}, {"type": "pi", "factor": 2.0}),
            "yarn2": (10000.0, {"type": "yarn", "factor": 2.0, "original_max_position": 32},
                      {"type": "yarn", "factor": 2.0, "original_max_position": 32, "alpha": 1.0, "beta": 32.0}),
            "mix": (1000.0, {"type": "ntk", "factor": 2.0}, {"type": "ntk", "factor": 2.0})}
    prun = load_run(parent)
    for name, (base, table, model_scaling) in want.items():
        r = load_run(os.path.join(prefix, f"rope-{name}"))
        assert r.parent["step"] == 14 and os.path.samefile(r.parent["run"], parent)
        assert r.config["phases"][:2] == prun.config["phases"][:2]          # before the branch step: the parent's
        assert r.config["phases"][2]["rope_base"] == base and r.config["phases"][2]["rope_scaling"] == table
        assert {k: v for k, v in r.config["phases"][2].items() if not k.startswith("rope")} == \
            {k: v for k, v in prun.config["phases"][2].items() if not k.startswith("rope")}
        assert branch_kind(prun, r) == "rope"
        ck = load_checkpoint(checkpoint_path(r.path, 16))                   # the branch trained under its choice
        assert ck["rope_base"] == base and ck["rope_scaling"] == model_scaling
    # the same branches again: refused, nothing overwritten
    before = sorted(os.listdir(prefix))
    assert main(sweep + ["--step", "14", "--steps", "2", "--rope", "pi2=pi:2"]) == 2
    assert sorted(os.listdir(prefix)) == before
