"""Prompt lookup: continuations copied from the context join the draft model's tree for free.

When the output repeats its input (code edits, added type hints or docstrings, quotes, JSON keys),
the tokens that followed an earlier occurrence of the context's last n tokens are a strong guess
for what comes next, and they cost no draft forward. Each step:

    match   on the device: for every position e of the context, the longest n (from
            `LookupConfig.ngram_sizes`) such that the n tokens before e equal the last n tokens
            of the context; the best B positions (longest n, then most recent) whose next tokens
            differ give B continuations of L tokens (`find_continuations`)
    merge   each continuation walks down the draft model's tree from the root: a token equal to
            an existing child of the node it has reached merges into that child; the first token
            that does not becomes a new node, and the rest of the continuation hangs below it
            (`merge_branches`). The tree gets B*L extra slots every step; slots that merged or
            found no match stay as padding (valid=False), so the shapes never change.

Both are a fixed number of tensor ops (loops over the branch length L and the n-gram sizes,
never over tree nodes or context positions), with no host synchronisation: the only host value
used is the context length the engine already tracks on the host.

How transformers (`PromptLookupCandidateGenerator`: n from max to 1, first match in the whole
input, one chain), vLLM (`NgramProposer`: longest n in [min, max], one chain) and SGLang (NGRAM:
a trie of earlier n-grams, several branches) match, and why this module picks the most recent
longest match: docs/lookup.md. None of them merges lookup candidates into a model-drafted tree.

Lookup nodes are point-mass proposals (q = delta at their token): they come after a node's
model-drawn children in rank order, so multi-path rejection sampling stays lossless
(docs/sampling.md, "Deterministic candidates"). Dimension letters: docs/dimensions.md; B lookup
branches, L tokens per branch, T context buffer length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.kv_cache import TreeKVCache
from treespec.drafting.base import ChildProposer, Drafter
from treespec.errors import TreeConfigError
from treespec.stats import GenerationStats
from treespec.tree.draft import DraftTree
from treespec.tree.topology import TreeTensors


@dataclass(frozen=True)
class LookupConfig:
    """ngram_sizes: suffix lengths to match (longer matches win); branches: continuations merged
    per step (B); length: tokens per continuation (L). The tree grows by B*L node slots."""

    ngram_sizes: tuple[int, ...] = (3, 2, 1)
    branches: int = 2
    length: int = 8

    def __post_init__(self) -> None:
        sizes = tuple(self.ngram_sizes)
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise TreeConfigError("ngram_sizes", f"lookup ngram_sizes must be ints >= 1, got {self.ngram_sizes!r}")
        object.__setattr__(self, "ngram_sizes", tuple(sorted(set(sizes))))
        for name in ("branches", "length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TreeConfigError(name, f"lookup {name} must be an int >= 1, got {value!r}")

    @property
    def slots(self) -> int:
        """Extra tree nodes reserved every step (B*L)."""
        return self.branches * self.length


def find_continuations(context: torch.Tensor, length: int, config: LookupConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuations of the context's suffix copied from earlier in the context.

    context: LongTensor (T,) the engine's token buffer; only context[:length] is read.
    length: how many tokens the context holds (a host int: no sync).
    Returns (tokens LongTensor (B, L), valid BoolTensor (B, L)): branch b is the L tokens that
    followed the b-th best match; valid is False past the end of the context and for branches
    with no match. Best = longest matching n-gram, then most recent; the branches' first tokens
    are distinct, so two branches never propose the same node.
    """
    t, device = context.shape[0], context.device
    nmax = config.ngram_sizes[-1]
    back = torch.arange(nmax, device=device)  # (n,) how far before the end / before e
    starts = torch.arange(t, device=device)  # (T,) candidate continuation starts e
    src = starts[None, :] - 1 - back[:, None]  # (n, T) the token `back` places before e
    ref = length - 1 - back  # (n,) the token `back` places before the context's end
    eq = context[src.clamp(min=0)] == context[ref.clamp(min=0)][:, None]  # (n, T)
    eq = eq & (src >= 0) & (ref >= 0)[:, None]
    run = eq.int().cumprod(dim=0)  # (n, T) run[i, e] = the last i+1 tokens before e all match
    # longest matching n, 0 = none; a tensor of the sizes would be a host-to-device copy every step
    matched = torch.stack([run[n - 1] * n for n in config.ngram_sizes]).amax(dim=0)  # (T,)
    # e < length: at least one known continuation token (e == length would be the suffix itself)
    score = torch.where((matched > 0) & (starts < length), matched * t + starts, -1)  # (T,)
    first = context[starts.clamp(max=t - 1)]  # (T,) the first token each start proposes
    picks, found = [], []
    for _ in range(config.branches):
        best = score.argmax()  # () most recent of the longest matches
        picks.append(best)
        at = best.view(1)  # (1,) index_select: an index by a 0-d tensor would read it on the host
        found.append(score.index_select(0, at)[0] >= 0)
        score = torch.where(first == first.index_select(0, at), -1, score)  # the next branch proposes another token
    pos = torch.stack(picks)[:, None] + torch.arange(config.length, device=device)  # (B, L)
    valid = torch.stack(found)[:, None] & (pos < length)  # (B, L)
    tokens = torch.where(valid, context[pos.clamp(max=t - 1)], 0)  # (B, L)
    return tokens, valid


def merge_branches(tree: DraftTree, tokens: torch.Tensor, valid: torch.Tensor) -> DraftTree:
    """`tree` with B lookup branches of L tokens hung below its root, without duplicate nodes.

    tree: the draft model's tree (N nodes, depth D; children (N, K)).
    tokens, valid: (B, L) continuations from `find_continuations` (distinct first tokens).
    Returns a tree of N + B*L nodes and depth max(D, L). Node N + b*L + j is slot j of branch b:
    a real node (valid, `lookup` True) when the branch's token j is the first of its tokens not
    already in the tree along its path, or any later one; padding (valid False, a child of the
    root) when it merged into an existing node, ran past the context or found no match. A new
    node's sibling rank is K + b: after all of its parent's model children, as the rejection
    sampler requires (docs/sampling.md). Loops run over L only.
    """
    s = tree.structure
    n, k = s.children.shape
    b, l = tokens.shape
    device = tokens.device
    m, depth_max = n + b * l, max(s.max_depth, l)
    slots = n + torch.arange(b * l, device=device).view(b, l)  # (B, L) node index of each slot
    extra = slots.flatten()  # (B*L,)

    parents = torch.cat([s.parents, torch.zeros(b * l, dtype=torch.long, device=device)])  # (M,)
    depth = torch.cat([s.depth, torch.ones(b * l, dtype=torch.long, device=device)])  # (M,)
    paths = torch.full((m, depth_max + 1), -1, dtype=torch.long, device=device)  # (M, D'+1)
    paths[:n, : s.max_depth + 1] = s.paths
    paths[n:, 0] = 0
    paths[extra, 1] = extra  # padding: a child of the root, so that its attention row is not empty
    ancestors = torch.zeros(m, m, dtype=torch.bool, device=device)  # (M, M)
    ancestors[:n, :n] = s.ancestors
    ancestors[n:, 0] = True
    true = torch.ones((), dtype=torch.bool, device=device)  # a Python True assigned by index is copied from the host
    ancestors.index_put_((extra, extra), true)
    children = torch.full((m + 1, k + b), -1, dtype=torch.long, device=device)  # row M absorbs padding writes
    children[:n, :k] = s.children
    node_valid = torch.cat([tree.valid, torch.zeros(b * l, dtype=torch.bool, device=device)])  # (M,)

    branch = torch.arange(b, device=device)
    cur = torch.zeros(b, dtype=torch.long, device=device)  # (B,) node each branch has reached
    alive = torch.ones(b, dtype=torch.bool, device=device)  # (B,)
    for j in range(l):
        tok, ok = tokens[:, j], valid[:, j] & alive  # (B,)
        kids = children[cur, :k]  # (B, K) model children of the reached node (none below a lookup node)
        safe = kids.clamp(min=0)
        hit = (kids >= 0) & tree.valid[safe] & (tree.tokens[safe] == tok[:, None])  # (B, K)
        merged = hit.any(dim=-1)  # (B,)
        kid = kids.gather(-1, hit.int().argmax(dim=-1, keepdim=True))[:, 0]  # (B,) first matching child
        slot = slots[:, j]  # (B,)
        new = ok & ~merged  # (B,)
        parents[slot] = torch.where(new, cur, 0)
        depth[slot] = torch.where(new, depth[cur] + 1, 1)
        paths[slot] = torch.where(new[:, None], paths[cur], paths[slot])
        paths[slot, depth[slot]] = slot
        ancestors[slot] = torch.where(new[:, None], ancestors[cur], ancestors[slot])
        ancestors.index_put_((slot, slot), true)
        node_valid[slot] = new
        children[torch.where(new, cur, m), k + branch] = slot
        cur = torch.where(ok, torch.where(merged, kid, slot), cur)
        alive = ok

    structure = TreeTensors(
        parents=parents,
        depth=depth,
        ancestors=ancestors,
        paths=paths,
        children=children[:m],
        ranks=torch.cat([s.ranks, (k + branch).repeat_interleave(l)]),
        draft_slot=torch.cat([s.draft_slot, torch.full((b * l,), -1, dtype=torch.long, device=device)]),
        max_depth=depth_max,
    )
    q_logits = None
    if tree.q_logits is not None:  # lookup nodes never run through the draft: their rows stay 0
        q_logits = torch.cat([tree.q_logits, tree.q_logits.new_zeros(b * l, tree.q_logits.shape[-1])])
    lookup = torch.cat([torch.zeros(n, dtype=torch.bool, device=device), torch.ones(b * l, dtype=torch.bool, device=device)])
    if tree.lookup is not None:
        lookup[:n] = tree.lookup
    return DraftTree(structure, torch.cat([tree.tokens, tokens.flatten()]), node_valid, q_logits, lookup=lookup)


class LookupDrafter:
    """A `Drafter` adapter: the wrapped drafter's tree plus lookup branches each step.

    The engine hands it its token buffer with `attach(out)` before the first step."""

    def __init__(self, inner: Drafter, config: LookupConfig):
        self.inner, self.config = inner, config
        self.max_nodes = inner.max_nodes + config.slots
        self.max_depth = max(inner.max_depth, config.length)
        self.context: torch.Tensor | None = None

    @property
    def model(self) -> PreTrainedModel:
        return self.inner.model

    @property
    def cache(self) -> TreeKVCache:
        return self.inner.cache

    @property
    def forwards_per_step(self) -> int:
        return self.inner.forwards_per_step

    def attach(self, context: torch.Tensor) -> None:
        """context: LongTensor (T,) the engine's output buffer (prompt + generated so far)."""
        self.context = context

    def draft(self, pending: torch.Tensor, root_pos: int) -> DraftTree:
        if self.context is None:
            raise RuntimeError("LookupDrafter.draft before attach(context): the engine must hand over its token buffer")
        tree = self.inner.draft(pending, root_pos)
        tokens, valid = find_continuations(self.context, root_pos + 1, self.config)  # the root is context[root_pos]
        return merge_branches(tree, tokens, valid)

    def commit(self, tree: DraftTree, path: torch.Tensor, num_accepted: int, kept: int,
               emitted: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The inner drafter's commit: lookup nodes have no draft entries (draft_slot -1), so
        accepted ones end the kept prefix and are fed next step."""
        return self.inner.commit(tree, path, num_accepted, kept, emitted)

    def observe(self, num_accepted: int) -> None:
        self.inner.observe(num_accepted)

    def restart(self, proposer: ChildProposer, stats: GenerationStats) -> bool:
        """See `Drafter.restart`: the inner drafter's; the token buffer is attached again."""
        self.context = None
        return self.inner.restart(proposer, stats)

    def describe(self) -> str:
        c = self.config
        return f"{self.inner.describe()} + lookup ({c.branches} x {c.length} tokens, n-grams {list(c.ngram_sizes)})"
