"""Deprecated path: :mod:`attnhooks.cli.demo`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.cli.demo")
