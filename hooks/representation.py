"""RepresentationProbe: the geometry of chosen layers on a fixed probe batch, every N steps.

At step 0, every ``every`` steps and at log-spaced early steps (1, 2, 4, 8, ... below
``log_spaced_until``) the hook runs one no-grad, eval-mode forward pass of the model on a fixed probe
batch, with forward hooks on the chosen activation sites attached only for that call (a context
manager; always removed). Inside each forward hook the site's output is reduced at once: a fixed,
seeded subsample of at most ``max_tokens`` token positions is gathered on the device, read out through
the model's own final norm + unembedding (logit lens), moved to CPU as float64, and turned into the
numbers of ``diagnostics.spectra``; nothing of the activations outlives the call.

    probe = {d: val_batch_of(d) for d in ("prose", "code", "math")}     # fixed, per domain
    monitor = Monitor(model, [RepresentationProbe(probe, every=100)], run_dir="runs/demo")
    ...                                    # the loop's three events; the probe runs in on_step_end

Metric keys (docs/representation.md, "RepresentationProbe hook"), one per probed site <layer>:

    repr/<layer>/entropy            matrix entropy of the centred token covariance (nats)
    repr/<layer>/effective_rank     RankMe effective rank (singular values of the centred tokens)
    repr/<layer>/alpha_req          eigenspectrum power-law decay exponent (ranks 6..100)
    repr/<layer>/twonn_id           TwoNN intrinsic dimension of the token cloud
    repr/<layer>/mi_xt              matrix-based I(X; T), X = identity of the current input token
    repr/<layer>/mi_ty              matrix-based I(T; Y), Y = next token
    repr/<layer>/readout_loss       logit-lens cross-entropy through final norm + lm_head (nats)
    repr/<layer>/compressing        1 once a compression onset is detected (diagnostics.phases)
    repr/<layer>/<domain>/<key>     entropy, effective_rank, alpha_req, readout_loss per domain
                                    (only with a per-domain probe batch of two or more domains)
    repr/probe_time_s               wall time of the whole probe (forward + metrics)

Optional extras via ``metrics=``: normalized_entropy, alpha_req_r2. Eigenspectra (trace-normalised
covariance eigenvalues of each site) go to ``arrays/repr_spectra_step_<N>.npz`` when a run writer is
known (given, set with ``set_writer``, or found on the Monitor's run-store sink).
"""

from __future__ import annotations

import contextlib
import fnmatch
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from diagnostics.phases import COMPRESSION_DIRECTION, detect_compression_onset, format_event
from diagnostics.spectra import (
    eigenspectrum,
    gram_entropy,
    joint_gram_entropy,
    kernel_gram,
    readout_loss,
    representation_metrics,
)
from hooks.monitor import Hook

__all__ = ["RepresentationProbe", "DEFAULT_METRICS", "default_sites"]

DEFAULT_METRICS = ("entropy", "effective_rank", "alpha_req", "twonn_id", "mi_xt", "mi_ty", "readout_loss")
_EXTRA_METRICS = ("normalized_entropy", "alpha_req_r2")
_DOMAIN_METRICS = ("entropy", "effective_rank", "alpha_req", "readout_loss", "normalized_entropy", "alpha_req_r2")
_HF_KEYS = ("input_ids", "inputs_embeds", "attention_mask")
_NORM_NAMES = ("final_norm", "ln_f", "norm", "final_layer_norm", "transformer.ln_f", "model.norm")

LayerSpec = Union[None, str, Sequence[str], Callable[[str], bool], type, tuple]


# ----------------------------------------------------------------------------------------------------
# probe inputs: whatever the user gives -> a list of forward "jobs" with fixed token subsamples

@dataclass
class _Input:
    """One domain's probe input, normalised."""

    args: tuple
    kwargs: dict
    ids: Optional[torch.Tensor]  # (B, T) integer token ids, if any
    targets: Optional[torch.Tensor]  # token grid shape, next token, -1 = none
    features: Optional[torch.Tensor]  # float inputs (grid..., D) when there are no token ids
    valid: torch.Tensor  # bool, token grid shape

    @property
    def n(self) -> int:
        return self.valid.numel()


@dataclass
class _Job:
    """One forward pass: inputs plus the fixed rows (flat token positions) it contributes."""

    args: tuple
    kwargs: dict
    n_tokens: int  # flat positions in this forward's token grid
    rows: torch.Tensor  # (n,) long, flat positions into the grid
    domain: torch.Tensor  # (n,) long, domain index of each row
    x_label: Optional[torch.Tensor]  # (n,) current-token ids
    x_feat: Optional[torch.Tensor]  # (n, Din) float inputs
    y: Optional[torch.Tensor]  # (n,) next-token ids (-1 = none)


def _shift_targets(ids: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token of every position of a (B, T) id grid; the last position (and masked ones) get -1."""
    y = torch.full_like(ids, -1)
    y[..., :-1] = ids[..., 1:]
    if mask is not None:
        m = mask.bool()
        y[~m] = -1
        y[..., :-1][~m[..., 1:]] = -1
    return y


def _one_input(b: Any, skip_first: int) -> _Input:
    """Normalise one probe input: ids tensor, float tensor, (x, y), an object with .x/.y, or HF kwargs."""
    kwargs: dict = {}
    if isinstance(b, dict):
        kwargs = {k: v for k, v in b.items() if k != "labels"}
        ids = b.get("input_ids")
        mask = b.get("attention_mask")
        if ids is not None:
            targets = _shift_targets(ids, mask) if b.get("labels") is None else _shift_targets(b["labels"], mask)
            grid = ids.shape
        else:
            emb = b["inputs_embeds"]
            grid, targets = emb.shape[:-1], None
        valid = torch.ones(grid, dtype=torch.bool)
        if mask is not None:
            valid &= mask.bool().cpu()
        if targets is not None:
            valid &= targets.cpu() >= 0  # -1 (ours) and -100 (HF) mean "no target"
        features = None if ids is not None else b["inputs_embeds"]
        inp = _Input((), kwargs, None if ids is None else ids.cpu(), None if targets is None else targets.cpu(),
                     None if features is None else features.detach().cpu(), valid)
    else:
        if isinstance(b, (tuple, list)) and len(b) == 2:
            x, y = b
        elif hasattr(b, "x") and hasattr(b, "y"):
            x, y = b.x, b.y
        elif isinstance(b, torch.Tensor):
            x, y = b, None
        else:
            raise TypeError(f"cannot use {type(b).__name__} as a probe batch: give a (B, T) tensor of token ids, "
                            "an (x, y) pair, a dict of keyword inputs, or a dict domain -> one of those")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"probe input must be a tensor, got {type(x).__name__}")
        integer = not torch.is_floating_point(x) and not torch.is_complex(x)
        if integer:
            targets = _shift_targets(x) if y is None else y
            grid = x.shape
        else:
            targets, grid = y, x.shape[:-1]
        if targets is not None and tuple(targets.shape) != tuple(grid):
            raise ValueError(f"probe targets have shape {tuple(targets.shape)} but the token grid is {tuple(grid)}")
        valid = torch.ones(grid, dtype=torch.bool)
        if targets is not None:
            valid &= targets.cpu() >= 0
        inp = _Input((x,), {}, x.cpu() if integer else None, None if targets is None else targets.cpu(),
                     None if integer else x.detach().cpu(), valid)
    if skip_first and inp.valid.dim() >= 2 and inp.valid.shape[-1] > skip_first:
        inp.valid[..., :skip_first] = False  # first positions: attention-sink outliers
    return inp


def _normalise_probe(probe_batch: Any, skip_first: int) -> dict[Optional[str], _Input]:
    if isinstance(probe_batch, dict) and not any(k in probe_batch for k in _HF_KEYS):
        if not probe_batch:
            raise ValueError("the probe batch dict is empty")
        return {str(k).replace("/", "_"): _one_input(v, skip_first) for k, v in probe_batch.items()}
    return {None: _one_input(probe_batch, skip_first)}


def _build_jobs(inputs: dict[Optional[str], _Input], max_tokens: int, seed: int) -> list[_Job]:
    """Fixed token subsample (seeded, sorted) per domain; domains of equal tensor shape share a forward."""
    names = list(inputs)
    quota = [max_tokens // len(names) + (1 if i < max_tokens % len(names) else 0) for i in range(len(names))]
    chosen = []
    for i, (name, inp) in enumerate(inputs.items()):
        pos = inp.valid.reshape(-1).nonzero().squeeze(1)
        if pos.numel() == 0:
            raise ValueError(f"probe batch{'' if name is None else f' of domain {name!r}'} has no usable token")
        g = torch.Generator().manual_seed(seed + 7919 * i)
        take = pos[torch.randperm(pos.numel(), generator=g)[: quota[i]]].sort().values
        chosen.append(take)
    # group domains that can be concatenated along the batch dim into one forward
    groups: list[list[int]] = []
    for i, name in enumerate(names):
        inp = inputs[name]
        for grp in groups:
            ref = inputs[names[grp[0]]]
            if (not inp.kwargs and not ref.kwargs and len(inp.args) == 1 and len(ref.args) == 1
                    and inp.args[0].shape[1:] == ref.args[0].shape[1:] and inp.args[0].dtype == ref.args[0].dtype):
                grp.append(i)
                break
        else:
            groups.append([i])
    jobs = []
    for grp in groups:
        rows, dom, xl, xf, ys, offset = [], [], [], [], [], 0
        for i in grp:
            inp, take = inputs[names[i]], chosen[i]
            rows.append(take + offset)
            dom.append(torch.full_like(take, i))
            if inp.ids is not None:
                xl.append(inp.ids.reshape(-1)[take])
            if inp.features is not None:
                xf.append(inp.features.reshape(inp.n, -1)[take])
            ys.append(inp.targets.reshape(-1)[take] if inp.targets is not None else torch.full_like(take, -1))
            offset += inp.n
        first = inputs[names[grp[0]]]
        args = (torch.cat([inputs[names[i]].args[0] for i in grp]),) if len(grp) > 1 else first.args
        has_y = any(inputs[names[i]].targets is not None for i in grp)
        jobs.append(_Job(args, first.kwargs, offset, torch.cat(rows), torch.cat(dom),
                         torch.cat(xl) if len(xl) == len(grp) else None,
                         torch.cat(xf).double() if len(xf) == len(grp) else None,
                         torch.cat(ys).long() if has_y else None))
    return jobs


# ----------------------------------------------------------------------------------------------------
# which modules: names, globs, filters, types; defaults for the built-in GPT and HF-like models

def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind torch.compile (``_orig_mod``) and DDP / DataParallel (``module``)."""
    seen = 0
    while seen < 4:
        seen += 1
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            break
    return model


def default_sites(model: nn.Module) -> list[str]:
    """Every block's output plus the final norm.

    Built-in GPT: ``blocks.<i>.resid_post`` and ``final_norm``. Otherwise the children of the longest
    ``nn.ModuleList`` (the transformer blocks of HF-like models, e.g. ``transformer.h.<i>``) plus a
    sibling final norm (``ln_f``, ``norm``, ...); for an ``nn.Sequential`` or anything else, the
    top-level children.
    """
    if hasattr(model, "activation_sites"):
        sites = [s for s in model.activation_sites() if s.endswith(".resid_post")]
        return sites + (["final_norm"] if hasattr(model, "final_norm") else [])
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if lists:
        name, ml = max(lists, key=lambda nm: len(nm[1]))
        sites = [f"{name}.{i}" if name else str(i) for i in range(len(ml))]
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        for norm in ("ln_f", "norm", "final_norm", "final_layer_norm"):
            full = f"{parent}.{norm}" if parent else norm
            try:
                model.get_submodule(full)
            except AttributeError:
                continue
            sites.append(full)
            break
        return sites
    return [name for name, _ in model.named_children()]


def _resolve_sites(model: nn.Module, layers: LayerSpec) -> list[str]:
    named = dict(model.named_modules())
    named.pop("", None)
    if layers is None:
        return default_sites(model)
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(t, type) for t in layers)):
        sites = [n for n, m in named.items() if isinstance(m, layers)]
    elif callable(layers):
        sites = [n for n in named if layers(n)]
    else:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        sites = []
        for p in patterns:
            hits = [p] if p in named else [n for n in named if fnmatch.fnmatchcase(n, p)]
            if not hits:
                some = ", ".join(list(named)[:12])
                raise ValueError(f"no module named or matching {p!r}; modules include: {some}, ...")
            sites += [h for h in hits if h not in sites]
    if not sites:
        raise ValueError(f"layers={layers!r} selects no module of {type(model).__name__}")
    return sites


def _find_readout(model: nn.Module, readout: Any) -> Optional[tuple[Optional[nn.Module], nn.Module]]:
    """(final norm or None, unembedding Linear) of the model, or None when there is no LM head."""
    if isinstance(readout, tuple):
        return readout
    head = getattr(model, "lm_head", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return None
    norm = None
    for name in _NORM_NAMES:
        try:
            norm = model.get_submodule(name)
            break
        except AttributeError:
            continue
    return norm, head


def _first_tensor(out: Any) -> Optional[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    if hasattr(out, "to_tuple"):  # HF ModelOutput
        return _first_tensor(out.to_tuple())
    return None


@contextlib.contextmanager
def _num_threads(n: Optional[int]):
    """Temporarily run torch's CPU ops on n threads (None: leave as is).

    The metric math is float64 eigendecompositions of matrices of at most a few thousand rows:
    threads gain little there, and on a CPU shared with other work LAPACK's spin-waiting threads
    can make one 512 x 512 eigvalsh 20-30x slower (measured: 2 s vs 0.07 s on a loaded 2-core box).
    """
    old = torch.get_num_threads()
    if n is None or n == old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _distributed_non_zero_rank() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


# ----------------------------------------------------------------------------------------------------
# the hook

@dataclass
class _Call:
    """Per-probe-call scratch space; dropped when the call returns."""

    jobs: list
    job: int = 0
    chunks: dict = field(default_factory=dict)  # site -> list of (n, D) float64 CPU chunks
    ce: dict = field(default_factory=dict)  # site -> {domain index: [sum CE, count]}
    fired: dict = field(default_factory=dict)  # site -> set of job indices
    out: dict = field(default_factory=dict)  # metric name -> float
    spectra: dict = field(default_factory=dict)  # site -> eigenspectrum
    shared: dict = field(default_factory=dict)  # X / Y Grams and entropies, built once per call


class RepresentationProbe(Hook):
    """Representation geometry of chosen layers on a fixed probe batch (module docstring for keys).

    Args:
        probe_batch: a (B, T) tensor of token ids (targets = the next token; the last position has
            none), an ``(x, y)`` pair (e.g. ``midtrain.data.Batch``'s ``.x``/``.y``; float ``x`` of shape
            (..., D) for non-LM modules), a dict of keyword inputs for HF-like models (``model(**batch)``;
            ``attention_mask`` respected, ``labels`` used as targets and not passed), or a dict
            domain -> any of those (per-domain metrics).
        layers: None (``default_sites``), a module name or glob ("blocks.*.resid_post"), a list of
            them, a callable ``name -> bool``, or a module type / tuple of types.
        every: probe every N steps (and at step 0). log_spaced_until: also at steps 1, 2, 4, 8, ...
            below this (default ``every``; 0 disables).
        max_tokens: token positions per probe (split evenly over domains), a fixed seeded subsample of
            the valid positions (next token known, not masked, not among the first ``skip_first``).
        metrics: keys to log (DEFAULT_METRICS; extras normalized_entropy, alpha_req_r2).
        twonn, info_plane, readout: switch off groups of metrics (TwoNN; mi_xt/mi_ty; readout_loss).
            ``readout`` may also be a ``(norm, head)`` pair of modules for a model the auto-detection misses.
        info_plane_tokens: the information-plane Grams are N x N with O(N^3) eigendecompositions, so
            they use a fixed subset of at most this many of the probe tokens.
        mi_input: X of I(X; T): "token" (one-hot of the current token id; fixed over training),
            "embedding" (output of the model's input embedding), or "auto" ("token" when ids exist,
            else the float input rows).
        save_spectra, writer: save each probe's eigenspectra with ``writer.save_array``.
        phase_metric, phase_alpha, phase_min_points: online compression-onset detection
            (``diagnostics.phases``) on each site's history of ``phase_metric``; sets
            ``repr/<layer>/compressing``.
        per_domain: log per-domain metrics when the probe batch has two or more domains.
        metric_threads: CPU threads for the metric math (default 1, see ``_num_threads``; None = as is).
        seed: the token subsample's seed. model: attach without a Monitor (then call ``probe``).
    """

    name = "representation"

    def __init__(
        self,
        probe_batch: Any,
        layers: LayerSpec = None,
        every: int = 100,
        log_spaced_until: Optional[int] = None,
        max_tokens: int = 1024,
        metrics: Iterable[str] = DEFAULT_METRICS,
        twonn: bool = True,
        info_plane: bool = True,
        readout: Any = True,
        save_spectra: bool = True,
        writer: Any = None,
        *,
        info_plane_tokens: int = 512,
        mi_input: str = "auto",
        skip_first: int = 1,
        per_domain: bool = True,
        phase_metric: str = "entropy",
        phase_alpha: float = 0.01,
        phase_min_points: int = 8,
        metric_threads: Optional[int] = 1,
        seed: int = 0,
        model: Optional[nn.Module] = None,
    ):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if max_tokens < 3:
            raise ValueError(f"max_tokens must be >= 3, got {max_tokens}")
        metrics = tuple(metrics)
        unknown = [m for m in metrics if m not in DEFAULT_METRICS + _EXTRA_METRICS]
        if unknown:
            raise ValueError(f"unknown metric(s) {unknown}; choose from {DEFAULT_METRICS + _EXTRA_METRICS}")
        if mi_input not in ("auto", "token", "embedding"):
            raise ValueError(f"mi_input must be 'auto', 'token' or 'embedding', got {mi_input!r}")
        self.every = int(every)
        self.log_spaced_until = self.every if log_spaced_until is None else int(log_spaced_until)
        self.max_tokens = int(max_tokens)
        self.metrics = metrics
        self.twonn = twonn and "twonn_id" in metrics
        self.info_plane = info_plane and ("mi_xt" in metrics or "mi_ty" in metrics)
        self.readout = readout if (readout is not False and "readout_loss" in metrics) else False
        self.save_spectra = save_spectra
        self.writer = writer
        self.info_plane_tokens = int(info_plane_tokens)
        self.mi_input = mi_input
        self.per_domain = per_domain
        self.phase_metric = phase_metric
        self.phase_alpha = phase_alpha
        self.phase_min_points = phase_min_points
        self.metric_threads = metric_threads
        self.layers = layers
        inputs = _normalise_probe(probe_batch, skip_first)
        self.domains = list(inputs)
        self.jobs = _build_jobs(inputs, self.max_tokens, seed)  # the fixed batch + subsample, on CPU
        n = sum(int(j.rows.numel()) for j in self.jobs)
        g = torch.Generator().manual_seed(seed + 1)
        self._mi_rows = torch.randperm(n, generator=g)[: self.info_plane_tokens].sort().values
        self.model: Optional[nn.Module] = None
        self.sites: list[str] = []
        self.history: dict[str, dict[str, list[float]]] = {}
        self.events: dict[str, dict] = {}
        self.skipped_sites: dict[str, str] = {}
        self._suspended = False
        self._call: Optional[_Call] = None
        if model is not None:
            self._set_model(model)

    # -- wiring --------------------------------------------------------------------------------------
    def _set_model(self, model: nn.Module) -> None:
        self.model = _unwrap(model)
        self.sites = _resolve_sites(self.model, self.layers)
        self._readout = _find_readout(self.model, self.readout) if self.readout else None
        self._embedding = None
        if self.mi_input == "embedding" and self.info_plane:
            emb = getattr(self.model, "tok_emb", None)
            if emb is None and hasattr(self.model, "get_input_embeddings"):
                emb = self.model.get_input_embeddings()
            if emb is None:
                raise ValueError("mi_input='embedding' needs a model with tok_emb or get_input_embeddings()")
            self._embedding = emb

    def attach(self, model, monitor) -> None:
        if model is not None:
            self._set_model(model)
        if self.writer is None:  # the run store the Monitor writes to, if any
            for sink in getattr(monitor, "sinks", []):
                if getattr(sink, "writer", None) is not None:
                    self.writer = sink.writer
                    break

    def set_writer(self, writer) -> None:
        """Where eigenspectra go (a ``diagnostics.runs.RunWriter``); None stops saving."""
        self.writer = writer

    def scheduled(self, step: int) -> bool:
        if _distributed_non_zero_rank():
            return False  # DDP: rank 0 measures, the others train on
        if step == 0 or step % self.every == 0:
            return True
        return 0 < step < self.log_spaced_until and (step & (step - 1)) == 0

    def on_step_end(self, step: int, scalars: dict) -> dict[str, float]:
        if not self.scheduled(step):
            return {}
        return self.probe(step)

    # -- the probe -----------------------------------------------------------------------------------
    def probe(self, step: Optional[int] = None) -> dict[str, float]:
        """Run one probe now; returns the metrics (and, with ``step``, records history and spectra)."""
        if self.model is None:
            raise RuntimeError("RepresentationProbe has no model: add it to a Monitor or pass model=...")
        t0 = time.perf_counter()
        model = self.model
        device = next(model.parameters(), torch.zeros(())).device
        modes = [(m, m.training) for m in model.modules()]
        call = _Call(self.jobs)
        self._call = call
        handles = []
        try:
            model.eval()
            for site in self.sites:
                if site not in self.skipped_sites:
                    handles.append(model.get_submodule(site).register_forward_hook(self._make_hook(site)))
            if self._embedding is not None:
                handles.append(self._embedding.register_forward_hook(self._make_hook("__input__")))
            with torch.no_grad():
                for j, job in enumerate(self.jobs):
                    call.job = j
                    args = tuple(a.to(device) for a in job.args)
                    kwargs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in job.kwargs.items()}
                    model(*args, **kwargs)  # outputs dropped at once
                    del args, kwargs
                for site in [s for s in call.chunks if s != "__input__"]:  # not fired in the last forward
                    with _num_threads(self.metric_threads):
                        self._finalize(site)
        finally:
            for h in handles:
                h.remove()
            for m, was in modes:
                m.training = was
            self._call = None
        out = call.out
        if step is not None:
            self._record(step, out)
            if self.save_spectra and self.writer is not None and call.spectra:
                self.writer.save_array(f"repr_spectra_step_{int(step)}", **call.spectra)
        out["repr/probe_time_s"] = time.perf_counter() - t0
        return out

    def _make_hook(self, site: str):
        def hook(module, inputs, output):
            call = self._call
            if self._suspended or call is None or site in self.skipped_sites:
                return None  # our own readout calls the final norm: not a probe event
            fired = call.fired.setdefault(site, set())
            if call.job in fired:
                return None  # a module used twice in one forward: keep its first output
            fired.add(call.job)
            h = _first_tensor(output)
            job = call.jobs[call.job]
            if h is None or not torch.is_floating_point(h) or h.numel() // max(h.shape[-1], 1) != job.n_tokens:
                shape = None if h is None else tuple(h.shape)
                self.skipped_sites[site] = f"output {shape} does not hold one vector per token of the probe batch"
                call.chunks.pop(site, None)
                return None
            sub = h.detach().reshape(job.n_tokens, h.shape[-1]).index_select(0, job.rows.to(h.device))  # (n, D)
            if site != "__input__":
                self._readout_chunk(site, module, sub, job, call)
            call.chunks.setdefault(site, []).append(sub.to("cpu", torch.float64))
            if call.job == len(call.jobs) - 1 and site != "__input__":
                with _num_threads(self.metric_threads):
                    self._finalize(site)  # reduce now: nothing of this site is kept past this point
            return None

        return hook

    def _readout_chunk(self, site, module, sub, job, call) -> None:
        if self._readout is None or job.y is None:
            return
        norm, head = self._readout
        if module is head or sub.shape[-1] != head.in_features:
            return
        y = job.y.to(sub.device)
        dom = job.domain.to(sub.device)
        acc = call.ce.setdefault(site, {})
        self._suspended = True
        try:
            for d in job.domain.unique().tolist():
                m = (dom == d) & (y >= 0)
                cnt = int(m.sum())
                if cnt == 0:
                    continue
                ce = readout_loss(sub[m].float(), y[m], head.weight, norm=None if module is norm else norm,
                                  head_bias=head.bias)
                s = acc.setdefault(d, [0.0, 0])
                s[0] += ce * cnt
                s[1] += cnt
        finally:
            self._suspended = False

    def _shared(self, call: _Call) -> dict:
        """X and Y Grams / entropies for the information plane, once per probe call."""
        if call.shared:
            return call.shared
        sel = self._mi_rows
        x_label = torch.cat([j.x_label for j in self.jobs]) if all(j.x_label is not None for j in self.jobs) else None
        x_feat = torch.cat([j.x_feat for j in self.jobs]) if all(j.x_feat is not None for j in self.jobs) else None
        y = torch.cat([j.y for j in self.jobs]) if all(j.y is not None for j in self.jobs) else None
        Kx = None
        if self.mi_input == "embedding" and "__input__" in call.chunks:
            Kx = kernel_gram(torch.cat(call.chunks.pop("__input__"))[sel], "gaussian")
        elif self.mi_input in ("auto", "token") and x_label is not None:
            Kx = kernel_gram(x_label[sel], "onehot")
        elif self.mi_input == "auto" and x_feat is not None:
            Kx = kernel_gram(x_feat[sel], "gaussian")
        Ky = None
        if y is not None and bool((y[sel] >= 0).all()):
            Ky = kernel_gram(y[sel], "onehot")
        call.shared.update(Kx=Kx, Ky=Ky, Hx=None if Kx is None else gram_entropy(Kx),
                           Hy=None if Ky is None else gram_entropy(Ky), ready=True)
        return call.shared

    def _finalize(self, site: str) -> None:
        call = self._call
        chunks = call.chunks.pop(site, None)
        if not chunks:
            return
        Z = torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # (N, D) float64 CPU
        del chunks
        dom = torch.cat([j.domain for j in self.jobs])
        if Z.shape[0] != dom.numel():  # the module did not run in every forward pass
            self.skipped_sites[site] = "did not run in every forward pass of the probe"
            return
        want = set(self.metrics)
        m = representation_metrics(Z, twonn=self.twonn)
        out = call.out
        for k, v in m.items():
            if k in want:
                out[f"repr/{site}/{k}"] = v
        if self.save_spectra and self.writer is not None:
            call.spectra[site] = eigenspectrum(Z)
        if self.info_plane:
            sh = self._shared(call)
            Kt = kernel_gram(Z[self._mi_rows], "gaussian")
            Ht = gram_entropy(Kt)
            if sh["Kx"] is not None and "mi_xt" in want:
                out[f"repr/{site}/mi_xt"] = sh["Hx"] + Ht - joint_gram_entropy(sh["Kx"], Kt)
            if sh["Ky"] is not None and "mi_ty" in want:
                out[f"repr/{site}/mi_ty"] = Ht + sh["Hy"] - joint_gram_entropy(Kt, sh["Ky"])
            del Kt
        ce = call.ce.pop(site, None)
        if ce and "readout_loss" in want:
            tot = sum(v[0] for v in ce.values())
            cnt = sum(v[1] for v in ce.values())
            out[f"repr/{site}/readout_loss"] = tot / cnt
        if self.per_domain and len(self.domains) > 1:
            dm = want & set(_DOMAIN_METRICS) - {"readout_loss"}
            for i, name in enumerate(self.domains):
                if dm and int((dom == i).sum()) >= 3:
                    md = representation_metrics(Z[dom == i], twonn=False)
                    for k in dm:
                        out[f"repr/{site}/{name}/{k}"] = md[k]
                if ce and i in ce and "readout_loss" in want:
                    out[f"repr/{site}/{name}/readout_loss"] = ce[i][0] / ce[i][1]

    # -- phases --------------------------------------------------------------------------------------
    def _record(self, step: int, out: dict[str, float]) -> None:
        direction = COMPRESSION_DIRECTION.get(self.phase_metric, +1)
        for site in self.sites:
            prefix = f"repr/{site}/"
            vals = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix) and "/" not in k[len(prefix):]}
            if not vals:
                continue
            hist = self.history.setdefault(site, {"step": []})
            keep = sum(1 for s in hist["step"] if s < step)  # resumed / branched: forget steps >= this one
            for k in hist:
                del hist[k][keep:]
            n_before = len(hist["step"])
            hist["step"].append(int(step))
            for k in set(hist) | set(vals):
                if k == "step":
                    continue
                col = hist.setdefault(k, [float("nan")] * n_before)
                col.append(float(vals.get(k, float("nan"))))
            if self.phase_metric in hist and len(hist["step"]) >= self.phase_min_points:
                ev = detect_compression_onset(hist["step"], hist[self.phase_metric], self.phase_alpha,
                                              direction=direction)
                if ev is not None:
                    event = {"layer": site, "domain": None, "step": ev["step"], "kind": "compression_onset",
                             "p_value": ev["p_value"], "metric": self.phase_metric,
                             "slope_before": ev["slope_before"], "slope_after": ev["slope_after"],
                             "direction": direction, "detected_at": int(step)}
                    event["text"] = format_event(event)
                    self.events[site] = event
                else:
                    self.events.pop(site, None)
            out[f"repr/{site}/compressing"] = 1.0 if site in self.events else 0.0

    def detected_events(self) -> list[dict]:
        """The compression onsets currently detected, one per site at most, sorted by step."""
        return sorted(self.events.values(), key=lambda e: (e["step"], e["layer"]))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ev in self.detected_events():
            out[f"repr/{ev['layer']}/compression_onset_step"] = float(ev["step"])
            out[f"repr/{ev['layer']}/compression_onset_p"] = float(ev["p_value"])
        out["repr/events"] = self.detected_events()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"history": {s: {k: list(v) for k, v in h.items()} for s, h in self.history.items()},
                "events": {s: dict(e) for s, e in self.events.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = {s: {k: list(v) for k, v in h.items()} for s, h in state.get("history", {}).items()}
        self.events = {s: dict(e) for s, e in state.get("events", {}).items()}

    def detach(self) -> None:
        self._call = None  # forward hooks live only inside probe(); nothing else to remove
