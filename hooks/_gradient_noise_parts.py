"""Parts of ``hooks.gradient_noise``: the ``groups=`` argument and the per-example (B_small = 1) adapter.

``_group_fn`` turns the hook's ``groups=`` argument into a function ``(name, owner modules) ->
[group, ...]`` (default: ``hooks._per_example_groups.default_groups``, the classifier ``hooks.per_example``
uses too); ``_PerExample`` accumulates ``hooks.per_example`` norms per parameter over a step's
micro-batches.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from hooks._per_example_groups import default_groups


def _group_fn(groups) -> Callable[[str, list[nn.Module]], Iterable[str]] | None:
    if groups is True:
        return default_groups
    if groups is False or groups is None:
        return None
    if callable(groups):
        return lambda name, module: groups(name)
    if isinstance(groups, Mapping):
        pats = {g: re.compile(p) for g, p in groups.items()}
        return lambda name, module: [g for g, p in pats.items() if p.search(name)]
    raise ValueError(f"groups must be True, False, a callable name -> [group, ...] or a mapping "
                     f"group -> regex, got {type(groups).__name__}")


# ----------------------------------------------------------------------------------------------

class _PerExample:
    """B_small = 1 (Gray et al. 2024): per-example |g_i|^2 from hooks.per_example, summed per parameter.

    ``acc[p] = sum_i |g_{i,p}|^2`` over this step's examples, where g_i is example i's gradient of
    (its loss / accum): ``harvest`` undoes each micro-batch's 1/B of the mean (a factor B^2 on
    the sum); the hook multiplies by accum^2 once the step's number of backwards is known.

    Per micro-batch, ``harvest`` is one stack, one sum and one (index_)add into ``acc``: which
    rows of ``acc`` the returned parameters fill (and the mask ``tracked``) is fixed by the set
    of parameters that got norms, so it is built once per such layout and cached on the device.
    """

    def __init__(self, model, modules: str, names: list[str], device, bookkeeping: bool = False,
                 gram: bool = False):
        from hooks.per_example import PerExampleGradNorms

        self.pe = PerExampleGradNorms(model, modules=modules, attach=False, bookkeeping=bookkeeping, gram=gram)
        self.index = {n: i for i, n in enumerate(names)}
        self.device, self.attached, self.broken = device, False, False
        # parameters of ours that per-example norms can cover (0: nothing to measure with them)
        self.n_covered = sum(1 for n in self.pe._names.values() if n in self.index)
        self._layouts: dict[tuple[str, ...], tuple] = {}
        self._weights: dict[tuple[int, ...], torch.Tensor] = {}
        self.reset()

    def attach(self) -> None:
        if not self.broken and not self.attached:
            self.pe.attach()
            self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.pe.detach()
            self.pe.reset()
            self.attached = False

    def reset(self) -> None:
        self.acc: torch.Tensor | None = None
        self.tracked: torch.Tensor | None = None    # (P,) 1 = has norms (None: none yet)
        self._last_layout = None
        self.n_examples = 0
        self.grams: list[torch.Tensor] = []   # gram mode: per forward pass, (B, B) summed over our parameters

    def _layout(self, key: tuple[str, ...]):
        """(positions in ``key`` of our parameters or None for all, their rows of ``acc`` as a
        device tensor or None when they are all rows in order, the (P,) mask)."""
        lay = self._layouts.get(key)
        if lay is None:
            keep = [j for j, n in enumerate(key) if n in self.index]
            rows = [self.index[key[j]] for j in keep]
            mask = torch.zeros(len(self.index), device=self.device)
            mask[rows] = 1.0
            identity = rows == list(range(len(self.index)))
            lay = (None if len(keep) == len(key) else keep,
                   None if identity else torch.tensor(rows, device=self.device), mask, bool(rows))
            if len(self._layouts) < 64:     # a handful in practice (all / norms / a subset)
                self._layouts[key] = lay
        return lay

    def harvest(self) -> None:
        """After one micro-batch's backward: add its examples' squared norms, per parameter."""
        res = self.pe.sq_norms(loss_scale=1.0, summaries=False)    # B^2 applied once, below
        self.grams = []
        if not res.params:
            return
        for b, grams in zip(res.batch_sizes, res.grams):   # gram mode (per-domain GNS): B^2 as below
            ours = [K for n, K in grams.items() if n in self.index]
            if ours:
                self.grams.append(torch.stack(ours).sum(0).to(self.device) * float(b) ** 2)
        lay = self._layout(tuple(res.params))
        keep, rows, mask, any_ours = lay
        if not any_ours:
            return
        vals = list(res.params.values())
        stacked = torch.stack(vals if keep is None else [vals[j] for j in keep])   # (p, N)
        sizes = res.batch_sizes
        if len(sizes) == 1:      # the usual case: one forward pass, loss mean over B examples
            sums, alpha = stacked.sum(1), float(sizes[0]) ** 2
        else:                    # several passes since the last harvest: B_k^2 per example
            w = self._weights.get(tuple(sizes))
            if w is None:
                w = torch.cat([torch.full((b,), float(b) ** 2) for b in sizes]).to(stacked)
                self._weights = {tuple(sizes): w}
            sums, alpha = stacked @ w, 1.0
        sums = sums.float().to(self.device)
        if rows is None:         # every parameter, in order
            self.acc = sums.mul(alpha) if self.acc is None else self.acc.add_(sums, alpha=alpha)
        else:
            if self.acc is None:
                self.acc = torch.zeros(len(self.index), device=self.device)
            self.acc.index_add_(0, rows, sums, alpha=alpha)
        if lay is not self._last_layout:    # a new set of parameters this step: widen the mask
            self.tracked = mask if self.tracked is None else torch.maximum(self.tracked, mask)
            self._last_layout = lay
        self.n_examples += sum(sizes)
