"""Trees that fit the text: dynamic expansion (EAGLE-2 style) and depth adapted to acceptance.

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

`AdaptiveDrafter` switches between static trees of several depths between steps, choosing the
depth that maximises expected tokens per unit of cost from the acceptance per depth measured
over a sliding window. Its choices are logged in the stats.

Dimension letters: docs/dimensions.md; W frontier width, K children per expanded node,
P candidate pool (K + (D-1) W K).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.sdpa import SdpaBackend
from treespec.drafting.base import DraftTree, GreedyProposer, SampledProposer, TreeDrafter, feed_pending
from treespec.backends.kv_cache import TreeKVCache
from treespec.stats import GenerationStats
from treespec.tree.topology import TreeShapeError, TreeTensors, TreeTopology


@dataclass(frozen=True)
class DynamicTreeConfig:
    """width: frontier nodes expanded per level (W); children: proposals per expanded node (K);
    depth: most draft tokens on a path (D); budget: draft nodes verified per step at
    temperature 0 (at temperature > 0 every proposal is verified: K + (D-1) W K)."""

    width: int = 4
    children: int = 4
    depth: int = 5
    budget: int = 24

    def __post_init__(self) -> None:
        for name in ("width", "children", "depth", "budget"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeShapeError(f"dynamic tree {name} must be an int >= 1, got {value!r}")
        if self.width > self.children:
            raise TreeShapeError(f"dynamic tree width ({self.width}) cannot exceed children ({self.children}): "
                                 "level 1 has only `children` candidates to expand")
        if self.budget > self.pool_size:
            raise TreeShapeError(f"dynamic tree budget {self.budget} exceeds the {self.pool_size} candidates that "
                                 f"width {self.width}, children {self.children}, depth {self.depth} propose")

    @property
    def pool_size(self) -> int:
        return self.children + (self.depth - 1) * self.width * self.children


class DynamicDrafter:
    """Expands a tree by cumulative draft probability under a fixed node budget."""

    def __init__(self, model: PreTrainedModel, config: DynamicTreeConfig, backend: SdpaBackend,
                 cache: TreeKVCache, proposer: GreedyProposer | SampledProposer):
        self.model, self.config, self.backend, self.cache, self.proposer = model, config, backend, cache, proposer
        self.sampled = isinstance(proposer, SampledProposer)
        c = config
        self.pool = c.pool_size
        self.nodes = self.pool if self.sampled else c.budget  # draft nodes verified per step
        self.max_nodes, self.max_depth = self.nodes + 1, c.depth
        self.forwards_per_step = c.depth
        device = model.device
        # candidate pool layout: level 1 = K children of the root, level d >= 2 = W*K children
        self._level_start = [0] + [c.children + (d - 1) * c.width * c.children for d in range(1, c.depth + 1)]
        depth = torch.cat([torch.full((self._level_start[d + 1] - self._level_start[d],), d + 1) for d in range(c.depth)])
        self._pool_depth = depth.to(device)  # (P,)
        # (P,) rank among siblings: the k-th proposal of its parent
        self._pool_rank = torch.cat([torch.arange(c.children)] + [torch.arange(c.children).repeat(c.width)] * (c.depth - 1)).to(device)

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
        vocab = root_logits.shape[-1]
        tokens = torch.zeros(self.pool, dtype=torch.long, device=device)  # (P,)
        valid = torch.zeros(self.pool, dtype=torch.bool, device=device)  # (P,)
        score = torch.full((self.pool,), -float("inf"), device=device)  # (P,) sum of log q on the path
        parent = torch.full((self.pool,), -1, dtype=torch.long, device=device)  # (P,) pool index, -1 = root
        slot = torch.full((self.pool,), -1, dtype=torch.long, device=device)  # (P,) draft scratch offset
        q_rows = root_logits.new_zeros(1 + (c.depth - 1) * w, vocab)  # (1 + (D-1) W, V): root, then frontiers
        q_rows[0] = root_logits[0]
        scratch_anc = torch.zeros((c.depth - 1) * w, (c.depth - 1) * w, dtype=torch.bool, device=device)

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


@dataclass(frozen=True)
class AdaptiveTreeConfig:
    """Static trees `widths[:depth]` for depth in [min_depth, max_depth] (widths past its end
    repeat its last entry). Every step uses the depth that maximises
    (1 + expected accepted) / (1 + draft_cost * depth), the expectation computed from the
    acceptance per depth over the last `window` steps; draft_cost is one draft forward's cost
    in target forwards (about 0.4 for the Qwen2.5-Coder pair on a CPU)."""

    widths: tuple[int, ...] = (2, 2, 1)
    min_depth: int = 1
    max_depth: int = 8
    window: int = 16
    draft_cost: float = 0.4

    def __post_init__(self) -> None:
        if not 1 <= self.min_depth <= self.max_depth:
            raise TreeShapeError(f"adaptive tree needs 1 <= min_depth <= max_depth, got {self.min_depth}, {self.max_depth}")
        if self.window < 1 or self.draft_cost < 0:
            raise TreeShapeError("adaptive tree needs window >= 1 and draft_cost >= 0")
        if not self.widths or any(w < 1 for w in self.widths):
            raise TreeShapeError(f"adaptive tree widths must be >= 1, got {self.widths}")

    def topology(self, depth: int) -> TreeTopology:
        widths = [self.widths[min(i, len(self.widths) - 1)] for i in range(depth)]
        return TreeTopology.from_widths(widths)


class AdaptiveDrafter:
    """Chooses the tree depth between steps from the acceptance measured over a window."""

    def __init__(self, model: PreTrainedModel, config: AdaptiveTreeConfig, backend: SdpaBackend,
                 cache: TreeKVCache, proposer, stats: GenerationStats):
        self.model, self.config, self.cache, self.stats = model, config, cache, stats
        self.drafters = {
            d: TreeDrafter(model, config.topology(d), backend, cache, proposer)
            for d in range(config.min_depth, config.max_depth + 1)
        }
        self.max_nodes = max(t.max_nodes for t in self.drafters.values())
        self.max_depth = config.max_depth
        self.depth = config.min_depth + (config.max_depth - config.min_depth) // 2
        self.window: deque[tuple[int, int]] = deque(maxlen=config.window)  # (tree depth, accepted)

    @property
    def forwards_per_step(self) -> int:
        return self.depth

    def describe(self) -> str:
        c = self.config
        return f"adaptive: widths {list(c.widths)}, depth {c.min_depth}..{c.max_depth}, window {c.window}"

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        return self.drafters[self.depth].draft(pending, root_pos)

    def observe(self, num_accepted: int) -> None:
        self.window.append((self.depth, num_accepted))
        self.depth = choose_depth(self.window, self.config)
        self.stats.tree_choices.append(self.depth)


def acceptance_per_depth(window, max_depth: int, prior: float = 1.0) -> list[float]:
    """alpha[d-1] = P(depth d accepted | depth d-1 reached), from (tree depth, accepted) pairs;
    a depth never tried borrows the deepest estimate (optimism that lets depth grow again)."""
    alphas = []
    for d in range(1, max_depth + 1):
        tried = sum(1 for depth, a in window if depth >= d and a >= d - 1)
        hits = sum(1 for depth, a in window if depth >= d and a >= d)
        if tried:
            alphas.append((hits + prior / 2) / (tried + prior))
        else:
            alphas.append(alphas[-1] if alphas else 0.5)
    return alphas


def choose_depth(window, config: AdaptiveTreeConfig) -> int:
    alphas = acceptance_per_depth(window, config.max_depth)
    best, best_value, reach, expected = config.min_depth, -1.0, 1.0, 0.0
    for d in range(1, config.max_depth + 1):
        reach *= alphas[d - 1]
        expected += reach
        value = (1 + expected) / (1 + config.draft_cost * d)
        if d >= config.min_depth and value > best_value:
            best, best_value = d, value
    return best
