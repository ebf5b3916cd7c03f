"""Token-tree topology: which node hangs below which, and the tensors the decode loop needs.

A topology is fixed for a whole generation, so every tensor here is built once and the decode
loop only indexes into them. Node 0 is the root: the last accepted token, whose target logits
score the depth-1 drafts. Nodes are stored level by level (breadth first); inside a level, the
children of one parent are contiguous and ordered by rank (rank 0 = the draft's best child).

Dimension letters (docs/dimensions.md): N tree nodes incl. the root, D max depth, K max
children of one node, F nodes of one level (the frontier), V vocabulary.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Sequence

import networkx as nx
import torch

from treespec.errors import TreeShapeError  # noqa: F401  (re-exported: raised here, long importable from here)

# Widths per level: [4, 2, 2, 1] = top-4 children of the root, top-2 below each of them, ...
PRESETS: dict[str, list[int]] = {
    "chain-1": [1],
    "chain-2": [1, 1],
    "chain-3": [1, 1, 1],
    "chain-4": [1, 1, 1, 1],
    "chain-5": [1, 1, 1, 1, 1],
    "chain-6": [1, 1, 1, 1, 1, 1],
    "chain-8": [1] * 8,
    "small": [2, 1, 1],  # 6 drafts
    "medium": [2, 2, 1, 1],  # 14 drafts
    "large": [4, 2, 2, 1],  # 44 drafts
    "wide": [8, 2, 1],  # 40 drafts
}

MAX_NODES = 4096


@dataclass(frozen=True)
class TreeTopology:
    """A static draft-tree shape.

    Attributes:
        parents: tuple of N ints; parents[0] == -1 (root), parents[i] < i otherwise.
        ranks: tuple of N ints; ranks[i] = which of its parent's children node i is (0 = best).
    Derived tensors (CPU; move with `.to(device)`):
        depth: LongTensor (N,)
        ancestors: BoolTensor (N, N); ancestors[i, j] = j is i or an ancestor of i.
        paths: LongTensor (N, D+1); paths[i, d] = the ancestor of i at depth d, -1 below depth[i].
        children: LongTensor (N, K); children of each node by rank, -1 where absent.
        level_starts: tuple of D+2 ints; level d is nodes level_starts[d]:level_starts[d+1].
    """

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    depth: torch.Tensor = field(init=False, repr=False, compare=False)
    ancestors: torch.Tensor = field(init=False, repr=False, compare=False)
    paths: torch.Tensor = field(init=False, repr=False, compare=False)
    children: torch.Tensor = field(init=False, repr=False, compare=False)
    level_starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parents, ranks = list(self.parents), list(self.ranks)
        _validate(parents, ranks)
        n = len(parents)
        depth = [0] * n
        for i in range(1, n):
            depth[i] = depth[parents[i]] + 1
        max_depth = max(depth)
        anc = torch.zeros(n, n, dtype=torch.bool)
        paths = torch.full((n, max_depth + 1), -1, dtype=torch.long)
        for i in range(n):
            j = i
            while j >= 0:
                anc[i, j] = True
                paths[i, depth[j]] = j
                j = parents[j]
        k = max(ranks[1:], default=-1) + 1
        children = torch.full((n, max(k, 1)), -1, dtype=torch.long)
        for i in range(1, n):
            children[parents[i], ranks[i]] = i
        starts = [0]
        for d in range(1, max_depth + 1):
            starts.append(depth.index(d))
        starts.append(n)
        set_ = object.__setattr__  # frozen dataclass: derived fields are set once here
        set_(self, "depth", torch.tensor(depth, dtype=torch.long))
        set_(self, "ancestors", anc)
        set_(self, "paths", paths)
        set_(self, "children", children)
        set_(self, "level_starts", tuple(starts))

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_widths(cls, widths: Sequence[int]) -> "TreeTopology":
        """Top-widths[0] children of the root, top-widths[1] below each of those, and so on."""
        widths = list(widths)
        if any(isinstance(w, bool) or not isinstance(w, numbers.Integral) for w in widths):  # numpy ints are Integral
            raise TreeShapeError(f"tree widths must be whole numbers, got {widths!r}")
        widths = [int(w) for w in widths]
        if any(w < 1 for w in widths):
            raise TreeShapeError(f"tree widths must be >= 1 at every level, got {widths!r}")
        parents, ranks, frontier = [-1], [0], [0]
        for w in widths:
            nxt = []
            for p in frontier:
                for r in range(w):
                    parents.append(p)
                    ranks.append(r)
                    nxt.append(len(parents) - 1)
                    if len(parents) > MAX_NODES:
                        raise TreeShapeError(
                            f"widths {widths} make more than {MAX_NODES} nodes; use fewer or narrower levels"
                        )
            frontier = nxt
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def chain(cls, k: int) -> "TreeTopology":
        """Linear speculation: one chain of k draft tokens."""
        return cls.from_widths([1] * k)

    @classmethod
    def from_networkx(cls, graph: nx.DiGraph, root=0) -> "TreeTopology":
        """From a directed tree (edges parent -> child). Child order = the optional edge
        attribute ``rank`` (default: order of insertion)."""
        if not nx.is_arborescence(graph):
            raise TreeShapeError("the graph is not a rooted tree (an arborescence with edges parent -> child)")
        if graph.in_degree(root) != 0:
            raise TreeShapeError(f"node {root!r} is not the root of the tree")
        order, parents, ranks, index = [root], [-1], [0], {root: 0}
        head = 0
        while head < len(order):
            u = order[head]
            head += 1
            kids = sorted(graph.successors(u), key=lambda v: graph.edges[u, v].get("rank", 0))
            for r, v in enumerate(kids):
                index[v] = len(order)
                order.append(v)
                parents.append(index[u])
                ranks.append(r)
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def from_parents(cls, parents: Sequence[int]) -> "TreeTopology":
        """From a parents list in breadth-first order; ranks follow the order of siblings."""
        seen: dict[int, int] = {}
        ranks = []
        for p in parents:
            ranks.append(seen.get(p, 0) if p >= 0 else 0)
            seen[p] = seen.get(p, 0) + 1
        return cls(tuple(parents), tuple(ranks))

    # ----------------------------------------------------------------- views
    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    @property
    def num_drafts(self) -> int:
        return len(self.parents) - 1

    @property
    def max_depth(self) -> int:
        return len(self.level_starts) - 2

    def level(self, d: int) -> slice:
        """Nodes at depth d."""
        return slice(self.level_starts[d], self.level_starts[d + 1])

    def level_children(self, d: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For the nodes at depth d+1: (index of their parent inside level d, their rank).
        Both LongTensor (F_{d+1},). Drafting gathers top-k results with these."""
        kids = self.level(d + 1)
        par = torch.tensor(self.parents[kids], dtype=torch.long) - self.level_starts[d]
        rank = torch.tensor(self.ranks[kids], dtype=torch.long)
        return par, rank

    def level_width(self, d: int) -> int:
        """How many children (top-k) must be proposed below the nodes at depth d."""
        ranks = self.ranks[self.level(d + 1)]
        return max(ranks) + 1 if ranks else 0

    def to_networkx(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_node(0, depth=0)
        for i in range(1, self.num_nodes):
            g.add_node(i, depth=int(self.depth[i]))
            g.add_edge(self.parents[i], i, rank=self.ranks[i])
        return g

    def tensors(self, device: torch.device | str = "cpu") -> TreeTensors:
        """This topology's structure on `device` (cached)."""
        device = torch.device(device)
        held = _STATIC_TENSORS.get((self, device))
        if held is None:
            held = _static_tensors(self, device)
            # only real tensors are kept: a call under a tensor subclass's mode (FakeTensorMode
            # while tracing, say) must not hand its tensors to every later generation
            if type(held.parents) is torch.Tensor:
                if len(_STATIC_TENSORS) >= 64:
                    _STATIC_TENSORS.clear()
                _STATIC_TENSORS[(self, device)] = held
        return held

    def describe(self) -> str:
        widths = [self.level_starts[d + 1] - self.level_starts[d] for d in range(1, self.max_depth + 1)]
        return f"{self.num_drafts} draft nodes, depth {self.max_depth}, nodes per level {widths}"


@dataclass(frozen=True)
class TreeTensors:
    """The structure of one step's tree, on the device: what verification, acceptance and
    commit read. A static topology has one for the whole generation (`TreeTopology.tensors`);
    a dynamic drafter builds a new one every step with the same shapes.

    parents: LongTensor (N,) parent of each node, -1 for the root (and for padding nodes).
    depth: LongTensor (N,)
    ancestors: BoolTensor (N, N) ancestor-or-self mask (the tree-attention mask).
    paths: LongTensor (N, D+1) the ancestor of each node at every depth, -1 below its depth.
    children: LongTensor (N, K) children by rank, -1 where absent.
    ranks: LongTensor (N,) sibling rank of each node.
    draft_slot: LongTensor (N,) where the node's draft KV entry sits in the draft cache's
        scratch region, -1 for nodes never run through the draft (leaves; the root, whose
        entry is committed before the tree is expanded).
    max_depth: int D.
    """

    parents: torch.Tensor
    depth: torch.Tensor
    ancestors: torch.Tensor
    paths: torch.Tensor
    children: torch.Tensor
    ranks: torch.Tensor
    draft_slot: torch.Tensor
    max_depth: int


_STATIC_TENSORS: dict[tuple, TreeTensors] = {}  # (topology, device) -> its tensors (TreeTopology.tensors)


def _static_tensors(topo: TreeTopology, device: torch.device) -> TreeTensors:
    # copied once per (topology, device): a host-to-device copy every step would make the host
    # wait for the GPU stream
    runs_in_draft = topo.depth < topo.max_depth
    slot = torch.where(runs_in_draft, torch.arange(topo.num_nodes) - 1, -1)
    slot[0] = -1
    return TreeTensors(
        parents=torch.tensor(topo.parents, device=device),
        depth=topo.depth.to(device),
        ancestors=topo.ancestors.to(device),
        paths=topo.paths.to(device),
        children=topo.children.to(device),
        ranks=torch.tensor(topo.ranks, device=device),
        draft_slot=slot.to(device),
        max_depth=topo.max_depth,
    )


def _validate(parents: list[int], ranks: list[int]) -> None:
    n = len(parents)
    if n == 0 or parents[0] != -1:
        raise TreeShapeError("a tree needs a root: parents[0] must be -1")
    if len(ranks) != n:
        raise TreeShapeError(f"parents has {n} entries but ranks has {len(ranks)}")
    if n > MAX_NODES:
        raise TreeShapeError(f"{n} nodes is more than the {MAX_NODES} a step may verify")
    depth = [0] * n
    seen: set[tuple[int, int]] = set()
    for i in range(1, n):
        p = parents[i]
        if not 0 <= p < i:
            raise TreeShapeError(f"node {i}: parent {p} must be an earlier node (breadth-first order)")
        depth[i] = depth[p] + 1
        if depth[i] < depth[i - 1]:
            raise TreeShapeError(f"node {i}: nodes must be stored level by level (depth {depth[i]} after {depth[i - 1]})")
        if ranks[i] < 0 or (p, ranks[i]) in seen:
            raise TreeShapeError(f"node {i}: rank {ranks[i]} is negative or repeats a sibling's")
        seen.add((p, ranks[i]))
    # ranks of each parent's children must be 0..k-1 so that top-k covers them
    counts: dict[int, int] = {}
    for i in range(1, n):
        counts[parents[i]] = max(counts.get(parents[i], 0), ranks[i] + 1)
    for p, k in counts.items():
        if sum(1 for i in range(1, n) if parents[i] == p) != k:
            raise TreeShapeError(f"children of node {p} must have ranks 0..{k - 1} with none missing")


def resolve_tree(tree: "TreeTopology | Sequence[int] | str | None", method: str) -> TreeTopology:
    """The topology for `method` from a preset name, a widths list or a TreeTopology."""
    if method == "autoregressive":
        return TreeTopology((-1,), (0,))
    if tree is None:
        tree = "chain-4" if method == "linear" else "medium"
    if isinstance(tree, TreeTopology):
        topo = tree
    elif isinstance(tree, str):
        if tree in ("dynamic", "adaptive") and method == "linear":
            raise TreeShapeError(f"tree={tree!r} grows a tree each step, and method='linear' drafts one chain: use "
                                 f"method='tree' with tree={tree!r}, or a chain for method='linear' ('chain-4', "
                                 "[1, 1, 1, 1] or 'auto')")  # fmt: skip
        if tree not in PRESETS:
            raise TreeShapeError(f"unknown tree preset {tree!r}; choose one of {sorted(PRESETS)} or pass a widths list")
        topo = TreeTopology.from_widths(PRESETS[tree])
    elif isinstance(tree, (list, tuple)):
        if len(tree) == 0:
            raise TreeShapeError("an empty widths list drafts nothing; use method='autoregressive' for the target alone")
        topo = TreeTopology.from_widths(list(tree))
    else:
        raise TreeShapeError(f"tree must be a preset name, a widths list or a TreeTopology, got {type(tree).__name__}")
    if method == "linear" and any(r > 0 for r in topo.ranks):
        raise TreeShapeError(f"method='linear' needs a chain (widths all 1), got {topo.describe()}")
    if topo.num_drafts == 0:
        raise TreeShapeError("the tree has no draft nodes; use method='autoregressive' for the target alone")
    return topo
