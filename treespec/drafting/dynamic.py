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

With overlap (drafting/ahead.py) the drafter drafts ahead one level: the E best-scored leaves
of the step's tree are the end points; the draft runs them, proposes K guesses below each, and
runs the guesses. On a hit the guess's KV entry becomes the next root's, and its q row is that
root's q: the next step skips its feed forward and expands from there, exactly as a fresh step
would (its tree only depends on the root's q and the proposer's draws).

Dimension letters: docs/dimensions.md; W frontier width, K children per expanded node,
P candidate pool (K + (D-1) W K); with overlap E end points, G = E K guesses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.ahead import AheadWork, OverlapConfig, commit_ahead_hit
from treespec.drafting.base import (
    ChildProposer, Drafter, SampledProposer, TreeConfigError, check_count, commit_accepted, feed_pending,
)
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree
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

    def ahead_plan(self, config: OverlapConfig, device: torch.device) -> DynamicAheadPlan:
        """How this policy drafts ahead (overlap=); engine/checks.py admits levels=1 only."""
        return DynamicAheadPlan(self, config, device)


class DynamicAheadPlan:
    """The fixed tables of drafting ahead one level below a dynamic tree (built once).

    Scratch layout of the draft cache after a step's drafting and ahead work:
        [(D-1) W frontier entries | E end points | G guesses]
    """

    def __init__(self, tree: DynamicTreeConfig, config: OverlapConfig, device: torch.device):
        if config.levels != 1:
            raise TreeConfigError("levels", f"a dynamic tree drafts ahead one level (the next root), "
                                  f"got OverlapConfig(levels={config.levels}): use levels=1")
        self.config = config
        self.leaves, self.candidates = e, k = config.leaves, config.candidates
        self.num_guesses = g = e * k
        self.run = run = (tree.depth - 1) * tree.width  # the frontiers' scratch entries
        self.end_slots = torch.arange(run, run + e, device=device)  # (E,)
        self.hit_slots = torch.arange(run + e, run + e + g, device=device)[:, None]  # (G, 1): the guess only
        self.slots_used = e + g
        self.forwards = 2  # the end points, then the guesses
        self.own_end = torch.eye(e, dtype=torch.bool, device=device)  # (E, E) each end point sees itself
        self.own_guess = torch.eye(g, dtype=torch.bool, device=device)  # (G, G)


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
        self._true = torch.ones((), dtype=torch.bool, device=device)
        self._q_rows: torch.Tensor | None = None  # (1 + (D-1) W, V): root, then frontiers; made at the first step
        self.plan: DynamicAheadPlan | None = None
        self._resume: torch.Tensor | None = None  # (1,) guess the next tree's root is (drafted ahead)

    def enable_ahead(self, plan: DynamicAheadPlan) -> None:
        """Draft ahead by `plan` (the draft cache must hold its slots_used entries more)."""
        self.plan = plan

    def describe(self) -> str:
        c = self.config
        kept = "all proposals" if self.sampled else f"best {c.budget}"
        return f"dynamic: width {c.width}, {c.children} children, depth {c.depth}, verify {kept} ({self.nodes} nodes)"

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """See `Drafter.restart`: a dynamic tree is made per generation (its shapes change per
        step, so nothing of it is captured as one graph)."""
        return False

    def observe(self, num_accepted: int) -> None:
        pass

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        c, device = self.config, pending.device
        w, k = c.width, c.children
        if self._resume is not None:  # the root was run ahead, as a guess: its entry is cached
            root_logits = self._guess_q.index_select(0, self._resume)  # (1, V)
            self._resume = None
        else:
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
            scratch_anc.index_put_((new_slots, new_slots), self._true)  # a Python True would be copied from the host
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
        n = chosen.shape[0] + 1
        to_tree = torch.full((self.pool + 1,), -1, dtype=torch.long, device=device)  # pool index (+1) -> node
        to_tree[:1] = 0  # pool index -1 is the root (a slice: a 0-dim target would copy 0 from the host)
        to_tree[chosen + 1] = torch.arange(1, n, device=device)
        tree = self._tree(pending[0, -1:], chosen, to_tree, tokens, valid, parent, slot, q_rows)
        if self.plan is not None:
            self._choose_end_points(tree, chosen, to_tree)
        return tree

    def _tree(self, root, chosen, to_tree, tokens, valid, parent, slot, q_rows) -> DraftTree:
        """Assemble the DraftTree of the chosen pool entries (ascending pool index = level order).
        to_tree: LongTensor (P + 1,) node id of pool index i at i + 1 (the root at 0, -1: not chosen)."""
        c, device = self.config, tokens.device
        n = chosen.shape[0] + 1
        parents = torch.cat([torch.full((1,), -1, dtype=torch.long, device=device), to_tree[parent[chosen] + 1]])  # (N,) root = -1
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
        # a node's q row: the root's is row 0, a run frontier node's sits at 1 + its slot, the
        # others (never run) get zeros; fixed-shape index ops, since a boolean-mask index would
        # sync with the host
        slot = structure.draft_slot  # (N,) -1: not run
        keep = (slot >= 0) | (torch.arange(n, device=device) == 0)  # (N,)
        q_logits = torch.where(keep[:, None], q_rows.index_select(0, 1 + slot), 0.0)  # (N, V); the root's slot -1 reads row 0
        node_tokens = torch.cat([root, tokens[chosen]])
        node_valid = torch.cat([torch.ones(1, dtype=torch.bool, device=device), valid[chosen]])
        return DraftTree(structure=structure, tokens=node_tokens, valid=node_valid, q_logits=q_logits)

    # ------------------------------------------------------------------ drafting ahead
    def _choose_end_points(self, tree: DraftTree, chosen: torch.Tensor, to_tree: torch.Tensor) -> None:
        """The end points: the draft's own path's leaf (rank 0 at every level, as a static
        tree's first end point), then the best-scored leaves (the likeliest ends, as the draft
        sees them). The tree marks them as run at the plan's end slots."""
        plan, c = self.plan, self.config
        in_tree = torch.zeros(self.pool, dtype=torch.bool, device=chosen.device)  # (P,)
        in_tree.index_fill_(0, chosen, True)
        # leaves of the tree: chosen, real, and no chosen child (an expanded node can be one at
        # T = 0, when its children miss the budget: it is run again at its end slot)
        has_child = torch.zeros(self.pool + 1, dtype=torch.bool, device=chosen.device)  # (P + 1,) root at 0
        has_child.index_fill_(0, self._parent[chosen] + 1, True)
        leaf = in_tree & self._valid & ~has_child[1:]  # (P,)
        own_path, node = self._pool_rank == 0, self._parent  # (P,) each; walk up to the root
        for _ in range(c.depth - 1):
            own_path = own_path & ((node < 0) | (self._pool_rank[node.clamp(min=0)] == 0))
            node = torch.where(node >= 0, self._parent[node.clamp(min=0)], node)
        key = torch.where(leaf, self._score + 1e4 * own_path, -float("inf"))  # (P,) log q + a bonus
        best = key.topk(plan.leaves)  # (E,)
        self._end_pool, self._end_ok = best.indices, best.values > -float("inf")  # (E,) each
        nodes = to_tree[best.indices + 1].clamp(min=0)  # (E,) not ok: the root, left as it is
        draft_slot = tree.structure.draft_slot
        draft_slot[nodes] = torch.where(self._end_ok, plan.end_slots, draft_slot[nodes])
        self._end_nodes = torch.where(self._end_ok, nodes, -1)  # (E,)

    def draft_ahead(self, root_pos: int) -> AheadWork:
        """Run the end points, propose K guesses below each, run the guesses (AheadDrafter)."""
        plan, k = self.plan, self.plan.candidates
        ends = self._end_pool  # (E,) pool indices
        parent = self._parent[ends]  # (E,) -1: the root
        if plan.run:  # each sees its parent's frontier ancestors (none below the root)
            seen = self._scratch_anc[self._slot[parent].clamp(min=0)] & (parent >= 0)[:, None]  # (E, (D-1) W)
        else:  # depth 1: nothing was expanded
            seen = plan.own_end[:, :0]  # (E, 0)
        end_mask = torch.cat([seen, plan.own_end], dim=1)  # (E, (D-1) W + E)
        ids = self._tokens[ends][None]  # (1, E)
        pos = root_pos + self._pool_depth[ends][None]  # (1, E)
        q_end = self.backend.forward(self.model, self.cache, ids, pos, end_mask)  # (E, V)
        guesses, valid = self.proposer.propose(q_end, k)  # (E, K)
        valid = valid & self._end_ok[:, None]
        guess_mask = torch.cat([end_mask.repeat_interleave(k, dim=0), plan.own_guess], dim=1)  # (G, (D-1) W + E + G)
        self._guess_q = self.backend.forward(self.model, self.cache, guesses.view(1, -1),
                                             (pos + 1).repeat_interleave(k, dim=1), guess_mask)  # (G, V)
        return AheadWork(end_nodes=self._end_nodes, tokens=guesses.flatten(), valid=valid.flatten(),
                         hit_slots=plan.hit_slots, retain=0, forwards=plan.forwards, saved=1)

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """See `Drafter.commit`."""
        return commit_accepted(self.cache, tree, path, num_accepted, kept, emitted)

    def commit_hit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, emitted: torch.Tensor,
                   work: AheadWork, guess: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """See `AheadDrafter.commit_hit`: the next root is the guess; its q is known, its entry cached."""
        self.resume(guess[None])
        return commit_ahead_hit(self.cache, tree, path, num_accepted, emitted, work, guess)

    def resume(self, guess: torch.Tensor) -> None:
        """The next root is guess `guess` (LongTensor (1,)): its q is known, its entry cached."""
        self._resume = guess
