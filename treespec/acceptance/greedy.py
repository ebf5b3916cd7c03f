"""Acceptance: which root-to-node path of the draft tree the target keeps. Pure functions.

Every function here takes the tree's tokens and the target's scores at every node and returns
an `Acceptance`, with no model calls and no host synchronisation: the engine reads
`Acceptance.num_accepted` once per step (its one sync point).

p is the target's distribution, q the draft's. Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.tree.topology import TreeTensors


@dataclass
class Acceptance:
    """The outcome of verifying one tree.

    path: LongTensor (D+1,) node indices from the root down the accepted path; entries past
        `num_accepted` are padding (they repeat the last accepted node).
    num_accepted: LongTensor () how many draft tokens were accepted (0..D).
    next_token: LongTensor () the token the target emits after the accepted path: the bonus
        token (greedy / a fully accepted leaf) or the residual sample after a rejection.
    """

    path: torch.Tensor
    num_accepted: torch.Tensor
    next_token: torch.Tensor


def greedy_accept(tree: TreeTensors, tokens: torch.Tensor, valid: torch.Tensor, p_logits: torch.Tensor) -> Acceptance:
    """Longest path whose every token equals the target's argmax at its parent.

    tree: the step's tree structure.
    tokens: LongTensor (N,) draft token at each node (tokens[0] = the root, already accepted).
    valid: BoolTensor (N,) False for padding nodes, which are never accepted.
    p_logits: FloatTensor (N, V) target logits at each node (scores the node's children).
    Greedy siblings are distinct (top-k), so at most one child of a node can match and the
    accepted path is unique.
    """
    depth, anc, paths = tree.depth, tree.ancestors, tree.paths
    best = p_logits.argmax(dim=-1)  # (N,) target's greedy token after each node
    match = (tokens == best[tree.parents.clamp(min=0)]) & valid  # (N,)
    match[:1] = True  # the root is accepted already (a slice: a 0-dim target would copy True from the host)
    # a node is accepted iff it and all its ancestors match: no ancestor-or-self is a mismatch
    accepted = ~(anc & ~match[None, :]).any(dim=-1)  # (N,)
    score = torch.where(accepted, depth, -1)  # (N,)
    last = score.argmax()  # deepest accepted node (the first such node on ties, all greedy paths equal)
    return _path_to(paths, depth, last, best.index_select(0, last.view(1))[0])


def _path_to(paths: torch.Tensor, depth: torch.Tensor, last: torch.Tensor, next_token: torch.Tensor) -> Acceptance:
    """Acceptance for the path from the root to node `last` (a 0-d LongTensor). index_select, not
    `paths[last]`: an index by a 0-d tensor reads it on the host (a sync on CUDA)."""
    at = last.view(1)  # (1,)
    path = paths.index_select(0, at)[0]  # (D+1,)
    path = torch.where(path >= 0, path, last)  # pad with the last node
    return Acceptance(path=path, num_accepted=depth.index_select(0, at)[0], next_token=next_token)
