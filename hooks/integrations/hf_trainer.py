"""Hugging Face ``transformers.Trainer`` adapter: the Monitor's events from a TrainerCallback.

One line (docs/integrations.md)::

    from hooks import GradientNoiseScale, RepresentationProbe
    from hooks.integrations.hf_trainer import MidtrainCallback
    trainer.add_callback(MidtrainCallback([GradientNoiseScale(mode="microbatch")], run_dir="runs/hf"))

Where each Monitor event comes from (HF's own loop, ``Trainer._inner_training_loop``)::

    on_step_begin (first micro-batch)      -> monitor.on_step_begin(state.global_step + 1)
    for micro in micro_batches:
        model(**inputs)                    <- forward pre/post hooks on the model: batch size, labels,
                                              ids/domains (popped from the inputs), per-example losses
        accelerator.backward(loss / accum) <- end of this backward (an autograd final callback)
                                              -> monitor.on_backward_end(B, losses=, ids=, domains=)
                                              last micro-batch: -> monitor.on_grads_ready()
        on_substep_end (not the last)         (not used: it comes after the backward anyway)
    clip_grad_norm_ (max_grad_norm > 0)       <- after our on_grads_ready: GNS sees unclipped grads
    on_pre_optimizer_step; optimizer.step(); on_optimizer_step   <- the step's learning rate
    scheduler.step(); zero_grad; global_step += 1
    on_step_end                            -> monitor.on_step_end(state.global_step, loss=, lr=, ...)
    on_log (every logging_steps)           -> monitor.write(...) (grad_norm, HF's windowed loss, eval)

Why not ``on_pre_optimizer_step`` for the gradients: HF calls it *after* ``_clip_grad_norm``
(and, with fp16, after the GradScaler's unscale inside ``accelerator.clip_grad_norm_``), and the
callback has no handle on the Trainer or its accelerator to wrap the clip. There is no HF event
between the last micro-batch's backward and the clip, so the adapter makes one: a forward hook on
the model registers a tensor hook on the output's logits; when that fires inside the backward it
queues an autograd *final callback* (``Variable._execution_engine.queue_callback``, the mechanism
DDP uses to finish its all-reduce), which re-queues itself once so that it runs after every
callback queued during the backward -- DDP's gradient all-reduce included. So ``on_backward_end``
runs right after each micro-batch's backward with the gradients complete, and on the last
micro-batch of a step (``accelerator.gradient_state.sync_gradients``, which the Trainer sets per
micro-batch) ``on_grads_ready`` runs before HF clips or unscales anything. Hence, with fp16 the
gradients are still scaled there: a ``GradientNoiseScale`` without ``grad_scale`` gets the
accelerator's GradScaler (``optimizer.scaler``) and ``grads_unscaled=False`` at ``on_train_begin``.

Loss normalisation (checked against transformers 5.x ``Trainer.training_step``): when the model
accepts loss kwargs (GPT-2, LLaMA, ... in transformers >= 4.46) the Trainer passes
``num_items_in_batch`` = the step's count of target tokens, so micro-batch k's loss is
sum(token losses in k) / N_step; otherwise it divides the micro-batch mean by the number of
micro-batches in this step. Either way, when every micro-batch of a step has the same number of
target tokens (fixed-length sequences without -100 labels: the usual LM (mid-)training case), a
micro-batch's contribution is g_k / accum, exactly what GradientNoiseScale undoes. With padding
(unequal token counts) GNS's small-batch norms are approximate; the adapter says so once.
``train/loss`` is this process's mean loss over the step's target tokens, rescaled from the parts
the model returned. Where the Trainer's token count differs from the model's (transformers 5.x
counts *unshifted* labels for a causal LM whose class name maps to no loss type, e.g.
``GPT2LMHeadModel``: every gradient is then (T-1)/T of the mean), the adapter says so once and how
to fix it (``model.loss_type = "ForCausalLM"``); ``gns/b_simple`` is unaffected, the raw norms are
those of the gradients HF actually applies.

Step numbers are HF's: the record of an optimizer step has ``step = state.global_step`` after it
(1, 2, ...), the x-axis of HF's own logs. Records of one step are merged on read (diagnostics.runs),
so HF's logged values land in the same row.

Not supported: DeepSpeed (the engine's backward owns accumulation and partitions gradients) --
the adapter warns and hooks that need gradients see partial ones. Resume: the hooks' state is
saved beside each HF checkpoint (``midtrain_monitor.pt``) and loaded when training resumes from
``output_dir/checkpoint-<global_step>``.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterable

import torch

from hooks._common import first_tensor, warn_once
from hooks.integrations._common import AdapterBase, domains_field, missing, per_example_field, wire_loss_scale

try:
    from transformers import TrainerCallback
except ImportError as _e:  # pragma: no cover - exercised only without transformers
    raise missing("Hugging Face Trainer", "hf", "transformers accelerate", _e) from _e

__all__ = ["MidtrainCallback"]

STATE_FILE = "midtrain_monitor.pt"


def _queue_final_callback(fn) -> None:
    torch.autograd.Variable._execution_engine.queue_callback(fn)


class _Micro:
    """What one training forward left for its backward."""

    __slots__ = ("size", "tokens", "targets", "labels", "losses", "ids", "domains", "loss", "n_items", "fired")

    def __init__(self, size, tokens, targets, ids, domains, n_items):
        self.size, self.tokens, self.targets, self.ids, self.domains = size, tokens, targets, ids, domains
        self.n_items = n_items   # HF's num_items_in_batch (the model's loss is sum / n_items), or None
        self.labels = self.losses = self.loss = None
        self.fired = False


class MidtrainCallback(AdapterBase, TrainerCallback):
    """Attach midtrain hooks (GradientNoiseScale, RepresentationProbe, DifficultyTracker, ...) to a
    ``transformers.Trainer``: ``trainer.add_callback(MidtrainCallback(hooks, run_dir=...))``.

    Args:
        hooks: measurement hooks; the Monitor is built at ``on_train_begin`` on the Trainer's model.
        run_dir / sinks / strict: as ``hooks.Monitor`` (only the main process writes).
        ids_key, domains_key: batch keys holding per-example ids / domain indices (B,). They are
            removed from the model's inputs by the adapter; set ``remove_unused_columns=False`` in
            ``TrainingArguments`` so that the Trainer keeps them. None: not looked for.
        per_example_losses: hand per-sequence losses (token mean over labels != ignore_index,
            from the logits) to ``on_backward_end``; default: when some hook is a DifficultyTracker.
        shift_labels: causal LM (labels = inputs, logits[:, :-1] predict labels[:, 1:]).
        ignore_index: label value left out of per-example losses (HF: -100).
    """

    def __init__(self, hooks: Iterable = (), run_dir=None, sinks=None, strict: bool = False,
                 ids_key: str | None = "ids", domains_key: str | None = "domains",
                 per_example_losses: bool | None = None, shift_labels: bool = True, ignore_index: int = -100):
        AdapterBase.__init__(self, hooks, run_dir=run_dir, sinks=sinks, strict=strict, ids_key=ids_key,
                             domains_key=domains_key)
        self.per_example_losses, self.shift_labels, self.ignore_index = per_example_losses, shift_labels, ignore_index
        self.notices: list[str] = []
        self._handles: list = []
        self._queue: list[_Micro] = []
        self._reset_step()
        self._tokens_local = 0
        self._lr = None

    # -- set-up ------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._guard("on_train_begin", self._train_begin, args, state, model, optimizer)

    def _train_begin(self, args, state, model, optimizer) -> None:
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin")
        self.args = args
        self._detach_model_hooks()
        self._load_checkpoint_state(args, state)
        self._build_monitor(model, enabled=bool(getattr(state, "is_world_process_zero", True)))
        wired = wire_loss_scale(self.hooks, getattr(optimizer, "scaler", None), grads_unscaled=False)
        if wired:
            self._notice(f"fp16: {', '.join(wired)} divide squared norms by the GradScaler's scale^2 "
                         "(the gradients are read before HF unscales them)")
        self._gradient_state = getattr(optimizer, "gradient_state", None)
        if getattr(args, "deepspeed", None) or getattr(args, "deepspeed_plugin", None):
            self._notice("DeepSpeed is not supported: its engine owns the backward and partitions "
                         "gradients, so gradient-reading hooks see partial gradients")
        if self.per_example_losses is None:
            from hooks.difficulty import DifficultyTracker

            self._want_losses = any(isinstance(h, DifficultyTracker) for h in self.hooks)
        else:
            self._want_losses = bool(self.per_example_losses)
        self._handles = [model.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
                         model.register_forward_hook(self._post_forward, with_kwargs=True)]
        self._queue, self._tokens_local = [], 0
        self._reset_step()

    def _load_checkpoint_state(self, args, state) -> None:
        step = int(getattr(state, "global_step", 0) or 0)
        path = os.path.join(getattr(args, "output_dir", "") or "", f"checkpoint-{step}", STATE_FILE)
        if step > 0 and os.path.isfile(path):
            self.load_monitor_state(torch.load(path, map_location="cpu", weights_only=False))

    def _detach_model_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _reset_step(self) -> None:
        self._n_micro = 0
        self._examples = 0
        self._micros: list[_Micro] = []

    def _notice(self, msg: str) -> None:
        warn_once(self.notices, msg, f"midtrain MidtrainCallback: {msg}", stacklevel=3)

    # -- the model's forward: what the micro-batch is ---------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        if self._off() or not (module.training and torch.is_grad_enabled()):
            return None   # evaluation, probes (no_grad / eval mode): not a training micro-batch
        return self._guard("the model's forward pre-hook", self._pre, args, kwargs)

    def _pre(self, args, kwargs):
        changed = False
        extra = {}
        for what, key in (("ids", self.ids_key), ("domains", self.domains_key)):
            if key is not None and key in kwargs:
                extra[what] = kwargs.pop(key)   # the model never sees them
                changed = True
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None:
            x = first_tensor(args) if args else first_tensor(kwargs)
        if x is None or x.dim() == 0:
            raise ValueError("cannot tell the micro-batch size: no input_ids / inputs_embeds / tensor input")
        n = int(x.shape[0])
        tokens = int(x.shape[0] * x.shape[1]) if x.dim() >= 2 else n
        labels = kwargs.get("labels")
        targets = None
        if isinstance(labels, torch.Tensor):
            lab = labels[..., 1:] if self.shift_labels else labels
            targets = lab.ne(self.ignore_index).sum()
        n_items = kwargs.get("num_items_in_batch")
        micro = _Micro(n, tokens, targets, per_example_field(extra.get("ids"), n, self.ids_key),
                       domains_field(extra.get("domains"), n, self.domains_key), n_items)
        micro.labels = labels if self._want_losses else None
        self._queue.append(micro)
        return (args, kwargs) if changed else None

    def _post_forward(self, module, args, kwargs, output):
        if self._off() or not self._queue or self._queue[-1].fired or not (module.training and torch.is_grad_enabled()):
            return None
        self._guard("the model's forward hook", self._post, output)
        return None

    def _post(self, output) -> None:
        micro = self._queue[-1]
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if isinstance(loss, torch.Tensor):
            micro.loss = loss.detach()
        if self._want_losses and isinstance(logits, torch.Tensor) and isinstance(micro.labels, torch.Tensor):
            from hooks.difficulty import per_example_loss

            with torch.no_grad():
                micro.losses = per_example_loss(logits.detach(), micro.labels, ignore_index=self.ignore_index,
                                                shift=self.shift_labels)
        micro.labels = None
        # the tensor whose gradient starts this micro-batch's backward: logits (also when a
        # compute_loss_func builds the loss from them), else the loss, else the first output
        anchor = next((t for t in (logits, loss, first_tensor(output)) if isinstance(t, torch.Tensor)
                       and t.requires_grad), None)
        if anchor is None:
            self._queue.pop()
            return
        micro.fired = True   # one anchor per forward

        def grad_hook(_grad, micro=micro):
            if not self._off():
                # runs after every final callback queued during this backward (DDP's all-reduce)
                _queue_final_callback(lambda: _queue_final_callback(lambda: self._backward_done(micro)))
            return None

        anchor.register_hook(grad_hook)

    # -- the end of a micro-batch's backward --------------------------------------------------------
    def _backward_done(self, micro: _Micro) -> None:
        # an exception here would surface from loss.backward(): the guard keeps it away
        self._guard("the end of a backward", self._after_backward, micro)

    def _after_backward(self, micro: _Micro) -> None:
        if micro in self._queue:
            self._queue.remove(micro)
        self._n_micro += 1
        self._examples += micro.size
        self._tokens_local += micro.tokens
        self._micros.append(micro)
        self.monitor.on_backward_end(micro.size, losses=micro.losses, ids=micro.ids, domains=micro.domains)
        if self._last_micro():
            self.monitor.on_grads_ready()

    def _last_micro(self) -> bool:
        gs = self._gradient_state
        if gs is not None and hasattr(gs, "sync_gradients"):
            return bool(gs.sync_gradients)
        return self._n_micro >= int(getattr(self.args, "gradient_accumulation_steps", 1))

    # -- HF events -----------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, **kwargs):
        if not self._off():
            self._guard("on_step_begin", self._step_begin, state)

    def _step_begin(self, state) -> None:
        self._reset_step()
        self._queue = []
        self.monitor.on_step_begin(int(state.global_step) + 1)

    def on_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        if not self._off() and optimizer is not None:   # the learning rate this step used
            self._lr = self._guard("on_optimizer_step", lambda: float(optimizer.param_groups[0]["lr"]))

    def on_step_end(self, args, state, control, **kwargs):
        if not self._off():
            self._guard("on_step_end", self._step_end, args, state)

    def _step_end(self, args, state) -> None:
        world = int(getattr(args, "world_size", 1) or 1)
        self.monitor.on_step_end(int(state.global_step), loss=self._step_loss(world), lr=self._lr,
                                 tokens=self._tokens(state, world), batch_size=self._examples * world)
        self._reset_step()

    def _step_loss(self, world: int):
        """This process's mean training loss of the step (one host sync, with the Monitor's)."""
        micros = [m for m in self._micros if m.loss is not None]
        if not micros:
            return None
        parts = torch.stack([m.loss.float().reshape(()) for m in micros])
        if micros[0].n_items is None:          # each part is a micro-batch mean: HF's equal weights
            return parts.mean()
        # each part is sum(token losses of k) / num_items_in_batch: rescale to a mean over the
        # target tokens this process saw, which is right whatever HF counted in num_items_in_batch
        n_items = float(micros[0].n_items.float().mean()) if torch.is_tensor(micros[0].n_items) else float(micros[0].n_items)
        if any(m.targets is None for m in micros):
            return parts.sum() * (world if world > 1 and getattr(self.args, "average_tokens_across_devices", False) else 1)
        targets = [float(t) for t in torch.stack([m.targets for m in micros]).tolist()]
        if len(set(targets)) > 1 and len(micros) > 1:
            self._notice("the micro-batches of a step have different numbers of target tokens (padding / -100 "
                         "labels): HF weights them by tokens, so GradientNoiseScale's micro-batch norms (which "
                         "undo a 1/accum scaling) are approximate on such steps")
        local = sum(targets)
        global_ = local * (world if world > 1 and getattr(self.args, "average_tokens_across_devices", False) else 1)
        if local > 0 and abs(n_items - global_) > 0.5:
            self._notice(f"the Trainer normalised the loss by num_items_in_batch = {n_items:g} target tokens, the "
                         f"model's loss counts {global_:g} (transformers did not recognise this model's causal-LM "
                         "loss and counted unshifted labels; set model.loss_type = 'ForCausalLM' before building "
                         f"the Trainer). Training gradients are scaled by {global_ / n_items:.4g}; train/loss is "
                         "the true mean, the raw gns/*_sq norms are of the scaled gradients, gns/b_simple is "
                         "unaffected")
        return parts.sum() * (n_items / local) if local > 0 else None

    def _tokens(self, state, world: int) -> int:
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        return seen if seen > 0 else self._tokens_local * world

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.monitor is not None and not self.closed and logs:
            self._guard("on_log", self._log, state, logs)

    def _log(self, state, logs: dict[str, Any]) -> None:
        rec: dict[str, Any] = {"step": int(state.global_step)}
        for k, v in logs.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if k == "learning_rate":
                rec["train/lr"] = v
            elif k == "grad_norm":
                rec["train/grad_norm"] = v        # HF's pre-clip total norm of this step
            elif k == "epoch":
                rec["train/epoch"] = v
            elif k.startswith("eval_"):
                rec["val/" + k[len("eval_"):]] = v
            else:
                rec["hf/" + k] = v                # hf/loss: HF's mean over the logging window
        if len(rec) > 1:
            self.monitor.write(rec)

    def on_save(self, args, state, control, **kwargs):
        if self.monitor is not None and getattr(state, "is_world_process_zero", True):
            self._guard("on_save", self._save, args, state)

    def _save(self, args, state) -> None:
        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.monitor.state_dict(), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self.close()
        except Exception as e:
            if self.strict:
                raise
            warnings.warn(f"midtrain MidtrainCallback: closing failed ({type(e).__name__}: {e})", RuntimeWarning)
