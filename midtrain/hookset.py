"""The measurement hooks the built-in loop attaches by default.

``build_hooks(cfg, model, corpus)`` reads ``[monitor.<hook>]`` tables of the
config: ``enabled = false`` turns a hook off; every other key is passed to the
hook's constructor, so a misspelt option is a ConfigError naming the hook.
Each hook's registration lives in ``_BUILDERS`` below (one function per hook).
"""

from __future__ import annotations

from typing import Any, Callable

from hooks.monitor import Hook
from midtrain.config import ConfigError, TrainConfig

# name -> (enabled by default, builder(options, cfg, model, corpus) -> Hook)
_BUILDERS: dict[str, tuple[bool, Callable[..., Hook]]] = {}


def register(name: str, default_enabled: bool = True):
    def deco(fn):
        _BUILDERS[name] = (default_enabled, fn)
        return fn

    return deco


def build_hooks(cfg: TrainConfig, model, corpus) -> list[Hook]:
    hooks: list[Hook] = []
    sections = vars(cfg.monitor)
    for name, opts in sections.items():
        if name not in _BUILDERS and opts:
            raise ConfigError(f"[monitor.{name}] names no known hook; known hooks: {', '.join(sorted(_BUILDERS))}.")
    for name, (default_on, fn) in _BUILDERS.items():
        opts: dict[str, Any] = dict(sections.get(name) or {})
        if not opts.pop("enabled", default_on):
            continue
        try:
            hooks.append(fn(opts, cfg, model, corpus))
        except TypeError as e:
            raise ConfigError(f"[monitor.{name}]: {e}") from None
    return hooks
