"""Thin adapters that drive the Monitor's events from training frameworks (docs/integrations.md).

    from hooks.integrations.hf_trainer import MidtrainCallback        # transformers.Trainer
    from hooks.integrations.lightning import MidtrainCallback         # lightning.pytorch.Trainer

Each module imports its framework when it is imported (and says which extra to install when it
is missing), so ``import hooks`` never pulls in transformers or lightning.
"""

__all__ = ["hf_trainer", "lightning"]
