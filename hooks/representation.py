"""RepresentationProbe: the geometry of chosen layers on a fixed probe batch, every N steps.

At step 0, every ``every`` steps and at log-spaced early steps (1, 2, 4, 8, ... below
``log_spaced_until``) the hook runs one no-grad, eval-mode forward pass of the model on a fixed probe
batch, with forward hooks on the chosen activation sites attached only for that call (a context
manager; always removed). Inside each forward hook the site's output is reduced at once: a fixed,
seeded subsample of at most ``max_tokens`` token positions is gathered on the device, read out through
the model's own final norm + unembedding (logit lens), moved to CPU as float64, and turned into the
numbers of ``diagnostics.representation``; nothing of the activations outlives the call. The probe batch
is normalised in ``hooks._representation_inputs``, the sites and the readout head are found in
``hooks._representation_sites``. What depends only on the probe set (row domains, readout targets and their
per-domain counts, the information plane's X and Y with their entropies) is built once at set-up
(``_Fixed``) and rebuilt only when the probe data change; the readout is pooled by domain with index ops.

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
    repr/<layer>/compressing        1 once a compression onset is detected (diagnostics.representation)
    repr/<layer>/<domain>/<key>     entropy, effective_rank, alpha_req, readout_loss per domain
                                    (only with a per-domain probe batch of two or more domains)
    repr/probe_time_s               wall time of the whole probe (forward + metrics)

Optional extras via ``metrics=``: normalized_entropy, alpha_req_r2. Eigenspectra (trace-normalised
covariance eigenvalues of each site) go to ``arrays/repr_spectra_step_<N>.npz`` when a run writer is
known (given, set with ``set_writer``, or found on the Monitor's run-store sink).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn as nn

from diagnostics.representation import (COMPRESSION_DIRECTION, detect_compression_onset, format_event,
                                        grouped_representation_metrics, information_plane, readout_loss,
                                        representation_metrics)
from hooks._common import first_tensor, run_writer, unwrap
from hooks._representation_inputs import _build_jobs, _normalise_probe
from hooks._representation_sites import LayerSpec, _find_readout, _resolve_sites, default_sites
from hooks.monitor import Hook, probe_role

__all__ = ["RepresentationProbe", "DEFAULT_METRICS", "default_sites"]

DEFAULT_METRICS = ("entropy", "effective_rank", "alpha_req", "twonn_id", "mi_xt", "mi_ty", "readout_loss")
_EXTRA_METRICS = ("normalized_entropy", "alpha_req_r2")
_DOMAIN_METRICS = ("entropy", "effective_rank", "alpha_req", "readout_loss", "normalized_entropy", "alpha_req_r2")


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


# ----------------------------------------------------------------------------------------------------
# the hook

@dataclass
class _ProbeCall:
    """Per-probe-call scratch space; dropped when the call returns."""

    jobs: list
    fixed: "_Fixed"
    job: int = 0
    chunks: dict = field(default_factory=dict)  # site -> list of (n, D) float64 CPU chunks
    ce: dict = field(default_factory=dict)  # site -> (2, n_domains) float64: sum of CE, tokens, per domain
    fired: dict = field(default_factory=dict)  # site -> set of job indices
    out: dict = field(default_factory=dict)  # metric name -> float
    spectra: dict = field(default_factory=dict)  # site -> eigenspectrum
    shared: dict = field(default_factory=dict)  # X / Y of the information plane for this call


@dataclass
class _Fixed:
    """What depends only on the probe set, built once at set-up (``RepresentationProbe._fixed_state``)
    and rebuilt only when the probe data change: the per-row domain of all jobs, each job's rows with
    a next token and their domains / per-domain counts (readout pooling by index ops), and the
    information plane's X and Y with their kernels and entropies (``ip_cache``; None when X comes
    from the model, ``mi_input="embedding"``, and is built per call)."""

    key: list  # the probe data it was built from (objects and in-place version counters)
    dom: torch.Tensor  # (N,) domain index of every probe row, jobs concatenated
    target_rows: list  # per job: (m,) rows with a next token (y >= 0), or None without targets
    target_dom: list  # per job: (m,) their domain index
    target_count: list  # per job: (n_domains,) float64, tokens with a next token per domain
    X: Optional[torch.Tensor]  # information-plane X (None: not logged, or per call)
    kernel_x: str
    Y: Optional[torch.Tensor]  # information-plane Y (None: not logged or not every row has one)
    ip_cache: Optional[dict]  # information_plane's cache of X/Y kernels + entropies across calls
    on_device: dict = field(default_factory=dict)  # device -> per job (rows, y) there (no copy per site)

    def device_rows(self, jobs: list, device: torch.device) -> list:
        """Per job: (its subsample rows, its next-token ids or None) on ``device``, copied once."""
        got = self.on_device.get(device)
        if got is None:
            got = self.on_device[device] = [(j.rows.to(device), None if j.y is None else j.y.to(device))
                                            for j in jobs]
        return got


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
            (``diagnostics.representation``) on each site's history of ``phase_metric``; sets
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
        self._fixed: Optional[_Fixed] = None
        self._fixed_state()  # set-up: everything that depends only on the probe set
        self.model: Optional[nn.Module] = None
        self.sites: list[str] = []
        self.history: dict[str, dict[str, list[float]]] = {}
        self._early: tuple[int, dict] | None = None  # (step, metrics) probed in on_step_begin
        self._monitor = None  # the Monitor attached to: its ``sharded`` decides the probe's role
        self.events: dict[str, dict] = {}
        self.skipped_sites: dict[str, str] = {}
        self._suspended = False
        self._call: Optional[_ProbeCall] = None
        if model is not None:
            self._set_model(model)

    # -- wiring --------------------------------------------------------------------------------------
    def _set_model(self, model: nn.Module) -> None:
        self.model = unwrap(model)
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

    @property
    def role(self) -> str:
        """``hooks.monitor.probe_role`` of this process: "measure", "forward" (a sharded model's other rank) or "skip"."""
        return probe_role(self._monitor)

    def attach(self, model, monitor) -> None:
        self._monitor = monitor  # sharded (FSDP2): every rank runs the probe's forward passes (role)
        if model is not None:
            self._set_model(model)
        if self.writer is None:  # the run store the Monitor writes to, if any
            self.writer = run_writer(monitor)

    def set_writer(self, writer) -> None:
        """Where eigenspectra go (a ``diagnostics.runs.RunWriter``); None stops saving."""
        self.writer = writer

    measures_model = True   # a probe on its own batch: also at the run's end (Monitor.on_run_end)

    def scheduled(self, step: int) -> bool:
        if self.role == "skip":
            return False  # DDP: rank 0 measures, the others train on
        if step == 0 or step % self.every == 0 or step in self.boundaries:  # also where phases end
            return True
        return 0 < step < self.log_spaced_until and (step & (step - 1)) == 0

    def on_step_begin(self, step: int) -> None:
        """Probe at the start of a scheduled step, before its optimizer update: the parameters that
        the loop's validation at this step sees (``midtrain.loop`` evaluates before the update), so
        ``repr/*`` and ``val/*`` of one record describe one model. Reported in ``on_step_end``. (The
        Monitor also calls this at the first ``on_backward_end`` of a step the loop did not
        announce -- still before the update.)"""
        self._early = (step, self.probe(step)) if self.scheduled(step) else None

    def on_step_end(self, step: int, scalars: dict) -> dict[str, float]:
        early, self._early = self._early, None
        if early is not None and early[0] == step:
            return early[1]
        if not self.scheduled(step):
            return {}
        return self.probe(step)  # called without on_step_begin (no Monitor): after the update

    # -- the probe -----------------------------------------------------------------------------------
    def probe(self, step: Optional[int] = None) -> dict[str, float]:
        """Run one probe now; returns the metrics (and, with ``step``, records history and spectra)."""
        if self.model is None:
            raise RuntimeError("RepresentationProbe has no model: add it to a Monitor or pass model=...")
        t0 = time.perf_counter()
        model = self.model
        device = next(model.parameters(), torch.zeros(())).device
        if self.role == "forward":  # another rank of a sharded model
            return self._forward_only(model, device)
        modes = [(m, m.training) for m in model.modules()]
        call = _ProbeCall(self.jobs, self._fixed_state())
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
                # a second probe in one Monitor (renamed representation_2) keeps its own arrays
                prefix = "repr_spectra" if self.name == type(self).name else f"{self.name}_spectra"
                self.writer.save_array(f"{prefix}_step_{int(step)}", **call.spectra)
        out["repr/probe_time_s"] = time.perf_counter() - t0
        return out

    def _forward_only(self, model, device) -> dict[str, float]:
        """The probe's forward passes and nothing else (``probe_role`` "forward"): rank 0's measuring probe
        waits for every rank's part of each sharded forward."""
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for job in self.jobs:
                    model(*(a.to(device) for a in job.args),
                          **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in job.kwargs.items()})
        finally:
            model.train(was)
        return {}

    def _make_hook(self, site: str):
        def hook(module, inputs, output):
            call = self._call
            if self._suspended or call is None or site in self.skipped_sites:
                return None  # our own readout calls the final norm: not a probe event
            fired = call.fired.setdefault(site, set())
            if call.job in fired:
                return None  # a module used twice in one forward: keep its first output
            fired.add(call.job)
            h = first_tensor(output)
            job = call.jobs[call.job]
            if h is None or not torch.is_floating_point(h) or h.numel() // max(h.shape[-1], 1) != job.n_tokens:
                shape = None if h is None else tuple(h.shape)
                self.skipped_sites[site] = f"output {shape} does not hold one vector per token of the probe batch"
                call.chunks.pop(site, None)
                return None
            rows = call.fixed.device_rows(call.jobs, h.device)[call.job][0]
            sub = h.detach().reshape(job.n_tokens, h.shape[-1]).index_select(0, rows)  # (n, D)
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
        y = call.fixed.device_rows(call.jobs, sub.device)[call.job][1]
        norm = None if module is norm else norm
        # the norm runs in its own parameters' dtype (a bf16 nn.LayerNorm rejects float32 input);
        # readout_loss computes the logits in float32 either way
        w = next(norm.parameters(), None) if isinstance(norm, nn.Module) else None
        h = sub.to(w.dtype) if w is not None and w.is_floating_point() else sub.float()
        self._suspended = True  # our readout calls the final norm: not a probe event
        try:
            with _num_threads(self.metric_threads if sub.device.type == "cpu" else None):
                ce = readout_loss(h, y, head.weight, norm=norm,
                                  head_bias=head.bias, reduction="none").cpu()  # (n,), 0 where y = -1
        finally:
            self._suspended = False
        # pooled per domain with index ops (rows, domains and counts fixed at set-up): sum of CE, tokens
        fixed = call.fixed
        acc = call.ce.get(site)
        if acc is None:
            acc = call.ce[site] = torch.zeros(2, len(self.domains), dtype=torch.float64)
        acc[0].index_add_(0, fixed.target_dom[call.job], ce.index_select(0, fixed.target_rows[call.job]))
        acc[1] += fixed.target_count[call.job]

    def _fixed_key(self) -> list:
        """The probe data the fixed state depends on: objects (compared by identity, and kept alive by
        the key so an id cannot be reused) and tensors' in-place version counters."""
        key: list = [self.jobs, len(self.jobs), self._mi_rows, self._mi_rows._version, self.mi_input,
                     self.metrics, len(self.domains)]
        for j in self.jobs:
            for t in (j.rows, j.domain, j.x_label, j.x_feat, j.y):
                key += [t, None if t is None else t._version]
        return key

    def _fixed_state(self) -> _Fixed:
        """The fixed state of the probe set, rebuilt only when the probe data changed (new jobs, a
        tensor of a job replaced or modified in place, another subsample or mi_input)."""
        key = self._fixed_key()
        f = self._fixed
        if f is not None and len(f.key) == len(key) and all(
                a is b or (not isinstance(a, (torch.Tensor, list)) and a == b) for a, b in zip(f.key, key)):
            return f
        jobs, n_dom = self.jobs, len(self.domains)
        dom = torch.cat([j.domain for j in jobs])
        rows, doms, counts = [], [], []
        for j in jobs:
            if j.y is None:
                rows.append(None), doms.append(None), counts.append(None)
                continue
            r = (j.y >= 0).nonzero().squeeze(1)
            rows.append(r)
            doms.append(j.domain.index_select(0, r))
            counts.append(torch.bincount(doms[-1], minlength=n_dom).double())
        sel = self._mi_rows
        x_label = torch.cat([j.x_label for j in jobs]) if all(j.x_label is not None for j in jobs) else None
        x_feat = torch.cat([j.x_feat for j in jobs]) if all(j.x_feat is not None for j in jobs) else None
        y = torch.cat([j.y for j in jobs]) if all(j.y is not None for j in jobs) else None
        X, kernel_x, cache = None, "gaussian", {}
        if self.mi_input == "embedding":
            cache = None  # X is the model's input embedding: built per call
        elif self.mi_input in ("auto", "token") and x_label is not None:
            X, kernel_x = x_label[sel], "onehot"
        elif self.mi_input == "auto" and x_feat is not None:
            X = x_feat[sel]
        Y = y[sel] if y is not None and bool((y[sel] >= 0).all()) else None
        if "mi_xt" not in self.metrics:
            X = None  # a coordinate nobody logs costs nothing
        if "mi_ty" not in self.metrics:
            Y = None
        self._fixed = _Fixed(key, dom, rows, doms, counts, X, kernel_x, Y, cache)
        return self._fixed

    def _shared(self, call: _ProbeCall) -> dict:
        """X and Y of the information plane (the same for every site), once per probe call. Fixed
        ones (token ids, float inputs) come from set-up with their kernels and entropies cached
        across calls; an embedding X is gathered from this call's forward."""
        if call.shared:
            return call.shared
        f = call.fixed
        if f.ip_cache is not None:
            call.shared.update(X=f.X, kernel_x=f.kernel_x, Y=f.Y, cache=f.ip_cache)
            return call.shared
        X = None
        if "__input__" in call.chunks:
            X = torch.cat(call.chunks.pop("__input__"))[self._mi_rows]
        if "mi_xt" not in self.metrics:
            X = None
        # cache: information_plane computes the X and Y kernels and entropies at the first site only
        call.shared.update(X=X, kernel_x="gaussian", Y=f.Y, cache={})
        return call.shared

    def _finalize(self, site: str) -> None:
        call = self._call
        chunks = call.chunks.pop(site, None)
        if not chunks:
            return
        Z = torch.cat(chunks) if len(chunks) > 1 else chunks[0]  # (N, D) float64 CPU
        del chunks
        dom = call.fixed.dom
        if Z.shape[0] != dom.numel():  # the module did not run in every forward pass
            self.skipped_sites[site] = "did not run in every forward pass of the probe"
            return
        want = set(self.metrics)
        dm = want & set(_DOMAIN_METRICS) - {"readout_loss"} if self.per_domain and len(self.domains) > 1 else set()
        if dm:  # pooled and per-domain spectra together (the pooled covariance from the domains')
            m, spectrum, per = grouped_representation_metrics(Z, dom, twonn=self.twonn)
        else:
            (m, spectrum), per = representation_metrics(Z, twonn=self.twonn, return_spectrum=True), {}
        out = call.out
        for k, v in m.items():
            if k in want:
                out[f"repr/{site}/{k}"] = v
        if self.save_spectra and self.writer is not None:
            call.spectra[site] = spectrum
        if self.info_plane:
            sh = self._shared(call)
            if sh["X"] is not None or sh["Y"] is not None:
                ip = information_plane(sh["X"], Z[self._mi_rows], sh["Y"], kernel_x=sh["kernel_x"], cache=sh["cache"])
                if "I_XT" in ip and "mi_xt" in want:
                    out[f"repr/{site}/mi_xt"] = ip["I_XT"]
                if "I_TY" in ip and "mi_ty" in want:
                    out[f"repr/{site}/mi_ty"] = ip["I_TY"]
        ce = call.ce.pop(site, None)
        ce_sum, ce_cnt = ce.tolist() if ce is not None else ([], [])  # counts: exact integers in float64
        if sum(ce_cnt) and "readout_loss" in want:
            out[f"repr/{site}/readout_loss"] = sum(ce_sum) / sum(ce_cnt)
        if self.per_domain and len(self.domains) > 1:
            for i, name in enumerate(self.domains):
                for k in dm if i in per else ():
                    out[f"repr/{site}/{name}/{k}"] = per[i][k]
                if ce_cnt and ce_cnt[i] and "readout_loss" in want:
                    out[f"repr/{site}/{name}/readout_loss"] = ce_sum[i] / ce_cnt[i]

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
        """``repr/<layer>/compression_onset_step`` and ``.../compression_onset_p`` (floats) per site
        with a detected onset, and ``repr/events``: the list of those events, one dict each
        (``detected_events``) -- the one value of a hook summary that is not a number."""
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
