"""Old module paths of the flat ``diagnostics/`` (before the sub-packages by theory) keep working for
one release: each is a small alias module that warns once on import and re-exports the new home."""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new} in midtrain 0.2; import from {new} (the old path goes in 0.3)",
                  DeprecationWarning, stacklevel=3)  # 3: the importer's line (importlib frames are skipped)
