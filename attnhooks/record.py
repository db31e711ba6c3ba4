"""Deprecated path: :mod:`attnhooks.capturing.record`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.capturing.record")
