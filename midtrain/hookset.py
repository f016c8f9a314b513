"""The measurement hooks the built-in loop attaches by default.

``build_hooks(cfg, model, corpus)`` reads ``[monitor.<hook>]`` tables of the
config: ``enabled = false`` turns a hook off; every other key is passed to the
hook's constructor, so a misspelt option is a ConfigError naming the hook and
listing the keys it takes (``_check_options``, from the constructor's signature).
The list of hooks is ``midtrain.config.MonitorSection``: each of its fields names
the builder function below that turns its table into a hook (``_BUILDERS``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import warnings
from typing import Any, Callable

from hooks.monitor import Hook, unique_hook_names
from midtrain.checkpoint import load_reference_model
from midtrain.config import ConfigError, MonitorSection, TrainConfig


def build_hooks(cfg: TrainConfig, model, corpus) -> list[Hook]:
    hooks: list[Hook] = []
    for name, (default_on, fn) in _BUILDERS.items():
        opts: dict[str, Any] = dict(getattr(cfg.monitor, name) or {})
        if not opts.pop("enabled", default_on):
            continue
        try:
            hook = fn(opts, cfg, model, corpus)
        except TypeError as e:
            raise ConfigError(f"[monitor.{name}]: {e}") from None
        if hook is not None:  # None: nothing to measure in this run (e.g. retrieval without a long phase)
            hooks.append(hook)
    return hooks


def _check_options(hook: str, cls: type, opts: dict[str, Any], *, supplied: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> None:
    """ConfigError for a ``[monitor.<hook>]`` key that neither the hook's constructor (its signature, less
    what the builder or the Monitor ``supplied``: objects, not TOML values) nor the builder (``extra``)
    takes, listing the valid keys."""
    params = inspect.signature(cls).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = sorted({"enabled", *extra, *(n for n in params if n not in supplied)})
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ConfigError(f"[monitor.{hook}]: unknown key(s) {bad}; valid keys are: {', '.join(valid)}.")


def _count_option(hook: str, opts: dict[str, Any], key: str, default: int) -> int:
    """Pop a builder's own option that counts sequences: a positive integer, or a ConfigError naming it."""
    value = opts.pop(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"[monitor.{hook}] {key} must be a positive integer, got {value!r}.")
    return value


def named_hooks(hooks: list[Hook]) -> list[Hook]:
    """A user's hook list with unique names (``hooks.monitor.unique_hook_names``), or a ConfigError
    naming the duplicates, before the run directory is written."""
    try:
        return unique_hook_names(list(hooks))
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_gradient_noise_scale(opts: dict[str, Any], cfg: TrainConfig, model, corpus) -> Hook:
    """``[monitor.gns]``: GradientNoiseScale (mode = "auto" | "microbatch" | "ddp" | "per_example" |
    "layernorm", every, ema, groups, group_details, fallback, per_domain, domain_every; docs/gns.md
    "Hook modes"). Domain indices are named after the corpus's domains.

    Tokens per example come from each step's ``train/seq_len``; the DDP wrapper from the Monitor."""
    from hooks.gradient_noise import GradientNoiseScale

    _check_options("gns", GradientNoiseScale, opts, supplied=("ddp_model", "process_group", "grad_scale",
                                                             "domain_names"))
    try:
        return GradientNoiseScale(domain_names=list(corpus.names()) if corpus is not None else None, **opts)
    except ValueError as e:
        raise ConfigError(f"[monitor.gns]: {e}") from None


# -- representation --------------------------------------------------------------------

def _probe_batches(hook: str, cfg: TrainConfig, corpus, n_seq: int, seq_len: int | None = None) -> dict:
    """A fixed probe batch per corpus domain -- every domain, including those only later
    phases train on: ``n_seq`` evenly spaced validation chunks at ``seq_len`` (default: the first
    phase's). A domain too short for one is left out with a warning."""
    from midtrain import data as data_mod

    out = {}
    for d in corpus.names():
        try:
            out[d] = data_mod.val_batches(corpus, d, seq_len or cfg.phases[0].seq_len, n_seq, 1)[0]
        except data_mod.DataError as e:
            warnings.warn(f"[monitor.{hook}]: no probe batch for domain {d!r} ({e})", UserWarning)
    return out


def build_representation_probe(opts: dict[str, Any], cfg: TrainConfig, model, corpus) -> Hook:
    """``[monitor.representation]``: RepresentationProbe on a fixed per-domain probe batch: the
    ``probe_sequences`` (default 4) evenly spaced validation chunks of every domain at the first phase's
    seq_len (``val_batches``). Defaults: every = eval_every (plus log-spaced steps 1, 2, 4, ...
    below it), max_tokens = 512, info_plane_tokens = 256; any other constructor keyword
    (layers, metrics, twonn, info_plane, readout, save_spectra, ...) may be set. Eigenspectra go
    to the run store found on the Monitor's sink."""
    from hooks.representation import RepresentationProbe

    _check_options("representation", RepresentationProbe, opts, supplied=("probe_batch", "writer", "model"),
                   extra=("probe_sequences",))
    opts = dict(opts)
    n_seq = _count_option("representation", opts, "probe_sequences", 4)
    probe = {d: (b.x, b.y) for d, b in _probe_batches("representation", cfg, corpus, n_seq).items()}
    if not probe:
        raise ConfigError("[monitor.representation]: no domain has enough validation tokens for a probe batch.")
    opts.setdefault("every", cfg.eval_every)
    opts.setdefault("max_tokens", 512)
    opts.setdefault("info_plane_tokens", 256)
    try:
        return RepresentationProbe(probe, **opts)
    except ValueError as e:
        raise ConfigError(f"[monitor.representation]: {e}") from None


# -- difficulty ------------------------------------------------------------------------

def build_difficulty_tracker(opts: dict[str, Any], cfg: TrainConfig, model, corpus) -> Hook:
    """DifficultyTracker with a fixed probe set per corpus domain -- every domain, including
    those only later phases train on -- taken from the validation split (``val_batches``:
    evenly spaced chunks at the first phase's seq_len). Extra options: ``probe_size``
    (sequences per domain, default 16) and ``reference_checkpoint`` (a midtrain checkpoint file,
    or a run directory meaning its latest checkpoint, whose model gives the reducible loss;
    loaded at the first probe -- a missing, corrupt or incompatible one is a warning, not an
    error: training and the other signals go on without reducible_loss). Probes follow
    ``eval_every``; the per-example table is saved every ``checkpoint_every`` steps and at the
    end, through the Monitor's run store."""
    import torch

    from hooks.difficulty import DifficultyTracker

    _check_options("difficulty", DifficultyTracker, opts, supplied=("domain_names", "probe", "reference", "writer", "save_fn"),
                   extra=("probe_size", "reference_checkpoint"))
    opts = dict(opts)
    probe_size = _count_option("difficulty", opts, "probe_size", 16)
    ref_path = opts.pop("reference_checkpoint", None)
    probe = {d: torch.cat([b.x, b.y[:, -1:]], dim=1)  # (N, T+1) token ids
             for d, b in _probe_batches("difficulty", cfg, corpus, probe_size).items()}
    opts.setdefault("probe_every", cfg.eval_every)
    opts.setdefault("save_every", cfg.checkpoint_every)
    if ref_path is not None:
        if not isinstance(ref_path, (str, os.PathLike)) or not str(ref_path):
            raise ConfigError(f"[monitor.difficulty]: reference_checkpoint must be a path (a checkpoint file or a "
                              f"run directory), got {ref_path!r}.")
        opts["reference"] = functools.partial(load_reference_model, str(ref_path), corpus.vocab_size)
    try:
        return DifficultyTracker(domain_names=corpus.names(), probe=probe, **opts)
    except ValueError as e:
        raise ConfigError(f"[monitor.difficulty]: {e}") from None


# -- retrieval -------------------------------------------------------------------------

def retrieval_schedule(cfg: TrainConfig, every: int | None = None) -> tuple[list[int], list[int]]:
    """(lengths, steps) of ``[monitor.retrieval]`` in the built-in loop: the long-context phases are
    those whose seq_len exceeds the first phase's; the lengths are their distinct seq_lens, and each
    such phase is probed at its first step (before its first update: the previous phase's weights,
    already with this phase's RoPE base), every ``every`` steps after it (default: ``eval_every`` or a
    quarter of the phase, whichever is longer: at most 5 probes per phase, at most one per
    ``eval_every`` steps) and at its last step (before that step's update). No long phase:
    ([], [])."""
    L0, out = cfg.phases[0].seq_len, set()
    lengths = sorted({p.seq_len for p in cfg.phases if p.seq_len > L0})
    for start, p in zip(cfg.phase_starts(), cfg.phases):
        n = p.num_steps()
        if p.seq_len <= L0 or n < 1:
            continue
        k = every or max(cfg.eval_every, -(-n // 4))
        out.update(range(start, start + n, k))
        out.add(start + n - 1)
    return lengths, sorted(out)


def build_retrieval_probe(opts: dict[str, Any], cfg: TrainConfig, model, corpus) -> Hook | None:
    """``[monitor.retrieval]``: RetrievalProbe in the long-context phases (``retrieval_schedule``; none:
    no hook), at their lengths (or ``lengths``), on the validation split of every corpus domain at each
    length (evenly spaced chunks, ``val_batches``; a domain too short for the length is left out with a
    warning), with ``far_from`` = the first phase's seq_len. Defaults: key_len 8, n_keys 4 and 6 depths
    per length from 16 to L - key_len (docs/retrieval.md); ``every`` sets the interval inside the
    long phases; any other constructor keyword (depths, key_len, n_keys, n_depths, min_depth,
    key_tokens, batch_size, seed, ...) may be set."""
    from hooks.retrieval import RetrievalProbe

    _check_options("retrieval", RetrievalProbe, opts, supplied=("data", "writer", "model", "steps", "far_from"))
    opts = dict(opts)
    every = opts.pop("every", None)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ConfigError(f"[monitor.retrieval] every must be a positive integer, got {every!r}.")
    lengths, steps = retrieval_schedule(cfg, every)
    if not steps:
        return None
    n_dom = max(1, len(corpus.names()))
    per_domain = -(-int(opts.get("n_keys", 4)) // n_dom) if isinstance(opts.get("n_keys", 4), int) else 1
    data, key_len = {}, opts.get("key_len", 8)
    if "lengths" not in opts and isinstance(key_len, int):  # the default lengths: only those that hold a key twice
        if [L for L in lengths if L < 2 * key_len]:
            warnings.warn(f"[monitor.retrieval]: context lengths below {2 * key_len} (twice key_len) are not "
                          f"probed: {[L for L in lengths if L < 2 * key_len]}", UserWarning)
        lengths = [L for L in lengths if L >= 2 * key_len]
    for L in opts.pop("lengths", lengths):
        data[L] = {d: b.x for d, b in _probe_batches("retrieval", cfg, corpus, per_domain, L).items()}
        if not data[L]:
            warnings.warn(f"[monitor.retrieval]: no domain has enough validation tokens for a context of {L}; "
                          "that length is not probed", UserWarning)
            del data[L]
    if not data:
        return None
    try:
        return RetrievalProbe(data.__getitem__, list(data), every=None, steps=steps, far_from=cfg.phases[0].seq_len,
                              **opts)
    except ValueError as e:
        raise ConfigError(f"[monitor.retrieval]: {e}") from None


# name -> (enabled by default, builder(options, cfg, model, corpus) -> Hook), one per [monitor.<name>]
_BUILDERS: dict[str, tuple[bool, Callable[..., Hook]]] = {
    f.name: (f.metadata["enabled"], globals()[f.metadata["builder"]]) for f in dataclasses.fields(MonitorSection)
}
