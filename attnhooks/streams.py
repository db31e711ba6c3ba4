"""Deprecated path: :mod:`attnhooks.capturing.streams`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.capturing.streams")
