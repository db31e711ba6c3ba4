"""Deprecated path: :mod:`attnhooks.attention.kernels`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.attention.kernels")
