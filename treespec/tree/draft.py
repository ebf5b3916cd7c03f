"""`DraftTree`: the tree one step proposes, as the drafters hand it to verification and acceptance.

Dimension letters: docs/dimensions.md (N nodes incl. the root, V vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.tree.topology import TreeTensors


@dataclass
class DraftTree:
    """The tree one step proposes.

    structure: the tree's shape on the device (static topologies reuse one; dynamic drafters
        build one per step with the same shapes).
    tokens: LongTensor (N,) token at each node; tokens[0] is the root (already accepted).
    valid: BoolTensor (N,) False for padding nodes that carry no real proposal.
    q_logits: FloatTensor (N, V) raw draft logits at each node with children (rows of leaves
        are 0); None when there is no draft (the target alone).
    lookup: BoolTensor (N,) True for nodes copied from the context (`treespec.drafting.lookup`):
        point-mass proposals, verified with q = delta at their token; None when there are none.
    """

    structure: TreeTensors
    tokens: torch.Tensor
    valid: torch.Tensor
    q_logits: torch.Tensor | None
    lookup: torch.Tensor | None = None
