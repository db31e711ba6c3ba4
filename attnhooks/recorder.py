"""Deprecated path: :mod:`attnhooks.capturing.recorder`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.capturing.recorder")
