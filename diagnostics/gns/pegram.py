"""Per-example gradient Gram matrices, exact, and their sums over groups of examples (domains).

``pegrad`` gives each example's squared gradient norm ``|g_i|^2``: the diagonal of the Gram
matrix ``K_ij = <g_i, g_j>``. The whole matrix (B x B per micro-batch, tiny) is what the norm of
any *sum* of per-example gradients needs, so it answers a question asked only after the backward:
which examples belong together. With examples grouped into domains, the gradient summed over
domain d, ``S_d = sum_{i in d} g_i``, has

    |S_d|^2 = sum_{i, j in d} K_ij          (the domain's block of K)                    (7)

which, with ``sum_{i in d} K_ii``, gives the per-domain unbiased ``|G_d|^2`` and ``tr(Sigma_d)``
(``diagnostics.gns.grouped_estimates``). Same notation as ``pegrad``: ``A`` (B, T, Din) the layer
input, ``G`` (B, T, Dout) the gradient of its output, ``ids`` (B, T).

Per layer kind (the off-diagonal analogues of pegrad's eqs. (2), (4)-(6)):

    linear     K_ij = <G_i^T A_i, G_j^T A_j> = sum_{t,s} (a_it . a_js)(g_it . g_js)
               "ghost": two (BT x BT) Grams, O((BT)^2 (Din + Dout)); "materialize": the per-example
               gradients (B, Din Dout) then their Gram, O(B T Din Dout + B^2 Din Dout). ``auto``
               picks the cheaper. Against the per-example norms alone (pegrad) the extra cost is
               B^2 Din Dout (materialised: one more small GEMM, at most B/T of the weight
               gradient's) or a factor B (ghost).
    embedding  K_ij = sum_{t,s} [x_it == x_js] (g_it . g_js): rows scattered into a dense
               (B, V, D) table when it fits, else the same-token mask on the (BT x BT) Gram.
    vector     (norm gain / bias, per-example (B, F) gradients) K = V V^T.
    tied       a matrix used as embedding (E_i) and as a linear head (H_i):
               K = K_E + K_H + C + C^T, C_ij = <E_i, H_j> = sum_t g^emb_it . H_j[x_it].

Everything is float32 (float64 if an input is), chunked so no temporary exceeds ``max_elements``.
"""

from __future__ import annotations

import torch

from diagnostics.gns.pegrad import (DEFAULT_MAX_ELEMENTS, accumulation_dtype, flatten_ids, flatten_positions,
                                    linear_grads)

__all__ = ["linear_gram", "embedding_gram", "vector_gram", "tied_cross_gram", "choose_gram_method",
           "group_block_sums"]


def choose_gram_method(B: int, T: int, d_in: int, d_out: int) -> str:
    """"ghost" when (BT)^2 (Din + Dout) < B T Din Dout + B^2 Din Dout, else "materialize"."""
    ghost = (B * T) ** 2 * (d_in + d_out)
    mat = B * T * d_in * d_out + B * B * d_in * d_out
    return "ghost" if ghost < mat else "materialize"


def _rows(B: int, per_row: int, max_elements: int):
    step = max(1, int(max_elements) // max(1, int(per_row)))
    return [slice(b, min(B, b + step)) for b in range(0, B, step)]


def linear_gram(A: torch.Tensor, G: torch.Tensor, *, method: str = "auto",
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """(B, B) Gram of the per-example weight gradients ``sum_t g_t a_t^T`` of a linear layer."""
    a, g = flatten_positions(A), flatten_positions(G)
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"A {tuple(A.shape)} and G {tuple(G.shape)} disagree on batch/positions")
    B, T, d_in = a.shape
    d_out = g.shape[2]
    if method == "auto":
        method = choose_gram_method(B, T, d_in, d_out)
    dt = accumulation_dtype(A, G)
    a, g = a.to(dt), g.to(dt)
    if method == "materialize":
        P = linear_grads(a, g).flatten(1) if B * d_in * d_out <= max_elements else None
        if P is not None:
            return P @ P.T
        out = torch.empty(B, B, dtype=dt, device=a.device)
        sl = _rows(B, d_in * d_out, max_elements // 2)
        for s1 in sl:                                       # pairs of chunks: recompute, bounded memory
            P1 = linear_grads(a[s1], g[s1]).flatten(1)
            for s2 in sl:
                P2 = P1 if s2 == s1 else linear_grads(a[s2], g[s2]).flatten(1)
                out[s1, s2] = P1 @ P2.T
        return out
    if method != "ghost":
        raise ValueError(f"method must be 'ghost', 'materialize' or 'auto', got {method!r}")
    af, gf = a.reshape(B * T, d_in), g.reshape(B * T, d_out)
    out = torch.empty(B, B, dtype=dt, device=a.device)
    for s in _rows(B, 2 * T * B * T, max_elements):        # example rows s against every example
        rows = slice(s.start * T, s.stop * T)
        k = (af[rows] @ af.T) * (gf[rows] @ gf.T)          # (bT, BT)
        out[s] = k.reshape(s.stop - s.start, T, B, T).sum((1, 3))
    return out


def embedding_gram(ids: torch.Tensor, G: torch.Tensor, num_embeddings: int | None = None, *,
                   padding_idx: int | None = None, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """(B, B) Gram of the per-example embedding-table gradients (rows ``ids``, values ``G``)."""
    x = flatten_ids(ids)
    g = flatten_positions(G)
    if x.shape != g.shape[:2]:
        raise ValueError(f"ids {tuple(ids.shape)} and G {tuple(G.shape)} disagree on batch/positions")
    B, T, D = g.shape
    dt = accumulation_dtype(G)
    g = g.to(dt)
    if padding_idx is not None:
        g = g * (x != padding_idx).unsqueeze(-1).to(dt)
    V = int(num_embeddings) if num_embeddings is not None else int(x.max().item()) + 1
    if B * V * D <= max_elements:           # dense per-example tables, then their Gram
        key = (x + torch.arange(B, device=x.device).unsqueeze(1) * V).reshape(-1)
        rows = torch.zeros(B * V, D, dtype=dt, device=g.device).index_add_(0, key, g.reshape(-1, D))
        P = rows.view(B, V * D)
        return P @ P.T
    xf, gf = x.reshape(-1), g.reshape(B * T, D)
    out = torch.empty(B, B, dtype=dt, device=g.device)
    for s in _rows(B, 2 * T * B * T, max_elements):
        rows = slice(s.start * T, s.stop * T)
        k = (gf[rows] @ gf.T) * (xf[rows].unsqueeze(1) == xf.unsqueeze(0))
        out[s] = k.reshape(s.stop - s.start, T, B, T).sum((1, 3))
    return out


def vector_gram(V: torch.Tensor) -> torch.Tensor:
    """(B, B) Gram of per-example vector gradients V (B, F) (norm gains, biases)."""
    V = V.reshape(V.shape[0], -1)
    return V @ V.T


def tied_cross_gram(ids: torch.Tensor, G_emb: torch.Tensor, A_head: torch.Tensor, G_head: torch.Tensor, *,
                    padding_idx: int | None = None) -> torch.Tensor:
    """C_ij = <E_i, H_j> for a matrix used as an embedding (ids, G_emb) and a linear head
    (A_head, G_head): C_ij = sum_t g^emb_it . H_j[x_it], H_j[v] = sum_s G_head[j, s, v] a_js.
    (B, B); the tied parameter's Gram is K_E + K_H + C + C^T."""
    x = flatten_ids(ids)                                       # (B, T)
    ge = flatten_positions(G_emb)                              # (B, T, D)
    a, gh = flatten_positions(A_head), flatten_positions(G_head)   # (B, S, D), (B, S, V)
    dt = accumulation_dtype(G_emb, A_head, G_head)
    B, T = x.shape
    ge = ge.to(dt)
    if padding_idx is not None:
        ge = ge * (x != padding_idx).unsqueeze(-1).to(dt)
    xf, gef = x.reshape(-1), ge.reshape(B * T, -1)
    out = torch.empty(B, B, dtype=dt, device=ge.device)
    for j in range(B):                                          # H_j's rows at every example's tokens
        rows = gh[j].to(dt)[:, xf].T @ a[j].to(dt)              # (BT, D) = H_j[x_it]
        out[:, j] = (gef * rows).sum(1).reshape(B, T).sum(1)
    return out


def group_block_sums(K: torch.Tensor, groups: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Per group d: (sum_{i,j in d} K_ij = |S_d|^2 (eq. 7), sum_{i in d} K_ii, examples n_d),
    each (n_groups,). ``groups``: (B,) long group index of each example (on K's device)."""
    M = torch.nn.functional.one_hot(groups.long(), n_groups).to(K.dtype)   # (B, D)
    tot = ((M.T @ K) * M.T).sum(1)
    diag = M.T @ torch.diagonal(K)
    return tot, diag, M.sum(0)
