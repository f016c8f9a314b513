"""How much do exact per-example gradient norms cost? (hooks/per_example.py)

On the built-in GPT, times one training step's forward + backward:

    plain       loss.backward(), nothing attached
    ours        the same with PerExampleGradNorms attached, plus .sq_norms()
    ours, book-keeping  the same with PerExampleGradNorms(bookkeeping=True): where per-example
                gradients are materialised, the batch weight gradient is their sum (autograd's
                weight GEMM is not run); gradients equal plain ones up to float summation order
    torch.func  vmap(grad(loss_i)) over examples, then the norms of the per-example gradients
    opacus      GradSampleModule (per-example gradients materialised by hooks), if installed;
                and GradSampleModuleFastGradientClipping (ghost norms) where it applies

and prints the ratios ours / plain and ours / torch.func (and the FLOP floor: exact norms need, per
Linear layer, the cheaper of the ghost Gram form T^2 (Din + Dout) and the materialised form
T Din Dout multiply-adds per example; when materialising is cheaper this is one more weight-gradient
GEMM, +1/3 of the layer's training work. torch.func's vmap(grad) computes per-example gradients
INSTEAD of the batch gradient, so in that regime it does less work than a training step that also
measures; the default hooks can only win where the ghost form is cheaper, i.e.
T < Din Dout / (Din + Dout); book-keeping removes that extra GEMM, so it does the work of vmap(grad)
plus the norms, without vmap's overhead), and the largest relative difference of the per-example total squared norm against torch.func. Default run (tiny B=8 T=128, small B=4
T=128, CPU, float32; timings are the best of a few round-robin repetitions) takes about two
minutes on two cores::

    python benchmarks/pegrad_speed.py
    python benchmarks/pegrad_speed.py --presets tiny --batch 16 --seq 256 --untied --method ghost
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from hooks.per_example import PerExampleGradNorms  # noqa: E402
from midtrain.model import GPT, get_preset  # noqa: E402

warnings.filterwarnings("ignore", message="There is a performance drop")  # sdpa under vmap


# (B, T) per preset: moderate, and the default run stays around two minutes on two cores
DEFAULT_SHAPES = {"tiny": (8, 128), "small": (4, 128)}


def timeit(fns: dict, reps: int) -> tuple[dict, dict]:
    """Round-robin timing (one warm-up each), best of ``reps``: the machine may be shared."""
    outs = {k: f() for k, f in fns.items()}
    best = {k: float("inf") for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            outs[k] = f()
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, outs


def rel_diff(a, b):
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def bench(preset, B, T, reps, tie, method):
    cfg = get_preset(preset)
    cfg.tie_weights = tie
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (B, T)), torch.randint(0, cfg.vocab_size, (B, T))
    model(x)  # RoPE cache

    def plain():
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()

    pe = PerExampleGradNorms(model, method=method, attach=False)
    model_bk = copy.deepcopy(model)
    pe_bk = PerExampleGradNorms(model_bk, method=method, bookkeeping=True)

    def bookkept():
        model_bk.zero_grad(set_to_none=True)
        model_bk(x, y)[1].backward()
        return pe_bk.sq_norms(loss_scale="mean").total

    def plain_then_ours():       # hooks stay attached between steps, as in the GNS hook
        model.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        return pe.sq_norms(loss_scale="mean").total

    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_i(p, xi, yi):
        return functional_call(twin, p, (xi[None], yi[None]))[1]   # twin: no hooks under vmap

    per_example_grads = vmap(grad(loss_i), in_dims=(None, 0, 0))

    def func():
        g = per_example_grads(params, x, y)
        return sum(v.flatten(1).pow(2).sum(1) for v in g.values())

    twin = copy.deepcopy(model)    # "plain" runs on an identical copy without hooks

    def plain_twin():
        twin.zero_grad(set_to_none=True)
        twin(x, y)[1].backward()

    pe.attach()
    t, out = timeit({"plain": plain_twin, "ours": plain_then_ours, "bk": bookkept, "func": func}, reps)
    pe.detach()
    pe_bk.detach()
    grad_rel = max(float((pb.grad - pt.grad).abs().max() / pt.grad.abs().max().clamp(min=1e-30))
                   for pb, pt in zip(model_bk.parameters(), twin.parameters()) if pt.grad is not None)
    sq_func = out["func"]
    row = {"preset": preset, "tied": tie, "B": B, "T": T, "params_M": model.num_params(False) / 1e6,
           "floor": flop_floor(model, T),
           "plain_s": t["plain"], "ours_s": t["ours"], "func_s": t["func"],
           "ours/plain": t["ours"] / t["plain"], "ours/func": t["ours"] / t["func"],
           "maxrel_ours_vs_func": rel_diff(out["ours"], sq_func),
           "bk_s": t["bk"], "bk/plain": t["bk"] / t["plain"], "bk/func": t["bk"] / t["func"],
           "maxrel_bk_vs_func": rel_diff(out["bk"], sq_func), "bk_grad_rel": grad_rel}
    row.update(bench_opacus(model, x, y, reps, sq_func))
    return row


def flop_floor(model, T):
    """Multiply-adds per example: (exact per-example norms of every Linear, the cheaper of ghost and
    materialised form, diagnostics.gns.pegrad.linear_costs) / (3 x the Linear layers' forward), i.e.
    the extra fraction of the linear layers' forward + backward work that exact norms need."""
    from diagnostics.gns.pegrad import linear_costs

    extra = train = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            extra += min(linear_costs(T, m.in_features, m.out_features).values())
            train += 3 * T * m.in_features * m.out_features
    return extra / train


def bench_opacus(model, x, y, reps, sq_func):
    try:
        from opacus import GradSampleModule
    except ImportError:
        return {"opacus": "skipped (not installed: pip install opacus)"}
    out = {}
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # opacus
    gsm = GradSampleModule(model, strict=False, loss_reduction="mean")  # strict: RoPE cache buffers

    def opacus_gsm():
        gsm.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.grad_sample = None
        gsm(x, y)[1].backward()
        return sum(p.grad_sample.flatten(1).pow(2).sum(1) for p in model.parameters())

    t, sq = timeit({"gsm": opacus_gsm}, reps)
    t, sq = t["gsm"], sq["gsm"]
    gsm._close()
    for p in model.parameters():
        p.grad_sample = None
    out.update({"opacus_gsm_s": t, "maxrel_opacus_vs_func": rel_diff(sq, sq_func)})
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        fgc = GradSampleModuleFastGradientClipping(model, strict=False, loss_reduction="mean",
                                                   use_ghost_clipping=True)
    except Exception as e:  # parameter tying is refused by opacus ghost clipping
        out["opacus_ghost"] = f"skipped ({type(e).__name__}: {e})"
        return out

    def opacus_ghost():
        fgc.zero_grad(set_to_none=True)
        fgc(x, y)[1].backward()
        return fgc.get_norm_sample() ** 2

    try:
        t, sq = timeit({"ghost": opacus_ghost}, reps)
        t, sq = t["ghost"], sq["ghost"]
    except Exception as e:  # opacus refuses tied parameters in its first forward
        out["opacus_ghost"] = f"skipped ({type(e).__name__}: {e})"
        return out
    finally:
        fgc._close()
    out.update({"opacus_ghost_s": t, "maxrel_opacus_ghost_vs_func": rel_diff(sq, sq_func)})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--batch", type=int, default=None, help="examples per batch (default: per preset)")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default: per preset)")
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (best kept)")
    ap.add_argument("--untied", action="store_true", help="also run with tie_weights=False")
    ap.add_argument("--method", default="auto", choices=["auto", "ghost", "materialize"])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads; 1 (default) gives steadier ratios on a shared machine, 0 leaves torch's default")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, float32, method={args.method}")
    for preset in args.presets:
        for tie in ([True, False] if args.untied else [True]):
            B, T = DEFAULT_SHAPES.get(preset, (4, 128))
            r = bench(preset, args.batch or B, args.seq or T, args.reps, tie, args.method)
            print(f"\n{preset} (tie_weights={tie}, {r['params_M']:.2f}M params), B={r['B']} T={r['T']}")
            print(f"  plain fwd+bwd      {r['plain_s'] * 1e3:9.1f} ms")
            print(f"  ours  fwd+bwd+norms{r['ours_s'] * 1e3:9.1f} ms   ours/plain = {r['ours/plain']:.2f}"
                  f"   (FLOP floor of exact norms: +{r['floor']:.0%} of the Linear layers' fwd+bwd)")
            print(f"  torch.func vmap    {r['func_s'] * 1e3:9.1f} ms   ours/torch.func = {r['ours/func']:.3f}")
            print(f"  max rel diff of per-example total vs torch.func: {r['maxrel_ours_vs_func']:.2e}")
            print(f"  ours, book-keeping {r['bk_s'] * 1e3:9.1f} ms   ours_bk/plain = {r['bk/plain']:.2f}"
                  f"   ours_bk/torch.func = {r['bk/func']:.3f}")
            print(f"    max rel diff vs torch.func {r['maxrel_bk_vs_func']:.2e}; weight gradients vs plain "
                  f"(max |diff| / max |grad| per parameter) {r['bk_grad_rel']:.1e}")
            if "opacus" in r:
                print(f"  opacus: {r['opacus']}")
            else:
                print(f"  opacus GradSampleModule {r['opacus_gsm_s'] * 1e3:9.1f} ms   ours/opacus = "
                      f"{r['ours_s'] / r['opacus_gsm_s']:.3f}   max rel diff {r['maxrel_opacus_vs_func']:.2e}")
                if "opacus_ghost" in r:
                    print(f"  opacus ghost clipping: {r['opacus_ghost']}")
                else:
                    print(f"  opacus ghost clipping   {r['opacus_ghost_s'] * 1e3:9.1f} ms   ours/opacus_ghost = "
                          f"{r['ours_s'] / r['opacus_ghost_s']:.3f}   max rel diff "
                          f"{r['maxrel_opacus_ghost_vs_func']:.2e}")


if __name__ == "__main__":
    main()
