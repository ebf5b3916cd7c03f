"""Tree policies: how each step's tree is shaped, and the one place a `tree=` argument becomes one.

A tree policy is one spec class that reports its node budget and builds its drafter:

    policy                 spec                 drafter          tree= of generate/stream
    static                 StaticTree           TreeDrafter      widths list, preset name, TreeTopology
                                                                 (an optimized preset is a TreeTopology)
    dynamic (EAGLE-2)      DynamicTreeConfig    DynamicDrafter   'dynamic' or a DynamicTreeConfig
    adaptive depth         AdaptiveTreeConfig   AdaptiveDrafter  'adaptive' or an AdaptiveTreeConfig
    auto (this machine)    AutoTreeConfig       (a static tree)  'auto' or an AutoTreeConfig

Each spec lives next to the drafter it builds (drafting/static.py, dynamic.py, adaptive.py);
AutoTreeConfig (tree/auto.py) builds none: generate/stream turn it into the StaticTree that
treespec.engine.calibrate.resolve_auto picks from this machine's measured forward costs, after
every argument check and before the caches are made;
this module states what they share (`TreePolicy`) and resolves `tree=` (`resolve_policy`), for
`generate`, `stream` and the benchmark alike.
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.adaptive import AdaptiveTreeConfig
from treespec.drafting.base import ChildProposer, Drafter
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.drafting.static import StaticTree
from treespec.errors import TreeShapeError
from treespec.stats import GenerationStats
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import TreeTopology, resolve_tree

__all__ = ["AdaptiveTreeConfig", "AutoTreeConfig", "DynamicTreeConfig", "StaticTree", "TreePolicy", "resolve_policy"]


@runtime_checkable
class TreePolicy(Protocol):
    """How a generation's trees are shaped."""

    @property
    def has_drafts(self) -> bool:
        """False for the root alone (method='autoregressive'): no draft model runs."""

    def draft_nodes(self, greedy: bool) -> int:
        """The most draft tokens one step proposes (temperature 0 when greedy)."""

    def max_nodes(self, greedy: bool) -> int:
        """The most cache slots one step writes beyond the committed tokens, in either model's
        cache: the verified tree (root included), or a drafter's scratch when that is larger."""

    def make_drafter(self, model: PreTrainedModel, backend: Backend, cache: TreeCache,
                     proposer: ChildProposer, stats: GenerationStats) -> Drafter:
        """The drafter that expands this policy's tree with `model` (its cache: `cache`)."""


def resolve_policy(tree: TreePolicy | TreeTopology | Sequence[int] | str | None, method: str) -> TreePolicy:
    """The policy `tree=` names for `method` ('tree', 'linear' or 'autoregressive').
    Raises TreeShapeError for a tree the method cannot use (see resolve_tree)."""
    if hasattr(tree, "tolist") and not isinstance(tree, (str, TreeTopology)):  # a numpy array or tensor of widths
        tree = tree.tolist()
    if isinstance(tree, (DynamicTreeConfig, AdaptiveTreeConfig)) and method == "linear":
        raise TreeShapeError(f"a {type(tree).__name__} grows a tree each step, and method='linear' drafts one chain: "
                             "use method='tree' with it, or a chain for method='linear' ('chain-4' or 'auto')")  # fmt: skip
    name = tree if isinstance(tree, str) else None  # compared by name only: a list's == is elementwise for arrays
    if method in ("tree", "linear") and (name == "auto" or isinstance(tree, AutoTreeConfig)):
        return (AutoTreeConfig() if name == "auto" else tree).for_method(method)  # chains only for 'linear'
    if method == "tree":
        if isinstance(tree, (DynamicTreeConfig, AdaptiveTreeConfig)):
            return tree
        if name == "dynamic":
            return DynamicTreeConfig()
        if name == "adaptive":
            return AdaptiveTreeConfig()
    if isinstance(tree, StaticTree):
        tree = tree.topology
    return StaticTree(resolve_tree(tree, method))
