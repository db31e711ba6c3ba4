"""A store to other tools: xarray / dask (``xarray``) and BertViz (``bertviz``)."""

from attnhooks.export.bertviz import to_bertviz

__all__ = ["to_bertviz"]
