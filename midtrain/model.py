"""A small decoder-only GPT for mid-training experiments, readable top to bottom.

nanoGPT layout with the modern pieces most current open LLMs use:

- RoPE positions (Su et al. 2021, arXiv 2104.09864) with a configurable base, so
  context extension by raising the base ("ABF", Xiong et al. 2023, arXiv 2309.16039)
  is one call: ``model.set_rope_base(500_000.0, block_size=2048)``; and the scaling
  methods of ``midtrain.rope`` (position interpolation, NTK-aware, YaRN):
  ``model.set_rope_scaling({"type": "yarn", "factor": 4.0, "original_max_position": 512})``;
- RMSNorm (Zhang & Sennrich 2019, arXiv 1910.07467), pre-norm, weight only;
- SwiGLU MLP (Shazeer 2020, arXiv 2002.05202), hidden size ~8/3 * n_embd;
- attention through ``F.scaled_dot_product_attention(is_causal=True)``
  (flash / memory-efficient kernels on GPU);
- no biases anywhere, optional weight tying (``lm_head.weight is tok_emb.weight``),
  GPT-2 initialisation (std 0.02, residual projections scaled by 1/sqrt(2 * n_layer)).

Every block exposes TransformerLens-style named activation sites (``HookPoint``
identity modules): ``blocks.{i}.resid_pre``, ``attn_out``, ``resid_mid``,
``mlp_out``, ``resid_post``; plus ``final_norm`` and ``lm_head``. Attach a plain
``register_forward_hook`` to ``model.get_submodule("blocks.0.resid_post")`` to see
the (B, T, C) residual stream; ``model.activation_sites()`` lists them all.

Presets use ``vocab_size=256`` (the byte-level tokenizer of ``midtrain.data``);
the training loop overrides ``vocab_size`` with the corpus vocabulary. With the
GPT-2 vocabulary (``vocab_size=50304``) the "gpt2" preset has ~124M parameters;
with 256 bytes it has ~85M (the difference is the embedding matrix).

Tiny CPU example (runs in about a second)::

    >>> import torch
    >>> from midtrain.model import GPT, get_preset
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = GPT(get_preset("tiny"))
    >>> idx = torch.randint(0, 256, (2, 64))            # (B, T) byte tokens
    >>> logits, loss = model(idx[:, :-1], targets=idx[:, 1:])
    >>> tuple(logits.shape)
    (2, 63, 256)
    >>> per_seq = model(idx[:, :-1], idx[:, 1:], reduction="none")[1]   # (B,)
    >>> tuple(per_seq.shape)
    (2,)
    >>> opt = model.configure_optimizer(weight_decay=0.1, lr=1e-3, betas=(0.9, 0.95), device_type="cpu")
    >>> loss.backward(); opt.step()
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from midtrain.rope import rope_frequencies, rope_scaling_spec

__all__ = [
    "GPTConfig",
    "PRESETS",
    "get_preset",
    "GPT",
    "Block",
    "CausalSelfAttention",
    "SwiGLU",
    "RMSNorm",
    "Rotary",
    "HookPoint",
    "rope_cos_sin",
    "apply_rope",
]


# -----------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    """Model shape. ``block_size`` is the longest sequence ``forward`` accepts.

    The SwiGLU hidden size is ``mlp_ratio * n_embd`` rounded up to a multiple of
    ``multiple_of`` (LLaMA's recipe, which keeps the MLP at ~8 n_embd^2 params
    like a 4x GELU MLP while using three matrices).
    """

    vocab_size: int = 256
    block_size: int = 512
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    mlp_ratio: float = 8.0 / 3.0
    multiple_of: int = 64
    rope_base: float = 10000.0
    rope_scaling: dict | None = None  # a midtrain.rope scaling table; None: plain RoPE
    tie_weights: bool = True
    dropout: float = 0.0
    norm_eps: float = 1e-6

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "multiple_of"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim} (n_embd / n_head)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.rope_base <= 1.0:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        try:
            self.rope_scaling = rope_scaling_spec(self.rope_scaling)
            rope_frequencies(self.head_dim, self.rope_base, self.rope_scaling)
        except ValueError as e:
            raise ValueError(f"rope_scaling: {e}") from None
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        hidden = int(math.ceil(self.mlp_ratio * self.n_embd - 1e-9))
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


# Parameter counts with vocab_size=256 (tied): tiny ~0.89M, small ~10.7M,
# medium ~39.8M, gpt2 ~85M (~124M with vocab_size=50304).
PRESETS: dict[str, GPTConfig] = {
    "tiny": GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=512),
    "small": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=1024),
    "medium": GPTConfig(n_layer=8, n_head=10, n_embd=640, block_size=1024),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024),
}


def get_preset(name: str) -> GPTConfig:
    """A fresh copy of a preset config (editing it never changes ``PRESETS``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


# -----------------------------------------------------------------------------
# Building blocks


class HookPoint(nn.Identity):
    """A named activation site: an identity module to hang forward hooks on.

    ``name`` is filled in by ``GPT.__init__`` with the module path, e.g.
    ``"blocks.3.resid_post"`` (TransformerLens convention).
    """

    def __init__(self):
        super().__init__()
        self.name: str = ""


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich 2019, eq. 4).

    Normalised in float32, then cast back, as LLaMA does.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_cos_sin(seq_len: int, head_dim: int, base: float, device=None, scaling=None):
    """RoPE tables (Su et al. 2021, eq. 34): angle[m, i] = m * base^(-2i / head_dim), or
    (m / divisor) * theta_i under a scaling method, both tables times its attention factor
    (``midtrain.rope.rope_frequencies``; ``scaling`` None is plain RoPE).

    Angles and cos/sin are computed in float64 on the CPU and returned as float32 (float32 angles
    lose ~1e-7 of a radian per radian, bf16 whole rotations at long positions).
    Returns cos, sin of shape (seq_len, head_dim // 2).
    """
    theta, divisor, gain = rope_frequencies(head_dim, base, scaling)
    positions = torch.arange(seq_len, dtype=torch.float64)
    if divisor != 1.0:
        positions = positions / divisor
    angles = torch.outer(positions, torch.tensor(theta, dtype=torch.float64))  # (T, head_dim/2)
    cos, sin = angles.cos(), angles.sin()
    if gain != 1.0:
        cos, sin = cos * gain, sin * gain
    return cos.to(device=device, dtype=torch.float32), sin.to(device=device, dtype=torch.float32)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i + d/2}) of the last dim by position-dependent angles.

    x: (..., T, head_dim); cos, sin: (T, head_dim/2). "Rotate-half" pairing
    (GPT-NeoX / LLaMA-HF). Because each pair is rotated by m * theta_i, the dot
    product <R_m q, R_n k> depends on positions only through m - n.
    """
    d = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :d], xf[..., d:]
    y1 = x1 * cos - x2 * sin
    y2 = x1 * sin + x2 * cos
    return torch.cat((y1, y2), dim=-1).type_as(x)


class Rotary(nn.Module):
    """Holds the RoPE base and scaling (``midtrain.rope``) and a lazily grown float32 cos/sin cache.

    The cache is a non-persistent buffer (not in the state dict; it follows
    ``model.to(device)``); it is rebuilt when a longer sequence arrives, when the
    base or the scaling changes, or when a dtype cast (``model.half()``) touched it.
    """

    def __init__(self, head_dim: int, base: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.base = float(base)
        self.scaling = rope_scaling_spec(scaling)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def _drop_cache(self):
        self.cos = torch.empty(0, device=self.cos.device)
        self.sin = torch.empty(0, device=self.sin.device)

    def set_base(self, base: float):
        self.base = float(base)
        self._drop_cache()

    def set_scaling(self, scaling: dict | None):
        self.scaling = rope_scaling_spec(scaling)
        self._drop_cache()

    def forward(self, seq_len: int, device):
        stale = (
            self.cos.dim() != 2
            or self.cos.shape[0] < seq_len
            or self.cos.dtype != torch.float32
            or self.cos.device != torch.device(device)
        )
        if stale:
            self.cos, self.sin = rope_cos_sin(seq_len, self.head_dim, self.base, device=device, scaling=self.scaling)
        return self.cos[:seq_len], self.sin[:seq_len]  # (T, head_dim/2) each


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # fused q, k, v
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.is_residual_proj = True  # scaled init, see GPT._init_weights
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.proj(y))


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x))  (Shazeer 2020, eq. 6 "FFN_SwiGLU")."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_hidden
        self.gate = nn.Linear(config.n_embd, hidden, bias=False)
        self.up = nn.Linear(config.n_embd, hidden, bias=False)
        self.down = nn.Linear(hidden, config.n_embd, bias=False)
        self.down.is_residual_proj = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.down(F.silu(self.gate(x)) * self.up(x)))  # (B, T, C)


class Block(nn.Module):
    """Pre-norm transformer block with named residual-stream sites."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.resid_pre = HookPoint()
        self.attn_out = HookPoint()
        self.resid_mid = HookPoint()
        self.mlp_out = HookPoint()
        self.resid_post = HookPoint()

    def forward(self, x, cos, sin):
        x = self.resid_pre(x)  # (B, T, C)
        x = self.resid_mid(x + self.attn_out(self.attn(self.attn_norm(x), cos, sin)))
        x = self.resid_post(x + self.mlp_out(self.mlp(self.mlp_norm(x))))
        return x  # (B, T, C)


# -----------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.rotary = Rotary(config.head_dim, config.rope_base, config.rope_scaling)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.final_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if config.tie_weights:
            # One tensor, two roles (Press & Wolf 2017). Tied after init so the
            # shared matrix gets the embedding's N(0, 0.02) init.
            self.lm_head.weight = self.tok_emb.weight
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name

    def _init_weights(self, module):
        """GPT-2 init (Radford et al. 2019, sec. 2.3): N(0, 0.02); residual
        projections N(0, 0.02 / sqrt(2 * n_layer)) so the residual stream's
        variance does not grow with depth."""
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_proj", False):
                std = 0.02 / math.sqrt(2 * self.config.n_layer)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)

    # -- forward ---------------------------------------------------------------

    def forward(self, idx, targets=None, reduction: str = "mean"):
        """idx, targets: (B, T) long; targets == -1 are ignored.

        Returns (logits (B, T, V), loss) where loss is None without targets, else
        "mean": mean over all non-ignored tokens (scalar);
        "none": per-sequence mean over that sequence's non-ignored tokens (B,),
                0 for a sequence whose targets are all ignored;
        "sum":  sum over all non-ignored tokens (scalar).
        """
        if idx.dim() != 2:
            raise ValueError(f"idx must be (B, T), got shape {tuple(idx.shape)}")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length {T} exceeds block_size {self.config.block_size}; "
                "raise config.block_size (e.g. model.set_rope_base(base, block_size=...))"
            )
        if reduction not in ("mean", "none", "sum"):
            raise ValueError(f"reduction must be 'mean', 'none' or 'sum', got {reduction!r}")
        cos, sin = self.rotary(T, idx.device)  # (T, hd/2) each
        x = self.drop(self.tok_emb(idx))  # (B, T, C)
        for block in self.blocks:
            x = block(x, cos, sin)  # (B, T, C)
        x = self.final_norm(x)  # (B, T, C)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        token_loss = F.cross_entropy(
            logits.float().view(B * T, -1), targets.reshape(B * T), ignore_index=-1, reduction="none"
        ).view(B, T)  # (B, T), 0 where ignored
        counted = (targets != -1).to(token_loss.dtype)  # (B, T)
        if reduction == "sum":
            loss = token_loss.sum()
        elif reduction == "mean":
            loss = token_loss.sum() / counted.sum().clamp(min=1.0)
        else:
            loss = token_loss.sum(dim=1) / counted.sum(dim=1).clamp(min=1.0)  # (B,)
        return logits, loss

    # -- context extension -----------------------------------------------------

    def set_rope_base(self, base: float, *, block_size: int | None = None):
        """Change the RoPE base (and optionally the maximum length), for context
        extension by "adjusted base frequency" (Xiong et al. 2023). The cos/sin
        cache is rebuilt on the next forward; ``config`` is updated so checkpoints
        record the new values."""
        base = float(base)
        if base <= 1.0:
            raise ValueError(f"rope base must be > 1, got {base}")
        if block_size is not None:
            if not isinstance(block_size, int) or block_size <= 0:
                raise ValueError(f"block_size must be a positive int, got {block_size!r}")
            self.config.block_size = block_size
        self.config.rope_base = base
        self.rotary.set_base(base)

    def set_rope_scaling(self, scaling: dict | None, *, block_size: int | None = None):
        """Set a RoPE scaling method (``midtrain.rope``: ``{"type": "pi" | "ntk" | "yarn", "factor": s,
        ...}``; None or ``{"type": "none"}``: plain RoPE) on top of the current base, optionally with a
        new maximum length. ValueError for a bad table, changing nothing. ``config.rope_scaling``
        records the checked table so checkpoints keep it."""
        spec = rope_scaling_spec(scaling)
        rope_frequencies(self.config.head_dim, self.config.rope_base, spec)  # ntk at head_dim 2
        if block_size is not None:
            self.set_rope_base(self.config.rope_base, block_size=block_size)
        self.config.rope_scaling = spec
        self.rotary.set_scaling(spec)

    def set_rope(self, base: float | None = None, scaling: dict | None = None):
        """What a phase of the built-in loop sets: its ``rope_base`` and ``rope_scaling``, where None
        keeps the current value (``{"type": "none"}`` turns a scaling off). Both are checked first."""
        if scaling is not None:
            rope_scaling_spec(scaling)
        if base is not None:
            self.set_rope_base(base)
        if scaling is not None:
            self.set_rope_scaling(scaling)

    # -- introspection ---------------------------------------------------------

    def activation_sites(self) -> list[str]:
        """Module names to hook: every HookPoint, then "final_norm" and "lm_head"."""
        sites = [name for name, m in self.named_modules() if isinstance(m, HookPoint)]
        return sites + ["final_norm", "lm_head"]

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count, a tied matrix counted once.

        ``non_embedding=True`` drops the token-embedding lookup table unless it
        is tied to ``lm_head`` (then it is a matmul weight and stays), as in
        nanoGPT; this is the N of the FLOP estimate.
        """
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.lm_head.weight is not self.tok_emb.weight:
            n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, 6N + 12 L H Q T (Chowdhery et al. 2022,
        PaLM, appendix B): 6N for the weight matmuls (forward + backward) and
        12 L H Q T for the attention score / value matmuls. Divide
        tokens/s * this by peak FLOP/s for MFU."""
        cfg = self.config
        N = self.num_params(non_embedding=True)
        return float(6 * N + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len)

    # -- optimizer -------------------------------------------------------------

    def configure_optimizer(self, weight_decay: float = 0.1, lr: float = 3e-4,
                            betas: tuple[float, float] = (0.9, 0.95), device_type: str = "cpu"):
        """AdamW with decay on 2-D weights (matmuls, embedding) only; norm gains
        and any 1-D params get none. ``named_parameters`` yields a tied matrix
        once, so it lands in exactly one group. Fused kernel on CUDA."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        extra = {}
        if device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters:
            extra["fused"] = True
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **extra)
