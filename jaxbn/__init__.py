"""jaxbn: Batch Normalization derived, implemented and proved in JAX."""

from jaxbn.ops import BatchStats as BatchStats
from jaxbn.ops import batch_norm as batch_norm
from jaxbn.ops import batch_norm_inference as batch_norm_inference

__all__ = [
    "BatchStats",
    "batch_norm",
    "batch_norm_inference",
]
