"""Deprecated path: :mod:`attnhooks.write.writer`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.write.writer")
