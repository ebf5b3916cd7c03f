"""What every drafter shares: the `Drafter` protocol (the tree it proposes is a `DraftTree`,
tree/draft.py), its commit (`commit_accepted`), how a
node's children are proposed (`GreedyProposer`, `SampledProposer`), `feed_pending`, and the
checks of the tree-policy configs (`TreeConfigError` names the bad field).

Each step a drafter first runs the accepted tokens the draft has not seen yet (the root, and
the previous step's leaf when a whole path was accepted), then expands the tree below the root.
Implementations: `TreeDrafter` (drafting/static.py), `DynamicDrafter` (drafting/dynamic.py),
`AdaptiveDrafter` (drafting/adaptive.py); drafting/policy.py picks one from `tree=`.

q is the draft's distribution. Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from transformers import PreTrainedModel

from treespec.acceptance.rejection import sample_children
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.backends.base import Backend, TreeCache
from treespec.errors import TreeConfigError  # noqa: F401  (re-exported)
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree


class GreedyProposer:
    """Temperature 0: the top-k tokens of q are a node's children, best first."""

    replayable = True  # a function of q alone: a captured graph of it stays right on every replay

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
    replayable = False  # a captured graph would replay one draw of the generator's state

    def propose(self, q_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q_logits: (F, V) -> (tokens LongTensor (F, k), valid BoolTensor (F, k))."""
        q = logits_to_probs(q_logits, self.config)  # (F, V)
        return sample_children(q, k, without_replacement=self.config.without_replacement, generator=self.generator)


ChildProposer = GreedyProposer | SampledProposer


@runtime_checkable
class Drafter(Protocol):
    """Expands one step's tree below the root. Implementations: `TreeDrafter` (a static
    topology), `DynamicDrafter`, `AdaptiveDrafter`; each is made by its tree policy's
    `make_drafter` (drafting/policy.py)."""

    model: PreTrainedModel
    cache: TreeCache
    max_nodes: int  # most nodes (root included) a step's tree can have
    max_depth: int  # deepest a step's tree can be
    forwards_per_step: int

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        """Expand the tree below the last pending token (the root).

        pending: LongTensor (1, m) accepted tokens not yet in the draft cache, ending with the
            root; m is 1, or 2 after a step that accepted a whole path down to a leaf.
        root_pos: position of the root in the sequence.
        """

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """After verification: keep the accepted nodes this drafter ran in its cache and return
        the accepted tokens it has not run yet, the next step's pending tokens (1, m).

        path: LongTensor (D+1,) accepted nodes, root first (padded past num_accepted); kept: how
        many of path[1:] the draft ran (host int, from the step's one sync); emitted: LongTensor
        (D+1,) the accepted drafts then the target's next token."""

    def observe(self, num_accepted: int) -> None:
        """Feedback after each step: how many drafts the target accepted."""

    def describe(self) -> str:
        """The tree, in words, for GenerationStats.tree."""

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """Ready this drafter for another generation on the same cache, proposing with
        `proposer` and recording into `stats`; False when it cannot start again (the caller
        makes a new one). A kept Speculator reuses its drafter, so that the buffers a captured
        draft graph reads and writes stay the same (drafting/static.py)."""


def commit_accepted(cache: TreeCache, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
                    emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """`Drafter.commit` for a drafter that keeps the accepted nodes it ran: their scratch
    entries move next to the committed ones; the accepted nodes it never ran (a leaf, lookup
    nodes) end the path and are the next step's pending tokens, with the new root."""
    cache.commit(tree.structure.draft_slot[path[1:]], kept)  # draft_slot (D,) of the accepted path
    return emitted[None, kept : num_accepted + 1]  # (1, a - kept + 1)


@runtime_checkable
class FeatureDrafter(Protocol):
    """A drafter that reads the target's own features (a draft head, drafting/head.py): the
    engine asks the target's forwards for their hidden states and hands them over."""

    def prefill(self, tokens: torch.Tensor, features: torch.Tensor, chunks: list[tuple[int, int, int]],
                layout: Callable[[int], tuple[torch.Tensor, torch.Tensor]]) -> int:
        """Run the prompt's tokens but the last (the first T-1 of tokens (L,)) with the target's
        features (T-1, Hm), in the target's prefill chunks [(start, real, size)] with the engine's
        layout(size) -> (causal mask (c, c), commit offsets (c,)); returns forwards run."""

    def accept_features(self, features: torch.Tensor) -> None:
        """The target's features along the accepted path, root first: (D+1, Hm)."""


def feed_pending(backend: Backend, model: PreTrainedModel, cache: TreeCache, pending: torch.Tensor, root_pos: int) -> torch.Tensor:
    """Run the accepted tokens the draft has not seen (pending: LongTensor (1, m), ending with
    the root) and commit them; returns the draft logits at the root: FloatTensor (1, V).

    The forward always has a power-of-two size P >= 2 (m is 1 or 2, more after accepted lookup
    tokens), so that a compiled or captured backend sees one shape whatever m is: P - m padding
    entries come first, each seeing only itself, and are dropped at the commit."""
    m = pending.shape[1]
    size = max(2, 1 << (m - 1).bit_length())
    pad = size - m
    # pending[0][None]: strides (P, 1) even when pending is a view of a wider row (a compiled
    # forward's guards include strides; is_contiguous ignores a size-1 dimension's)
    ids = torch.cat([pending[:, :1].expand(1, pad), pending], dim=1) if pad else pending[0][None]  # (1, P)
    pos = torch.arange(root_pos - size + 1, root_pos + 1, device=pending.device).clamp(min=0)[None]  # (1, P)
    mask, keep = _pending_layout(size, pad, pending.device)  # (P, P), (P,)
    logits = backend.forward(model, cache, ids, pos, mask, last_only=True)  # (1, V)
    cache.commit(keep, m)  # pending tokens are accepted already; the padding goes
    return logits


_PENDING_LAYOUTS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _pending_layout(size: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask BoolTensor (P, P), keep LongTensor (P,)) for `pad` padding entries before the real
    pending tokens: the real ones are causal among themselves, padding sees itself only; keep
    lists the real entries first. Kept: the same tensors every step (a graph copies none), real
    tensors only (not those of a call under FakeTensorMode)."""
    held = _PENDING_LAYOUTS.get((size, pad, device))
    if held is None:
        mask = torch.eye(size, dtype=torch.bool, device=device)
        mask[pad:, pad:] = torch.ones(size - pad, size - pad, dtype=torch.bool, device=device).tril()
        keep = torch.cat([torch.arange(pad, size, device=device), torch.arange(pad, device=device)])
        held = (mask, keep)
        if type(mask) is torch.Tensor:
            _PENDING_LAYOUTS[(size, pad, device)] = held
    return held


# ------------------------------------------------------------------ checks of the policy configs
def check_count(policy: str, key: str, value, minimum: int = 1) -> None:
    """A whole number >= minimum (bools refused), or TreeConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise TreeConfigError(key, f"{policy} tree {key} must be an int >= {minimum}, got {value!r}")
