"""Which stochastic verifier a sampled step runs: the `acceptance=` option.

* "rejection" (default): token-level multi-path rejection sampling, top-down
  (`treespec.acceptance.rejection`).
* "traversal": traversal verification, leaf-to-root with sequence-level ratios, any tree
  (`treespec.acceptance.traversal`).
* "block": block verification, chains only (method="linear"; `treespec.acceptance.block`).

All three are lossless for children drawn i.i.d. or without replacement (docs/sampling.md). At
temperature 0 every scheme is greedy verification (`greedy_accept`): the option is accepted and
has no effect, because with one-hot p and q every lossless verifier accepts exactly the
target's argmax path. A `TreeVerifier` callable may be passed instead of a name: the sampled
steps then verify with it.
"""

from __future__ import annotations

from typing import Protocol

import torch

from treespec.errors import ArgumentError
from treespec.acceptance.block import block_accept
from treespec.acceptance.greedy import Acceptance
from treespec.acceptance.rejection import rejection_accept
from treespec.acceptance.traversal import traversal_accept
from treespec.tree.auto import AutoTreeConfig
from treespec.tree.topology import TreeTensors, TreeTopology

__all__ = ["TreeVerifier", "VERIFIERS", "ACCEPTANCES", "check_acceptance"]


class TreeVerifier(Protocol):
    """A pure stochastic verifier: (tree, tokens (B?, N), valid (B?, N), p (B?, N, V),
    q (B?, N, V)) -> Acceptance, no host synchronisation."""

    def __call__(
        self,
        tree: TreeTensors | TreeTopology,
        tokens: torch.Tensor,
        valid: torch.Tensor,
        p: torch.Tensor,
        q: torch.Tensor,
        *,
        without_replacement: bool = True,
        generator: torch.Generator | None,
    ) -> Acceptance: ...


VERIFIERS: dict[str, TreeVerifier] = {
    "rejection": rejection_accept,
    "traversal": traversal_accept,
    "block": block_accept,
}
ACCEPTANCES = tuple(VERIFIERS)


def check_acceptance(acceptance: str | TreeVerifier, tree: object) -> None:
    """Fail before any work: an unknown scheme, or block verification of anything but a chain.
    tree: the resolved tree spec (a TreeTopology, or a dynamic/adaptive tree config).
    A TreeVerifier of the caller's own (a study recording what each step verifies, say) passes:
    whether it is lossless is the caller's to show."""
    if callable(acceptance):
        return
    if acceptance not in VERIFIERS:
        raise ArgumentError("acceptance", f"unknown acceptance {acceptance!r}; choose one of {ACCEPTANCES}")
    if acceptance == "block":
        if isinstance(tree, AutoTreeConfig):
            raise ArgumentError(
                "acceptance",
                "acceptance='block' verifies one fixed chain, but tree='auto' chooses its tree (or the target alone) "
                "only after measuring this machine; pass a chain (method='linear', tree='chain-4'), or keep "
                "tree='auto' with acceptance='rejection' or 'traversal'"
            )
        chain = isinstance(tree, TreeTopology) and tree.children.shape[1] == 1 and tree.num_nodes == tree.max_depth + 1
        if not chain:
            raise ArgumentError(
                "acceptance",
                "acceptance='block' verifies a single chain only; use method='linear' (e.g. tree='chain-4'), "
                "or acceptance='traversal' for trees"
            )
