"""The attention rule in torch: which keys a query may see (:class:`MaskSpec`) and the exact
probabilities, log-sum-exp and checks computed from q, k and a mask (``kernels``)."""

from attnhooks.attention.masks import MaskSpec

__all__ = ["MaskSpec"]
