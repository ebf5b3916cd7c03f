"""A static tree: one `TreeTopology` for the whole generation (widths, a preset, a chain for
method='linear', an optimized preset, or the root alone for method='autoregressive').

`TreeDrafter` expands it with one batched draft forward per level: the nodes of each level
1..D-1 together, each seeing the committed prefix plus its own ancestors. Leaves at depth D are
never run through the draft: their children are not needed this step. Its buffers (tokens,
valid flags, draft logits, the root's position) are allocated at the first step and reused by
every later one, and by later generations of a kept Speculator (`restart`).

Below the root everything has the tree's fixed shapes and reads only those buffers, so with
greedy proposals the whole expansion (proposals and level forwards) goes to the backend as one
`run_captured` function: on a GPU, one CUDA graph replay per step instead of a launch per level
and the host work between levels.

Dimension letters: docs/dimensions.md (N nodes incl. the root, D depth, F_d nodes of level d).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.ahead import AheadPlan, AheadWork, OverlapConfig, commit_ahead_hit
from treespec.drafting.base import ChildProposer, Drafter, commit_accepted, feed_pending
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree
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

    def ahead_plan(self, config: OverlapConfig, device: torch.device) -> AheadPlan:
        """How this policy drafts ahead (overlap=, drafting/ahead.py)."""
        return AheadPlan(self.topology, config, device)


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
            anc[topo.level(d), 1 : topo.level_starts[d + 1]].contiguous() for d in range(1, topo.max_depth)
        ]  # each (F_d, end_d - 1)
        self.structure = topo.tensors(device)
        self.max_nodes, self.max_depth = topo.num_nodes, topo.max_depth
        n = topo.num_nodes
        self._tokens = torch.zeros(n, dtype=torch.long, device=device)  # (N,) every entry rewritten each step
        self._root_pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,) the root's position, on the device
        self._valid = torch.ones(n, dtype=torch.bool, device=device)  # (N,) the root's stays True
        self._q_logits: torch.Tensor | None = None  # (N, V) made at the first step (V, dtype from the logits); leaf rows stay 0
        self.plan: AheadPlan | None = None
        self._resume: torch.Tensor | None = None  # (1,) guess the next tree starts from (drafted ahead)
        self._ahead_tokens: list[torch.Tensor] = []  # per ahead group (n,), with a plan
        self._ahead_valid: list[torch.Tensor] = []
        self._ahead_q: list[torch.Tensor] = []  # per run group (n, V)

    def enable_ahead(self, plan: AheadPlan) -> None:
        """Draft ahead below this tree by `plan` (drafting/ahead.py; the draft cache must hold
        its slots_used entries after the tree's)."""
        if plan.topo != self.topo:
            raise ValueError("the ahead plan was made for another tree")
        self.plan = plan
        slot = self.structure.draft_slot.clone()
        slot[plan.leaf_nodes] = plan.leaf_slots  # the end points are run too, after T's nodes
        self.structure = dataclasses.replace(self.structure, draft_slot=slot)

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        """See `Drafter.draft`. The returned tree's tensors are this drafter's buffers: valid
        until its next step (the engine consumes them within the step)."""
        topo = self.topo
        tokens, valid = self._tokens, self._valid
        tokens[0] = pending[0, -1]
        if self._resume is not None:  # the first levels were drafted ahead; the root is cached
            known = self._restore(self._resume)
            self._resume = None
        else:
            logits = feed_pending(self.backend, self.model, self.cache, pending, root_pos)  # (1, V)
            if self._q_logits is None:
                self._q_logits = logits.new_zeros(topo.num_nodes, logits.shape[-1])
            self._q_logits[0] = logits[0]
            known = 0
        self._root_pos.fill_(root_pos)
        if known == 0 and self.proposer.replayable:  # fixed shapes, buffers only: one captured run
            self.backend.run_captured(self.cache, ("tree levels", id(self)), self._expand_from_root)
        else:
            self._expand(known)
        return DraftTree(structure=self.structure, tokens=tokens, valid=valid, q_logits=self._q_logits)

    def _expand_from_root(self) -> None:
        self._expand(0)

    def _expand(self, known: int) -> None:
        """Propose and run levels known+1..D below the root, in the buffers: tokens and valid
        flags of every level, q logits of levels 0..D-1 (levels 1..known have their tokens and
        levels 0..known-1 their q and draft KV entries already)."""
        topo, tokens, valid, q_logits = self.topo, self._tokens, self._valid, self._q_logits
        if 0 < known < topo.max_depth:
            q_logits[topo.level(known)] = self._run_level(known)
        for d in range(known, topo.max_depth):
            level, kids = topo.level(d), topo.level(d + 1)
            par, rank = self._children[d]  # (F_{d+1},) each
            child_tokens, child_valid = self.proposer.propose(q_logits[level], self._widths[d])  # (F_d, k)
            tokens[kids] = child_tokens[par, rank]
            valid[kids] = child_valid[par, rank] & valid[level][par]
            if d + 1 == topo.max_depth:
                break
            q_logits[kids] = self._run_level(d + 1)

    def _run_level(self, d: int) -> torch.Tensor:
        """The draft forward of level d (>= 1): FloatTensor (F_d, V) q logits at its nodes."""
        ids = self._tokens[self.topo.level(d)][None]  # (1, F_d)
        pos = (self._root_pos + d) + torch.zeros_like(ids)  # (1, F_d): from the device, as a replay reads it
        return self.backend.forward(self.model, self.cache, ids, pos, self._level_masks[d - 1])

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """See `Drafter.restart`: the buffers stay; what the last generation left is dropped."""
        self.proposer = proposer
        self._resume = None
        self._ahead_tokens, self._ahead_valid, self._ahead_q = [], [], []
        return True

    # ------------------------------------------------------------------ drafting ahead
    def draft_ahead(self, root_pos: int) -> AheadWork:
        """Below the tree just drafted: the plan's end points, K guesses each, and the next
        tree's first levels below every guess (drafting/ahead.py)."""
        plan = self.plan
        tokens_prev = self._tokens[plan.leaf_nodes]  # (E,)
        valid_prev = self._valid[plan.leaf_nodes]
        toks, vals, qs = [tokens_prev], [valid_prev], []
        q_prev = None
        for i, group in enumerate(plan.groups):
            if i > 0:  # propose this group's tokens below the previous group's nodes
                child_tokens, child_valid = self.proposer.propose(q_prev, group.width)  # (rows, k)
                tokens_prev = child_tokens[group.parent_row, group.rank]  # (n,)
                valid_prev = child_valid[group.parent_row, group.rank] & vals[-1][group.parent_row]
                toks.append(tokens_prev)
                vals.append(valid_prev)
            if group.runs:
                ids = tokens_prev[None]  # (1, n)
                pos = (root_pos + group.depth) + torch.zeros_like(ids)  # (1, n)
                q_prev = self.backend.forward(self.model, self.cache, ids, pos, group.block_mask)  # (n, V)
                qs.append(q_prev)
        self._ahead_tokens, self._ahead_valid, self._ahead_q = toks, vals, qs
        return AheadWork(end_nodes=plan.leaf_nodes, tokens=toks[1], valid=vals[1], hit_slots=plan.hit_slots,
                         retain=plan.retain, forwards=plan.forwards, saved=plan.config.levels)

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """See `Drafter.commit`."""
        return commit_accepted(self.cache, tree, path, num_accepted, kept, emitted)

    def commit_hit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, emitted: torch.Tensor,
                   work: AheadWork, guess: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """See `AheadDrafter.commit_hit`: the next tree's first levels were drafted ahead and
        their draft KV entries are retained; the next step copies them in (`_restore`)."""
        self.resume(guess[None])
        return commit_ahead_hit(self.cache, tree, path, num_accepted, emitted, work, guess)

    def resume(self, guess: torch.Tensor) -> None:
        """The next step starts from guess `guess` (LongTensor (1,)): its tree's first levels
        were drafted ahead and their draft KV entries retained by the commit."""
        self._resume = guess

    def _restore(self, guess: torch.Tensor) -> int:
        """Copy the drafted-ahead levels below `guess` into this step's buffers; returns how
        many levels below the root are known."""
        plan, g = self.plan, self.plan.num_guesses
        self._q_logits[0] = self._ahead_q[1].index_select(0, guess)[0]  # q at the guess, now the root
        for j, size in enumerate(plan.level_sizes, start=1):
            level = self.topo.level(j)
            self._tokens[level] = self._ahead_tokens[j + 1].view(g, size).index_select(0, guess)[0]
            self._valid[level] = self._ahead_valid[j + 1].view(g, size).index_select(0, guess)[0]
            if j < len(plan.level_sizes):
                q = self._ahead_q[j + 1]
                self._q_logits[level] = q.view(g, size, q.shape[-1]).index_select(0, guess)[0]
        return len(plan.level_sizes)

    @property
    def forwards_per_step(self) -> int:
        return self.topo.max_depth

    def describe(self) -> str:
        return self.topo.describe()

    def observe(self, num_accepted: int) -> None:
        """A static tree ignores the feedback."""
