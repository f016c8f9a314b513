"""The ground truth both adapter tests compare against: the plain-loop Monitor
(tests/hooks/test_gradient_noise.py's loop: loss / accum, on_backward_end per micro-batch,
on_grads_ready before clipping), replayed on the micro-batches a framework really fed, with SGD."""

import torch

from hooks import GradientNoiseScale, MemorySink, Monitor


def plain_reference(model, micros, loss_fn, *, accum, clip=0.0, lr=0.5, first_step=0, **gns_kw):
    """Records of the plain loop over ``micros`` (``accum`` per step), steps numbered from
    ``first_step`` (HF numbers steps from 1, Lightning from 0); ``loss_fn(model, micro)``."""
    sink = MemorySink()
    mon = Monitor(model, [GradientNoiseScale(mode="microbatch", **gns_kw)], sinks=[sink], strict=True)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    for step in range(len(micros) // accum):
        mon.on_step_begin(step + first_step)
        losses = []
        for x in micros[step * accum:(step + 1) * accum]:
            loss = loss_fn(model, x)
            (loss / accum).backward()
            mon.on_backward_end(len(x))
            losses.append(loss.item())
        mon.on_grads_ready()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        model.zero_grad(set_to_none=True)
        mon.on_step_end(step + first_step, loss=sum(losses) / len(losses))
    mon.close()
    return sink.records


def by_step(records, key):
    return {r["step"]: r[key] for r in records if key in r}
