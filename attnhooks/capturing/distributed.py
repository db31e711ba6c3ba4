"""This process's place in a ``torch.distributed`` job, when there is one (a capture then writes its
rank's group of a rank set: :mod:`attnhooks.backends.subtree`)."""

from __future__ import annotations

from dataclasses import dataclass

from attnhooks.errors import StoreOptionError

__all__ = ["RankInfo", "current"]


@dataclass(frozen=True)
class RankInfo:
    """This process's place in the job."""

    rank: int
    world_size: int


def current(require: bool = False) -> RankInfo | None:
    """The rank and world size of this process when ``torch.distributed`` is initialised, else
    None (``require``: a StoreOptionError instead)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if require:
            raise StoreOptionError(
                "capture(distributed=True) needs torch.distributed.init_process_group() to have run in this process"
            )
        return None
    return RankInfo(dist.get_rank(), dist.get_world_size())
