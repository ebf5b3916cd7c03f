"""treespec: lossless tree-based speculative decoding for transformers causal LMs.

The names below are imported on first use (PEP 562), so that `import treespec.errors` or the
benchmark's config check does not pay for importing torch and transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from treespec.errors import (
    ArgumentError, CacheError, CacheFullError, ConfigError, IncompatibleModelsError, IncompatibleTokenizersError,
    ModelLoadError, TreeConfigError, TreeShapeError, TreespecError, UnsupportedModelError, WeightsError,
)  # fmt: skip

if TYPE_CHECKING:
    from treespec.acceptance.sampling import SamplingConfig
    from treespec.drafting.adaptive import AdaptiveTreeConfig
    from treespec.drafting.ahead import OverlapConfig
    from treespec.drafting.dynamic import DynamicTreeConfig
    from treespec.drafting.lookup import LookupConfig
    from treespec.engine.api import GenerationResult, TokenStream, generate, release, stream
    from treespec.engine.speculator import Speculator
    from treespec.stats import GenerationStats
    from treespec.tree.auto import AutoTreeConfig
    from treespec.tree.topology import PRESETS, TreeTopology

__all__ = [
    "PRESETS",
    "AdaptiveTreeConfig",
    "ArgumentError",
    "AutoTreeConfig",
    "CacheError",
    "CacheFullError",
    "ConfigError",
    "DynamicTreeConfig",
    "GenerationResult",
    "GenerationStats",
    "IncompatibleModelsError",
    "IncompatibleTokenizersError",
    "LookupConfig",
    "ModelLoadError",
    "OverlapConfig",
    "SamplingConfig",
    "Speculator",
    "TokenStream",
    "TreeConfigError",
    "TreeShapeError",
    "TreeTopology",
    "TreespecError",
    "UnsupportedModelError",
    "WeightsError",
    "generate",
    "release",
    "stream",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Each branch imports its module explicitly (tests/test_layout.py reads these imports).
    if name in ("generate", "stream", "release", "GenerationResult", "TokenStream"):
        from treespec.engine import api

        value = getattr(api, name)
    elif name == "Speculator":
        from treespec.engine.speculator import Speculator as value
    elif name == "AdaptiveTreeConfig":
        from treespec.drafting.adaptive import AdaptiveTreeConfig as value
    elif name == "OverlapConfig":
        from treespec.drafting.ahead import OverlapConfig as value
    elif name == "DynamicTreeConfig":
        from treespec.drafting.dynamic import DynamicTreeConfig as value
    elif name == "LookupConfig":
        from treespec.drafting.lookup import LookupConfig as value
    elif name == "SamplingConfig":
        from treespec.acceptance.sampling import SamplingConfig as value
    elif name == "GenerationStats":
        from treespec.stats import GenerationStats as value
    elif name == "AutoTreeConfig":
        from treespec.tree.auto import AutoTreeConfig as value
    elif name in ("PRESETS", "TreeTopology"):
        from treespec.tree import topology

        value = getattr(topology, name)
    else:
        raise AttributeError(f"module 'treespec' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
