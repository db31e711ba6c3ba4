"""Deprecated path: :mod:`attnhooks.read.tiles`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.read.tiles")
