"""Drafting with a draft head (treespec.heads): any tree policy's drafter, fed the target's features.

A head reads, with each token it runs, the feature of the token before it (docs/heads.md):

- accepted tokens (the prompt, and each step's accepted path and next token) read the target's
  own features f, from the target's forwards (prefill, verification: `Backend.forward(...,
  hidden=True)`, no second pass);
- tree nodes read their parent's predicted feature f^, which the head produced when it ran the
  parent (the root's comes from the pending forward).

`HeadBackend` does that bookkeeping around the real backend, so that the ordinary drafters
(static trees, chains, dynamic, adaptive) drive a head exactly as a draft model: their pending
forward (`feed_pending`, the one last_only forward of a step) reads the target features the
engine handed over; a tree forward's nodes read the features of their parents, the last scratch
entry each one's block mask shows (ancestors are written before descendants, level by level),
or the root's when it shows none.

`HeadDrafter` wraps the policy's drafter. Its trees mark every node as not kept by the draft
(`draft_slot` -1): the head's tree entries were computed from predicted features, so after
acceptance the engine feeds the whole accepted path back as pending tokens and the head
recomputes their entries from the target's true features (as EAGLE's "draft extend" does).

Dimension letters: docs/dimensions.md (n new tokens, s scratch, Hm hidden size, D depth).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from treespec.backends.base import Backend, TreeCache
from treespec.drafting.base import ChildProposer, Drafter
from treespec.heads.model import DraftHead, HeadMismatchError
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree


def is_head(draft) -> bool:
    return isinstance(draft, DraftHead)


def check_head_use(target, head: DraftHead, *, lookup: object | None, overlap: object | None) -> None:
    """Before any work: the head is bound to this very target (load_head checked its weights),
    and the options a head does not support are off."""
    if head.shared is None or head.shared.target is not target:
        raise HeadMismatchError(
            "this draft head is bound to another model object than the target passed; load it for this target "
            "with treespec.heads.load_head(target) (which checks that it was trained for it)"
        )
    if overlap is not None:
        raise ValueError(
            "overlap=True is not supported with a draft head: the nodes drafted ahead would need the features of a "
            "verification that has not ended yet; use overlap=False (a head level costs a few percent of a target "
            "forward, little to hide)"
        )
    if lookup is not None:
        raise ValueError("lookup=True is not supported with a draft head yet; use lookup=False")


class HeadBackend:
    """The real backend, plus the features a head reads and writes (see the module docstring).

    pending: (P, Hm) target features of the next pending tokens (set by `HeadDrafter`).
    root: (1, Hm) the head's predicted feature at the root (its pending forward's last token).
    scratch: (S, Hm) predicted features of this step's scratch entries, by scratch offset.
    """

    def __init__(self, inner: Backend, head: DraftHead, pending_rows: int):
        self.inner, self.head = inner, head
        h, device, dtype = head.config.hidden_size, head.device, head.dtype
        self.name = inner.name
        self.pending = torch.zeros(pending_rows, h, dtype=dtype, device=device)
        self.root = torch.zeros(1, h, dtype=dtype, device=device)
        self.scratch = torch.zeros(0, h, dtype=dtype, device=device)
        self.pending_count = 0  # m, the real pending tokens of the coming pending forward (host int)

    def check_model(self, model) -> None:
        self.inner.check_model(model)

    def make_cache(self, model, capacity: int, role: str = "target") -> TreeCache:
        return self.inner.make_cache(model, capacity, role)

    def forward(self, model, cache: TreeCache, input_ids: torch.Tensor, position_ids: torch.Tensor,
                block_mask: torch.Tensor, last_only: bool = False, hidden: bool = False):
        """`Backend.forward` of the head, with its parent features set first and its predicted
        features kept after."""
        n, s = block_mask.shape
        if last_only:  # the pending forward: accepted tokens, the target's features
            # feed_pending puts n - m padding rows before the m real ones (drafting/base.py)
            m = self.pending_count or n
            feats = self.pending[:m]  # (m, Hm)
            if m < n:
                feats = torch.cat([feats[:1].expand(n - m, -1), feats])  # (n, Hm)
        else:
            feats = self._parent_features(block_mask)
        self.head.set_features(feats)
        out = self.inner.forward(model, cache, input_ids, position_ids, block_mask, last_only, hidden=True)
        if last_only:
            self.root.copy_(out.hidden[-1:])
        else:
            if self.scratch.shape[0] < s:  # grown outside any captured graph: it is not a graph buffer
                self.scratch = torch.cat([self.scratch, self.scratch.new_zeros(s - self.scratch.shape[0], self.scratch.shape[1])])
            self.scratch[s - n : s] = out.hidden
        return out if hidden else out.logits

    def run_captured(self, cache: TreeCache, key: object, fn: Callable[[], None]) -> None:
        self.inner.run_captured(cache, key, fn)

    def _parent_features(self, block_mask: torch.Tensor) -> torch.Tensor:
        """(n, Hm): each new token's parent's predicted feature. Its parent is the last earlier
        scratch entry it sees (its deepest ancestor), or the root when it sees none."""
        n, s = block_mask.shape
        if s == n:  # the first tree level: every node hangs below the root
            return self.root.expand(n, -1)
        earlier = block_mask[:, : s - n].long()  # (n, s - n)
        order = torch.arange(1, s - n + 1, device=block_mask.device)  # (s - n,)
        last = (earlier * order).amax(dim=-1)  # (n,) 1-based offset of the parent, 0 = the root
        parents = self.scratch[(last - 1).clamp(min=0)]  # (n, Hm)
        return torch.where((last > 0)[:, None], parents, self.root)


class HeadDrafter:
    """A tree policy's drafter driving a head (see the module docstring)."""

    def __init__(self, inner: Drafter, head_backend: HeadBackend, backend: Backend):
        self.inner, self.feed, self.backend = inner, head_backend, backend
        self.model, self.cache = inner.model, inner.cache
        self.max_nodes, self.max_depth = inner.max_nodes, inner.max_depth
        self._unkept: dict[int, object] = {}

    @property
    def forwards_per_step(self) -> int:
        return self.inner.forwards_per_step

    def describe(self) -> str:
        return f"{self.inner.describe()} (draft head)"

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Keeps none of its tree entries (draft_slot -1): the whole accepted path is pending,
        rerun next step from the target's features (`accept_features`)."""
        return self.inner.commit(tree, path, num_accepted, kept, emitted)

    def observe(self, num_accepted: int) -> None:
        self.inner.observe(num_accepted)

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """See `Drafter.restart`: the policy's drafter's; the feature buffers stay (every
        generation's prefill writes them before a step reads them)."""
        self.feed.pending_count = 0
        return self.inner.restart(proposer, stats)

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        self.feed.pending_count = pending.shape[1]
        tree = self.inner.draft(pending, root_pos)
        return dataclasses.replace(tree, structure=self._without_kept(tree.structure))

    def _without_kept(self, structure):
        """The structure with draft_slot -1 everywhere: the engine then keeps none of the head's
        tree entries and feeds the whole accepted path back (recomputed from true features).
        Cached per structure object (a static tree reuses one)."""
        held = self._unkept.get(id(structure))
        if held is not None and held[0] is structure:
            return held[1]
        unkept = dataclasses.replace(structure, draft_slot=torch.full_like(structure.draft_slot, -1))
        if len(self._unkept) > 64:  # dynamic trees make a structure per step
            self._unkept.clear()
        self._unkept[id(structure)] = (structure, unkept)
        return unkept

    def accept_features(self, features: torch.Tensor) -> None:
        """After a step: the target's features along the accepted path, root first, (D+1, Hm)
        (padded past the accepted ones): the next pending tokens read them in order."""
        self.feed.pending[: features.shape[0]].copy_(features)

    def prefill(self, tokens: torch.Tensor, features: torch.Tensor, chunks: list[tuple[int, int, int]],
                layout: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Run the prompt's tokens but the last through the head, cut as the target's prefill cut
        them (chunks: [(start, real tokens, size)], engine/loop.py `prefill_chunks`), each token
        reading the feature before it (the first, a zero feature as in training); the last
        feature waits for the root. tokens: (L,) the sequence buffer, the prompt first (a padded
        chunk reads what follows it; its padding comes last, is seen by no real token and is
        dropped at the commit); features: (T-1, Hm) the target's at the prompt's tokens but the
        last; layout(c): the engine's (c, c) causal mask and (c,) commit offsets for a chunk size,
        the same tensors the target's prefill used. Fixed chunk sizes keep a compiled, captured
        head to the shapes it already has. Returns the forwards run."""
        t, h = features.shape
        shifted = torch.cat([features.new_zeros(1, h), features[:-1]])  # (T-1, Hm)
        for start, real, size in chunks:
            ids = tokens[start : start + size][None]  # (1, c), contiguous whatever L is
            feats = shifted[start : start + real]  # (real, Hm)
            if real < size:
                feats = torch.cat([feats, feats.new_zeros(size - real, h)])  # (c, Hm)
            pos = torch.arange(start, start + size, device=ids.device)[None]  # (1, c)
            self.feed.head.set_features(feats)
            causal, keep = layout(size)  # (c, c), (c,)
            self.backend.forward(self.model, self.cache, ids, pos, causal, last_only=True)
            self.cache.commit(keep, real)
        if t > 0:
            self.feed.pending[0].copy_(features[-1])
        else:
            self.feed.pending.zero_()
        return len(chunks)


def make_head_drafter(policy, head: DraftHead, backend: Backend, cache: TreeCache, proposer: ChildProposer,
                      stats: GenerationStats) -> HeadDrafter:
    """The policy's drafter (drafting/policy.py) over `head`, with the feature bookkeeping."""
    feed = HeadBackend(backend, head, pending_rows=0)
    inner = policy.make_drafter(head, feed, cache, proposer, stats)
    feed.pending = feed.pending.new_zeros(inner.max_depth + 1, feed.pending.shape[1])  # (D+1, Hm): a path's features
    return HeadDrafter(inner, feed, backend)
