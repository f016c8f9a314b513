"""The built-in mid-training loop: phases, accumulation, AdamW, clipping, eval,
checkpoints, resume, branching, DDP, with the Monitor's three events wired in.

Tiny CPU run (a few minutes on 2 cores), then a look at it::

    midtrain train --out runs/demo
    midtrain show runs/demo

or from Python::

    from midtrain.config import default_config
    from midtrain.loop import train
    result = train(default_config().scaled_to(60), "runs/quick")
    print(result.val_start, result.val_end)

The loop is one flat, ordered loop (nanoGPT style). Everything a step needs is a
pure function of the global step: the phase, the LR (``TrainConfig.lr_at``)
and the batch (``MixtureSampler.global_batch``), so resuming and branching
only need the model/optimizer state and the step number.

Under ``torchrun`` it runs DDP, or FSDP2 with ``parallelism = "fsdp"`` (``midtrain.distributed``); only rank 0 writes the run
directory. Evaluation lives in ``midtrain.evaluate``, the progress line and throughput in
``midtrain._progress``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diagnostics.runs import RUN_JSON, RunDirError, RunWriter, load_run
from hooks.monitor import Hook, Monitor, NullSink, RunStoreSink
from midtrain import data as data_mod
from midtrain._guard import DivergenceGuard
from midtrain._lock import RunLock
from midtrain.checkpoint import (check_sharding, checkpoint_path, load_checkpoint, model_config,
                                 newest_readable_checkpoint, restore_checkpoint, save_checkpoint)
from midtrain._progress import Progress, Throughput, peak_flops
from midtrain.config import ConfigError, TrainConfig
from midtrain.distributed import (forward_model, grad_sync, mean_over_ranks, set_up_processes, shard_model, sharded,
                                  total_norm)
from midtrain.evaluate import Evaluator
from midtrain.hookset import build_hooks, named_hooks
from midtrain.model import GPT, GPTConfig


@dataclass
class TrainResult:
    run_dir: str
    start_step: int
    steps_done: int  # global step reached (number of optimizer updates applied)
    total_steps: int
    final_loss: float  # train loss of the last step run
    val_start: dict[str, float] = field(default_factory=dict)
    val_end: dict[str, float] = field(default_factory=dict)
    tokens_per_s: float = float("nan")
    mfu: float = float("nan")
    wall_s: float = 0.0
    model: Any = None
    status: str = "finished"  # or "stopped" (until_step), "diverged" (midtrain._guard; ``message`` says why)
    message: str = ""


# -- set-up helpers ---------------------------------------------------------------

def _data_and_model_config(cfg: TrainConfig, corpus, world: int):
    """(corpus, model config): the data (the config's unless ``corpus`` is given) and the model's
    config, once the run's config is checked against the data, the model's context length and the
    number of processes (every micro-batch must split evenly over them)."""
    if corpus is None:
        corpus = data_mod.default_corpus() if not cfg.data.path else data_mod.load_corpus(cfg.data.path, val_fraction=cfg.data.val_fraction)
    mcfg = model_config(cfg, corpus.vocab_size)
    cfg.validate(domains=list(corpus.names()), max_seq_len=mcfg.block_size)
    data_mod.check_phases(corpus, cfg.phases)
    for p in cfg.phases:
        micro_global = p.batch_size // p.grad_accum
        if micro_global % world:
            raise ConfigError(
                f"phase {p.name!r}: the micro-batch of {micro_global} sequences (batch_size {p.batch_size} / "
                f"grad_accum {p.grad_accum}) does not split evenly over {world} processes."
            )
    return corpus, mcfg


# -- resume and branch planning: decide everything before writing anything ----------------

_RESUME_KEYS = ("seed", "model", "data", "optim", "phases")


def _incompatible(old: dict, new: dict) -> list[str]:
    return [k for k in _RESUME_KEYS if old.get(k) != new.get(k)]


@dataclass
class _Start:
    """Where a run starts and stops: ``ckpt`` is the checkpoint it continues (None: a new run),
    ``step`` and ``tokens`` the state it holds, ``end_step`` the global step to stop after;
    ``val_start``: a resumed run's first evaluation (the summary's "start")."""

    ckpt: dict | None
    step: int
    tokens: int
    end_step: int
    val_start: dict[str, float] = field(default_factory=dict)
    ckpt_path: str | None = None  # the file ``ckpt`` was read from


def _first_evaluation(run, before: int) -> dict[str, float]:
    """The validation losses of ``run``'s first evaluation at a step <= ``before`` ({} if none)."""
    m = run.metrics
    vcols = [c for c in m.columns if c.startswith("val/")]
    rows = m[m["step"] <= before].dropna(subset=vcols, how="all") if vcols and len(m) else m.iloc[:0]
    return {} if rows.empty else {c: float(v) for c, v in rows.iloc[0][vcols].items() if v == v}


def _plan_start(cfg: TrainConfig, out_dir: str, *, resume: bool, parent: str | None, parent_step: int | None,
                until_step: int | None, world: int) -> _Start:
    """A new run, a resume of ``out_dir`` from its latest checkpoint, or a branch from ``parent``'s
    checkpoint ``parent_step``, decided from the disk as it is; ConfigError / RunDirError for what
    cannot run. Nothing is written."""
    total = cfg.total_steps()
    run_json = os.path.join(out_dir, RUN_JSON)
    ckpt, ckpt_path, start_step, tokens, val_start = None, None, 0, 0, {}
    if parent is not None:
        if resume:
            raise ConfigError("--resume and --from cannot be combined: a branch is a new run.")
        if parent_step is None:
            raise ConfigError("a branch needs the parent's step (--step S).")
        prun = load_run(parent)
        steps = [s for s, _ in prun.checkpoints()]
        if parent_step not in steps:
            raise ConfigError(f"run {parent} has no checkpoint at step {parent_step}; it has checkpoints at steps {steps}.")
        if parent_step >= total:
            raise ConfigError(f"the branch config has {total} steps in all; nothing is left to run after step {parent_step}.")
        if os.path.exists(run_json):
            raise RunDirError(f"{out_dir} already holds a run; a branch needs a new output directory. Nothing was changed.")
        ckpt_path = checkpoint_path(parent, parent_step)
        ckpt = load_checkpoint(ckpt_path)
        start_step, tokens = ckpt["step"], ckpt["tokens"]
    elif os.path.exists(run_json):
        if not resume:
            raise RunDirError(
                f"{out_dir} already holds a run ({RUN_JSON} exists). midtrain never overwrites a run: "
                "pass --resume to continue it, or choose another --out directory. Nothing was changed."
            )
        old = load_run(out_dir)
        diff = _incompatible(old.config, cfg.to_dict())
        if diff:
            raise ConfigError(
                f"cannot resume {out_dir}: the config differs from the run's in {diff}. Resume with the run's own "
                "config (omit --config), or branch a new run from a checkpoint with --from. Nothing was changed."
            )
        ckpt, unreadable = newest_readable_checkpoint(old)
        if ckpt is not None:
            start_step, tokens = ckpt["step"], ckpt["tokens"]
            ckpt_path = checkpoint_path(out_dir, start_step)
        if unreadable:
            warnings.warn(" ".join(unreadable) + f" Resuming from step {start_step}, the newest readable checkpoint.",
                          RuntimeWarning, stacklevel=3)
        val_start = _first_evaluation(old, start_step)
        if start_step >= total:
            raise ConfigError(f"{out_dir} is already finished ({start_step} of {total} steps); nothing to resume.")
    elif resume:
        raise RunDirError(f"--resume was given but {out_dir} holds no run (no {RUN_JSON}) to resume.")
    if ckpt is not None:  # a sharded checkpoint loads only on as many sharded processes
        check_sharding(ckpt, ckpt_path, world if sharded(cfg, world) else 0)
    if world > 1:  # every rank decided on the same disk state; only now may rank 0 write
        import torch.distributed as dist

        dist.barrier()
    end_step = total if until_step is None else min(total, until_step)
    if end_step <= start_step:
        raise ConfigError(f"until_step {until_step} is not after the start step {start_step}.")
    return _Start(ckpt, start_step, tokens, end_step, val_start, ckpt_path)


# -- model, optimizer, precision ------------------------------------------------------------

def _build_model(cfg: TrainConfig, mcfg: GPTConfig, device: torch.device, start: _Start, *, branch: bool,
                 world: int = 1):
    """The model (sharded with FSDP2 when the run is: ``midtrain.distributed.shard_model``) and its AdamW
    optimizer, seeded from the config; from the checkpoint the run starts at, if any (a resume restores
    its RNG streams too, a branch keeps the fresh seed)."""
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = shard_model(GPT(mcfg).to(device), cfg, device, world)
    optimizer = model.configure_optimizer(
        weight_decay=cfg.optim.weight_decay, lr=cfg.phases[0].lr,
        betas=(cfg.optim.beta1, cfg.optim.beta2), device_type=device.type,
    )
    for g in optimizer.param_groups:
        g["eps"] = cfg.optim.eps
    if start.ckpt is not None:
        restore_checkpoint(start.ckpt, model, optimizer, rng=not branch, path=start.ckpt_path)
    return model, optimizer


def _precision(cfg: TrainConfig, device: torch.device):
    """(dtype, autocast context) of the forward passes: bf16 autocast on CUDA by default, fp32 on CPU."""
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = (torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    return dtype, autocast


def _clip_grads(params: list, grad_clip: float) -> torch.Tensor:
    """The gradients' global norm, before clipping them to ``grad_clip`` (0: no clipping)."""
    if grad_clip > 0:  # DTensor gradients (FSDP2): the norm over every rank's shards
        return total_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    return total_norm(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


# -- the run store ----------------------------------------------------------------------------

def _wandb_sink(cfg: TrainConfig, out_dir: str):
    """The [wandb] mirror of the run store (hooks.sinks.WandbSink); a failure to start is a clear
    ConfigError before anything is trained or written (except wandb's own folder)."""
    from hooks.sinks import WandbSink

    opts = {k: v for k, v in cfg.wandb.items() if k != "enabled"}
    try:
        return WandbSink(run_dir=out_dir, config=cfg.to_dict(), **opts)
    except Exception as e:
        raise ConfigError(f"[wandb]: could not start the wandb run ({type(e).__name__}: {e}). Nothing was "
                          "trained. Fix it, set mode = \"offline\" (no API key needed), or remove [wandb].") from e


def _open_run_store(cfg: TrainConfig, out_dir: str, start: _Start, *, resume: bool, parent: str | None,
                    parent_step: int | None, model, corpus, world: int, device, dtype) -> RunWriter:
    """Rank 0's writer of ``out_dir``: a new run (recording its parent, for a branch) or the resumed
    one (records after the checkpoint's step dropped), with the run's model, data and hardware in run.json."""
    if parent is not None:
        writer = RunWriter.create(out_dir, cfg.to_dict(), parent={"run": os.path.abspath(parent), "step": parent_step})
    elif resume:
        writer = RunWriter.resume(out_dir, step=start.step - 1)
    else:
        writer = RunWriter.create(out_dir, cfg.to_dict())
    writer.update_info(
        model=vars(model.config), n_params=model.num_params(non_embedding=False), world_size=world,
        device=str(device), dtype=str(dtype).replace("torch.", ""), data=corpus.describe(),
        total_steps=cfg.total_steps(), phase_starts=cfg.phase_starts(), phase_names=[p.name for p in cfg.phases],
        platform=platform.platform(),
    )
    return writer


def _record_failure(writer: RunWriter | None, monitor: Monitor, e: BaseException, step: int) -> None:
    """Leave the run directory honest when training stops on an exception: its status says how it
    ended (interrupted or failed, and where); the checkpoints stay resumable. On a full or read-only
    disk this may itself fail: then the original exception is the one that surfaces (the CLI says
    whether run.json could record the status), not a chain of tracebacks from here."""
    if writer is not None:
        status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
        with contextlib.suppress(OSError):
            writer.update_info(status=status, error=f"{type(e).__name__}: {e}", steps_done=step)
        with contextlib.suppress(OSError):
            writer.close()
    monitor.close()


def _checkpoint_now(writer: RunWriter | None, owed: bool, sharded: bool = False) -> bool:
    """Whether to take the checkpoint that is ``owed`` (due now, or since records waited): only once
    every record before it is in metrics.jsonl, so that a resume from the latest checkpoint records
    again every step that is missing; a lost record stops the run (RunStoreError). Sharded, every
    rank takes it (a collective) when rank 0 decides to: its answer is broadcast."""
    now = False
    if writer is not None:
        writer.check()
        now = owed and writer.flush()
    if sharded and owed:
        import torch.distributed as dist

        flag = torch.tensor([int(now)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.broadcast(flag, src=0)
        now = bool(flag.item())
    return now


def _end_diverged(guard: DivergenceGuard, step: int, out_dir: str, writer: RunWriter | None, monitor: Monitor,
                  dtype) -> str:
    """Record a divergence: status ``diverged`` and the guard's report in run.json; nothing else is
    written (no evaluation, no checkpoint of the diverged state). Returns the message."""
    ckpts = [s for s, _ in load_run(out_dir).checkpoints()] if writer is not None else []
    report = guard.report(step, ckpts, str(dtype).replace("torch.", ""))
    if writer is not None:
        writer.update_info(status="diverged", diverged=report, error=report["message"], steps_done=step + 1)
    return report["message"]


def _end_run(model, evaluator: Evaluator, device, autocast, monitor: Monitor, writer: RunWriter | None, end_step: int,
             tokens: int, status: str, t_start: float, save_checkpoint_now, sharded: bool = False) -> dict[str, float]:
    """The final evaluation (at every length too: ``midtrain.evaluate``), written as the record of step ``end_step``, the last checkpoint and the run's
    status; returns the evaluation. The final state is evaluated also when --until stops early (step
    end_step: the state after end_step updates, as an evaluation at the start of step end_step of a
    longer run would see it; a resume drops this record and evaluates that step again, with the same
    values). The last checkpoint is taken once every record is written (evaluating drew no RNG), so a
    resume from it records every missing step again; ``save_checkpoint_now`` is None when the last
    update was skipped (no checkpoint of such a state). Returns the ``val/`` losses."""
    evaluation = evaluator(model, end_step, device, autocast, writer, final=True)
    record = {"step": end_step, **evaluation, "train/tokens": tokens}
    if status == "finished":  # the hooks marked for the end (probes) measure the final model too
        monitor.on_run_end(**record)
    else:  # stopped by --until: no hook runs, so a resume continues every hook exactly
        monitor.write(record)
    val_end = {k: v for k, v in evaluation.items() if k.startswith("val/")}
    if writer is not None:
        writer.check(wait=True)
    if save_checkpoint_now is not None and (writer is not None or sharded):  # sharded: every rank writes its shards
        save_checkpoint_now()
    if writer is not None:
        writer.update_info(status=status, steps_done=end_step, wall_s=time.perf_counter() - t_start)
    return val_end


# -- the loop -----------------------------------------------------------------------------------

def train(cfg: TrainConfig, out_dir: str, *, resume: bool = False, parent: str | None = None,
          parent_step: int | None = None, until_step: int | None = None, hooks: list[Hook] | None = None,
          corpus: "data_mod.Corpus | None" = None, progress: bool = True, strict_hooks: bool = False) -> TrainResult:
    """Run (or resume, or branch) a phased run into ``out_dir``.

    Args:
        resume: continue the run in ``out_dir`` from its latest checkpoint.
        parent, parent_step: branch: start from checkpoint ``parent_step`` of the run
            ``parent`` with this (possibly changed) config; only steps from
            ``parent_step`` on are run, and run.json records the parent.
        until_step: stop after this global step (a checkpoint is written), e.g. to
            split a run in two.
        hooks: measurement hooks for the Monitor; None: the defaults of ``[monitor]``
            (``midtrain.hookset``); ``[]``: none.
        corpus: data to use instead of the config's (tests pass small corpora).
    Raises ConfigError / DataError / RunDirError for bad input, before touching disk (but for the
    lock file: one process at a time trains ``out_dir``, ``midtrain._lock``; a RunDirError names the
    holder of a live lock).
    """
    lock = RunLock(out_dir).acquire() if int(os.environ.get("RANK", "0")) == 0 else None
    try:
        return _train(cfg, out_dir, resume=resume, parent=parent, parent_step=parent_step, until_step=until_step,
                      hooks=hooks, corpus=corpus, progress=progress, strict_hooks=strict_hooks)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: TrainConfig, out_dir: str, *, resume: bool, parent: str | None, parent_step: int | None,
           until_step: int | None, hooks: list[Hook] | None, corpus, progress: bool, strict_hooks: bool) -> TrainResult:
    """``train`` once the run directory is locked."""
    t_start = time.perf_counter()
    cfg.validate()
    rank, world, device = set_up_processes(cfg)
    master = rank == 0
    corpus, mcfg = _data_and_model_config(cfg, corpus, world)
    evaluator = Evaluator(cfg, corpus)  # a domain too short to evaluate is refused before anything is written
    total = cfg.total_steps()
    start = _plan_start(cfg, out_dir, resume=resume, parent=parent, parent_step=parent_step,
                        until_step=until_step, world=world)
    tokens, end_step = start.tokens, start.end_step

    model, optimizer = _build_model(cfg, mcfg, device, start, branch=parent is not None, world=world)
    dtype, autocast = _precision(cfg, device)
    fwd_model, shards = forward_model(model, cfg, device, world), sharded(cfg, world)
    # before the run store: a bad [monitor.<hook>] option or two hooks of one name touch no disk
    hooks = build_hooks(cfg, model, corpus) if hooks is None else named_hooks(hooks)
    # wandb first: a bad [wandb] (not installed, no API key online) stops here, before run.json
    extra_sinks = [_wandb_sink(cfg, out_dir)] if master and cfg.wandb_enabled() else []
    writer = _open_run_store(cfg, out_dir, start, resume=resume, parent=parent, parent_step=parent_step, model=model,
                             corpus=corpus, world=world, device=device, dtype=dtype) if master else None
    monitor = Monitor(model, hooks, sinks=[RunStoreSink(writer), *extra_sinks] if writer else [NullSink()],
                      strict=strict_hooks, enabled=master, ddp_model=fwd_model if world > 1 and not shards else None,
                      sharded=shards)
    monitor.set_boundaries([*cfg.phase_starts()[1:], total])  # probes also where phases end, and at the end
    if start.ckpt is not None and start.ckpt.get("monitor"):
        monitor.load_state_dict(start.ckpt["monitor"])

    bar = Progress(total, start.step, cfg.log_every, enabled=progress and master)
    phase_ends = {s + p.num_steps() for s, p in zip(cfg.phase_starts(), cfg.phases)}
    params = [p for p in model.parameters() if p.requires_grad]
    val_start = dict(start.val_start)  # a resume keeps the run's first evaluation
    last_loss, cur_phase, message = float("nan"), -1, ""  # message: why the run diverged (midtrain._guard)
    skipped = int(start.ckpt.get("skipped_steps", 0)) if start.ckpt is not None else 0  # older checkpoints: 0
    guard = DivergenceGuard(cfg.max_skipped_steps, cfg.skip_window, (start.ckpt or {}).get("recent_skipped", ()))
    speed = Throughput(peak_flops(device))
    model.train()
    done, owed, finite = start.step, False, True  # steps done; a checkpoint owed (_checkpoint_now)
    try:
        for step in range(start.step, end_step):
            pi, phase, _ = cfg.phase_at(step)
            scalars: dict[str, Any] = {}
            # before a phase switch: a phase's first step evaluates the model as the phase before left it
            # (its RoPE base); val/ at L0, at phase boundaries every length too (midtrain.evaluate)
            if evaluator.due(step):
                scalars.update(evaluator(model, step, device, autocast, writer))
                if step == 0:
                    val_start = {k: v for k, v in scalars.items() if k.startswith("val/")}
            if pi != cur_phase:  # phase switch: context length, RoPE base, data mixture
                cur_phase, sampler = pi, data_mod.MixtureSampler(corpus, phase.mixture, phase.seq_len, cfg.seed)
                model.set_rope(phase.rope_base, phase.rope_scaling)  # None keeps the model's current one
                micro_global, flops_tok = phase.batch_size // phase.grad_accum, model.flops_per_token(phase.seq_len)

            monitor.on_step_begin(step)  # probes that measure before the update (retrieval) run here
            speed.step_begin()  # step time excludes evaluation and those probes
            lr = cfg.lr_at(step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            loss_sum = torch.zeros((), device=device)
            for micro in range(phase.grad_accum):
                batch = sampler.shard(sampler.global_batch(pi, step, micro, micro_global), rank, world).to(device)
                sync = micro == phase.grad_accum - 1  # gradients are reduced on the last micro-batch only
                with grad_sync(fwd_model, sync, world):
                    with autocast:
                        _, losses = fwd_model(batch.x, batch.y, reduction="none")  # (B,) per-sequence
                    loss = losses.mean()
                    (loss / phase.grad_accum).backward()
                monitor.on_backward_end(batch.size, losses=losses.detach(), ids=batch.ids, domains=batch.domains)
                loss_sum += loss.detach()
            monitor.on_grads_ready()  # accumulated, synchronised, before clipping
            grad_norm = _clip_grads(params, cfg.optim.grad_clip)
            finite = bool(torch.isfinite(grad_norm))
            if finite:
                optimizer.step()
            else:  # NaN/inf gradients: skip the update rather than poison the weights
                skipped += 1
            optimizer.zero_grad(set_to_none=True)

            last_loss = mean_over_ranks(loss_sum / phase.grad_accum, world).item()
            step_tokens = phase.batch_size * phase.seq_len
            tokens += step_tokens
            scalars.update(
                loss=last_loss, lr=lr, tokens=tokens, batch_size=phase.batch_size, batch_tokens=step_tokens,
                seq_len=phase.seq_len, phase=phase.name, phase_index=pi, grad_norm=float(grad_norm),
                skipped_steps=skipped, **speed.step_end(step_tokens, flops_tok),
            )
            monitor.on_step_end(step, **scalars)
            bar.update(step, phase.name, last_loss, lr, speed.tok_s_ema)
            if guard.update(step, skipped=not finite, loss=last_loss, lr=lr, grad_norm=float(grad_norm)):
                end_step, message = step + 1, _end_diverged(guard, step, out_dir, writer, monitor, dtype)
                break

            done = step + 1
            owed = owed or ((cfg.checkpoint_due(done) or done in phase_ends) and done < end_step)
            if _checkpoint_now(writer, owed, shards) and finite:  # never a checkpoint of a skipped update's state
                save_checkpoint(out_dir, done, tokens, model, optimizer, monitor, cfg, skipped, guard.state(),
                                sharded_world=world if shards else 0)
                owed = False
        tokens_per_s = speed.loop_tokens_per_s()
        status = "diverged" if message else "finished" if end_step == total else "stopped"
        last = (lambda: save_checkpoint(out_dir, end_step, tokens, model, optimizer, monitor, cfg, skipped,
                                        guard.state(), sharded_world=world if shards else 0)) if finite else None
        val_end = {} if message else _end_run(model, evaluator, device, autocast, monitor, writer, end_step, tokens,
                                              status, t_start, last, shards)
    except BaseException as e:
        _record_failure(writer, monitor, e, done)
        raise
    monitor.close()
    return TrainResult(run_dir=out_dir, start_step=start.step, steps_done=end_step, total_steps=total,
                       final_loss=last_loss, val_start=val_start, val_end=val_end, tokens_per_s=tokens_per_s,
                       mfu=speed.mfu, wall_s=time.perf_counter() - t_start, model=model, status=status, message=message)
