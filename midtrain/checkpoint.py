"""The built-in loop's checkpoint format: where checkpoints live in a run directory, what one
holds, saving, loading and restoring one, and the models they describe (``model_config``; the
reference model of ``[monitor.difficulty]``, ``load_reference_model``).

A checkpoint is ``<run>/checkpoints/step_<N>.pt`` (``diagnostics.runs.checkpoint_name``), taken
after ``N`` optimizer steps: a ``torch.save`` dict with the model and optimizer state, the RoPE
base and scaling (``midtrain.rope``; a checkpoint without ``rope_scaling`` is plain RoPE), the run's
config, the Monitor's state and every RNG stream, so a resumed run continues bit-identically. It is
written atomically (``diagnostics.runs.atomic_write``).

A sharded run (``parallelism = "fsdp"`` under ``torchrun``) keeps its model and optimizer state beside that
file, in the folder ``step_<N>.dcp/`` written by every rank with torch's distributed checkpoint
(``torch.distributed.checkpoint``: each rank its own shards); the ``.pt`` file, written by rank 0 once
that folder is complete, holds everything else, ``"model"`` and ``"optimizer"`` set to None and
``"sharded": {"dir": "step_<N>.dcp", "world_size": W}``. It resumes on the same number of processes
with ``parallelism = "fsdp"``, and loads into an unsharded run (one process, e.g. a ``midtrain sweep``
branch, or DDP: the shards are read into whole tensors); a sharded run on another number of processes,
and an unsharded checkpoint in a sharded run, are a clear ConfigError (``check_sharding``).
Single-process and DDP checkpoints are unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings

import numpy as np
import torch

from diagnostics.runs import CHECKPOINTS_DIR, RunDirError, atomic_write, checkpoint_name, load_run
from midtrain.config import ConfigError, TrainConfig
from midtrain.model import GPT, GPTConfig, get_preset

CHECKPOINT_FORMAT = 1


def model_config(cfg: TrainConfig, vocab_size: int) -> GPTConfig:
    """The preset named in ``[model]`` with the section's overrides applied."""
    try:
        mc = get_preset(cfg.model.preset)
    except (KeyError, ValueError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    overrides = {k: v for k, v in vars(cfg.model).items() if k != "preset" and v is not None}
    try:
        return dataclasses.replace(mc, vocab_size=vocab_size, **overrides)
    except ValueError as e:
        raise ConfigError(f"[model] section: {e}.") from None


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, CHECKPOINTS_DIR, checkpoint_name(step))


def sharded_dir(path: str) -> str:
    """The distributed-checkpoint folder of the checkpoint file ``path`` (``step_<N>.pt`` -> ``step_<N>.dcp``)."""
    return os.path.splitext(path)[0] + ".dcp"


def save_checkpoint(run_dir, step, tokens, model, optimizer, monitor, cfg, skipped_steps=0, recent_skipped=(),
                    *, sharded_world: int = 0) -> str:
    """Write checkpoint ``step``. ``sharded_world``: the number of processes of a sharded (FSDP2) run,
    0 otherwise; then every rank must call this (the distributed checkpoint is a collective) and only
    rank 0 writes the ``.pt`` file."""
    path = checkpoint_path(run_dir, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sharding = None
    if sharded_world:
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=sharded_dir(path))
        if dist.get_rank() != 0:
            dist.barrier()  # returns once rank 0 wrote the .pt: every rank then sees the same checkpoints
            return path
        sharding = {"dir": os.path.basename(sharded_dir(path)), "world_size": int(sharded_world)}
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,  # optimizer updates applied; the next step to run
        "tokens": tokens,
        "skipped_steps": skipped_steps,  # non-finite-gradient steps so far: the count spans resumes
        "recent_skipped": list(recent_skipped),  # those in the divergence guard's window (midtrain._guard)
        "model": None if sharding else model.state_dict(),
        "optimizer": None if sharding else optimizer.state_dict(),
        "sharded": sharding,
        "rope_base": model.config.rope_base,
        "rope_scaling": model.config.rope_scaling,  # the checked table (midtrain.rope) or None
        "config": cfg.to_dict(),
        "monitor": monitor.state_dict(),
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        },
    }
    try:
        atomic_write(path, writer=lambda f: torch.save(state, f))  # a killed save never leaves half a checkpoint
    finally:
        if sharding:
            import torch.distributed as dist

            dist.barrier()
    return path


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise RunDirError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be corrupted.") from None


def newest_readable_checkpoint(run) -> tuple[dict | None, list[str]]:
    """The newest checkpoint of ``run`` (a ``diagnostics.runs.Run``) that loads, or None when it has
    none, and why each newer one could not be read (a truncated or corrupted file). RunDirError when
    there are checkpoints but none loads."""
    unreadable = []
    for _, path in reversed(run.checkpoints()):
        try:
            return load_checkpoint(str(path)), unreadable
        except RunDirError as e:
            unreadable.append(str(e))
    if unreadable:
        raise RunDirError(f"no checkpoint of {run.path} can be read: {' '.join(unreadable)} Nothing was changed. "
                          f"Delete the run directory to start again, or branch from another run.")
    return None, []


def check_sharding(ckpt: dict, path: str, sharded_world: int) -> None:
    """ConfigError unless the checkpoint ``ckpt`` (read from ``path``) can be loaded by a run that is sharded
    over ``sharded_world`` processes (0: not sharded): a sharded checkpoint by a sharded run of the same
    world size, or by an unsharded run (one process, DDP: the distributed checkpoint reads the shards into
    whole tensors), an unsharded one only by an unsharded run."""
    had = ckpt.get("sharded") or {}
    was = int(had.get("world_size", 0))
    if was == sharded_world or not sharded_world:
        return
    if was:
        raise ConfigError(f"checkpoint {path} was written by a sharded (FSDP) run of {was} processes; a sharded run "
                          f"can only resume or branch from it on {was} processes, not {sharded_world}. Start torchrun "
                          f"with --nproc_per_node {was}, or load it unsharded (one process, or parallelism = \"ddp\"). "
                          f"Nothing was changed.")
    raise ConfigError(f"checkpoint {path} was written by an unsharded (single-process or DDP) run; a sharded "
                      f"(parallelism = \"fsdp\") run cannot load it. Use parallelism = \"ddp\". Nothing was changed.")


def restore_checkpoint(ckpt: dict, model, optimizer, *, rng: bool, path: str | None = None) -> None:
    """Load a checkpoint's model, optimizer and RoPE base and scaling; with ``rng`` (a resume) also its
    RNG streams (dropout), which a branch does not take: it reseeds. A sharded checkpoint (every rank
    calls this) is read from its distributed-checkpoint folder beside ``path``."""
    if ckpt.get("sharded"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process" (it is)
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
            dcp.load(state, checkpoint_id=os.path.join(os.path.dirname(path), ckpt["sharded"]["dir"]))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    else:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    model.set_rope_base(ckpt["rope_base"])
    model.set_rope_scaling(ckpt.get("rope_scaling"))  # older checkpoints have none: plain RoPE
    if rng:
        torch.set_rng_state(ckpt["rng"]["torch"])
        np.random.set_state(ckpt["rng"]["numpy"])
        random.setstate(ckpt["rng"]["python"])
        if ckpt["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])


# -- the reference model of [monitor.difficulty] ----------------------------------------

def reference_checkpoint_path(path: str) -> str:
    """The checkpoint file ``path`` names: the file itself, or a run directory's latest checkpoint."""
    if os.path.isdir(path):
        latest = load_run(path).latest_checkpoint()
        if latest is None:
            raise ConfigError(f"[monitor.difficulty] reference_checkpoint {path!r} is a run directory without "
                              "checkpoints.")
        return latest[1]
    if not os.path.isfile(path):
        raise ConfigError(f"[monitor.difficulty] reference_checkpoint {path!r} is neither a checkpoint file nor a "
                          "run directory.")
    return path


def load_reference_model(path: str, vocab_size: int):
    """A frozen GPT (CPU, eval mode) from a midtrain checkpoint file or run directory, with the
    checkpoint's own architecture, RoPE base and scaling; any architecture works if its vocabulary is ours."""
    file = reference_checkpoint_path(path)
    ck = load_checkpoint(file)
    if ck.get("sharded"):
        raise ConfigError(f"[monitor.difficulty] reference_checkpoint {file} is a sharded (FSDP) checkpoint; a "
                          "reference model needs an unsharded one (a single-process or DDP run's).")
    try:
        ref = GPT(model_config(TrainConfig.from_dict(ck["config"]), vocab_size))
        ref.load_state_dict(ck["model"])
        ref.set_rope_base(ck["rope_base"])
        ref.set_rope_scaling(ck.get("rope_scaling"))
    except (KeyError, TypeError, ValueError, RuntimeError, ConfigError) as e:
        raise ConfigError(f"[monitor.difficulty] reference_checkpoint {file} does not hold a midtrain model for "
                          f"this corpus (vocabulary {vocab_size}): {type(e).__name__}: {e}") from None
    return ref.eval().requires_grad_(False)
