"""What the framework adapters share: the Monitor they build, fault isolation of the adapter's
own code, loss-scale wiring of GNS hooks, and the check of per-example ids / domains (the first
tensor of a batch comes from ``hooks._common.first_tensor``)."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

from hooks._common import check_domains
from hooks.monitor import Monitor, unique_hook_names


def missing(framework: str, extra: str, packages: str, err: Exception) -> ImportError:
    return ImportError(f"midtrain's {framework} adapter needs {packages}, which is not installed "
                       f"({type(err).__name__}: {err}). Install the extra: pip install 'midtrain[{extra}]' "
                       f"(or: pip install {packages}).")


class AdapterBase:
    """The framework-neutral half of an adapter: holds the hooks until the framework hands over the
    model, builds the Monitor then, and makes sure the adapter's own code (not just the hooks, which
    the Monitor already isolates) never stops training: an error there is warned about once and
    switches the adapter off (``strict=True`` re-raises, for tests)."""

    def __init__(self, hooks: Iterable = (), run_dir=None, sinks=None, strict: bool = False,
                 ids_key: str | None = "ids", domains_key: str | None = "domains"):
        self.hooks = unique_hook_names(list(hooks))  # duplicate names refused here, not at train start
        self.run_dir, self.sinks, self.strict = run_dir, sinks, strict
        self.ids_key, self.domains_key = ids_key, domains_key
        self.monitor: Monitor | None = None
        self.error: str | None = None      # set once the adapter itself failed; it is off from then on
        self.closed = False
        self._state_to_load: dict | None = None

    # -- set-up ------------------------------------------------------------------------------------
    def _build_monitor(self, model, enabled: bool, ddp_model=None) -> Monitor:
        if self.monitor is not None:       # a second train() call: the same hooks, their state kept
            if self._state_to_load is None:
                self._state_to_load = self.monitor.state_dict()
            if not self.closed:
                self.monitor.close()
        self.error, self.closed = None, False
        # Monitor: with run_dir it appends to (resumes) the run directory; sinks are the user's
        self.monitor = Monitor(model, self.hooks, run_dir=self.run_dir, sinks=self.sinks, strict=self.strict,
                               enabled=enabled, ddp_model=ddp_model)
        if self._state_to_load is not None:
            self.monitor.load_state_dict(self._state_to_load)
            self._state_to_load = None
        return self.monitor

    def _off(self) -> bool:
        return self.monitor is None or self.error is not None or self.closed

    def _guard(self, what: str, fn, *args, **kwargs):
        """Run adapter code; an exception disables the adapter (never the training run)."""
        if self.error is not None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if self.strict:
                raise
            self.error = f"{type(e).__name__}: {e}"
            warnings.warn(f"midtrain: the {type(self).__module__.rsplit('.', 1)[-1]} adapter failed in {what} "
                          f"({self.error}); it stops measuring for the rest of this run. Training continues.",
                          RuntimeWarning, stacklevel=2)
            self._detach_model_hooks()
            return None

    def _detach_model_hooks(self) -> None:
        pass

    def close(self) -> None:
        """Remove the adapter's model hooks and close the Monitor (hooks detached, sinks closed);
        ``self.monitor`` stays readable (``summary()``, ``last_record``)."""
        self._detach_model_hooks()
        if self.monitor is not None and not self.closed:
            self.monitor.close()
        self.closed = True

    # -- resumable state ---------------------------------------------------------------------------
    def monitor_state(self) -> dict[str, Any]:
        if self.monitor is not None:
            return self.monitor.state_dict()
        return dict(self._state_to_load or {})

    def load_monitor_state(self, state: dict[str, Any]) -> None:
        if self.monitor is not None:
            self.monitor.load_state_dict(state)
        else:
            self._state_to_load = dict(state)


def wire_loss_scale(hooks: Iterable, scaler, grads_unscaled: bool) -> list[str]:
    """Give mixed-precision loss scaling to hooks that read gradients (GradientNoiseScale's
    ``grad_scale`` / ``grads_unscaled``) unless the user set a scale. Returns the hooks' names."""
    wired = []
    if scaler is None:
        return wired
    for h in hooks:
        if hasattr(h, "grad_scale") and hasattr(h, "grads_unscaled") and h.grad_scale is None:
            h.grad_scale, h.grads_unscaled = scaler, bool(grads_unscaled)
            wired.append(getattr(h, "name", type(h).__name__))
    return wired


def per_example_field(x, n: int, what: str):
    """``ids`` / ``domains`` of a micro-batch as given (a (B,) tensor or sequence), checked."""
    if x is None:
        return None
    length = x.shape[0] if hasattr(x, "shape") and len(x.shape) == 1 else (len(x) if isinstance(x, (list, tuple)) else None)
    if length != n:
        raise ValueError(f"the batch's {what!r} field must hold one value per example ({n}), got "
                         f"{type(x).__name__} of shape {tuple(getattr(x, 'shape', ()))}")
    return x


def domains_field(x, n: int, key: str):
    """``domains`` of a micro-batch as given: integer indices or names, one per example
    (``hooks._common.check_domains``), else a TypeError / ValueError naming the batch's field."""
    check_domains(x, n, where=f"the batch's {key!r} field (domains=)")
    return x
