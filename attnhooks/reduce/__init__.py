"""Blockwise reductions of attention where the model runs (``record="summary"``): never an n x n
matrix. ``summary`` plans and runs them in torch; ``native`` is the optional C pass per block."""

from attnhooks.reduce.summary import ROWWISE, SUMMARY, SummaryOptions, summarize_call

__all__ = ["ROWWISE", "SUMMARY", "SummaryOptions", "summarize_call"]
