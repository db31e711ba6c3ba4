"""Old module paths that moved in the package layout of 0.2: each still imports, with a
DeprecationWarning, and is the new module itself (same objects). They go in the release after."""

from __future__ import annotations

import importlib
import sys
import warnings


def redirect(old: str, new: str) -> None:
    """Make the module being imported as ``old`` the module ``new``."""
    warnings.warn(
        f"{old} moved to {new}; import it from there (the old path goes in the next release)",
        DeprecationWarning,
        stacklevel=3,
    )
    sys.modules[old] = importlib.import_module(new)
