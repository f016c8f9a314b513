"""DifficultyTracker's probe scoring: a model's per-sequence loss and EL2N on fixed token sequences.

    loss, el2n = score_sequences(model, tokens)   # tokens (N, T+1): x = tokens[:, :-1], y = tokens[:, 1:]

No gradients, eval mode (the model's mode is restored, also on error), sequences in chunks of
``batch_size`` on the model's device, bf16 autocast on CUDA by default; the math is
``diagnostics.difficulty.sequence_scores``.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from diagnostics.difficulty import sequence_scores


def _logits(out):
    """Logits from a model's output: a tensor, a (logits, ...) tuple, or an object with .logits."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return getattr(out, "logits", out)


@torch.no_grad()
def _score(model, tokens: torch.Tensor, batch_size: int, autocast: bool | None,
           ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    p = next(iter(model.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    use_amp = autocast if autocast is not None else device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_amp else contextlib.nullcontext()
    losses, el2n = [], []
    for i in range(0, len(tokens), batch_size):
        chunk = tokens[i:i + batch_size].to(device)
        x, y = chunk[:, :-1], chunk[:, 1:]  # (b, T) each
        with amp:
            logits = _logits(model(x))  # (b, T, V)
        loss, e, _ = sequence_scores(logits, y, ignore_index=ignore_index, el2n=True)
        losses.append(loss.cpu())
        el2n.append(e.cpu())
    return torch.cat(losses).double().numpy(), torch.cat(el2n).double().numpy()


def score_sequences(model, tokens: torch.Tensor, batch_size: int = 32, autocast: bool | None = None,
                    ignore_index: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Per-sequence mean token loss (N,) and EL2N (N,), float64, of ``model`` on ``tokens`` (N, T+1)
    in eval mode under no_grad; the model's training mode is restored afterwards."""
    was = model.training
    model.eval()
    try:
        return _score(model, tokens, batch_size, autocast, ignore_index)
    finally:
        model.train(was)
