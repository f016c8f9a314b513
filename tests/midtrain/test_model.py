"""Tests for midtrain.model: shapes, causality, losses, RoPE, hook sites, optimizer."""

import doctest
import math

import pytest
import torch
import torch.nn.functional as F

import midtrain.model as model_module
from midtrain.model import GPT, GPTConfig, HookPoint, PRESETS, apply_rope, get_preset, rope_cos_sin


def micro_config(**overrides) -> GPTConfig:
    """Smaller than "tiny" so every test runs in milliseconds."""
    kw = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32)
    kw.update(overrides)
    return GPTConfig(**kw)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(micro_config()).eval()


# -- presets -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, low, high",
    [("tiny", 0.7e6, 1.3e6), ("small", 8e6, 13e6), ("medium", 32e6, 48e6), ("gpt2", 80e6, 90e6)],
)
def test_preset_param_counts(name, low, high):
    cfg = get_preset(name)
    assert cfg.vocab_size == 256
    with torch.device("meta"):  # no memory, no init cost
        n = GPT(cfg).num_params()
    assert low <= n <= high, f"{name}: {n:,} params"


def test_gpt2_preset_shape_and_full_vocab_count():
    cfg = get_preset("gpt2")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) == (12, 12, 768, 1024)
    cfg.vocab_size = 50304
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    assert 120e6 <= n <= 128e6


def test_get_preset_returns_copy_and_rejects_unknown():
    cfg = get_preset("tiny")
    cfg.n_layer = 99
    assert PRESETS["tiny"].n_layer == 4
    with pytest.raises(ValueError, match="huge.*tiny"):
        get_preset("huge")


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="even head_dim"):
        GPTConfig(n_embd=12, n_head=4)


def test_num_params_counts_tied_weight_once_and_untied_embedding_excluded():
    torch.manual_seed(0)
    tied = GPT(micro_config(tie_weights=True))
    untied = GPT(micro_config(tie_weights=False))
    emb = 64 * 32
    assert untied.num_params(non_embedding=False) == tied.num_params(non_embedding=False) + emb
    assert untied.num_params(non_embedding=True) == untied.num_params(non_embedding=False) - emb
    assert tied.num_params(non_embedding=True) == tied.num_params(non_embedding=False)


def test_flops_per_token_formula(model):
    cfg = model.config
    expected = 6 * model.num_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * 16
    assert model.flops_per_token(16) == pytest.approx(expected)


def test_module_docstring_example_runs():
    result = doctest.testmod(model_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# -- forward / loss --------------------------------------------------------------


def test_forward_shapes_and_no_targets(model):
    idx = torch.randint(0, 64, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 64) and loss is None


def test_causal(model):
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    a, _ = model(idx)
    b, _ = model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_reduction_none_matches_manual_and_means_agree(model):
    idx = torch.randint(0, 64, (4, 12))
    targets = torch.randint(0, 64, (4, 12))
    logits, per_seq = model(idx, targets, reduction="none")
    assert per_seq.shape == (4,)
    manual = torch.stack([F.cross_entropy(logits[b], targets[b]) for b in range(4)])
    torch.testing.assert_close(per_seq, manual)
    _, mean = model(idx, targets)
    _, total = model(idx, targets, reduction="sum")
    torch.testing.assert_close(mean, per_seq.mean())
    torch.testing.assert_close(total, per_seq.sum() * 12)


def test_ignore_index(model):
    idx = torch.randint(0, 64, (3, 12))
    targets = torch.randint(0, 64, (3, 12))
    targets[0, 5:] = -1
    targets[2, :] = -1  # a sequence with nothing to predict
    logits, per_seq = model(idx, targets, reduction="none")
    assert torch.isfinite(per_seq).all()
    assert per_seq[2].item() == 0.0
    torch.testing.assert_close(per_seq[0], F.cross_entropy(logits[0, :5], targets[0, :5]))
    _, mean = model(idx, targets)
    kept = targets != -1
    torch.testing.assert_close(mean, F.cross_entropy(logits[kept], targets[kept]))
    # gradients stay finite when a whole sequence is ignored
    model.train()
    model(idx, targets, reduction="none")[1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_too_long_sequence_raises(model):
    with pytest.raises(ValueError, match=r"33.*32"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_bad_reduction_raises(model):
    idx = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="reduction"):
        model(idx, idx, reduction="avg")


# -- weights -----------------------------------------------------------------------


def test_tied_weights_share_storage():
    torch.manual_seed(0)
    tied = GPT(micro_config())
    assert tied.lm_head.weight is tied.tok_emb.weight
    assert tied.lm_head.weight.data_ptr() == tied.tok_emb.weight.data_ptr()
    untied = GPT(micro_config(tie_weights=False))
    assert untied.lm_head.weight.data_ptr() != untied.tok_emb.weight.data_ptr()


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = micro_config(n_layer=8, n_embd=128, n_head=4)
    m = GPT(cfg)
    res_std = torch.cat([torch.cat([b.attn.proj.weight.flatten(), b.mlp.down.weight.flatten()]) for b in m.blocks]).std()
    qkv_std = torch.cat([b.attn.qkv.weight.flatten() for b in m.blocks]).std()
    assert res_std.item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.05)
    assert qkv_std.item() == pytest.approx(0.02, rel=0.05)
    assert all((b.attn_norm.weight == 1).all() for b in m.blocks)
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, torch.nn.Linear))


# -- RoPE ----------------------------------------------------------------------------


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    T, d = 12, 16
    cos, sin = rope_cos_sin(T, d, base=10000.0)
    q = torch.randn(d).expand(T, d)  # the same query vector at every position
    k = torch.randn(d).expand(T, d)  # the same key vector at every position
    scores = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T  # (T, T)
    for offset in range(-T + 1, T):
        diag = torch.diagonal(scores, offset=offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), atol=1e-5, rtol=1e-5)
    # and it is a rotation: norms are kept, position 0 is untouched
    rotated = apply_rope(q, cos, sin)
    torch.testing.assert_close(rotated.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rotated[0], q[0])


def test_rope_cache_is_float32_non_persistent_and_lazy(model):
    assert "rotary.cos" not in model.state_dict()
    model(torch.zeros(1, 8, dtype=torch.long))
    assert model.rotary.cos.shape == (8, model.config.head_dim // 2)
    assert model.rotary.cos.dtype == torch.float32
    model(torch.zeros(1, 20, dtype=torch.long))
    assert model.rotary.cos.shape[0] == 20
    model.to(torch.bfloat16)
    model(torch.zeros(1, 4, dtype=torch.long))
    assert model.rotary.cos.dtype == torch.float32


def test_set_rope_base_changes_outputs(model):
    idx = torch.randint(0, 64, (2, 16))
    before, _ = model(idx)
    model.set_rope_base(500_000.0)
    after, _ = model(idx)
    assert model.config.rope_base == 500_000.0
    assert not torch.allclose(before, after)
    torch.testing.assert_close(before[:, 0], after[:, 0])  # position 0 has no rotation
    model.set_rope_base(10_000.0)
    torch.testing.assert_close(model(idx)[0], before)
    model.set_rope_base(10_000.0, block_size=64)
    assert model(torch.zeros(1, 48, dtype=torch.long))[0].shape == (1, 48, 64)


# -- activation sites ---------------------------------------------------------------------


def test_activation_sites_and_forward_hook(model):
    sites = model.activation_sites()
    for i in range(model.config.n_layer):
        for site in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            assert f"blocks.{i}.{site}" in sites
    assert sites[-2:] == ["final_norm", "lm_head"]
    hp = model.get_submodule("blocks.0.resid_post")
    assert isinstance(hp, HookPoint) and hp.name == "blocks.0.resid_post"
    for name in sites:
        model.get_submodule(name)  # every listed site resolves

    seen = []
    handle = hp.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    try:
        model(torch.zeros(3, 7, dtype=torch.long))
    finally:
        handle.remove()
    assert seen == [(3, 7, model.config.n_embd)]


def test_hook_sites_decompose_the_residual_stream(model):
    acts = {}
    handles = [
        model.get_submodule(f"blocks.1.{s}").register_forward_hook(
            lambda mod, inp, out, s=s: acts.__setitem__(s, out))
        for s in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
    ]
    try:
        model(torch.randint(0, 64, (2, 9)))
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(acts["resid_mid"], acts["resid_pre"] + acts["attn_out"])
    torch.testing.assert_close(acts["resid_post"], acts["resid_mid"] + acts["mlp_out"])


# -- optimizer -------------------------------------------------------------------------------


def test_configure_optimizer_groups_cover_every_param_once():
    for tie in (True, False):
        m = GPT(micro_config(tie_weights=tie))
        opt = m.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
        assert isinstance(opt, torch.optim.AdamW)
        in_groups = [id(p) for g in opt.param_groups for p in g["params"]]
        assert len(in_groups) == len(set(in_groups))
        assert set(in_groups) == {id(p) for p in m.parameters()}
        decay, no_decay = opt.param_groups
        assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
        assert all(p.dim() == 2 for p in decay["params"])
        assert all(p.dim() == 1 for p in no_decay["params"])


def test_adamw_steps_reduce_loss_on_repeated_batch():
    torch.manual_seed(0)
    m = GPT(micro_config())
    opt = m.configure_optimizer(weight_decay=0.0, lr=3e-3, betas=(0.9, 0.95), device_type="cpu")
    data = torch.randint(0, 64, (4, 17))
    x, y = data[:, :-1], data[:, 1:]
    losses = []
    for _ in range(15):
        _, loss = m(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_dropout_config_trains_and_eval_is_deterministic():
    torch.manual_seed(0)
    m = GPT(micro_config(dropout=0.1))
    idx = torch.randint(0, 64, (2, 8))
    m.train()
    _, loss = m(idx, idx)
    loss.backward()
    m.eval()
    torch.testing.assert_close(m(idx)[0], m(idx)[0])
