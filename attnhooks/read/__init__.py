"""A store read without the model: the :class:`Store` (``store``), what a store holds (``catalog``),
the tensor reads (``reads``), exact tiles of any call (``tiles``, with the mask rule in
``visibility`` and softmax from lse in ``softmax``), rank sets (``ranksets``) and ``repair``.
Numpy only: importing it never imports torch."""

from attnhooks.read.repair import RepairReport, repair
from attnhooks.read.store import Store, open_store

__all__ = ["RepairReport", "Store", "open_store", "repair"]
