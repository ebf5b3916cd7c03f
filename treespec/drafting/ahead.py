"""Drafting ahead: the next tree's first levels, drafted while the target verifies this one.

After a static tree T (depth D) is drafted, the draft keeps going below the nodes where it
expects verification to end: the first `leaves` nodes of T's deepest level (the first is the
draft's own best path). Below each such end point e it proposes `candidates` guesses c for
the target's next token, and below each guess the first `levels` levels of T. On the GPU this
runs on a second CUDA stream beside the verification (engine/streams.py); on the CPU it runs in
order, so the same schedule is tested everywhere.

The step hits when verification accepts a whole path down to an end point e and the target's
next token is one of e's guesses c: the next tree, rooted at c, then has its first `levels`
levels drafted already, and their draft KV entries are in the draft cache's scratch. The
commit keeps them there (`TreeCache.commit(..., retain=R)`) in exactly the slots the next
tree's drafting expects, so that drafting resumes at level `levels`. Any other outcome drops
the ahead work (an end point's own entry is kept when the path ends there: it is on the path).

Why the output keeps the target's distribution (docs/overlap.md): verification is unchanged,
and a resumed tree is drawn exactly as a fresh one. Below a guess c its children are drawn
from q(. | prefix, c) by the same proposer, with randomness that verification never reads;
whether c is used depends only on the target's token and on which guesses were drawn, never
on what was drawn below c. So, given the root, the resumed tree has the law of a fresh one.

A dynamic tree drafts ahead its next root only (drafting/dynamic.py, `DynamicAheadPlan`); both
drafters implement `AheadDrafter` and hand the engine an `AheadWork`, which `ahead_hit` reads.

The ahead part is one extended topology T' (T, then the guesses, then the next tree's levels)
with explicit scratch offsets; `AheadPlan` holds its index tables, built once per generation.
Dimension letters: docs/dimensions.md (N nodes of T, D its depth, F_j nodes of T's level j,
E end points, K here the guesses per end point, G = E * K guesses, R retained entries, V
vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from treespec.errors import TreeConfigError, TreeShapeError
from treespec.tree.topology import TreeTopology


@dataclass(frozen=True)
class OverlapConfig:
    """How far and where the draft works ahead (`overlap=` of generate/stream).

    leaves: E, end points drafted below: the first E nodes of the tree's deepest level.
    candidates: K, guesses for the target's next token below each end point (the draft's
        top-K at T = 0; K draws without replacement at T > 0).
    levels: the next tree's levels drafted below each guess (1..D): a hit saves that many
        draft forwards on the critical path (the next tree's feed forward and levels
        1..levels-1); the ahead work is levels + 1 forwards.
    """

    leaves: int = 1
    candidates: int = 4
    levels: int = 1

    def __post_init__(self) -> None:
        for name in ("leaves", "candidates", "levels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeConfigError(name, f"OverlapConfig.{name} must be an int >= 1, got {value!r}")


@dataclass
class AheadWork:
    """What one step's ahead work leaves for its commit (device tensors of this step).

    end_nodes: LongTensor (E,) node ids, in this step's tree, of the end points (-1: none).
    tokens / valid: LongTensor / BoolTensor (G,) the guesses, end-point-major (K per end point).
    hit_slots: LongTensor (G, 1 + R) scratch offsets a hit with guess g keeps: the guess (the
        next root), then the next tree's drafted entries, in the order its drafting wants them.
    retain: R. forwards: draft forwards the ahead work ran. saved: draft forwards a hit saves
        the next step (its feed forward and the drafted levels' forwards).
    """

    end_nodes: torch.Tensor
    tokens: torch.Tensor
    valid: torch.Tensor
    hit_slots: torch.Tensor
    retain: int
    forwards: int
    saved: int


def ahead_hit(work: AheadWork, path: torch.Tensor, num_accepted: torch.Tensor,
              next_token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """On the device: did verification end at an end point, with a guessed next token?

    path: LongTensor (D+1,) the accepted path (node ids, padding past num_accepted).
    Returns (hit BoolTensor (), guess LongTensor () index of the matching guess, 0 on a miss)."""
    e = work.end_nodes.shape[0]
    last = path.gather(0, num_accepted.view(1))  # (1,) the node the path ends at
    at_end = work.end_nodes == last  # (E,)
    match = (work.tokens.view(e, -1) == next_token) & work.valid.view(e, -1) & at_end[:, None]  # (E, K)
    match = match.flatten()  # (G,)
    hit = match.any()
    return hit, torch.where(hit, match.int().argmax(), 0)


@runtime_checkable
class AheadDrafter(Protocol):
    """A drafter that can draft ahead (`TreeDrafter`, `DynamicDrafter`): made with a plan
    (`enable_ahead`), it drafts ahead beside each verification (`draft_ahead`, queued by the
    engine on the side stream) and, when verification ended where it guessed, commits the next
    tree's drafted levels and starts from them (`commit_hit`)."""

    def enable_ahead(self, plan) -> None:
        """Draft ahead by `plan` (its policy's `ahead_plan`; the draft cache holds its
        slots_used entries after the tree's)."""

    def draft_ahead(self, root_pos: int) -> AheadWork:
        """Below the tree just drafted: end points, guesses, and the next tree's first levels."""

    def commit_hit(self, tree, path: torch.Tensor, num_accepted: int, emitted: torch.Tensor, work: AheadWork,
                   guess: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """After a hit (`ahead_hit`): keep the path, the guess that is the new root and the
        levels drafted below it; the next step starts from them. Returns the pending tokens
        (1, 1): the new root, cached already."""


def commit_ahead_hit(cache, tree, path: torch.Tensor, num_accepted: int, emitted: torch.Tensor, work: AheadWork,
                     guess: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`AheadDrafter.commit_hit`'s cache work: the path down to the end point, the guess that is
    the new root, and the next tree's levels drafted below it, which stay in the scratch where
    that tree's drafting expects them. guess: LongTensor () on the device. Returns (1, 1)."""
    a = num_accepted
    slots = tree.structure.draft_slot[path[1:]]  # (D,)
    guessed = work.hit_slots.index_select(0, guess[None])[0]  # (1 + R,)
    cache.commit(torch.cat([slots[:a], guessed]), a + 1, work.retain)
    return emitted[None, a : a + 1]


@dataclass(frozen=True)
class AheadGroup:
    """One forward of the ahead work: its nodes, their parents' q rows, and its mask.

    parent_row: LongTensor (n,) row of each node's parent in the previous group's q (guesses:
        the end point's row; the next tree's level j: row of its parent at level j-1).
    rank: LongTensor (n,) which of the parent's proposed children the node takes.
    block_mask: BoolTensor (n, s) scratch entries each node sees (T's run nodes, ancestors).
    depth: depth below this step's root (for positions).
    width: children proposed below each parent row (top-k / k draws).
    runs: False for the last level proposed (its tokens are known, it is not run).
    """

    parent_row: torch.Tensor
    rank: torch.Tensor
    block_mask: torch.Tensor
    depth: int
    width: int
    runs: bool


class AheadPlan:
    """The index tables of drafting ahead below a static tree `topo` (built once, on `device`).

    Scratch layout of the draft cache after a step's drafting and ahead work:
        [T's nodes of levels 1..D-1 | E end points | G guesses | next tree's levels 1..levels-1 per guess]
    The end points are T's nodes, already proposed; each later group is proposed from the
    previous group's q. Groups are guess-major (guess g's F_j nodes of level j are
    contiguous), so a guess's retained entries are the next tree's levels in T's own order.
    """

    def __init__(self, topo: TreeTopology, config: OverlapConfig, device: torch.device):
        d = topo.max_depth
        if d < 1:
            raise TreeShapeError("drafting ahead needs a tree with at least one draft level")
        if config.levels > d:
            raise TreeShapeError(f"OverlapConfig.levels={config.levels} exceeds the tree's depth {d}: "
                                 f"a tree's worth of levels is the most that can be drafted ahead")
        self.topo, self.config = topo, config
        deepest = topo.level(d)
        self.num_leaves = e = min(config.leaves, deepest.stop - deepest.start)
        self.leaf_nodes = torch.arange(deepest.start, deepest.start + e, device=device)  # (E,) node ids in T
        run_t = topo.level_starts[d] - 1  # T's nodes of levels 1..D-1, scratch offsets 0..run_t-1
        self.leaf_slots = torch.arange(run_t, run_t + e, device=device)  # (E,) the end points' scratch offsets
        k = config.candidates
        self.num_guesses = g = e * k
        widths = [topo.level_width(j) for j in range(config.levels)]  # T's widths of levels 0..levels-1
        sizes = [topo.level_starts[j + 1] - topo.level_starts[j] for j in range(1, config.levels + 1)]  # F_1..
        # ancestors of every scratch entry, as a list of scratch offsets (T's run nodes: node - 1)
        anc_t = [[j - 1 for j in range(1, topo.num_nodes) if topo.ancestors[i, j]] for i in range(topo.num_nodes)]
        leaf_offsets = list(range(run_t, run_t + e))
        leaf_anc = [anc_t[int(node)][:-1] + [off] for node, off in zip(self.leaf_nodes.tolist(), leaf_offsets)]
        groups, ancestry = [], []
        # group 0: the end points (tokens already proposed in T; q not yet computed)
        groups.append(self._group(torch.zeros(e, dtype=torch.long), torch.zeros(e, dtype=torch.long),
                                  leaf_anc, run_t + e, d, 0, True, device))
        ancestry.append(leaf_anc)
        # group 1: K guesses below each end point; groups 2..: the next tree's levels below each guess
        prev, offset = leaf_anc, run_t + e
        specs = [(torch.arange(e).repeat_interleave(k), torch.arange(k).repeat(e), k, True)]  # guesses always run
        for j in range(config.levels):
            par, rank = topo.level_children(j)  # (F_{j+1},) parent index inside level j, rank
            rows_per_guess = 1 if j == 0 else sizes[j - 1]
            specs.append(((torch.arange(g)[:, None] * rows_per_guess + par[None]).flatten(),
                          rank.repeat(g), widths[j], j + 1 < config.levels))
        for i, (parent_row, rank, width, runs) in enumerate(specs):
            anc = [prev[int(r)] + [offset + n] for n, r in enumerate(parent_row.tolist())]
            if runs:
                offset += len(anc)
            groups.append(self._group(parent_row, rank, anc, offset, d + 1 + i, width, runs, device))
            ancestry.append(anc)
            prev = anc
        self.groups: list[AheadGroup] = groups
        self.forwards = sum(grp.runs for grp in groups)  # draft forwards of the ahead work: levels + 1
        self.slots_used = offset - run_t  # scratch entries the ahead work adds after T's
        # retained on a hit with guess g: the next tree's run levels 1..levels-1 below g, in T's order
        per_guess = [[] for _ in range(g)]
        for grp, anc in zip(groups[2:], ancestry[2:]):
            if grp.runs:
                n_per = len(anc) // g
                for n, a in enumerate(anc):
                    per_guess[n // n_per].append(a[-1])
        self.retain = sum(sizes[:-1])  # R
        guess_offsets = [a[-1] for a in ancestry[1]]
        self.hit_slots = torch.tensor([[guess_offsets[i]] + per_guess[i] for i in range(g)], dtype=torch.long,
                                      device=device)  # (G, 1 + R) the guess, then its retained entries
        self.level_sizes = sizes  # F_1..F_levels

    @staticmethod
    def _group(parent_row, rank, anc, s, depth, width, runs, device) -> AheadGroup:
        mask = torch.zeros(len(anc), s, dtype=torch.bool)
        for n, a in enumerate(anc):
            mask[n, [x for x in a if x < s]] = True
        return AheadGroup(parent_row.to(device), rank.to(device), mask.to(device), depth, width, runs)
