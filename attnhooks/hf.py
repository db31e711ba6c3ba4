"""Deprecated path: :mod:`attnhooks.cli.models`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.cli.models")
