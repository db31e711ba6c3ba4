"""Deprecated path: :mod:`attnhooks.read.store`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.read.store")
