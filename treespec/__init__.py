"""treespec: lossless tree-based speculative decoding for transformers causal LMs."""

from .generation import GenerationResult, TokenStream, generate, stream
from .stats import GenerationStats
from .tree import PRESETS, TreeShapeError, TreeTopology

__all__ = [
    "PRESETS",
    "GenerationResult",
    "GenerationStats",
    "TokenStream",
    "TreeShapeError",
    "TreeTopology",
    "generate",
    "stream",
]
__version__ = "0.1.0"
