"""Per-example gradient squared norms, exact, without materialising per-example gradients
(unless that is the cheaper way).

Pure functions on tensors: each takes what a layer saw in the forward pass (its input ``A``, or
token ``ids``, or the normalised input ``xhat``) and the gradient ``G`` of the loss with respect to
the layer's output, both with a leading batch dimension, and returns one squared Frobenius norm per
example, shape ``(B,)``. ``hooks.per_example.PerExampleGradNorms`` gathers those inputs during an
ordinary backward pass; nothing here knows about hooks or models.

Notation: ``B`` examples, ``T`` positions per example (any middle dimensions are flattened into
``T``), ``A`` (B, T, Din), ``G`` (B, T, Dout). For a linear layer y_t = W a_t + b the gradient of
example b's loss is a sum of outer products over its positions (Goodfellow 2015, "Efficient
per-example gradient computations", arXiv 1510.01799, eq. 3):

    dL_b/dW = sum_t g_t a_t^T                                                         (1)
    ||dL_b/dW||_F^2 = sum_{t,s} (a_t . a_s) (g_t . g_s)                                (2)
    ||dL_b/db||^2   = ||sum_t g_t||^2                                                  (3)

Eq. (2) is the "ghost norm" (Li, Tramer, Liang, Hashimoto 2022, arXiv 2110.05679, "ghost
clipping"): two T x T Gram matrices, cost O(B T^2 (Din + Dout)), memory O(B T^2). Materialising (1)
costs O(B T Din Dout) and memory O(B Din Dout). Which is cheaper depends on T versus
Din Dout / (Din + Dout); ``method="auto"`` picks the cheaper (Gray et al. 2024, arXiv 2411.00999,
make the same comparison for per-example norms computed alongside the backward pass, and show that
the normalisation-layer norms alone, eq. (5) below, already predict the gradient noise scale).

An embedding lookup e_t = E[x_t] scatters g_t into row x_t, so repeated tokens add before squaring:

    ||dL_b/dE||_F^2 = sum_{t,s} [x_t == x_s] (g_t . g_s) = sum_v ||sum_{t: x_t = v} g_t||^2   (4)

Elementwise-affine normalisation y_t = xhat_t * w + c (LayerNorm, RMSNorm):

    dL_b/dw = sum_t g_t * xhat_t,      dL_b/dc = sum_t g_t                             (5)

A matrix tied between the embedding and the output head (``lm_head.weight is tok_emb.weight``)
is one parameter: its per-example gradient is E_b + H_b (embedding part (4), head part (1)), so

    ||E_b + H_b||^2 = ||E_b||^2 + ||H_b||^2 + 2 <E_b, H_b>,
    <E_b, H_b> = sum_t g^emb_t . H_b[x_t] = sum_{t,s} G^head[b, s, x_t] (g^emb_t . a_s)          (6)

Loss scaling. These functions return the squared norm of whatever gradient reached the layer. If
the loss that was backpropagated is ``sum_i c * loss_i`` (``c = 1/B`` for a mean over the batch,
``1/(B n_micro)`` under gradient accumulation, times a GradScaler's scale), every example's gradient
is ``c`` times the gradient of its own loss, and every squared norm is ``c^2`` times too.
``rescale_sq_norms(sq, loss_scale=c)`` returns the convention used throughout midtrain: the squared
norm of the per-example gradient of the per-example loss, ``||grad loss_i||^2``.

Quick check (a second on a CPU)::

    >>> import torch
    >>> from diagnostics.pegrad import linear_sq_norms
    >>> A, G = torch.randn(4, 8, 16), torch.randn(4, 8, 32)       # (B, T, Din), (B, T, Dout)
    >>> ref = torch.einsum("bto,bti->boi", G, A).pow(2).sum((1, 2))  # materialised eq. (1)
    >>> bool(torch.allclose(linear_sq_norms(A, G, method="ghost"), ref, rtol=1e-4))
    True
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "accumulation_dtype",
    "flatten_positions",
    "flatten_ids",
    "linear_costs",
    "choose_linear_method",
    "linear_sq_norms",
    "bias_sq_norms",
    "embedding_sq_norms",
    "rms_normalize",
    "layer_normalize",
    "norm_weight_grads",
    "norm_gain_grads",
    "norm_gain_grads_from_output",
    "bias_grads",
    "rmsnorm_sq_norms",
    "layernorm_sq_norms",
    "linear_grads",
    "linear_weight_grad_and_sq_norms",
    "add_embedding_grads",
    "linear_grad_rows",
    "tied_embedding_head_cross",
    "tied_embedding_head_sq_norms",
    "rescale_sq_norms",
]

# Largest temporary (elements) one chunk of examples may allocate: 2^25 float32 = 128 MiB.
DEFAULT_MAX_ELEMENTS = 1 << 25

# Up to this many positions the (t, s) same-token Gram of eq. (4) beats sort + scatter on CPU.
_EMBEDDING_GRAM_MAX_T = 16


# ----------------------------------------------------------------------------------------------
# shapes and precision


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 when an input already is (bf16/fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def flatten_positions(x: torch.Tensor, feature_dims: int = 1) -> torch.Tensor:
    """(B, ..., *F) -> (B, T, prod(F)); a (B, *F) input becomes (B, 1, prod(F))."""
    if x.dim() < 1 + feature_dims:
        raise ValueError(f"expected a leading batch dimension and {feature_dims} feature dim(s), "
                         f"got shape {tuple(x.shape)}")
    B = x.shape[0]
    F = 1
    for d in x.shape[x.dim() - feature_dims:]:
        F *= d
    return x.reshape(B, -1, F)


def flatten_ids(ids: torch.Tensor) -> torch.Tensor:
    """(B, ...) token ids -> (B, T); (B,) -> (B, 1)."""
    return ids.reshape(ids.shape[0], -1)


def _chunks(B: int, per_example: int, max_elements: int):
    """Batch slices whose temporaries (``per_example`` elements each) fit in ``max_elements``."""
    step = max(1, int(max_elements) // max(1, int(per_example)))
    for b0 in range(0, B, step):
        yield slice(b0, min(B, b0 + step))


# ----------------------------------------------------------------------------------------------
# linear layers, eqs. (1)-(3)


def linear_costs(T: int, d_in: int, d_out: int) -> dict[str, int]:
    """Multiply-adds per example of the two exact forms: ghost eq. (2) vs materialised eq. (1)."""
    return {"ghost": T * T * (d_in + d_out), "materialize": T * d_in * d_out}


def choose_linear_method(T: int, d_in: int, d_out: int) -> str:
    """"ghost" when T (Din + Dout) < Din Dout, else "materialize" (Li et al. 2022)."""
    c = linear_costs(T, d_in, d_out)
    return "ghost" if c["ghost"] < c["materialize"] else "materialize"


def bias_sq_norms(G: torch.Tensor) -> torch.Tensor:
    """Eq. (3): ||sum_t g_t||^2 per example. G: (B, ..., Dout) -> (B,)."""
    return bias_grads(G).pow(2).sum(1)  # (B,)


def linear_sq_norms(A: torch.Tensor, G: torch.Tensor, *, bias: bool = False, method: str = "auto",
                    max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Squared Frobenius norm of each example's weight gradient sum_t g_t a_t^T (eqs. 1-2).

    A: (B, ..., Din) layer input; G: (B, ..., Dout) gradient w.r.t. the layer output (same middle
    dims). ``bias=True`` adds the bias term eq. (3) (the layer's whole per-example norm).
    ``method``: "ghost" (Gram form, Li et al. 2022), "materialize" (Goodfellow 2015) or "auto"
    (cheaper of the two, ``choose_linear_method``). Examples are processed in chunks so no
    temporary exceeds ``max_elements``. Returns (B,) in float32 (float64 if an input is).
    """
    a, g = flatten_positions(A), flatten_positions(G)  # (B, T, Din), (B, T, Dout)
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on batch/positions")
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if method == "auto":
        method = choose_linear_method(T, d_in, d_out)
    if method not in ("ghost", "materialize"):
        raise ValueError(f"method must be 'ghost', 'materialize' or 'auto', got {method!r}")
    dt = accumulation_dtype(A, G)
    if a.dtype != dt:
        a = a.to(dt)
    if g.dtype != dt:
        g = g.to(dt)

    def ghost(ac, gc):
        aa = torch.bmm(ac, ac.transpose(1, 2))  # (b, T, T)  a_t . a_s
        gg = torch.bmm(gc, gc.transpose(1, 2))  # (b, T, T)  g_t . g_s
        return torch.linalg.vecdot(aa.flatten(1), gg.flatten(1))  # sum_{t,s} eq. (2)

    def materialize(ac, gc):
        # (b, Din, Dout) = eq. (1) transposed: a^T g reads both operands in their stored
        # layout (one transposed GEMM flag), a little faster on CPU than g^T a
        w = torch.bmm(ac.transpose(1, 2), gc).flatten(1)
        return torch.linalg.vector_norm(w, dim=1).square()  # measured a little faster than vecdot

    f, per = (ghost, 2 * T * T) if method == "ghost" else (materialize, d_in * d_out)
    chunks = list(_chunks(B, per, max_elements))
    if len(chunks) == 1:  # the usual case: no output buffer, no slicing (each op costs here)
        out = f(a, g)
    else:
        out = torch.empty(B, dtype=dt, device=g.device)
        for sl in chunks:
            out[sl] = f(a[sl], g[sl])
    if bias:
        out = out + bias_sq_norms(G).to(dt)
    return out


# ----------------------------------------------------------------------------------------------
# embeddings, eq. (4)


def embedding_sq_norms(ids: torch.Tensor, G: torch.Tensor, num_embeddings: int | None = None, *,
                       padding_idx: int | None = None, method: str = "auto",
                       max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Squared norm of each example's embedding-table gradient (eq. 4). Repeated tokens of one
    example land in the same row, so their gradients are summed before squaring.

    ids: (B, ...) token ids; G: (B, ..., D) gradient w.r.t. the looked-up vectors.
    ``padding_idx``: positions with this id get no gradient (as ``nn.Embedding``).
    ``method``: "gram" (the (t, s) same-token mask times the G Gram, O(B T^2 D)), "scatter"
    (add rows into a dense (B, V, D) table when it fits in ``max_elements``, else sum rows per
    distinct (example, token) after a sort: O(B T D + B T log BT), memory O(B T D) however large
    the vocabulary), or "auto" ("gram" for T <= 16). ``num_embeddings`` only
    bounds the ids (computed from ``ids`` when omitted). Returns (B,).
    """
    x = flatten_ids(ids)  # (B, T)
    g = flatten_positions(G)  # (B, T, D)
    if x.shape != g.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} and G {tuple(G.shape)} disagree on batch/positions")
    B, T, D = g.shape
    dt = accumulation_dtype(G)
    if padding_idx is not None:
        g = g * (x != padding_idx).unsqueeze(-1).to(g.dtype)
    if method == "auto":
        method = "gram" if T <= _EMBEDDING_GRAM_MAX_T else "scatter"
    if method == "gram":
        out = torch.empty(B, dtype=dt, device=g.device)
        for sl in _chunks(B, 2 * T * T, max_elements):
            gc = g[sl].to(dt)
            gg = torch.bmm(gc, gc.transpose(1, 2))  # (b, T, T)
            same = x[sl].unsqueeze(2) == x[sl].unsqueeze(1)  # (b, T, T) [x_t == x_s]
            out[sl] = (gg * same).sum((1, 2))
        return out
    if method != "scatter":
        raise ValueError(f"method must be 'gram', 'scatter' or 'auto', got {method!r}")
    V = int(num_embeddings) if num_embeddings is not None else int(x.max().item()) + 1
    key = (x + torch.arange(B, device=x.device).unsqueeze(1) * V).reshape(-1)  # (B T,) example-major
    if B * V * D <= max_elements:  # small table: dense per-example scatter, no host sync
        rows = torch.zeros(B * V, D, dtype=dt, device=g.device)
        rows.index_add_(0, key, g.reshape(-1, D).to(dt))  # (B V, D)
        return rows.view(B, V * D).pow(2).sum(1)
    uniq, inverse = torch.unique(key, return_inverse=True)  # distinct (example, token) pairs
    rows = torch.zeros(uniq.numel(), D, dtype=dt, device=g.device)
    rows.index_add_(0, inverse, g.reshape(-1, D).to(dt))  # (U, D): sum_{t: x_t = v} g_t
    out = torch.zeros(B, dtype=dt, device=g.device)
    return out.index_add_(0, uniq // V, rows.pow(2).sum(1))


# ----------------------------------------------------------------------------------------------
# normalisation layers, eq. (5)


def rms_normalize(x: torch.Tensor, eps: float, feature_dims: int = 1) -> torch.Tensor:
    """xhat = x / sqrt(mean(x^2) + eps) over the last ``feature_dims`` dims (Zhang & Sennrich 2019)."""
    xf = x.to(accumulation_dtype(x))
    dims = tuple(range(x.dim() - feature_dims, x.dim()))
    return xf * torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + eps)


def layer_normalize(x: torch.Tensor, eps: float, feature_dims: int = 1) -> torch.Tensor:
    """xhat = (x - mean) / sqrt(var + eps), biased variance, as ``nn.LayerNorm`` (Ba et al. 2016)."""
    xf = x.to(accumulation_dtype(x))
    dims = tuple(range(x.dim() - feature_dims, x.dim()))
    mu = xf.mean(dims, keepdim=True)
    var = (xf - mu).pow(2).mean(dims, keepdim=True)
    return (xf - mu) * torch.rsqrt(var + eps)


def norm_gain_grads(x: torch.Tensor, G: torch.Tensor, eps: float, kind: str = "rmsnorm",
                    feature_dims: int = 1) -> torch.Tensor:
    """Eq. (5) from the norm's INPUT x: sum_t g_t * xhat_t -> (B, F).

    xhat comes from torch's fused ``rms_norm`` / ``layer_norm`` kernel (no weight), multiplied by
    G in place and summed over positions: three kernels in all. This runs inside the backward,
    where the training step has just evicted the caches, so the number of ops per call matters
    more than their FLOPs (docs/gns.md, Speed). ``kind``: "rmsnorm" or "layernorm". Same value as
    ``norm_weight_grads(rms_normalize(x), G)`` to float rounding.
    """
    if kind not in ("rmsnorm", "layernorm"):
        raise ValueError(f"kind must be 'rmsnorm' or 'layernorm', got {kind!r}")
    dt = accumulation_dtype(x, G)
    xf = flatten_positions(x, feature_dims)  # (B, T, F)
    g = flatten_positions(G, feature_dims)
    if xf.dtype != dt:
        xf = xf.to(dt)
    if g.dtype != dt:
        g = g.to(dt)
    norm = torch.nn.functional.rms_norm if kind == "rmsnorm" else torch.nn.functional.layer_norm
    return norm(xf, (xf.shape[2],), eps=eps).mul_(g).sum(1)  # (B, F)


def norm_gain_grads_from_output(y: torch.Tensor, G: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None, feature_dims: int = 1) -> torch.Tensor:
    """Eq. (5) from the norm's OUTPUT y = xhat * w (+ b): sum_t g_t * xhat_t = (sum_t g_t * y_t
    - b * sum_t g_t) / w -> (B, F).

    Exact up to float rounding (y / w = xhat (1 + delta), |delta| <= machine epsilon) when no
    entry of ``weight`` is zero or too small to divide by; the caller checks that. In the
    backward, y has just been read by the next layer's weight gradient (it is in cache) while
    the norm's input is not: two kernels on hot data instead of three on cold.
    """
    dt = accumulation_dtype(y, G)
    if y.dtype != dt:
        y = y.to(dt)
    if G.dtype != dt:
        G = G.to(dt)
    v = flatten_positions(G * y, feature_dims).sum(1)  # (B, F) sum_t g * y
    if bias is not None:
        v -= bias.reshape(-1) * flatten_positions(G, feature_dims).sum(1)
    return v.div_(weight.reshape(-1))


def norm_weight_grads(xhat: torch.Tensor, G: torch.Tensor, feature_dims: int = 1) -> torch.Tensor:
    """Per-example gradient of an elementwise gain, eq. (5): sum_t g_t * xhat_t -> (B, F).

    These are small enough to keep, which is why normalisation-layer per-example norms are
    nearly free (Gray et al. 2024). For a bias use ``bias_grads``.
    """
    dt = accumulation_dtype(xhat, G)
    return (flatten_positions(G, feature_dims).to(dt) * flatten_positions(xhat, feature_dims).to(dt)).sum(1)  # (B, F)


def bias_grads(G: torch.Tensor, feature_dims: int = 1) -> torch.Tensor:
    """Per-example gradient of a bias (linear or norm), eqs. (3) and (5): sum_t g_t -> (B, F)."""
    return flatten_positions(G, feature_dims).sum(1, dtype=accumulation_dtype(G))


def rmsnorm_sq_norms(xhat: torch.Tensor, G: torch.Tensor, feature_dims: int = 1) -> torch.Tensor:
    """||sum_t g_t * xhat_t||^2 per example for an RMSNorm gain (eq. 5). Returns (B,)."""
    return norm_weight_grads(xhat, G, feature_dims).pow(2).sum(1)


def layernorm_sq_norms(xhat: torch.Tensor, G: torch.Tensor, *, bias: bool = True,
                       feature_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm per-example squared norms (eq. 5): (gain (B,), bias (B,) or None)."""
    w = rmsnorm_sq_norms(xhat, G, feature_dims)
    b = bias_grads(G, feature_dims).pow(2).sum(1) if bias else None
    return w, b


# ----------------------------------------------------------------------------------------------
# tied embedding / output head, eq. (6)


def linear_grads(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Per-example weight gradients of a linear layer, eq. (1), materialised: (B, Dout, Din)."""
    a, g = flatten_positions(A), flatten_positions(G)
    dt = accumulation_dtype(A, G)
    return torch.bmm(g.to(dt).transpose(1, 2), a.to(dt))


def linear_weight_grad_and_sq_norms(A: torch.Tensor, G: torch.Tensor, *,
                                    max_elements: int = DEFAULT_MAX_ELEMENTS):
    """The batch weight gradient as the sum of the materialised per-example gradients, eq. (1),
    and their squared norms, from the same GEMMs (where per-example gradients are instantiated
    anyway, their sum is the batch gradient: the layerwise hybrid of Bu et al. 2023, "Differentially
    private optimization on large model at small cost", arXiv 2210.00038, does the same).

    Returns ``(dW, sq)``: ``dW`` (Dout, Din) = sum_b sum_t g_t a_t^T, which is what autograd's
    weight-gradient GEMM computes (mathematically equal; the float summation order differs: per
    example first, then over examples), and ``sq`` (B,) as ``linear_sq_norms(method="materialize")``.
    Where materialising is the cheaper exact form, this replaces autograd's weight GEMM instead of
    adding one. Same dtype in and out (float32 or float64 inputs expected); chunks of examples keep
    each temporary within ``max_elements``.
    """
    a, g = flatten_positions(A), flatten_positions(G)  # (B, T, Din), (B, T, Dout)
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on batch/positions")
    if a.dtype != g.dtype:
        raise ValueError(f"A and G must share a dtype (got {a.dtype} and {g.dtype})")
    B, _, d_in = a.shape
    d_out = g.shape[2]
    chunks = list(_chunks(B, d_in * d_out, max_elements))
    if len(chunks) == 1:  # the usual case: no buffers, no slicing
        per = torch.bmm(g.transpose(1, 2), a)  # (B, Dout, Din)
        return per.sum(0), torch.linalg.vector_norm(per.flatten(1), dim=1).square()
    dW = torch.zeros(d_out, d_in, dtype=a.dtype, device=a.device)
    sq = torch.empty(B, dtype=a.dtype, device=a.device)
    for sl in chunks:
        per = torch.bmm(g[sl].transpose(1, 2), a[sl])
        dW += per.sum(0)
        sq[sl] = torch.linalg.vector_norm(per.flatten(1), dim=1).square()
    return dW, sq


def add_embedding_grads(W: torch.Tensor, ids: torch.Tensor, G: torch.Tensor, *,
                        padding_idx: int | None = None) -> torch.Tensor:
    """W (B, V, D) += each example's embedding-table gradient (eq. 4), in place; returns W.

    With W = ``linear_grads`` of a tied output head, ``W.flatten(1)`` squared norms are
    ||E_b + H_b||^2 of eq. (6) directly, cross term included, when a (B, V, D) table is affordable.
    """
    x = flatten_ids(ids)  # (B, T)
    g = flatten_positions(G).to(W.dtype)  # (B, T, D)
    B, V, D = W.shape
    if padding_idx is not None:
        g = g * (x != padding_idx).unsqueeze(-1).to(g.dtype)
    key = (x + torch.arange(B, device=x.device).unsqueeze(1) * V).reshape(-1)
    W.view(B * V, D).index_add_(0, key, g.reshape(-1, D))
    return W


def linear_grad_rows(ids: torch.Tensor, A: torch.Tensor, G: torch.Tensor, *,
                     max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Rows ``ids`` of each example's linear weight gradient H_b = sum_s g_s a_s^T (eq. 1):

        P[b, t] = H_b[ids[b, t]] = sum_s G[b, s, ids[b, t]] a_s            -> (B, T, Din)

    Only the rows an example's own tokens select, so for a tied head this is O(B S T Din) instead
    of materialising the (V, Din) gradient. ids: (B, ...) indices into Dout; A: (B, S.., Din);
    G: (B, S.., Dout).
    """
    x = flatten_ids(ids)  # (B, T)
    a, g = flatten_positions(A), flatten_positions(G)  # (B, S, Din), (B, S, V)
    B, T = x.shape
    S = a.shape[1]
    dt = accumulation_dtype(A, G)
    out = torch.empty(B, T, a.shape[2], dtype=dt, device=a.device)
    for sl in _chunks(B, S * T, max_elements):
        b = x[sl].shape[0]
        gth = g[sl].gather(2, x[sl].unsqueeze(1).expand(b, S, T)).to(dt)  # (b, S, T) G[b,s,x_t]
        out[sl] = torch.bmm(gth.transpose(1, 2), a[sl].to(dt))  # (b, T, Din)
    return out


def tied_embedding_head_cross(ids: torch.Tensor, G_emb: torch.Tensor, A_head: torch.Tensor,
                              G_head: torch.Tensor, *, padding_idx: int | None = None,
                              max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """<E_b, H_b> of eq. (6) for a matrix used as embedding (ids, G_emb) and as the weight of a
    linear head (A_head, G_head). ids: (B, T); G_emb: (B, T, D); A_head: (B, S, D);
    G_head: (B, S, V). Returns (B,)."""
    P = linear_grad_rows(ids, A_head, G_head, max_elements=max_elements)  # (B, T, D)
    g = flatten_positions(G_emb).to(P.dtype)
    if padding_idx is not None:
        g = g * (flatten_ids(ids) != padding_idx).unsqueeze(-1).to(g.dtype)
    return (g * P).sum((1, 2))


def tied_embedding_head_sq_norms(ids, G_emb, A_head, G_head, num_embeddings: int | None = None, *,
                                 padding_idx: int | None = None, method: str = "auto",
                                 max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """||E_b + H_b||^2 for a tied embedding / head matrix, counted once (eq. 6). Returns (B,)."""
    emb = embedding_sq_norms(ids, G_emb, num_embeddings, padding_idx=padding_idx,
                             max_elements=max_elements)
    head = linear_sq_norms(A_head, G_head, method=method, max_elements=max_elements)
    cross = tied_embedding_head_cross(ids, G_emb, A_head, G_head, padding_idx=padding_idx,
                                      max_elements=max_elements)
    return emb + head.to(emb.dtype) + 2 * cross.to(emb.dtype)


# ----------------------------------------------------------------------------------------------
# loss scaling


def rescale_sq_norms(sq, loss_scale: float):
    """Undo the loss scaling: squared norms of the gradient of each example's own loss.

    ``loss_scale`` is the factor each example's loss carried in the backpropagated objective:
    ``1/B`` for ``loss.mean()`` over B examples (``model(x, y, reduction="mean")`` of midtrain's
    GPT when no target is ignored), ``1/(B n_micro)`` when micro-batch losses are also divided by
    the accumulation steps, multiplied by the GradScaler scale under AMP. Gradients are linear in
    the loss, so squared norms scale by ``loss_scale^2``: returns ``sq / loss_scale**2``.
    Works on tensors, numpy arrays and floats.
    """
    if loss_scale == 0:
        raise ValueError("loss_scale must be nonzero")
    return sq / (float(loss_scale) ** 2)
