"""treespec: lossless tree-based speculative decoding for transformers causal LMs."""

from treespec.drafting.adaptive import AdaptiveTreeConfig
from treespec.drafting.ahead import OverlapConfig
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.drafting.lookup import LookupConfig
from treespec.engine.api import GenerationResult, TokenStream, generate, release, stream
from treespec.engine.speculator import Speculator
from treespec.acceptance.sampling import SamplingConfig
from treespec.stats import GenerationStats
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import PRESETS, TreeShapeError, TreeTopology

__all__ = [
    "PRESETS",
    "AdaptiveTreeConfig",
    "AutoTreeConfig",
    "DynamicTreeConfig",
    "GenerationResult",
    "GenerationStats",
    "LookupConfig",
    "OverlapConfig",
    "SamplingConfig",
    "Speculator",
    "TokenStream",
    "TreeShapeError",
    "TreeTopology",
    "generate",
    "release",
    "stream",
]
__version__ = "0.1.0"
