import math

import pytest

from midtrain.config import ConfigError, Phase, TrainConfig, config_from_dict, default_config, dumps_toml, load_toml


def test_default_recipe_has_three_phases_and_validates():
    cfg = default_config().validate(domains=["prose", "code", "math"], max_seq_len=512)
    assert [p.name for p in cfg.phases] == ["pretrain", "midtrain", "long_context"]
    assert cfg.phases[2].seq_len > cfg.phases[0].seq_len
    assert cfg.phases[2].rope_base > 10000
    # the anneal upweights code and math
    assert cfg.phases[1].mixture["math"] > cfg.phases[0].mixture["math"]


@pytest.mark.parametrize("shape", ["linear", "cosine", "1-sqrt", "exponential"])
def test_decay_shapes_closed_form(shape):
    p = Phase(name="a", steps=110, lr=1.0, warmup_steps=10, decay=shape, decay_fraction=0.5, final_lr=0.01,
              mixture={"x": 1})
    lrs = [p.lr_at(t) for t in range(110)]
    # warmup is linear from lr/10 to lr
    assert lrs[:10] == pytest.approx([(t + 1) / 10 for t in range(10)])
    # plateau until the last 50 steps (half of the 100 post-warmup steps)
    assert all(x == 1.0 for x in lrs[10:60])
    # reaches the floor on the last step, monotone non-increasing in the decay
    assert lrs[-1] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[60:], lrs[61:]))
    p25 = 0.5  # step 84 is 25/50 = half-way into the decay
    expected = {
        "linear": 1 - 0.99 * p25,
        "cosine": 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * p25)),
        "1-sqrt": 0.01 + 0.99 * (1 - math.sqrt(p25)),
        "exponential": 0.01 ** p25,
    }[shape]
    assert lrs[84] == pytest.approx(expected)


def test_global_lr_and_phase_lookup():
    cfg = default_config()
    starts = cfg.phase_starts()
    assert starts[0] == 0 and starts[1] == cfg.phases[0].num_steps()
    i, p, t = cfg.phase_at(starts[1])
    assert (i, t) == (1, 0) and p.name == "midtrain"
    assert cfg.lr_at(starts[1]) == cfg.phases[1].lr_at(0)
    with pytest.raises(IndexError):
        cfg.phase_at(cfg.total_steps())


def test_token_budget_converts_to_steps():
    p = Phase(name="a", tokens=10_000, batch_size=8, seq_len=128, mixture={"x": 1})
    assert p.num_steps() == math.ceil(10_000 / 1024)


@pytest.mark.parametrize("n", [3, 7, 60, 601, 5000])
def test_scaled_to_sums_exactly_and_keeps_proportions(n):
    cfg = default_config()
    s = cfg.scaled_to(n)
    assert s.total_steps() == n
    assert all(p.num_steps() >= 1 for p in s.phases)
    if n >= 60:
        for a, b in zip(cfg.phases, s.phases):
            assert abs(b.num_steps() / n - a.num_steps() / cfg.total_steps()) < 2 / n + 1e-9
    s.validate()


def test_scaled_to_fewer_steps_than_phases_is_an_error():
    with pytest.raises(ConfigError, match="phases"):
        default_config().scaled_to(2)


def test_toml_roundtrip(tmp_path):
    cfg = default_config()
    cfg.model.n_layer = 3
    path = tmp_path / "c.toml"
    path.write_text(dumps_toml(cfg))
    back = load_toml(path)
    assert back.to_dict() == cfg.to_dict()


def test_unknown_keys_are_named_with_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['lr_max'\].*valid keys.*warmup_steps"):
        config_from_dict({"phases": [{"name": "a", "steps": 3, "lr_max": 1, "mixture": {"prose": 1}}]})
    with pytest.raises(ConfigError, match="valid keys"):
        config_from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"\[model\]"):
        config_from_dict({"model": {"layers": 3}})


@pytest.mark.parametrize(
    "phase, match",
    [
        (dict(steps=0), "zero budget"),
        (dict(steps=5, tokens=100), "exactly one budget"),
        (dict(steps=5, decay="step"), "unknown decay"),
        (dict(steps=5, decay="exponential", final_lr=0.0), "floor"),
        (dict(steps=5, batch_size=10, grad_accum=3), "multiple of grad_accum"),
        (dict(steps=5, mixture={}), "empty mixture"),
        (dict(steps=5, mixture={"prose": -1}), "non-negative"),
        (dict(steps=5, mixture={"poetry": 1}), "unknown domain"),
        (dict(steps=5, seq_len=4096), "beyond what the model supports"),
        (dict(steps=5, warmup_steps=9, decay="linear"), "warmup_steps"),
    ],
)
def test_bad_phases_are_clear_errors(phase, match):
    kw = dict(name="a", mixture={"prose": 1.0})
    kw.update(phase)
    cfg = TrainConfig(phases=[Phase(**kw)])
    with pytest.raises(ConfigError, match=match):
        cfg.validate(domains=["prose", "code"], max_seq_len=512)


def test_bad_toml_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("seed = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")


def test_patch_that_shortens_the_schedule_drops_checkpoint_steps_past_its_end():
    """midtrain recommend --write-config on a run that kept probe checkpoints (checkpoint_steps): the batch and
    long_context recommendations shorten phases, and the patched config was refused ('past the run's last
    step')."""
    import warnings

    cfg = default_config()
    cfg.checkpoint_steps = [100, 360]
    with pytest.warns(UserWarning, match=r"checkpoint_steps \[360\] are past"):
        c = cfg.with_patch({"phases": {"midtrain": {"batch_size": 24, "grad_accum": 3, "steps": 80},
                                       "long_context": {"steps": 30}}})
    assert c.total_steps() == 350 and c.checkpoint_steps == [100]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cfg.with_patch({"phases": {"midtrain": {"lr": 1e-3}}}).checkpoint_steps == [100, 360]
