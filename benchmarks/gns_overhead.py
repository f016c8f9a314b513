"""Overhead of the GradientNoiseScale hook in the built-in loop: step time and peak memory.

    python benchmarks/gns_overhead.py                                  # tiny + small, CPU, < 3 min
    python benchmarks/gns_overhead.py --presets tiny --modes microbatch,per_example
    python benchmarks/gns_overhead.py --presets tiny --grad-accum 1 --modes per_example,per_example_bk
    python benchmarks/gns_overhead.py --device cuda --presets small --steps 60

For each preset, runs of ``midtrain.loop.train`` alternate in this process (grad_accum 2, same
seed, same batches): ``hooks=[]`` and ``hooks=[GradientNoiseScale(mode=...)]``. Reported per
mode: median ``perf/step_time_s`` over all steps of all rounds (the first ``--warmup`` steps of
each run dropped), the ratio hook/off (target for microbatch: <= 1.02); the hook's own time per
step (a stopwatch around its callbacks, tensor hooks and, in the per_example / layernorm modes,
the forward and backward module hooks of hooks.per_example; exact on CPU up to the autograd
engine's own cost of calling the hooks, far less noisy than the A/B ratio on a shared machine) and (off + own) / off; and the ratio of peak
memory: on CUDA ``torch.cuda.max_memory_allocated`` of each run, on CPU the peak RSS of a fresh
child process running the same short config (``resource.getrusage``; RSS includes the
interpreter, so a hook's own few kilobytes show as ~1.00).

What the microbatch hook costs per step: one squared-norm kernel per parameter per micro-batch (in
the backward, no gradient copy), one ``_foreach_norm`` over .grad, a (groups x params) matvec and
one host sync after the step. per_example additionally stores layer inputs in the forward and
computes per-example norms in the backward (hooks.per_example), so it costs more.
A mode ending in ``_nodomain`` (``per_example_nodomain``, ``auto_nodomain``) turns per-domain GNS off
(``per_domain=False``), so ``--modes per_example,per_example_nodomain`` prints what the per-example Gram
of per-domain GNS costs on top of the per-example norms (docs/gns.md, "Per-domain GNS").
``per_example_bk`` is per_example with ``bookkeeping=True``: where per-example gradients are
materialised, the weight gradient is their sum and autograd's weight GEMM is skipped; its "own"
time includes that whole weight-gradient computation (an upper bound: part of it replaces work the
plain step does), so for it the A/B ratio is the measure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diagnostics.runs import load_run  # noqa: E402
from hooks.gradient_noise import GradientNoiseScale  # noqa: E402
from midtrain.config import Phase, TrainConfig  # noqa: E402
from midtrain.data import default_corpus  # noqa: E402
from midtrain.loop import train  # noqa: E402


def make_config(preset: str, steps: int, device: str, batch_size: int, grad_accum: int, seq_len: int) -> TrainConfig:
    cfg = TrainConfig(seed=0, device=device, eval_every=10**9, checkpoint_every=10**9, log_every=10**9)
    cfg.model.preset = preset
    cfg.data.eval_batches, cfg.data.eval_batch_size = 1, 4
    cfg.phases = [Phase(name="bench", steps=steps, lr=1e-3, mixture={"prose": 1, "code": 1, "math": 1},
                        batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len)]
    return cfg


class TimedGNS(GradientNoiseScale):
    """The hook with a stopwatch around each of its callbacks (its own time; on CPU, where ops run
    synchronously, that is its real cost; on CUDA only the launch time)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.self_s = 0.0
        self.per_step: list[float] = []

    def _timed(self, fn, *a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            self.self_s += time.perf_counter() - t0

    def _make_grad_hook(self, i):
        inner = super()._make_grad_hook(i)
        return lambda grad: self._timed(inner, grad)

    def attach(self, model, monitor=None):
        super().attach(model, monitor)
        if self._pe is not None:
            # per_example / layernorm: the module hooks of hooks.per_example (input capture in the
            # forward, per-example norms in the backward, the parameter safety net) run outside
            # the callbacks above; time them too. Instance attributes win over the class
            # methods the hook closures look up at call time.
            pe = self._pe.pe
            for name in ("_on_model_forward", "_record_call", "_on_output_grad", "_bookkept_weight_grad"):
                inner = getattr(pe, name)
                setattr(pe, name, lambda *a, _f=inner, **k: self._timed(_f, *a, **k))
            make = pe._make_param_hook
            pe._make_param_hook = lambda pid, _m=make: (lambda g, _h=_m(pid): self._timed(_h, g))
            if self._pe.attached:   # re-register so the timed versions are the ones called
                self._pe.detach()
                self._pe.attach()

    def on_backward_end(self, *a, **k):
        return self._timed(super().on_backward_end, *a, **k)

    def on_grads_ready(self):
        return self._timed(super().on_grads_ready)

    def on_step_end(self, step, scalars):
        out = self._timed(super().on_step_end, step, scalars)
        self.per_step.append(self.self_s)
        self.self_s = 0.0
        return out


def run(cfg: TrainConfig, corpus, mode: str, warmup: int) -> tuple[list[float], list[float], float]:
    """Step times (s) after warm-up, the hook's own time per step (s), peak CUDA memory (NaN on CPU)."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hooks = ([] if mode == "off" else [TimedGNS(mode="per_example", bookkeeping=True)]
             if mode == "per_example_bk" else [TimedGNS(mode=mode[:-len("_nodomain")], per_domain=False)]
             if mode.endswith("_nodomain") else [TimedGNS(mode=mode)])
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(cfg, os.path.join(d, "run"), hooks=hooks, corpus=corpus, progress=False, strict_hooks=True)
        m = load_run(os.path.join(d, "run")).metrics
        if mode != "off":
            assert m["gns/b_small"].notna().any(), "the hook measured nothing"
    peak = torch.cuda.max_memory_allocated() if cuda else float("nan")
    own = hooks[0].per_step[warmup:] if hooks else []
    return list(m["perf/step_time_s"].dropna())[warmup:], own, float(peak)


def child_peak_rss(args, preset: str, mode: str) -> float:
    """Peak RSS (bytes) of a fresh process running the config for a few steps (CPU memory)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss-child", preset, mode, "--device", args.device,
           "--steps", "2", "--threads", str(args.threads), "--batch-size", str(args.batch_size),
           "--grad-accum", str(args.grad_accum), "--seq-len", str(args.seq_len)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["peak_rss"])


def _rss_child(args) -> None:
    import resource

    preset, mode = args._rss_child
    cfg = make_config(preset, args.steps, args.device, args.batch_size, args.grad_accum, args.seq_len)
    run(cfg, default_corpus(), mode, warmup=0)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    print(json.dumps({"peak_rss": kib * 1024}))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", default="tiny,small")
    ap.add_argument("--modes", default="microbatch", help="comma list of GNS modes to compare with no hook")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: tiny 12, small 4)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: small CPU boxes only contend; 0 = torch's default)")
    ap.add_argument("--rounds", type=int, default=None, help="default: tiny 3, small 2")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    ap.add_argument("--_rss-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads > 0 and not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads)
    if args._rss_child:
        return _rss_child(args)

    corpus = default_corpus()
    modes = ["off"] + [m for m in args.modes.split(",") if m]
    cuda = args.device.startswith("cuda")
    results = {}
    for preset in args.presets.split(","):
        steps = args.steps or {"tiny": 12, "small": 4}.get(preset, 4)
        cfg = make_config(preset, steps, args.device, args.batch_size, args.grad_accum, args.seq_len)
        times = {m: [] for m in modes}
        own = {m: [] for m in modes}
        peaks = {m: [] for m in modes}
        per_round = {m: [] for m in modes}   # median step time of each run: the spread of A/B
        rounds = args.rounds or {"tiny": 3, "small": 2}.get(preset, 2)
        for r in range(rounds):            # alternate the arms; rotate who goes first
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m in order:
                t, o, peak = run(cfg, corpus, m, args.warmup)
                times[m] += t
                per_round[m].append(statistics.median(t))
                own[m] += o
                peaks[m].append(peak)
        med = {m: statistics.median(times[m]) for m in modes}
        if not args.no_memory:
            mem = ({m: max(peaks[m]) for m in modes} if cuda
                   else {m: child_peak_rss(args, preset, m) for m in modes})
        print(f"preset {preset} on {args.device}: batch {args.batch_size} x {args.seq_len} tokens, grad_accum "
              f"{args.grad_accum}, {rounds} rounds x {steps} steps (first {args.warmup} dropped), "
              f"{torch.get_num_threads()} thread(s)")
        print(f"  {'hook':<14} {'median step':>12} {'time ratio':>11} {'per-round range':>16} {'hook own/step':>14}"
              f" {'own ratio':>10}"
              + ("" if args.no_memory else f" {'peak mem':>10} {'mem ratio':>10}"))
        for m in modes:
            own_s = statistics.mean(own[m]) if own[m] else 0.0
            own_ratio = (med["off"] + own_s) / med["off"]
            rr = [a / b for a, b in zip(per_round[m], per_round["off"])]
            line = (f"  {m:<14} {med[m] * 1e3:9.2f} ms {med[m] / med['off']:10.3f}x {min(rr):7.3f}-{max(rr):.3f}x"
                    f" {own_s * 1e3:11.2f} ms"
                    f" {own_ratio:9.3f}x")
            if not args.no_memory:
                line += f" {mem[m] / 2**20:7.1f} MiB {mem[m] / mem['off']:9.3f}x"
            print(line)
            results[(preset, m)] = {"step_s": med[m], "time_ratio": med[m] / med["off"], "own_s": own_s,
                                    "round_ratio_min": min(rr), "round_ratio_max": max(rr),
                                    "own_ratio": own_ratio,
                                    "mem_ratio": (mem[m] / mem["off"]) if not args.no_memory else float("nan")}
        print("  time ratio: A/B medians; per-round range: the same ratio run by run (how steady the machine was);"
              "\n  own ratio: (off + the hook's own time) / off."
              "\n  targets: microbatch <= 1.02x, layernorm <= 1.05x, per_example <= 1.3x"
              + ("\n  per_example_bk: own time includes the weight GEMM it replaces (an upper bound)"
                 if "per_example_bk" in modes else ""), flush=True)
    return results


if __name__ == "__main__":
    main()
