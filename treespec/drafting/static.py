"""A static tree: one `TreeTopology` for the whole generation (widths, a preset, a chain for
method='linear', an optimized preset, or the root alone for method='autoregressive').

`TreeDrafter` expands it with one batched draft forward per level: the nodes of each level
1..D-1 together, each seeing the committed prefix plus its own ancestors. Leaves at depth D are
never run through the draft: their children are not needed this step. Its buffers (tokens,
valid flags, draft logits) are allocated at the first step and reused by every later one.

Dimension letters: docs/dimensions.md (N nodes incl. the root, D depth, F_d nodes of level d).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.base import ChildProposer, Drafter, DraftTree, feed_pending
from treespec.stats import GenerationStats
from treespec.tree.topology import TreeTopology


@dataclass(frozen=True)
class StaticTree:
    """The tree policy of a fixed topology (see drafting/policy.py for the protocol)."""

    topology: TreeTopology

    @property
    def has_drafts(self) -> bool:
        return self.topology.num_drafts > 0

    def draft_nodes(self, greedy: bool) -> int:
        return self.topology.num_drafts

    def max_nodes(self, greedy: bool) -> int:
        return self.topology.num_nodes

    def make_drafter(self, model: PreTrainedModel, backend: Backend, cache: TreeCache,
                     proposer: ChildProposer, stats: GenerationStats) -> Drafter:
        return TreeDrafter(model, self.topology, backend, cache, proposer)


class TreeDrafter:
    """Expands a fixed `TreeTopology` with a draft model."""

    def __init__(
        self,
        model: PreTrainedModel,
        topo: TreeTopology,
        backend: Backend,
        cache: TreeCache,
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
        n = topo.num_nodes
        self._tokens = torch.zeros(n, dtype=torch.long, device=device)  # (N,) every entry rewritten each step
        self._valid = torch.ones(n, dtype=torch.bool, device=device)  # (N,) the root's stays True
        self._q_logits: torch.Tensor | None = None  # (N, V) made at the first step (V, dtype from the logits); leaf rows stay 0

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        """See `Drafter.draft`. The returned tree's tensors are this drafter's buffers: valid
        until its next step (the engine consumes them within the step)."""
        topo = self.topo
        logits = feed_pending(self.backend, self.model, self.cache, pending, root_pos)  # (1, V)
        if self._q_logits is None:
            self._q_logits = logits.new_zeros(topo.num_nodes, logits.shape[-1])
        tokens, valid, q_logits = self._tokens, self._valid, self._q_logits
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
        """A static tree ignores the feedback."""
