"""Matplotlib views of attention, drawn from arrays or from stores; no model needed.

Every view returns a :class:`matplotlib.figure.Figure` (several panels) or an ``Axes`` (one panel,
drawn into ``ax=`` when given), made without ``pyplot``: nothing needs a display and nothing is
shown; save with ``fig.savefig("x.png" | ".svg" | ".pdf")``. Attention maps use one perceptual
colour scale (square root, so small weights stay visible), masked cells are drawn as masked (never
as 0), and long sequences are max-pooled to the pixels of their panel.

Views of arrays: :func:`heatmap`, :func:`overview` (long sequences), :func:`rollout_view`,
:func:`model_view` (layer x head grid), :func:`metric_grid` / :func:`metric_grids`,
:func:`compare_view` / :func:`divergence_grid`, :func:`head_view` (BertViz-style lines),
:func:`qk_view` (one query's q, keys, q⊙k, scores and softmax), :func:`patch_overlay` /
:func:`image_overlay` (ViT patches, diffusion cross-attention). Views of stores: :func:`render`.

Example:
    >>> import numpy as np
    >>> from attnhooks import viewer
    >>> ax = viewer.heatmap(np.eye(4), tokens=list("abcd"), mask=np.tri(4, dtype=bool))
    >>> ax.figure.savefig("/tmp/attnhooks-doctest.png")
"""

from attnhooks.viewer._common import ViewError
from attnhooks.viewer.grids import compare_view, divergence_grid, head_divergence, metric_grid, metric_grids, model_view
from attnhooks.viewer.head_view import head_edges, head_view, head_view_grid
from attnhooks.viewer.image import cross_attention_map, image_overlay, patch_map, patch_overlay, upsample
from attnhooks.viewer.maps import heatmap, overview, rollout_view
from attnhooks.viewer.qk import qk_scores, qk_view
from attnhooks.viewer.stored import VIEWS, pooled_attention, render

__all__ = [
    "VIEWS",
    "ViewError",
    "compare_view",
    "cross_attention_map",
    "divergence_grid",
    "head_divergence",
    "head_edges",
    "head_view",
    "head_view_grid",
    "heatmap",
    "image_overlay",
    "metric_grid",
    "metric_grids",
    "model_view",
    "overview",
    "patch_map",
    "patch_overlay",
    "pooled_attention",
    "qk_scores",
    "qk_view",
    "render",
    "rollout_view",
    "upsample",
]
