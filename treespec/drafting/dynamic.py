"""A dynamic tree (EAGLE-2 style): grown each step by the draft's cumulative path probability.

`DynamicDrafter` grows each step's tree by the draft's cumulative path probability instead of a
fixed width per level: at every level the W best-scored frontier nodes (score = sum of log q
along the path) are expanded, each proposing K children. Shapes stay fixed (W nodes a draft
forward, a fixed verification size), so the GPU path can capture them.

- Temperature 0: children are the top-K of q; after the last level the `budget` best-scored
  candidates become the tree (a child scores below its parent, so the selection is a tree).
- Temperature > 0: children are sampled from q (without replacement: the order of the draws is
  their rank), and EVERY drawn child stays in the tree. The score only decides which nodes get
  expanded, and a node's expansion is decided before its own children are drawn; pruning
  children by their own q after the draw would bias the verifier (docs/dynamic_trees.md).

The candidate pool's buffers (tokens, scores, parents, draft slots, frontier logits) are
allocated with the drafter and reset every step; the tree assembled from the chosen candidates
(`_tree`: its structure tensors, N of each, and its (N, V) draft logits) is built anew each step,
since its content is that step's choice.

Dimension letters: docs/dimensions.md; W frontier width, K children per expanded node,
P candidate pool (K + (D-1) W K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.base import (
    ChildProposer, Drafter, DraftTree, SampledProposer, TreeConfigError, check_count, feed_pending,
)
from treespec.stats import GenerationStats
from treespec.tree.topology import TreeTensors


@dataclass(frozen=True)
class DynamicTreeConfig:
    """width: frontier nodes expanded per level (W); children: proposals per expanded node (K);
    depth: most draft tokens on a path (D); budget: draft nodes verified per step at
    temperature 0 (at temperature > 0 every proposal is verified: K + (D-1) W K).
    The tree policy of `tree='dynamic'` (drafting/policy.py)."""

    width: int = 4
    children: int = 4
    depth: int = 5
    budget: int = 24

    def __post_init__(self) -> None:
        for name in ("width", "children", "depth", "budget"):
            check_count("dynamic", name, getattr(self, name))
        if self.width > self.children:
            raise TreeConfigError("width", f"dynamic tree width ({self.width}) cannot exceed children ({self.children}): "
                                  "level 1 has only `children` candidates to expand")
        if self.budget > self.pool_size:
            raise TreeConfigError("budget", f"dynamic tree budget {self.budget} exceeds the {self.pool_size} candidates "
                                  f"that width {self.width}, children {self.children}, depth {self.depth} propose")

    @property
    def pool_size(self) -> int:
        """P: every candidate proposed in one step."""
        return self.children + (self.depth - 1) * self.width * self.children

    # the tree policy (drafting/policy.py)
    has_drafts = True

    def draft_nodes(self, greedy: bool) -> int:
        return self.budget if greedy else self.pool_size

    def max_nodes(self, greedy: bool) -> int:
        # the draft's scratch holds (depth-1) frontiers of `width` nodes besides the verified tree
        return max(1 + self.draft_nodes(greedy), 2 + (self.depth - 1) * self.width)

    def make_drafter(self, model: PreTrainedModel, backend: Backend, cache: TreeCache,
                     proposer: ChildProposer, stats: GenerationStats) -> Drafter:
        return DynamicDrafter(model, self, backend, cache, proposer)


class DynamicDrafter:
    """Expands a tree by cumulative draft probability under a fixed node budget."""

    def __init__(self, model: PreTrainedModel, config: DynamicTreeConfig, backend: Backend,
                 cache: TreeCache, proposer: ChildProposer):
        self.model, self.config, self.backend, self.cache, self.proposer = model, config, backend, cache, proposer
        self.sampled = isinstance(proposer, SampledProposer)
        c = config
        self.pool = c.pool_size
        self.nodes = c.draft_nodes(greedy=not self.sampled)  # draft nodes verified per step
        self.max_nodes, self.max_depth = self.nodes + 1, c.depth
        self.forwards_per_step = c.depth
        device = model.device
        # candidate pool layout: level 1 = K children of the root, level d >= 2 = W*K children
        self._level_start = [0] + [c.children + (d - 1) * c.width * c.children for d in range(1, c.depth + 1)]
        depth = torch.cat([torch.full((self._level_start[d + 1] - self._level_start[d],), d + 1) for d in range(c.depth)])
        self._pool_depth = depth.to(device)  # (P,)
        # (P,) rank among siblings: the k-th proposal of its parent
        self._pool_rank = torch.cat([torch.arange(c.children)] + [torch.arange(c.children).repeat(c.width)] * (c.depth - 1)).to(device)
        p, frontiers = self.pool, (c.depth - 1) * c.width
        self._tokens = torch.zeros(p, dtype=torch.long, device=device)  # (P,)
        self._valid = torch.zeros(p, dtype=torch.bool, device=device)  # (P,)
        self._score = torch.zeros(p, device=device)  # (P,) sum of log q on the path
        self._parent = torch.zeros(p, dtype=torch.long, device=device)  # (P,) pool index, -1 = root
        self._slot = torch.zeros(p, dtype=torch.long, device=device)  # (P,) draft scratch offset
        self._scratch_anc = torch.zeros(frontiers, frontiers, dtype=torch.bool, device=device)
        self._q_rows: torch.Tensor | None = None  # (1 + (D-1) W, V): root, then frontiers; made at the first step

    def describe(self) -> str:
        c = self.config
        kept = "all proposals" if self.sampled else f"best {c.budget}"
        return f"dynamic: width {c.width}, {c.children} children, depth {c.depth}, verify {kept} ({self.nodes} nodes)"

    def observe(self, num_accepted: int) -> None:
        pass

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        c, device = self.config, pending.device
        w, k = c.width, c.children
        root_logits = feed_pending(self.backend, self.model, self.cache, pending, root_pos)  # (1, V)
        if self._q_rows is None:
            self._q_rows = root_logits.new_zeros(1 + (c.depth - 1) * w, root_logits.shape[-1])
        tokens, valid, score = self._tokens.zero_(), self._valid.zero_(), self._score.fill_(-float("inf"))
        parent, slot, scratch_anc = self._parent.fill_(-1), self._slot.fill_(-1), self._scratch_anc.zero_()
        q_rows = self._q_rows  # every row is written below: the root's, then each level's W frontier rows
        q_rows[0] = root_logits[0]

        frontier_q, frontier_pool = root_logits, None
        frontier_score = torch.zeros(1, device=device)  # (F,)
        frontier_valid = torch.ones(1, dtype=torch.bool, device=device)  # (F,)
        for d in range(c.depth):
            start, end = self._level_start[d], self._level_start[d + 1]
            kids, ok = self.proposer.propose(frontier_q, k)  # (F, K)
            logq = torch.log_softmax(frontier_q.float(), dim=-1).gather(-1, kids)  # (F, K)
            tokens[start:end] = kids.flatten()
            ok = ok & frontier_valid[:, None]  # nothing real hangs below a padding node
            valid[start:end] = ok.flatten()
            score[start:end] = torch.where(ok, frontier_score[:, None] + logq, -float("inf")).flatten()
            if frontier_pool is not None:
                parent[start:end] = frontier_pool.repeat_interleave(k)
            if d + 1 == c.depth:
                break
            # expand the W best candidates of this level (an invalid one scores -inf)
            best = score[start:end].topk(w).indices  # (W,)
            frontier_pool = start + best  # (W,)
            new_slots = torch.arange(d * w, (d + 1) * w, device=device)  # (W,) their draft scratch offsets
            slot[frontier_pool] = new_slots
            if d > 0:  # a frontier node sees what its parent (a frontier node one level up) sees
                scratch_anc[new_slots] = scratch_anc[slot[parent[frontier_pool]]]
            scratch_anc[new_slots, new_slots] = True
            ids = tokens[frontier_pool][None]  # (1, W)
            pos = torch.full_like(ids, root_pos + d + 1)
            frontier_q = self.backend.forward(self.model, self.cache, ids, pos, scratch_anc[new_slots, : (d + 1) * w])  # (W, V)
            q_rows[1 + new_slots] = frontier_q
            frontier_score, frontier_valid = score[frontier_pool], valid[frontier_pool]

        if self.sampled:
            chosen = torch.arange(self.pool, device=device)  # every draw stays (see module docstring)
        else:
            # a child scores at most its parent; the depth term breaks ties towards parents
            chosen = (score - 1e-4 * self._pool_depth).topk(c.budget).indices.sort().values  # (B,)
        return self._tree(pending[0, -1:], chosen, tokens, valid, parent, slot, q_rows)

    def _tree(self, root, chosen, tokens, valid, parent, slot, q_rows) -> DraftTree:
        """Assemble the DraftTree of the chosen pool entries (ascending pool index = level order)."""
        c, device = self.config, tokens.device
        n = chosen.shape[0] + 1
        to_tree = torch.full((self.pool + 1,), 0, dtype=torch.long, device=device)  # pool index (+1) -> node
        to_tree[chosen + 1] = torch.arange(1, n, device=device)
        parents = torch.cat([torch.tensor([-1], device=device), to_tree[parent[chosen] + 1]])  # (N,) root = -1
        depth = torch.cat([torch.zeros(1, dtype=torch.long, device=device), self._pool_depth[chosen]])  # (N,)
        ranks = torch.cat([torch.zeros(1, dtype=torch.long, device=device), self._pool_rank[chosen]])  # (N,)
        # paths (N, D+1): walk up D times; column D+1 swallows the writes of finished walks
        paths = torch.full((n, c.depth + 2), -1, dtype=torch.long, device=device)
        node = torch.arange(n, device=device)
        rows = torch.arange(n, device=device)
        for _ in range(c.depth + 1):
            col = torch.where(node >= 0, depth[node.clamp(min=0)], c.depth + 1)
            paths[rows, col] = torch.where(node >= 0, node, paths[rows, col])
            node = torch.where(node > 0, parents[node.clamp(min=0)], -1)
        paths = paths[:, : c.depth + 1]
        ancestors = torch.zeros(n, n, dtype=torch.bool, device=device)
        ancestors.scatter_(1, paths.clamp(min=0), True)  # -1 entries land on the root, an ancestor of all
        children = torch.full((n, c.children), -1, dtype=torch.long, device=device)
        children[parents[1:], ranks[1:]] = torch.arange(1, n, device=device)
        structure = TreeTensors(
            parents=parents, depth=depth, ancestors=ancestors, paths=paths, children=children,
            ranks=ranks, draft_slot=torch.cat([torch.full((1,), -1, device=device), slot[chosen]]),
            max_depth=c.depth,
        )
        q_logits = torch.zeros(n, q_rows.shape[-1], dtype=q_rows.dtype, device=device)
        q_logits[0] = q_rows[0]
        ran = structure.draft_slot >= 0
        q_logits[ran] = q_rows[1 + structure.draft_slot[ran]]
        node_tokens = torch.cat([root, tokens[chosen]])
        node_valid = torch.cat([torch.ones(1, dtype=torch.bool, device=device), valid[chosen]])
        return DraftTree(structure=structure, tokens=node_tokens, valid=node_valid, q_logits=q_logits)
