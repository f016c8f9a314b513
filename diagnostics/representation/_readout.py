"""Readout of the next token from a layer: the logit lens through the model's own head, and a small
fitted softmax probe (docs/representation.md, "Readout").

    from diagnostics.representation import readout_loss
    readout_loss(hidden, targets, model.lm_head.weight, norm=model.final_norm)   # nats
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from diagnostics.representation._linalg import _as_matrix64, _as_tensor

__all__ = ["readout_loss", "ProbeResult", "fit_linear_probe"]


@torch.no_grad()
def readout_loss(
    hidden: Any,
    targets: Any,
    head_weight: Any,
    norm: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    head_bias: Any = None,
    ignore_index: int = -1,
    chunk_size: int = 1024,
    reduction: str = "mean",
) -> float | torch.Tensor:
    """Logit-lens cross-entropy (nats, mean over non-ignored tokens) of reading targets off hidden states.

    logits = norm(hidden) @ head_weight^T (+ head_bias), loss = CE(logits, targets): the loss the model
    would have if this layer's residual stream went straight into its own final norm and unembedding
    (nostalgebraist 2020, "logit lens"). hidden (N, D) (or (..., D)), targets (N,) (or (...)),
    head_weight (V, D); norm is e.g. model.final_norm (None = identity). Logits are computed in float32
    (float64 if hidden is float64) in chunks of rows, so (N, V) never sits in memory at once.
    reduction="none" returns the (N,) per-token losses instead (float64, on hidden's device; 0 where
    the target is ignored), e.g. to pool them by domain.
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    h = _as_tensor(hidden)
    h = h.reshape(-1, h.shape[-1])  # (N, D)
    y = _as_tensor(targets).reshape(-1).to(device=h.device, dtype=torch.long)  # (N,)
    dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    W = _as_tensor(head_weight).to(device=h.device, dtype=dtype)  # (V, D)
    b = None if head_bias is None else _as_tensor(head_bias).to(device=h.device, dtype=dtype)
    total, count, per_token = 0.0, 0, []
    for s in range(0, h.shape[0], chunk_size):
        hc = h[s : s + chunk_size]
        if norm is not None:
            hc = norm(hc)
        logits = F.linear(hc.to(dtype), W, b)  # (c, V)
        yc = y[s : s + chunk_size]
        if reduction == "none":
            per_token.append(F.cross_entropy(logits, yc, ignore_index=ignore_index, reduction="none").double())
            continue
        total += float(F.cross_entropy(logits, yc, ignore_index=ignore_index, reduction="sum"))
        count += int((yc != ignore_index).sum())
    if reduction == "none":
        return torch.cat(per_token) if per_token else torch.zeros(0, dtype=torch.float64, device=h.device)
    return total / count if count else float("nan")


@dataclass
class ProbeResult:
    """Outcome of fit_linear_probe; losses in nats."""

    val_loss: float        # held-out cross-entropy, the number to log
    train_loss: float      # cross-entropy on the probe's training split (no weight-decay term)
    val_accuracy: float
    n_train: int
    n_val: int
    n_classes: int         # distinct targets in the probe set (the probe's output size)
    n_features: int        # feature dims after the optional PCA projection

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_linear_probe(
    hidden: Any,
    targets: Any,
    val_fraction: float = 0.25,
    weight_decay: float = 1e-2,
    max_iter: int = 100,
    max_dim: Optional[int] = 256,
    seed: int = 0,
    ignore_index: int = -1,
) -> ProbeResult:
    """Softmax-regression probe predicting targets from hidden states; returns the held-out CE (nats).

    Deliberately small and deterministic (cf. Alain & Bengio 2016, linear classifier probes):
      - tokens with target == ignore_index are dropped; a seeded random split keeps val_fraction held out;
      - features are centred, projected on the top max_dim principal components of the training split
        (None = keep all) and scaled to unit variance, all with training statistics only;
      - classes are the distinct targets of the whole probe set (train + val), so a held-out token whose
        target never occurs in training is still scored (it is just hard): the loss is comparable across
        layers for a fixed probe set, not with the model's full-vocabulary loss;
      - mean CE + weight_decay/2 |W|^2 is minimised by full-batch L-BFGS (strong Wolfe), max_iter
        iterations, in float32 on CPU. Cost ~ max_iter * N * max_dim * n_classes flops.
    The held-out CE depends on weight_decay (on standardised features, 1e-2 was the best of
    1e-3..3e-1 on a synthetic softmax task; 1e-3 overfits badly when n_classes * max_dim ~ N), so
    compare layers and steps at fixed settings; it over-estimates the best linear readout loss.
    """
    h = _as_matrix64(hidden).cpu()
    y = _as_tensor(targets).reshape(-1).cpu().long()
    if y.shape[0] != h.shape[0]:
        raise ValueError(f"hidden has {h.shape[0]} rows but targets has {y.shape[0]}")
    keep = y != ignore_index
    h, y = h[keep], y[keep]
    N = h.shape[0]
    n_val = int(round(N * val_fraction))
    if n_val < 1 or N - n_val < 2:
        raise ValueError(f"need at least 2 training and 1 validation token, got N={N}, val_fraction={val_fraction}")
    classes, y = torch.unique(y, return_inverse=True)  # labels -> 0..C-1
    C = classes.numel()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(N, generator=g)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]

    # features from training statistics only (float64), then float32 for the optimiser
    htr = h[tr_idx]
    mean = htr.mean(dim=0, keepdim=True)
    if max_dim is not None and max_dim < h.shape[1]:
        _, _, Vh = torch.linalg.svd(htr - mean, full_matrices=False)
        P = Vh[:max_dim].T  # (D, k)
    else:
        P = torch.eye(h.shape[1], dtype=h.dtype)
    feats = (h - mean) @ P  # (N, k)
    std = feats[tr_idx].std(dim=0, keepdim=True)
    feats = (feats / torch.where(std > 0, std, torch.ones_like(std))).float()
    xtr, ytr, xva, yva = feats[tr_idx], y[tr_idx], feats[val_idx], y[val_idx]

    k = feats.shape[1]
    W = torch.zeros(C, k, requires_grad=True)
    b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(xtr, W, b), ytr) + 0.5 * weight_decay * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        logits_va = F.linear(xva, W, b)
        val_loss = float(F.cross_entropy(logits_va, yva))
        train_loss = float(F.cross_entropy(F.linear(xtr, W, b), ytr))
        val_acc = float((logits_va.argmax(dim=1) == yva).float().mean())
    return ProbeResult(val_loss, train_loss, val_acc, N - n_val, n_val, C, k)

