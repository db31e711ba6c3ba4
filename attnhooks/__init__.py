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

from .capture import Capture, capture
from .errors import (
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
    StoreError,
    StoreExistsError,
    StoreFullError,
    StoreMismatchError,
    StoreOptionError,
    StoreStateError,
    StoreWriteError,
)
from .intercept.emit import emit
from .masks import MaskSpec
from .record import Record
from .repair import RepairReport, repair
from .store import Store, open_store

__version__ = "0.1.0"

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
    "StoreError",
    "StoreExistsError",
    "StoreFullError",
    "StoreMismatchError",
    "StoreOptionError",
    "StoreStateError",
    "StoreWriteError",
    "capture",
    "emit",
    "open_store",
    "repair",
]
