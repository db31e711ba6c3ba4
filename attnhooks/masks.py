"""Deprecated path: :mod:`attnhooks.attention.masks`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.attention.masks")
