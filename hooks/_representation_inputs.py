"""RepresentationProbe's probe inputs: whatever the user gives -> a list of forward "jobs".

A probe batch is a (B, T) id tensor, an (x, y) pair, an object with .x/.y, a dict of keyword inputs for
HF-like models, or a dict domain -> one of those. ``_normalise_probe`` turns it into one ``_Input`` per
domain (token grid, targets = next token, valid positions); ``_build_jobs`` draws the fixed, seeded token
subsample and groups domains of equal tensor shape into one forward pass (``_Job``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

_HF_KEYS = ("input_ids", "inputs_embeds", "attention_mask")


@dataclass
class _Input:
    """One domain's probe input, normalised."""

    args: tuple
    kwargs: dict
    ids: Optional[torch.Tensor]  # (B, T) integer token ids, if any
    targets: Optional[torch.Tensor]  # token grid shape, next token, -1 = none
    features: Optional[torch.Tensor]  # float inputs (grid..., D) when there are no token ids
    valid: torch.Tensor  # bool, token grid shape

    @property
    def n(self) -> int:
        return self.valid.numel()


@dataclass
class _Job:
    """One forward pass: inputs plus the fixed rows (flat token positions) it contributes."""

    args: tuple
    kwargs: dict
    n_tokens: int  # flat positions in this forward's token grid
    rows: torch.Tensor  # (n,) long, flat positions into the grid
    domain: torch.Tensor  # (n,) long, domain index of each row
    x_label: Optional[torch.Tensor]  # (n,) current-token ids
    x_feat: Optional[torch.Tensor]  # (n, Din) float inputs
    y: Optional[torch.Tensor]  # (n,) next-token ids (-1 = none)


def _shift_targets(ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token of every position of a (B, T) id grid; the last position (and masked ones) get -1."""
    y = torch.full_like(ids, -1)
    y[..., :-1] = ids[..., 1:]
    if mask is not None:
        m = mask.bool()
        y[~m] = -1
        y[..., :-1][~m[..., 1:]] = -1
    return y


def _one_input(b: Any, skip_first: int) -> _Input:
    """Normalise one probe input: ids tensor, float tensor, (x, y), an object with .x/.y, or HF kwargs."""
    kwargs: dict = {}
    if isinstance(b, dict):
        kwargs = {k: v for k, v in b.items() if k != "labels"}
        ids = b.get("input_ids")
        mask = b.get("attention_mask")
        if ids is not None:
            targets = _shift_targets(ids, mask) if b.get("labels") is None else _shift_targets(b["labels"], mask)
            grid = ids.shape
        else:
            emb = b["inputs_embeds"]
            grid, targets = emb.shape[:-1], None
        valid = torch.ones(grid, dtype=torch.bool)
        if mask is not None:
            valid &= mask.bool().cpu()
        if targets is not None:
            valid &= targets.cpu() >= 0  # -1 (ours) and -100 (HF) mean "no target"
        features = None if ids is not None else b["inputs_embeds"]
        inp = _Input((), kwargs, None if ids is None else ids.cpu(), None if targets is None else targets.cpu(),
                     None if features is None else features.detach().cpu(), valid)
    else:
        if isinstance(b, (tuple, list)) and len(b) == 2:
            x, y = b
        elif hasattr(b, "x") and hasattr(b, "y"):
            x, y = b.x, b.y
        elif isinstance(b, torch.Tensor):
            x, y = b, None
        else:
            raise TypeError(f"cannot use {type(b).__name__} as a probe batch: give a (B, T) tensor of token ids, "
                            "an (x, y) pair, a dict of keyword inputs, or a dict domain -> one of those")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"probe input must be a tensor, got {type(x).__name__}")
        integer = not torch.is_floating_point(x) and not torch.is_complex(x)
        if integer:
            targets = _shift_targets(x) if y is None else y
            grid = x.shape
        else:
            targets, grid = y, x.shape[:-1]
        if targets is not None and tuple(targets.shape) != tuple(grid):
            raise ValueError(f"probe targets have shape {tuple(targets.shape)} but the token grid is {tuple(grid)}")
        valid = torch.ones(grid, dtype=torch.bool)
        if targets is not None:
            valid &= targets.cpu() >= 0
        inp = _Input((x,), {}, x.cpu() if integer else None, None if targets is None else targets.cpu(),
                     None if integer else x.detach().cpu(), valid)
    if skip_first and inp.valid.dim() >= 2 and inp.valid.shape[-1] > skip_first:
        inp.valid[..., :skip_first] = False  # first positions: attention-sink outliers
    return inp


def _normalise_probe(probe_batch: Any, skip_first: int) -> dict[Optional[str], _Input]:
    if isinstance(probe_batch, dict) and not any(k in probe_batch for k in _HF_KEYS):
        if not probe_batch:
            raise ValueError("the probe batch dict is empty")
        return {str(k).replace("/", "_"): _one_input(v, skip_first) for k, v in probe_batch.items()}
    return {None: _one_input(probe_batch, skip_first)}


def _build_jobs(inputs: dict[Optional[str], _Input], max_tokens: int, seed: int) -> list[_Job]:
    """Fixed token subsample (seeded, sorted) per domain; domains of equal tensor shape share a forward."""
    names = list(inputs)
    quota = [max_tokens // len(names) + (1 if i < max_tokens % len(names) else 0) for i in range(len(names))]
    chosen = []
    for i, (name, inp) in enumerate(inputs.items()):
        pos = inp.valid.reshape(-1).nonzero().squeeze(1)
        if pos.numel() == 0:
            raise ValueError(f"probe batch{'' if name is None else f' of domain {name!r}'} has no usable token")
        g = torch.Generator().manual_seed(seed + 7919 * i)
        take = pos[torch.randperm(pos.numel(), generator=g)[: quota[i]]].sort().values
        chosen.append(take)
    # group domains that can be concatenated along the batch dim into one forward
    groups: list[list[int]] = []
    for i, name in enumerate(names):
        inp = inputs[name]
        for grp in groups:
            ref = inputs[names[grp[0]]]
            if (not inp.kwargs and not ref.kwargs and len(inp.args) == 1 and len(ref.args) == 1
                    and inp.args[0].shape[1:] == ref.args[0].shape[1:] and inp.args[0].dtype == ref.args[0].dtype):
                grp.append(i)
                break
        else:
            groups.append([i])
    jobs = []
    for grp in groups:
        rows, dom, xl, xf, ys, offset = [], [], [], [], [], 0
        for i in grp:
            inp, take = inputs[names[i]], chosen[i]
            rows.append(take + offset)
            dom.append(torch.full_like(take, i))
            if inp.ids is not None:
                xl.append(inp.ids.reshape(-1)[take])
            if inp.features is not None:
                xf.append(inp.features.reshape(inp.n, -1)[take])
            ys.append(inp.targets.reshape(-1)[take] if inp.targets is not None else torch.full_like(take, -1))
            offset += inp.n
        first = inputs[names[grp[0]]]
        args = (torch.cat([inputs[names[i]].args[0] for i in grp]),) if len(grp) > 1 else first.args
        has_y = any(inputs[names[i]].targets is not None for i in grp)
        jobs.append(_Job(args, first.kwargs, offset, torch.cat(rows), torch.cat(dom),
                         torch.cat(xl) if len(xl) == len(grp) else None,
                         torch.cat(xf).double() if len(xf) == len(grp) else None,
                         torch.cat(ys).long() if has_y else None))
    return jobs
