"""Deprecated path: :mod:`attnhooks.cli.report`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.cli.report")
