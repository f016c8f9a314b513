"""The retrieval probe's math: random keys planted in held-out text, and the retrieval gain.

Layout of one context of length L with a key of K tokens at depth d (0-based positions)::

    [ held-out text ........ | key (planted) | text ........ | key (repeated) ]
                              L-K-d .. L-d-1                   L-K .. L-1

The repeated key fills the last K positions; its planted copy starts d positions earlier, so every
repeated key token has its copy exactly d tokens back (d >= K: the copies do not overlap;
d <= L - K: the planted key starts inside the context). In the *unplanted* context the planted span
holds other random tokens (each differs from the key token it replaces) and all else is equal.

The loss of a context is the mean cross-entropy of the repeated key's tokens 2..K (its first token
has nothing to announce it and is left out), each predicted from the positions before it: the
logits at positions L-K .. L-2. The retrieval gain at (L, d) is the mean unplanted loss minus the
mean planted loss over the keys (nats): 0 for a model that does not use the context d tokens back,
up to the unplanted loss for one that copies the key perfectly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def check_depths(length: int, key_len: int, depths) -> list[int]:
    """The depths (ints, sorted, unique) that fit a context of ``length`` for a key of ``key_len``
    tokens: ``key_len <= d <= length - key_len``; ValueError for a depth < key_len (the copies would
    overlap) or a non-integer one. Depths > length - key_len are left out (they do not fit)."""
    out = set()
    for d in depths:
        if isinstance(d, bool) or int(d) != d:
            raise ValueError(f"depth {d!r} is not an integer number of tokens")
        d = int(d)
        if d < key_len:
            raise ValueError(f"depth {d} is smaller than the key ({key_len} tokens): the planted key and its "
                             f"repeat would overlap; use depths >= key_len")
        if d <= length - key_len:
            out.add(d)
    return sorted(out)


def draw_keys(n_keys: int, key_len: int, pool: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, others), each (n_keys, key_len) long: key tokens drawn uniformly from ``pool`` (1-D
    token ids, at least two distinct) with a generator seeded by ``seed``, and the tokens that replace
    the planted key in the unplanted contexts: also from ``pool``, each different from the key token
    at the same place."""
    pool = torch.unique(pool.reshape(-1).long())
    if pool.numel() < 2:
        raise ValueError(f"keys need a pool of at least 2 distinct token ids, got {pool.numel()}")
    if n_keys < 1 or key_len < 2:
        raise ValueError(f"need n_keys >= 1 and key_len >= 2, got {n_keys} and {key_len}")
    g = torch.Generator().manual_seed(int(seed))
    n = pool.numel()
    ki = torch.randint(0, n, (n_keys, key_len), generator=g)
    shift = torch.randint(1, n, (n_keys, key_len), generator=g)  # never 0: another token of the pool
    return pool[ki], pool[(ki + shift) % n]


def plant_keys(contexts: torch.Tensor, keys: torch.Tensor, others: torch.Tensor, depths) -> torch.Tensor:
    """The probe's inputs, (2, n_depths, n_keys, L) long: ``[0]`` planted, ``[1]`` unplanted.

    contexts: (n_keys, L) held-out token ids (context i carries key i); keys, others: (n_keys, K);
    depths: each with K <= d <= L - K (``check_depths``). The last K positions hold the key in both."""
    n, L = contexts.shape
    K = keys.shape[1]
    if keys.shape != (n, K) or others.shape != (n, K):
        raise ValueError(f"keys {tuple(keys.shape)} and others {tuple(others.shape)} must be ({n}, K) for "
                         f"{n} contexts")
    x = contexts.long().reshape(1, 1, n, L).repeat(2, len(depths), 1, 1)
    x[:, :, :, L - K:] = keys
    for i, d in enumerate(depths):
        if not K <= d <= L - K:
            raise ValueError(f"depth {d} does not fit a context of {L} tokens with a key of {K}")
        x[0, i, :, L - K - d:L - d] = keys
        x[1, i, :, L - K - d:L - d] = others
    return x


def key_logits(logits: torch.Tensor, key_len: int) -> torch.Tensor:
    """The logits that predict the repeated key's tokens 2..K: positions L-K .. L-2 of (..., L, V)."""
    L = logits.shape[-2]
    return logits[..., L - key_len:L - 1, :]


def repeated_key_loss(logits_at_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats; float32, float64 for float64 logits) of key tokens 2..K per context: logits_at_keys
    (..., n_keys, K-1, V) from ``key_logits``, keys (n_keys, K) -> (..., n_keys)."""
    target = keys[:, 1:].to(logits_at_keys.device)
    z = logits_at_keys if logits_at_keys.dtype == torch.float64 else logits_at_keys.float()
    logp = F.log_softmax(z, dim=-1)
    nll = -logp.gather(-1, target.expand(*logp.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    return nll.mean(-1)


def retrieval_gain(losses: torch.Tensor) -> dict[str, torch.Tensor]:
    """From per-context losses (2, n_depths, n_keys) ([0] planted, [1] unplanted): ``planted`` and
    ``unplanted`` (n_depths,) means over the keys, and ``gain`` = unplanted - planted (nats)."""
    planted, unplanted = losses[0].double().mean(-1), losses[1].double().mean(-1)
    return {"planted": planted, "unplanted": unplanted, "gain": unplanted - planted}
