"""treespec: lossless tree-based speculative decoding for transformers causal LMs."""

from .dynamic import AdaptiveTreeConfig, DynamicTreeConfig
from .generation import GenerationResult, TokenStream, generate, stream
from .sampling import SamplingConfig
from .stats import GenerationStats
from .tree import PRESETS, TreeShapeError, TreeTopology

__all__ = [
    "PRESETS",
    "AdaptiveTreeConfig",
    "DynamicTreeConfig",
    "GenerationResult",
    "GenerationStats",
    "SamplingConfig",
    "TokenStream",
    "TreeShapeError",
    "TreeTopology",
    "generate",
    "stream",
]
__version__ = "0.1.0"
