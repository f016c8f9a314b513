"""Parameter groups (hooks._per_example_groups) shared by GradientNoiseScale and PerExampleGradNorms, the
per-example harvest of the GNS hook, model unwrapping, and the auto mode's one-time message.

References: hand-written labels for Hugging Face style (GPT-2, LLaMA) and built-in GPT parameter
names; per-parameter per-example norms summed by hand for the groups; the plain per-parameter
sum of ``sq_norms(loss_scale="mean")`` (what the harvest computed before it was cached).
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hooks._gradient_noise_parts import _PerExample
from hooks._per_example_groups import default_groups, layer_of, param_kind
from hooks.gradient_noise import GradientNoiseScale
from hooks.monitor import MemorySink, Monitor
from hooks.per_example import PerExampleGradNorms


from tests.hooks.test_gradient_noise import one_thread  # noqa: E402,F401  (autouse: one torch thread)


# ----------------------------------------------------------------------------------------------
# the classifier on name lists

def test_transformers_gpt2_names():
    want = {
        "transformer.wte.weight": ["embeddings"], "wte": ["embeddings"],
        "transformer.wpe.weight": ["embeddings"],
        "transformer.h.0.ln_1.weight": ["norms", "blocks.0"],
        "transformer.h.0.attn.c_attn.weight": ["attention", "blocks.0"],
        "transformer.h.0.attn.c_proj.bias": ["attention", "blocks.0"],
        "transformer.h.11.mlp.c_fc.weight": ["mlp", "blocks.11"],
        "transformer.h.11.mlp.c_proj.weight": ["mlp", "blocks.11"],
        "transformer.ln_f.weight": ["norms"],
        "lm_head.weight": ["head"],                  # by name: an untied output projection
    }
    assert {n: default_groups(n) for n in want} == want


def test_llama_names():
    want = {
        "model.embed_tokens.weight": ["embeddings"],
        "model.layers.0.self_attn.q_proj.weight": ["attention", "blocks.0"],
        "model.layers.0.self_attn.o_proj.weight": ["attention", "blocks.0"],
        "model.layers.0.input_layernorm.weight": ["norms", "blocks.0"],
        "model.layers.0.post_attention_layernorm.weight": ["norms", "blocks.0"],  # not attention
        "model.layers.3.mlp.gate_proj.weight": ["mlp", "blocks.3"],
        "model.layers.3.mlp.down_proj.weight": ["mlp", "blocks.3"],
        "model.norm.weight": ["norms"],
        "lm_head.weight": ["head"],
    }
    assert {n: default_groups(n) for n in want} == want


def test_other_names_and_owner_kinds():
    assert default_groups("blocks.3.attn_norm.weight") == ["norms", "blocks.3"]
    assert default_groups("embed_out.weight") == ["head"]                  # GPT-NeoX: untied head
    assert default_groups("pos_embedding") == ["embeddings"]               # a bare Parameter
    assert default_groups("scale") == ["other"]
    assert layer_of("encoder.block.2.layer.0.SelfAttention.q.weight") == "encoder.blocks.2"
    assert layer_of("model.decoder.layers.2.fc1.weight") == "decoder.blocks.2"
    # the owning modules decide over the name: a tied head is the embedding (one parameter)
    assert default_groups("lm_head.weight", [nn.Linear(4, 8), nn.Embedding(8, 4)]) == ["embeddings"]
    assert default_groups("lm_head.weight", nn.Linear(4, 8)) == ["head"]
    assert default_groups("blocks.0.ffn_norm_proj.weight", nn.Linear(4, 4)) == ["mlp", "blocks.0"]
    assert default_groups("x.bn.weight", nn.BatchNorm1d(4)) == ["norms"]
    assert param_kind("h.1.anything.weight", {"rmsnorm"}) == "norms"


# ----------------------------------------------------------------------------------------------
# both consumers on real models: the same labels for the same parameter

def gpt(tie):
    from midtrain.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, tie_weights=tie))


class _Attn(nn.Module):
    def __init__(self, d, names):
        super().__init__()
        self.names = names
        for n, (i, o) in names.items():
            setattr(self, n, nn.Linear(i, o))

    def forward(self, x):
        if "c_attn" in self.names:
            q, k, v = self.c_attn(x).chunk(3, -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], is_causal=True)[:, 0]
        return (self.c_proj if "c_proj" in self.names else self.o_proj)(y)


class LlamaRMSNorm(nn.Module):   # Hugging Face's contract: weight + variance_epsilon, no bias
    def __init__(self, d):
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(1 + 0.1 * torch.randn(d)), 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class HFStyle(nn.Module):
    """GPT-2 (``transformer.h.<i>``) or LLaMA (``model.layers.<i>``) parameter names, nn.Linear layers."""

    def __init__(self, style, V=32, D=16, L=2, T=16):
        super().__init__()
        torch.manual_seed(1)
        self.style = style
        if style == "gpt2":
            self.transformer = root = nn.Module()
            root.wte, root.wpe = nn.Embedding(V, D), nn.Embedding(T, D)
            root.h = nn.ModuleList()
            for _ in range(L):
                b = nn.Module()
                b.ln_1, b.ln_2 = nn.LayerNorm(D), nn.LayerNorm(D)
                b.attn = _Attn(D, {"c_attn": (D, 3 * D), "c_proj": (D, D)})
                b.mlp = nn.Sequential()
                b.mlp.c_fc, b.mlp.act, b.mlp.c_proj = nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D)
                root.h.append(b)
            root.ln_f = nn.LayerNorm(D)
        else:
            self.model = root = nn.Module()
            root.embed_tokens, root.layers = nn.Embedding(V, D), nn.ModuleList()
            for _ in range(L):
                b = nn.Module()
                b.input_layernorm, b.post_attention_layernorm = LlamaRMSNorm(D), LlamaRMSNorm(D)
                b.self_attn = _Attn(D, {n: (D, D) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
                b.mlp = nn.Module()
                b.mlp.gate_proj, b.mlp.up_proj = nn.Linear(D, 2 * D, bias=False), nn.Linear(D, 2 * D, bias=False)
                b.mlp.down_proj = nn.Linear(2 * D, D, bias=False)
                root.layers.append(b)
            root.norm = LlamaRMSNorm(D)
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, idx, targets):
        if self.style == "gpt2":
            t = self.transformer
            x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]).expand_as(idx))   # batch dim 0
            for b in t.h:
                x = x + b.attn(b.ln_1(x))
                x = x + b.mlp(b.ln_2(x))
            x = t.ln_f(x)
        else:
            m = self.model
            x = m.embed_tokens(idx)
            for b in m.layers:
                x = x + b.self_attn(b.input_layernorm(x))
                h = b.post_attention_layernorm(x)
                x = x + b.mlp.down_proj(F.silu(b.mlp.gate_proj(h)) * b.mlp.up_proj(h))
            x = m.norm(x)
        logits = self.lm_head(x)
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())


MODELS = {"gpt_tied": lambda: gpt(True), "gpt_untied": lambda: gpt(False),
          "gpt2_style": lambda: HFStyle("gpt2"), "llama_style": lambda: HFStyle("llama")}
EXPECT = {   # a few labels per model, by hand
    "gpt_tied": {"tok_emb.weight": {"embeddings"}, "blocks.1.attn.qkv.weight": {"attention", "blocks.1"}},
    "gpt_untied": {"tok_emb.weight": {"embeddings"}, "lm_head.weight": {"head"},
                   "blocks.0.mlp_norm.weight": {"norms", "blocks.0"}},
    "gpt2_style": {"transformer.h.1.attn.c_attn.weight": {"attention", "blocks.1"},
                   "transformer.wpe.weight": {"embeddings"}, "lm_head.weight": {"head"}},
    "llama_style": {"model.layers.0.input_layernorm.weight": {"norms", "blocks.0"},
                    "model.layers.1.mlp.up_proj.weight": {"mlp", "blocks.1"},
                    "model.norm.weight": {"norms"}, "lm_head.weight": {"head"}},
}


@pytest.mark.parametrize("which", list(MODELS))
def test_gns_and_per_example_give_the_same_groups(which):
    """Per parameter, GNS's groups (gns/<group>/b_simple) and PerExampleSqNorms.groups / .layers
    agree: every per-example group is the sum of exactly the parameters GNS puts in it. Before
    hooks._per_example_groups, an untied lm_head was "head" in one and "embeddings" in the other, and
    transformer.h.0 was a layer of its own in one and blocks.0 in the other."""
    model = MODELS[which]()
    sink, hook = MemorySink(), GradientNoiseScale(mode="per_example")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # every module of these models is supported
        mon = Monitor(model, [hook], sinks=[sink], strict=True)
        pe = PerExampleGradNorms(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    member, groups = hook._member.cpu(), list(hook.trackers)
    labels = {n: {groups[r] for r in range(1, len(groups)) if member[r, i] > 0} for i, n in enumerate(names)}
    for n, want in EXPECT[which].items():
        assert labels[n] == want, n
    xy = torch.randint(0, 32, (3, 9), generator=torch.Generator().manual_seed(0))
    mon.on_step_begin(0)
    model(xy[:, :-1], xy[:, 1:])[1].backward()
    mon.on_backward_end(3)
    mon.on_grads_ready()
    mon.on_step_end(0)
    res = pe.sq_norms(loss_scale="mean")
    assert set(res.params) == set(names)
    pe_groups = {**res.groups, **res.layers}
    assert set(pe_groups) == set(groups) - {"total"}
    for g, sq in pe_groups.items():
        ref = sum(res.params[n] for n in names if g in labels[n])
        torch.testing.assert_close(sq, ref, rtol=1e-6, atol=0), g
    # the metric names are those groups, the same for the built-in GPT and the HF-style names
    logged = {k[4:-len("/b_simple")] for k in sink.records[0] if k.count("/") == 2 and k.endswith("/b_simple")}
    assert logged == set(pe_groups)
    assert {"blocks.0", "blocks.1", "attention", "mlp", "norms", "embeddings"} <= logged
    assert ("head" in logged) == (which != "gpt_tied")
    pe.detach()
    mon.close()


# ----------------------------------------------------------------------------------------------
# the per-example harvest: same numbers as the plain per-parameter sum, a few ops per micro-batch

def _harvest_reference(pe_ref, index):
    """What the harvest computed before caching: per parameter, sum_i of sq_norms("mean")."""
    res = pe_ref.sq_norms(loss_scale="mean", summaries=False)
    out = torch.zeros(len(index))
    for n, sq in res.params.items():
        if n in index:
            out[index[n]] = float(sq.double().sum())
    return out, res


@pytest.mark.parametrize("modules,passes", [("all", 1), ("norms", 1), ("all", 2)])
def test_harvest_equals_plain_per_parameter_sum(modules, passes):
    model = gpt(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pex = _PerExample(model, modules, names, torch.device("cpu"))
    pex.attach()
    ref_pe = PerExampleGradNorms(model, modules=modules)
    g = torch.Generator().manual_seed(3)
    want = torch.zeros(len(names))
    tracked = torch.zeros(len(names))
    n_ex = 0
    for b in (2, 5, 3, 4):                                      # unequal micro-batch sizes
        for _ in range(passes):          # passes=2: two forward/backward pairs per harvest
            xy = torch.randint(0, 32, (b, 9), generator=g)
            model(xy[:, :-1], xy[:, 1:])[1].backward()
            n_ex += b
        pex.harvest()
        ref, res = _harvest_reference(ref_pe, pex.index)
        want += ref
        tracked[[pex.index[n] for n in res.params]] = 1
    assert pex.n_examples == n_ex
    torch.testing.assert_close(pex.acc.double(), want.double(), rtol=2e-6, atol=0)
    assert torch.equal(pex.tracked, tracked)
    assert (tracked.sum() == len(names)) == (modules == "all")
    pex.detach()
    ref_pe.detach()


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("modules", ["all", "norms"])
def test_harvest_is_a_few_ops_per_micro_batch(modules):
    """With the per-example results given, a harvest is stack + sum + (index_)add: the row
    index and the mask are cached per layout (before: a new index tensor, zeros, index_copy_,
    an add and an index_put on every micro-batch)."""
    model = gpt(False)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    pex = _PerExample(model, modules, names, torch.device("cpu"))
    pex.attach()
    xy = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    model(xy[:, :-1], xy[:, 1:])[1].backward()
    res = pex.pe.sq_norms(loss_scale=1.0, summaries=False)
    pex.pe.sq_norms = lambda **kw: res          # isolate the harvest's own tensor ops
    counts = []
    for reset in (False, True, False, False):   # first ever (builds the layout), a new step, ...
        if reset:
            pex.reset()
        with _OpCounter() as c:
            pex.harvest()
        counts.append(c.ops)
    assert len(counts[1]) <= 4                  # first micro-batch of a step: acc is new
    assert counts[2] == counts[3] and len(counts[2]) == 3, counts[2]    # stack, sum, (index_)add_
    assert counts[2][-1] == ("add_" if modules == "all" else "index_add_")
    assert pex.n_examples == 3 * 4
    pex.detach()


# ----------------------------------------------------------------------------------------------
# wrapped models: one unwrap helper (hooks._common.unwrap_ddp)

def test_compiled_and_data_parallel_models_are_unwrapped():
    model = gpt(True)
    for wrapped in (torch.compile(model), nn.DataParallel(model)):   # compile is lazy: not run
        hook = GradientNoiseScale(mode="per_example")
        hook.attach(wrapped)
        assert [id(p) for p in hook._params] == [id(p) for p in model.parameters()]
        assert hook._pe.pe.model is model
        hook.detach()


def test_ddp_wrapper_gets_the_comm_hook(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = gpt(True)
        ddp = nn.parallel.DistributedDataParallel(model)
        hook = GradientNoiseScale(mode="ddp", world_size=2)       # 2: ddp mode refuses one process
        hook.attach(ddp)                                          # no ddp_model=: found by unwrapping
        assert [id(p) for p in hook._params] == [id(p) for p in model.parameters()]
        hook.on_step_begin(0)
        xy = torch.randint(0, 32, (2, 9))
        ddp(xy[:, :-1], xy[:, 1:])[1].backward()
        assert hook._comm_fired
        hook.detach()
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# the built-in loop: the auto mode's per-example message once per run

def test_auto_takeover_message_once_per_run_and_across_resume(tmp_path):
    import copy

    from hooks.gradient_noise import PE_TAKEOVER_MSG
    from midtrain.hookset import _BUILDERS
    from midtrain.loop import train
    from tests.midtrain.conftest import micro_config

    cfg = micro_config(steps=(2, 2, 2), checkpoint_every=100, eval_every=100)
    for name in _BUILDERS:
        if name != "gns":
            setattr(cfg.monitor, name, {"enabled": False})
    # per-domain GNS attaches the per-example hooks on its own steps (every 10th), which would
    # measure step 10 below: this test is about the takeover on the mode's own schedule
    cfg.monitor.gns = {"per_domain": False}
    a, b = cfg.phases[0], cfg.phases[1]              # grad_accum 2 and 1
    cfg.phases = []
    for k in range(3):                               # 2, 1, 2, 1, 2, 1: three switches
        for p in (a, b):
            p = copy.deepcopy(p)
            p.name, p.seq_len, p.batch_size, p.rope_base = f"{p.name}{k}", 32, 4, None
            cfg.phases.append(p)
    assert [p.grad_accum for p in cfg.phases] == [2, 1, 2, 1, 2, 1]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True, until_step=7)
        train(cfg, str(tmp_path / "r"), progress=False, strict_hooks=True, resume=True)
    msgs = [str(x.message) for x in w if "GradientNoiseScale" in str(x.message)]
    assert msgs == [f"midtrain GradientNoiseScale: {PE_TAKEOVER_MSG}"]
    assert "only once" in msgs[0] and "not measured" in msgs[0]
    from diagnostics.runs import load_run

    m = load_run(tmp_path / "r").metrics.dropna(subset=["train/loss"])
    # the first step of each one-batch-size stretch after accumulating is not measured, the rest are
    assert list(m["gns/b_small"].fillna(0)) == [2, 2, 0, 1, 2, 2, 0, 1, 2, 2, 0, 1]
