"""Deprecated path: :mod:`attnhooks.capturing.select`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.capturing.select")
