"""Deprecated path: rank sets are :mod:`attnhooks.backends.subtree` (layout, reading),
:mod:`attnhooks.capturing.distributed` (this process's rank) and :mod:`attnhooks.write.ranks`
(opening a rank's group for writing)."""

import warnings

from attnhooks.backends.subtree import LAYOUT, Subtree, group, present, subtree
from attnhooks.capturing.distributed import RankInfo, current
from attnhooks.write.ranks import open_rank

warnings.warn(
    "attnhooks.ranks moved to attnhooks.backends.subtree, attnhooks.capturing.distributed and attnhooks.write.ranks; "
    "import from there (the old path goes in the next release)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["LAYOUT", "RankInfo", "Subtree", "current", "group", "open_rank", "present", "subtree"]
