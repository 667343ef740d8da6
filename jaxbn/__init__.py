"""jaxbn: Batch Normalization derived, implemented and proved in JAX."""

# The kernels' status and calls, as `jaxbn.kernels` after `import jaxbn` (as the docs write it).
from jaxbn import kernels as kernels
from jaxbn.ops import BatchStats as BatchStats
from jaxbn.ops import Blend as Blend
from jaxbn.ops import Renorm as Renorm
from jaxbn.ops import RenormCorrection as RenormCorrection
from jaxbn.ops import batch_norm as batch_norm
from jaxbn.ops import batch_norm_inference as batch_norm_inference
from jaxbn.ops import update_running_stats as update_running_stats
from jaxbn.recompute import recompute_batch_stats as recompute_batch_stats

__all__ = [
    "BatchStats",
    "Blend",
    "Renorm",
    "RenormCorrection",
    "batch_norm",
    "batch_norm_inference",
    "recompute_batch_stats",
    "update_running_stats",
]
