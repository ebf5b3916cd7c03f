"""The decode loop: draft, verify, accept, commit.

One step, for a tree of N nodes and depth D below the root (the last accepted token):

    draft   the draft model expands the tree, one batched forward per level       -> tokens (N,)
    verify  the target scores every node in one forward with a tree mask          -> p logits (N, V)
    ahead   with overlap: the draft drafts the next tree's first levels below the
            nodes where it expects verification to end, on a second CUDA stream
            beside verify (drafting/ahead.py, engine/streams.py)                  -> AheadWork: guesses (G,)
    accept  a pure function picks the longest accepted path and the next token    -> Acceptance
    commit  ONE host sync reads how many tokens were accepted; both KV caches keep
            only the accepted path (and, when verification ended where the draft
            guessed, the next tree's first levels); the tokens are appended to the output

Shapes are fixed for a given tree and the only device-to-host transfer inside a step is the one
in `commit` (the documented sync point, `_read`). Allocated once per generation: the output
buffer, both KV caches, the static tree's tensors and a static drafter's buffers (tokens, draft
logits); a dynamic drafter's candidate pool. Allocated per step: the small temporaries of the
tensor operations (a few tensors of N or D+1 entries; on the GPU the caching allocator serves
them without a device allocation), the target's (N, V) logits, and the tree a dynamic drafter
assembles from its candidates (its content is the step's choice).
Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.acceptance.acceptors import Acceptor
from treespec.acceptance.greedy import Acceptance
from treespec.backends.base import PREFILL_CHUNKS, Backend, TreeCache
from treespec.backends.compat import vocab_size
from treespec.drafting.base import Drafter, FeatureDrafter
from treespec.drafting.ahead import AheadDrafter, AheadWork, ahead_hit
from treespec.engine.streams import SideStream
from treespec.stats import GenerationStats, Stopwatch
from treespec.tree.draft import DraftTree
from treespec.tree.topology import TreeTopology

__all__ = ["PREFILL_CHUNKS", "SpeculativeEngine", "prefill_chunks"]


EAGER_PREFILL_CHUNK = 512  # without fixed shapes: bounds the prefill mask at (chunk, chunk)


def prefill_chunks(t: int, fixed: bool) -> list[tuple[int, int, int]]:
    """How t prompt tokens are cut into forwards: [(start, real tokens, chunk size)].
    fixed: only PREFILL_CHUNKS sizes (compiled / captured backends): full chunks of the largest
    size, then the rest in one padded large chunk, or in small chunks when it is short (a few
    small forwards cost less than one large one). Otherwise unpadded chunks of up to 512."""
    small, large = PREFILL_CHUNKS if fixed else (EAGER_PREFILL_CHUNK, EAGER_PREFILL_CHUNK)
    out, start = [], 0
    while start < t:
        size = large if t - start > 3 * small else small
        real = min(size, t - start)
        out.append((start, real, size if fixed else real))
        start += size
    return out


@dataclass
class StepRead:
    """What the one host sync of a step reads (host ints).

    num_accepted: a, the accepted drafts (0..D). proposed: real draft nodes in the tree.
    kept: how many accepted nodes the draft ran (a prefix of the path: below it come an
        accepted leaf and lookup nodes, which the draft is fed next step).
    from_lookup: accepted nodes that came from lookup branches.
    tokens: the a + 1 emitted tokens (accepted drafts, then the target's next token).
    ranks: sibling rank of each accepted node, depth 1 down.
    ahead_hit: verification ended at a drafted-ahead end point with one of its guesses.
    """

    num_accepted: int
    proposed: int
    kept: int
    from_lookup: int
    tokens: list[int]
    ranks: list[int]
    ahead_hit: bool = False


@dataclass
class StepResult:
    """What one step emitted (host-side ints, read at the sync point)."""

    tokens: list[int]
    num_accepted: int
    finished: bool


class SpeculativeEngine:
    """Holds the state of one generation (batch size 1) and advances it step by step."""

    def __init__(
        self,
        target: PreTrainedModel,
        target_cache: TreeCache,
        drafter: Drafter | None,
        backend: Backend,
        acceptor: Acceptor,
        stats: GenerationStats,
        *,
        prompt_len: int,
        max_new_tokens: int,
        eos_token_ids: set[int],
        ahead: AheadDrafter | None = None,
        fixed_shapes: bool = False,
    ):
        """drafter: expands each step's tree (None: the target alone, the tree is the root).
        target_cache must hold prompt_len + max_new_tokens + the drafter's max_nodes entries.
        ahead: the drafter again, when it drafts ahead (overlap on; its plan is enabled).
        fixed_shapes: cut the prompt into PREFILL_CHUNKS sizes only (a compiled or captured backend)."""
        self.fixed_shapes = fixed_shapes
        self.target, self.target_cache, self.drafter = target, target_cache, drafter
        self.ahead = ahead
        self.side = SideStream(target.device) if ahead is not None else None
        self._saved = 0  # draft forwards this step's tree skips: it starts from levels drafted ahead
        self.backend, self.acceptor = backend, acceptor
        self.stats, self.stopwatch = stats, Stopwatch(stats)
        self.max_new_tokens, self.eos_token_ids = max_new_tokens, eos_token_ids
        device = target.device
        max_depth = drafter.max_depth if drafter is not None else 0
        # room for the padding of the last prefill chunk too (it reads the buffer past the prompt)
        self.out = torch.zeros(max(prompt_len + max_new_tokens + max_depth + 1, prompt_len + max(PREFILL_CHUNKS)),
                               dtype=torch.long, device=device)
        self._causal_masks: dict[int, torch.Tensor] = {}
        self._steps_long = torch.arange(max(PREFILL_CHUNKS), device=device)  # (c,) commit offsets of a chunk
        self.length = 0  # tokens in self.out
        self.new_tokens = 0
        self.pending: torch.Tensor | None = None  # (1, m) accepted tokens the draft has not seen
        self._root_only = TreeTopology((-1,), (0,)).tensors(device)
        # A draft with fewer rows than the target (same tokenizer, less padding) cannot embed the
        # target's ids past its own range; it reads id 0 there instead. That only changes what the
        # draft proposes, never the output distribution (docs/sampling.md, padded vocabularies).
        draft_vocab = vocab_size(drafter.model) if drafter is not None else None
        self._draft_vocab = draft_vocab if draft_vocab is not None and draft_vocab < vocab_size(target) else None
        self._steps = torch.arange(max_depth + 1, device=device)  # (D+1,)
        self._no_hit = torch.zeros((), dtype=torch.long, device=device)  # the hit flag without overlap
        # a draft head (drafting/head.py) reads the target's features: verification returns them too
        self._features = isinstance(drafter, FeatureDrafter)
        self._hidden: torch.Tensor | None = None  # (N, Hm) the last verification's features, with a head

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Cache every prompt token but the last, which becomes the first step's root.
        input_ids: LongTensor (1, T). The tokens go through forwards of the fixed PREFILL_CHUNKS
        sizes (the last chunk padded at its end, its padding dropped at the commit), so that a
        compiled, graph-captured backend serves every prompt length with the same shapes."""
        t = input_ids.shape[1]
        self.out[:t] = input_ids[0]
        self.length = t
        self.pending = input_ids[:, -1:]  # (1, 1)
        device = input_ids.device
        with self.stopwatch("time_prefill"):
            caches = [(self.target, self.target_cache)]
            if self.drafter is not None and not self._features:
                caches.append((self.drafter.model, self.drafter.cache))
            features = []  # the target's features per chunk, for a draft head
            chunks = prefill_chunks(t - 1, self.fixed_shapes)
            for start, real, size in chunks:
                chunk = self.out[start : start + size][None]  # (1, c): padded with whatever follows
                pos = torch.arange(start, start + size, device=device)[None]  # (1, c)
                causal = self._causal(size)  # padding comes last: no real token sees it
                keep = self._offsets(size)  # (c,) offsets 0..c-1; the first `real` are kept
                for model, cache in caches:
                    ids = chunk if model is self.target else self._for_draft(chunk)
                    hidden = self._hidden_kwargs if model is self.target else {}
                    out = self.backend.forward(model, cache, ids, pos, causal, last_only=True, **hidden)
                    if hidden:
                        features.append(out.hidden[:real])
                    cache.commit(keep, real)
                    self.stats.prefill_forwards += 1
            if self._features:  # the head runs the prompt reading the target's features
                hidden = torch.cat(features) if features else self._empty_features()
                self.stats.prefill_forwards += self.drafter.prefill(self.out, hidden, chunks, self._chunk_layout)

    @property
    def _hidden_kwargs(self) -> dict:
        return {"hidden": True} if self._features else {}

    def _empty_features(self) -> torch.Tensor:
        """(0, Hm): a one-token prompt has no prefill, so no features."""
        config = self.target.config.get_text_config()
        return torch.zeros(0, config.hidden_size, dtype=self.target.dtype, device=self.out.device)

    def _chunk_layout(self, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A prefill chunk's (c, c) causal mask and (c,) commit offsets (for a draft head's prefill)."""
        return self._causal(c), self._offsets(c)

    def _causal(self, c: int) -> torch.Tensor:
        """BoolTensor (c, c) lower-triangular, one per size (the same tensor each call, so that a
        captured graph need not copy it again)."""
        if c not in self._causal_masks:
            self._causal_masks[c] = torch.ones(c, c, dtype=torch.bool, device=self.out.device).tril()
        return self._causal_masks[c]

    def _offsets(self, c: int) -> torch.Tensor:
        """LongTensor (c,) 0..c-1."""
        return self._steps_long[:c] if c <= self._steps_long.shape[0] else torch.arange(c, device=self.out.device)

    # ------------------------------------------------------------------ one step
    def step(self) -> StepResult:
        """Draft, verify, (with overlap: draft ahead beside the verification), accept, commit;
        returns the tokens this step emitted."""
        root_pos = self.length - 1
        with self.stopwatch("time_draft"):
            tree = self.draft(root_pos)
            drafted = self.side.mark() if self.side is not None else None
        with self.stopwatch("time_verify"):
            p_logits = self.verify(tree, root_pos)
        with self.stopwatch("time_ahead"):  # queued after verify, so that verify is launched first
            work = self.draft_ahead(root_pos, drafted)
        with self.stopwatch("time_other"):
            acc = self.acceptor.accept(tree, p_logits)
            return self.commit(tree, acc, work)

    def draft(self, root_pos: int) -> DraftTree:
        if self.drafter is None:  # target alone: the tree is just the root
            valid = torch.ones(1, dtype=torch.bool, device=self.out.device)
            return DraftTree(self._root_only, self.pending[0, -1:], valid, None)
        tree = self.drafter.draft(self._for_draft(self.pending), root_pos)
        if self._draft_vocab is not None:  # the target runs the true root, not the draft's stand-in
            tree = dataclasses.replace(tree, tokens=torch.cat([self.pending[0, -1:], tree.tokens[1:]]))  # (N,)
        self.stats.draft_forwards += self.drafter.forwards_per_step - self._saved
        self.stats.draft_forwards_saved += self._saved
        return tree

    def draft_ahead(self, root_pos: int, drafted) -> AheadWork | None:
        """With overlap: queue the ahead work on the side stream once the tree is drafted (the
        `drafted` event), beside the verification; None without overlap."""
        if self.ahead is None:
            return None
        with self.side.side(drafted):
            work = self.ahead.draft_ahead(root_pos)
        self.stats.ahead_steps += 1
        self.stats.draft_forwards_ahead += work.forwards
        return work

    def _for_draft(self, ids: torch.Tensor) -> torch.Tensor:
        """ids the draft can embed: LongTensor like ids (the target's ids past the draft's rows -> 0)."""
        if self._draft_vocab is None:
            return ids
        return torch.where(ids < self._draft_vocab, ids, 0)

    def verify(self, tree: DraftTree, root_pos: int) -> torch.Tensor:
        """Target logits at every node, in one forward: FloatTensor (N, V)."""
        self.stats.target_forwards += 1
        pos = (root_pos + tree.structure.depth)[None]  # (1, N)
        out = self.backend.forward(self.target, self.target_cache, tree.tokens[None], pos, tree.structure.ancestors,
                                   **self._hidden_kwargs)
        if not self._features:
            return out
        self._hidden = out.hidden  # (N, Hm): the accepted path's rows go to the head at commit
        return out.logits

    def commit(self, tree: DraftTree, acc: Acceptance, work: AheadWork | None = None) -> StepResult:
        """Keep the accepted path: read it (the one host sync), commit both caches, emit the
        tokens (trimmed at EOS and max_new_tokens), record the step."""
        emitted = self._emitted(tree, acc)  # (D+1,)
        hit, guess = self._ahead_hit(acc, work)
        read = self._read(tree, acc, emitted, hit)
        self._commit_caches(tree, acc, read, emitted, work, guess)
        tokens = self._emit(read.tokens, emitted)
        self._record(read)
        finished = self.new_tokens >= self.max_new_tokens or (len(tokens) > 0 and tokens[-1] in self.eos_token_ids)
        return StepResult(tokens=tokens, num_accepted=read.num_accepted, finished=finished)

    def _emitted(self, tree: DraftTree, acc: Acceptance) -> torch.Tensor:
        """The step's tokens on the device, LongTensor (D+1,): the accepted drafts, then the
        target's next token at index a (entries past a are padding)."""
        d = tree.structure.max_depth
        drafted = tree.tokens[acc.path[1:]]  # (D,) accepted drafts first, then padding
        emitted = torch.cat([drafted, acc.next_token[None]])  # (D+1,)
        return torch.where(self._steps[: d + 1] == acc.num_accepted, acc.next_token, emitted)  # (D+1,)

    def _ahead_hit(self, acc: Acceptance, work: AheadWork | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On the device: (hit BoolTensor (), guess LongTensor ()) whether the next tree was
        drafted ahead; the main stream waits for the side stream here."""
        if work is None:
            return self._no_hit, None
        self.side.join()
        return ahead_hit(work, acc.path, acc.num_accepted, acc.next_token)

    def _read(self, tree: DraftTree, acc: Acceptance, emitted: torch.Tensor, hit: torch.Tensor) -> StepRead:
        """The one host synchronisation of the step: everything after it is bookkeeping on ints
        (and device work whose sizes these ints fix)."""
        s, d = tree.structure, tree.structure.max_depth
        proposed = tree.valid[1:].sum()
        ranks = s.ranks[acc.path[1:]]  # (D,)
        on_path = self._steps[:d] < acc.num_accepted  # (D,) which entries of path[1:] were accepted
        kept = ((s.draft_slot[acc.path[1:]] >= 0) & on_path).sum()
        from_lookup = (tree.lookup[acc.path[1:]] & on_path).sum() if tree.lookup is not None else kept * 0
        head = torch.stack([acc.num_accepted, proposed, kept, from_lookup, hit.long()])  # (5,)
        info = torch.cat([head, emitted, ranks]).tolist()
        a = info[0]
        return StepRead(num_accepted=a, proposed=info[1], kept=info[2], from_lookup=info[3], ahead_hit=bool(info[4]),
                        tokens=info[5 : a + 6], ranks=info[d + 6 : d + 6 + a])

    def _commit_caches(self, tree: DraftTree, acc: Acceptance, read: StepRead, emitted: torch.Tensor,
                       work: AheadWork | None, guess: torch.Tensor | None) -> None:
        """Both caches keep the accepted path (the drafter commits its own, drafting/), the
        drafter hears how far it got, `pending` gets the accepted tokens the draft has not run."""
        a = read.num_accepted
        self.target_cache.commit(acc.path, a + 1)
        if self.drafter is None:
            self.pending = emitted[None, :1]
            return
        self._saved = work.saved if read.ahead_hit else 0
        if read.ahead_hit:
            self.pending = self.ahead.commit_hit(tree, acc.path, a, emitted, work, guess)  # (1, 1)
            self.stats.ahead_hits += 1
        else:
            self.pending = self.drafter.commit(tree, acc.path, a, read.kept, emitted)  # (1, m)
        if self._features:  # a head (keeps none) reruns the path from the target's features at it
            self.drafter.accept_features(self._hidden.index_select(0, acc.path))  # (D+1, Hm)
        self.drafter.observe(a)

    def _emit(self, tokens: list[int], emitted: torch.Tensor) -> list[int]:
        """Append the step's tokens to the output, up to max_new_tokens and the first EOS;
        returns the ones kept."""
        keep = min(len(tokens), self.max_new_tokens - self.new_tokens)
        for i, tok in enumerate(tokens[:keep]):
            if tok in self.eos_token_ids:
                keep = i + 1
                break
        self.out[self.length : self.length + keep] = emitted[:keep]
        self.length += keep
        self.new_tokens += keep
        return tokens[:keep]

    def _record(self, read: StepRead) -> None:
        self.stats.accepted_lengths.append(read.num_accepted)
        self.stats.accepted_ranks.append(read.ranks)
        self.stats.draft_tokens_proposed += read.proposed
        self.stats.accepted_from_lookup += read.from_lookup
        self.stats.accepted_from_model += read.num_accepted - read.from_lookup

    @property
    def sequences(self) -> torch.Tensor:
        """LongTensor (1, T + new)."""
        return self.out[None, : self.length].clone()
