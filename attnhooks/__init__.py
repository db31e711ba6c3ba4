"""attnhooks: capture exact attention, Q and K from any PyTorch model, on its own attention path.

Example:
    >>> import torch, attnhooks
    >>> mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    >>> x = torch.randn(1, 3, 16)
    >>> with attnhooks.capture(mha) as cap:
    ...     _ = mha(x, x, x)
    >>> tuple(cap.records[0].attn.shape)
    (1, 4, 3, 3)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from attnhooks._version import __version__
from attnhooks.errors import (
    AnalysisError,
    AttnHooksError,
    AttnHooksWarning,
    CacheMismatchError,
    CaptureError,
    CaptureStateError,
    DropoutError,
    FaithfulnessWarning,
    ModuleSelectionError,
    NotAStoreError,
    NotInStoreError,
    RecordOptionError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
    StoreExistsError,
    StoreFullError,
    StoreMismatchError,
    StoreOptionError,
    StoreStateError,
    StoreWriteError,
)

if TYPE_CHECKING:
    from attnhooks.api import capture
    from attnhooks.attention.masks import MaskSpec
    from attnhooks.capturing.intercept.emit import emit
    from attnhooks.capturing.record import Record
    from attnhooks.capturing.session import Capture
    from attnhooks.read.repair import RepairReport, repair
    from attnhooks.read.store import Store, open_store
    from attnhooks.read.verify import VerifyReport, verify

# Loaded on first use: ``import attnhooks`` (and ``import attnhooks.read``) import neither torch nor a
# storage or plotting library; the capture side (torch) loads when one of its names is used.
_LAZY = {
    "Capture": "attnhooks.capturing.session",
    "capture": "attnhooks.api",
    "emit": "attnhooks.capturing.intercept.emit",
    "MaskSpec": "attnhooks.attention.masks",
    "Record": "attnhooks.capturing.record",
    "RepairReport": "attnhooks.read.repair",
    "repair": "attnhooks.read.repair",
    "verify": "attnhooks.read.verify",
    "VerifyReport": "attnhooks.read.verify",
    "Store": "attnhooks.read.store",
    "open_store": "attnhooks.read.store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'attnhooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "AnalysisError",
    "AttnHooksError",
    "AttnHooksWarning",
    "CacheMismatchError",
    "Capture",
    "CaptureError",
    "CaptureStateError",
    "DropoutError",
    "FaithfulnessWarning",
    "MaskSpec",
    "ModuleSelectionError",
    "NotAStoreError",
    "NotInStoreError",
    "Record",
    "RecordOptionError",
    "RepairReport",
    "Store",
    "StoreBusyError",
    "StoreCorruptError",
    "StoreError",
    "StoreExistsError",
    "StoreFullError",
    "StoreMismatchError",
    "StoreOptionError",
    "StoreStateError",
    "StoreWriteError",
    "VerifyReport",
    "__version__",
    "capture",
    "emit",
    "open_store",
    "repair",
    "verify",
]
