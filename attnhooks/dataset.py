"""Deprecated path: :mod:`attnhooks.export.xarray`."""

from attnhooks._moved import redirect

redirect(__name__, "attnhooks.export.xarray")
