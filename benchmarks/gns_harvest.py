"""Per-micro-batch cost of the GNS hook's per-example harvest (hooks/_gradient_noise_parts.py ``_PerExample``).

After each micro-batch's backward, the ``per_example`` / ``layernorm`` / ``auto`` modes add the
micro-batch's per-example squared norms into one (P,) vector per parameter. The harvest used to
rebuild its row index (a host list -> tensor copy), a zero vector, ``index_copy_``, an add and a
mask ``index_put_`` on every micro-batch; it now caches the row index and the mask per layout
(which parameters got norms) and does stack + sum + one (index_)add, with the 1/B loss scale
undone by one scalar ``alpha`` instead of per parameter. This script compares the two in one
process (one torch thread, the same per-example results for both, interleaved repeats, medians):

    ops      aten operators per harvest (TorchDispatchMode), the results of sq_norms given
    own      time of the harvest alone (the results of sq_norms given)
    full     time of a whole harvest, PerExampleGradNorms.sq_norms included (reset=False so both
             read the same results; sq_norms still divides every parameter's norms by the loss
             scale, a cost inside hooks/per_example.py that both pay)

It also checks that both accumulate the same vector (rtol 1e-6)::

    python benchmarks/gns_harvest.py [--preset tiny] [--batch 8] [--seq 128] [--repeats 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hooks._gradient_noise_parts import _PerExample  # noqa: E402
from midtrain.model import GPT, get_preset  # noqa: E402


def harvest_before(self) -> None:
    """The harvest as it was before the layout cache (verbatim but for ``self``), for comparison."""
    res = self.pe.sq_norms(loss_scale="mean", summaries=False)
    names = [n for n in res.params if n in self.index]
    if not names:
        return
    idx = [self.index[n] for n in names]
    sums = torch.stack([res.params[n] for n in names]).sum(1).float().to(self.device)
    vec = torch.zeros(len(self.index), device=self.device).index_copy_(
        0, torch.tensor(idx, device=self.device), sums)
    self.acc = vec if self.acc is None else self.acc + vec
    if self.tracked is None:
        self.tracked = torch.zeros(len(self.index), device=self.device)
    self.tracked[idx] = 1.0
    self.n_examples += sum(res.batch_sizes)


class OpCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--micro", type=int, default=2, help="harvests per step (micro-batches)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    model = GPT(cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    print(f"{args.preset}: {len(names)} parameters, batch {args.batch} x {args.seq}, "
          f"{args.micro} harvests per step, {args.repeats} interleaved repeats, 1 thread")
    for modules in ("all", "norms"):
        pex = _PerExample(model, modules, names, torch.device("cpu"))
        pex.attach()
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
        model.zero_grad(set_to_none=True)
        model(x[:, :-1], x[:, 1:])[1].backward()
        real = pex.pe.sq_norms
        kept = real(loss_scale=1.0, summaries=False, reset=False)    # one backward's results
        full = lambda **kw: real(reset=False, **kw)                  # noqa: E731
        given = {"mean": real(loss_scale="mean", summaries=False, reset=False), 1.0: kept}
        fixed = lambda **kw: given[kw["loss_scale"]]                  # noqa: E731
        impl = {"before": lambda: harvest_before(pex), "now": pex.harvest}
        times = {(k, m): [] for k in impl for m in ("own", "full")}
        ops, acc = {}, {}
        for k, fn in impl.items():               # warm-up, op count (2nd micro-batch), result
            pex.pe.sq_norms = fixed
            pex.reset()
            fn()
            with OpCount() as c:
                fn()
            ops[k] = c.n
            acc[k] = pex.acc.clone()
        for r in range(args.repeats):
            for k in (impl if r % 2 == 0 else reversed(list(impl))):
                for m, sq in (("own", fixed), ("full", full)):
                    pex.pe.sq_norms = sq
                    pex.reset()
                    t0 = time.perf_counter()
                    for _ in range(args.micro):
                        impl[k]()
                    times[(k, m)].append((time.perf_counter() - t0) / args.micro)
        pex.pe.sq_norms = real
        pex.detach()
        same = torch.allclose(acc["now"].double(), acc["before"].double(), rtol=1e-6, atol=0)
        med = {km: statistics.median(v) * 1e6 for km, v in times.items()}
        print(f"\nmodules={modules!r}: aten ops per harvest before {ops['before']}, now {ops['now']} "
              f"(sq_norms excluded); same accumulated vector (rtol 1e-6): {same}")
        for m in ("own", "full"):
            b, n = med[("before", m)], med[("now", m)]
            print(f"  {m:4s} median per harvest: before {b:8.1f} us, now {n:8.1f} us, now/before {n / b:.2f}x")
        if not same:
            raise SystemExit("the two harvests disagree")


if __name__ == "__main__":
    main()
