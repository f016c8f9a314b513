"""Evaluation of the built-in loop: the fixed validation set and the per-domain validation loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midtrain import data as data_mod
from midtrain.config import TrainConfig


def val_batches(cfg: TrainConfig, corpus) -> dict[str, list]:
    """The fixed evaluation set: ``eval_batches`` validation batches per domain at the first phase's seq_len."""
    eval_seq = cfg.phases[0].seq_len
    return {d: data_mod.val_batches(corpus, d, eval_seq, cfg.data.eval_batch_size, cfg.data.eval_batches)
            for d in corpus.names()}


@torch.no_grad()
def evaluate(model, val: dict[str, list], device, autocast) -> dict[str, float]:
    """Token-weighted mean val loss per domain: ``{"val/<domain>/loss": float}``."""
    was_training = model.training
    model.eval()
    out = {}
    for name, batches in val.items():
        tot, n = 0.0, 0
        for b in batches:
            b = b.to(device)
            with autocast:
                logits, _ = model(b.x)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), b.y.reshape(-1), ignore_index=-1, reduction="sum")
            tot += loss.item()
            n += int((b.y != -1).sum())
        out[f"val/{name}/loss"] = tot / max(1, n)
    model.train(was_training)
    return out
