"""Drafting: the draft model expands the token tree level by level.

One batched draft forward per level: first the accepted tokens the draft has not seen yet
(the root, and the previous step's leaf when a whole path was accepted), then the nodes of
each level 1..D-1 together, each seeing the committed prefix plus its own ancestors. Leaves at
depth D are never run through the draft: their children are not needed this step.

q is the draft's distribution. Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from transformers import PreTrainedModel

from treespec.backends.sdpa import SdpaBackend
from treespec.backends.kv_cache import TreeKVCache
from treespec.acceptance.rejection import sample_children
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.tree.topology import TreeTensors, TreeTopology


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


class GreedyProposer:
    """Temperature 0: the top-k tokens of q are a node's children, best first."""

    def propose(self, q_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_logits: (F, V) -> (tokens LongTensor (F, k), valid BoolTensor (F, k))."""
        tokens = q_logits.topk(k, dim=-1).indices  # (F, k)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)


@dataclass
class SampledProposer:
    """Temperature > 0: a node's k children are drawn from the processed q, without
    replacement by default (docs/sampling.md). Ranks are the draw order, which the rejection
    sampler relies on: children must not be re-sorted."""

    config: SamplingConfig
    generator: torch.Generator

    def propose(self, q_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_logits: (F, V) -> (tokens LongTensor (F, k), valid BoolTensor (F, k))."""
        q = logits_to_probs(q_logits, self.config)  # (F, V)
        return sample_children(q, k, without_replacement=self.config.without_replacement, generator=self.generator)


ChildProposer = GreedyProposer | SampledProposer


class Drafter(Protocol):
    """Expands one step's tree below the root. Implementations: `TreeDrafter` (a static
    topology), `treespec.dynamic.DynamicDrafter`, `treespec.dynamic.AdaptiveDrafter`."""

    model: PreTrainedModel
    cache: TreeKVCache
    max_nodes: int  # most nodes (root included) a step's tree can have
    max_depth: int  # deepest a step's tree can be
    forwards_per_step: int

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree: ...

    def observe(self, num_accepted: int) -> None: ...

    def describe(self) -> str: ...


def feed_pending(backend, model, cache: TreeKVCache, pending: torch.Tensor, root_pos: int) -> torch.Tensor:
    """Run the accepted tokens the draft has not seen (pending: LongTensor (1, m), ending with
    the root) and commit them; returns the draft logits at the root: FloatTensor (1, V)."""
    m = pending.shape[1]
    pos = torch.arange(root_pos - m + 1, root_pos + 1, device=pending.device)[None]  # (1, m)
    causal = torch.ones(m, m, dtype=torch.bool, device=pending.device).tril()
    logits = backend.forward(model, cache, pending, pos, causal, last_only=True)  # (1, V)
    cache.commit_all()  # pending tokens are accepted already
    return logits


class TreeDrafter:
    """Expands a fixed `TreeTopology` with a draft model."""

    def __init__(
        self,
        model: PreTrainedModel,
        topo: TreeTopology,
        backend: SdpaBackend,
        cache: TreeKVCache,
        proposer: ChildProposer,
    ):
        self.model, self.topo, self.backend, self.cache, self.proposer = model, topo, backend, cache, proposer
        device = model.device
        self._children = [tuple(t.to(device) for t in topo.level_children(d)) for d in range(topo.max_depth)]
        self._widths = [topo.level_width(d) for d in range(topo.max_depth)]
        # block mask of level d: its nodes see their ancestors among nodes 1..end of level d
        anc = topo.ancestors.to(device)
        self._level_masks = [
            anc[topo.level(d), 1 : topo.level_starts[d + 1]] for d in range(1, topo.max_depth)
        ]  # each (F_d, end_d - 1)
        self.structure = topo.tensors(device)
        self.max_nodes, self.max_depth = topo.num_nodes, topo.max_depth

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        """Expand the tree below the last pending token (the root).

        pending: LongTensor (1, m) accepted tokens not yet in the draft cache, ending with the
            root; m is 1, or 2 after a step that accepted a whole path down to a leaf.
        root_pos: position of the root in the sequence.
        """
        topo, n = self.topo, self.topo.num_nodes
        device = pending.device
        logits = feed_pending(self.backend, self.model, self.cache, pending, root_pos)  # (1, V)

        tokens = torch.zeros(n, dtype=torch.long, device=device)  # (N,)
        valid = torch.ones(n, dtype=torch.bool, device=device)  # (N,)
        q_logits = logits.new_zeros(n, logits.shape[-1])  # (N, V)
        tokens[0] = pending[0, -1]
        q_logits[0] = logits[0]
        for d in range(topo.max_depth):
            level, kids = topo.level(d), topo.level(d + 1)
            par, rank = self._children[d]  # (F_{d+1},) each
            child_tokens, child_valid = self.proposer.propose(q_logits[level], self._widths[d])  # (F_d, k)
            tokens[kids] = child_tokens[par, rank]
            valid[kids] = child_valid[par, rank] & valid[level][par]
            if d + 1 == topo.max_depth:
                break
            ids = tokens[kids][None]  # (1, F_{d+1})
            pos = (root_pos + d + 1) + torch.zeros_like(ids)  # (1, F_{d+1})
            q_logits[kids] = self.backend.forward(self.model, self.cache, ids, pos, self._level_masks[d])
        return DraftTree(structure=self.structure, tokens=tokens, valid=valid, q_logits=q_logits)

    @property
    def forwards_per_step(self) -> int:
        return self.topo.max_depth

    def describe(self) -> str:
        return self.topo.describe()

    def observe(self, num_accepted: int) -> None:
        """Feedback after each step (a static tree ignores it)."""
