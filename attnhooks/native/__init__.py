"""Deprecated path: :mod:`attnhooks.reduce.native`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.reduce.native")
