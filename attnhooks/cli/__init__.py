"""The ``attnhooks`` command: capture a local transformers model (``models``), draw views, analyse,
repair; ``demo`` is the main job, ``report`` what ``info`` and ``analyze`` print."""

from attnhooks.cli.main import main

__all__ = ["main"]
