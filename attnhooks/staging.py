"""Deprecated path: :mod:`attnhooks.capturing.staging`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.capturing.staging")
