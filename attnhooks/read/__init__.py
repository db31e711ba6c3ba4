"""A store read without the model: the :class:`Store`, exact tiles of any call (``tiles``), rank
sets (``ranks``) and ``repair``. Numpy only: importing it never imports torch."""

from attnhooks.read.repair import RepairReport, repair
from attnhooks.read.store import Store, open_store

__all__ = ["RepairReport", "Store", "open_store", "repair"]
