"""PyTorch Lightning adapter: the Monitor's events from a ``lightning.pytorch.Callback``.

One line (docs/integrations.md)::

    from hooks import GradientNoiseScale
    from hooks.integrations.lightning import MidtrainCallback
    trainer = L.Trainer(..., callbacks=[MidtrainCallback([GradientNoiseScale(mode="microbatch")], run_dir="runs/pl")])

Where each Monitor event comes from (Lightning's automatic optimization)::

    on_train_batch_start (first micro-batch of a step) -> monitor.on_step_begin(trainer.global_step)
    training_step -> loss / accumulate_grad_batches -> backward
    on_after_backward (every micro-batch)               -> monitor.on_backward_end(B, losses=, ids=, domains=)
    [last micro-batch] scaler.unscale_ (fp16) ; on_before_optimizer_step -> monitor.on_grads_ready()
    clip_gradients (gradient_clip_val) ; optimizer.step ; zero_grad
    on_train_batch_end (only when the step really ended) -> monitor.on_step_end(step, loss=, lr=, ...)

Lightning calls ``on_before_optimizer_step`` before clipping and, with 16-bit AMP, after the
GradScaler's ``unscale_``: so a ``GradientNoiseScale`` without ``grad_scale`` gets the precision
plugin's scaler with ``grads_unscaled=True`` (micro-batch norms are still scaled, ``.grad`` no
longer is). ``on_train_batch_end`` runs after every batch; the adapter ends a Monitor step only
after a batch whose ``on_before_optimizer_step`` fired, so under ``accumulate_grad_batches`` the
accumulating batches only add micro-batches. Lightning divides each micro-batch loss by
``accumulate_grad_batches`` even when the epoch's last step has fewer batches; GradientNoiseScale
undoes 1/(micro-batches seen), so on such a short step ``on_grads_ready`` is not announced (GNS
does not measure it; said once).

Step numbers are Lightning's: the record of a step has ``step = trainer.global_step`` at its start
(0, 1, ...), the step ``self.log`` uses inside ``training_step``.

Per-example inputs: a batch that is a dict may carry ``ids`` / ``domains`` (keys configurable);
or pass ``batch_fn(batch) -> dict(size=..., ids=..., domains=...)``. Per-example losses (for a
DifficultyTracker): set ``self.midtrain_losses = losses.detach()`` (shape (B,)) in
``training_step`` (attribute configurable with ``losses_attr``). Hooks attach to the
LightningModule, or to its attribute ``model_attr`` (e.g. ``"model"``) when given. The hooks' state
is saved in Lightning checkpoints (the callback's ``state_dict``) and restored on resume.
Manual optimization is not supported (the adapter warns once and stays off).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterable

from hooks._common import first_tensor, warn_once
from hooks.integrations._common import AdapterBase, domains_field, missing, per_example_field, wire_loss_scale

try:
    import lightning.pytorch as pl
except ImportError as _e1:  # the standalone package of older releases
    try:
        import pytorch_lightning as pl
    except ImportError as _e2:  # pragma: no cover - exercised only without lightning
        raise missing("PyTorch Lightning", "lightning", "lightning", _e1) from _e2

__all__ = ["MidtrainCallback"]


class MidtrainCallback(AdapterBase, pl.Callback):
    """Attach midtrain hooks to a Lightning ``Trainer``: ``callbacks=[MidtrainCallback(hooks, run_dir=...)]``.

    Args:
        hooks: measurement hooks; the Monitor is built at ``on_train_start``.
        run_dir / sinks / strict: as ``hooks.Monitor`` (only global rank 0 writes).
        model_attr: attach the hooks to ``getattr(pl_module, model_attr)`` instead of the module.
        ids_key, domains_key: keys of a dict batch holding per-example ids / domains.
        batch_fn: ``batch -> {"size": int, "ids": ..., "domains": ...}`` for other batch layouts.
        losses_attr: LightningModule attribute that ``training_step`` sets to per-example losses.
    """

    def __init__(self, hooks: Iterable = (), run_dir=None, sinks=None, strict: bool = False,
                 model_attr: str | None = None, ids_key: str | None = "ids", domains_key: str | None = "domains",
                 batch_fn: Callable[[Any], dict] | None = None, losses_attr: str = "midtrain_losses"):
        AdapterBase.__init__(self, hooks, run_dir=run_dir, sinks=sinks, strict=strict, ids_key=ids_key,
                             domains_key=domains_key)
        self.model_attr, self.batch_fn, self.losses_attr = model_attr, batch_fn, losses_attr
        self.notices: list[str] = []
        self._open = False

    def _notice(self, msg: str) -> None:
        warn_once(self.notices, msg, f"midtrain MidtrainCallback (lightning): {msg}", stacklevel=3)

    # -- set-up --------------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module):
        self._guard("on_train_start", self._train_start, trainer, pl_module)

    def _train_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            self._notice("manual optimization is not supported (no framework event marks the backward "
                         "passes and the optimizer step); the hooks are not attached")
            return
        model = getattr(pl_module, self.model_attr) if self.model_attr else pl_module
        self._build_monitor(model, enabled=bool(trainer.is_global_zero))
        scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
        wired = wire_loss_scale(self.hooks, scaler, grads_unscaled=True)
        if wired:
            self._notice(f"16-bit AMP: {', '.join(wired)} divide squared norms by the GradScaler's scale^2 "
                         "(Lightning unscales .grad before on_before_optimizer_step)")
        self._open = False
        self._reset_step()

    def _reset_step(self) -> None:
        self._n_micro = 0
        self._examples = 0
        self._losses: list = []
        self._grads_ready = False
        self._lr = None
        self._batch: dict | None = None

    # -- per batch -------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self._off():
            self._guard("on_train_batch_start", self._batch_start, trainer, batch)

    def _batch_start(self, trainer, batch) -> None:
        if not self._open:
            self._reset_step()
            self._step = int(trainer.global_step)
            self.monitor.on_step_begin(self._step)
            self._open = True
        self._batch = self._describe(batch)

    def _describe(self, batch) -> dict:
        if self.batch_fn is not None:
            info = dict(self.batch_fn(batch))
        else:
            info = {}
            if isinstance(batch, dict):
                for what, key in (("ids", self.ids_key), ("domains", self.domains_key)):
                    if key is not None and key in batch:
                        info[what] = batch[key]
            try:
                from lightning.pytorch.utilities.data import extract_batch_size
            except ImportError:  # pragma: no cover
                from pytorch_lightning.utilities.data import extract_batch_size
            try:
                info["size"] = extract_batch_size(batch)
            except Exception:
                t = first_tensor(batch)
                if t is None or t.dim() == 0:
                    raise ValueError("cannot tell the batch size: pass batch_fn=lambda b: {'size': ...}")
                info["size"] = int(t.shape[0])
        n = int(info["size"])
        return {"size": n, "ids": per_example_field(info.get("ids"), n, "ids"),
                "domains": domains_field(info.get("domains"), n, "domains")}

    def on_after_backward(self, trainer, pl_module):
        if not self._off() and self._open:
            self._guard("on_after_backward", self._after_backward, pl_module)

    def _after_backward(self, pl_module) -> None:
        b = self._batch or {"size": 1, "ids": None, "domains": None}
        losses = getattr(pl_module, self.losses_attr, None)
        if losses is not None:
            setattr(pl_module, self.losses_attr, None)   # one micro-batch's losses, used once
        self._n_micro += 1
        self._examples += b["size"]
        self.monitor.on_backward_end(b["size"], losses=losses, ids=b["ids"], domains=b["domains"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self._off() and self._open:
            self._guard("on_before_optimizer_step", self._before_optimizer_step, trainer, optimizer)

    def _before_optimizer_step(self, trainer, optimizer) -> None:
        self._grads_ready = True
        self._lr = float(optimizer.param_groups[0]["lr"])
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if self._n_micro == accum:
            self.monitor.on_grads_ready()
        else:
            self._notice(f"a step with {self._n_micro} micro-batches where Lightning scaled each loss by "
                         f"1/{accum} (the epoch's last, short accumulation): gradients are not announced "
                         "to the hooks on such steps (GNS does not measure them)")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self._off() and self._open:
            self._guard("on_train_batch_end", self._batch_end, trainer, outputs)

    def _batch_end(self, trainer, outputs) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None and hasattr(loss, "detach"):
            self._losses.append(loss.detach().float().reshape(()))
        if not self._grads_ready:          # accumulating: the step goes on
            return
        accum = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        step_loss = None
        if self._losses:   # Lightning hands each micro-batch's loss already divided by accumulate_grad_batches
            import torch

            step_loss = torch.stack(self._losses).sum() * accum / len(self._losses)
        world = int(getattr(trainer, "world_size", 1) or 1)
        self.monitor.on_step_end(self._step, loss=step_loss, lr=self._lr, batch_size=self._examples * world)
        self._open = False

    def on_train_end(self, trainer, pl_module):
        try:
            self.close()
        except Exception as e:
            if self.strict:
                raise
            warnings.warn(f"midtrain MidtrainCallback (lightning): closing failed ({type(e).__name__}: {e})",
                          RuntimeWarning)

    # -- checkpoints: Lightning stores a callback's state_dict -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("monitor"):
            self.load_monitor_state(state_dict["monitor"])
