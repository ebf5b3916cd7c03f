"""The decode loop: draft, verify, accept, commit.

One step, for a tree of N nodes and depth D below the root (the last accepted token):

    draft   the draft model expands the tree, one batched forward per level       -> tokens (N,)
    verify  the target scores every node in one forward with a tree mask          -> p logits (N, V)
    accept  a pure function picks the longest accepted path and the next token    -> Acceptance
    commit  ONE host sync reads how many tokens were accepted; both KV caches keep
            only the accepted path; the emitted tokens are appended to the output

Shapes are fixed for a given tree, every buffer is allocated once per generation, and the only
device-to-host transfer inside a step is the one in `commit` (the documented sync point).
Dimension letters: docs/dimensions.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from treespec.backends.sdpa import SdpaBackend
from treespec.drafting.base import DraftTree, Drafter
from treespec.backends.kv_cache import TreeKVCache
from treespec.acceptance.schemes import VERIFIERS
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.stats import GenerationStats, Stopwatch
from treespec.tree.topology import TreeTopology
from treespec.acceptance.greedy import Acceptance, greedy_accept

PREFILL_CHUNK = 512  # bounds the prefill mask at (chunk, prompt) instead of (prompt, prompt)


@dataclass
class GreedyAcceptor:
    """Temperature 0: the longest path that matches the target's argmax."""

    def accept(self, tree: DraftTree, p_logits: torch.Tensor) -> Acceptance:
        return greedy_accept(tree.structure, tree.tokens, tree.valid, p_logits)


@dataclass
class SampledAcceptor:
    """Temperature > 0: a lossless stochastic verifier for the processed p, chosen by
    `acceptance` ("rejection", "traversal" or "block": treespec.acceptance.schemes)."""

    config: SamplingConfig
    generator: torch.Generator
    acceptance: str = "rejection"

    def accept(self, tree: DraftTree, p_logits: torch.Tensor) -> Acceptance:
        p = logits_to_probs(p_logits, self.config)  # (N, V)
        q = p if tree.q_logits is None else logits_to_probs(tree.q_logits, self.config)  # (N, V); unused without drafts
        return VERIFIERS[self.acceptance](
            tree.structure, tree.tokens, tree.valid, p, q,
            without_replacement=self.config.without_replacement, generator=self.generator,
        )


Acceptor = GreedyAcceptor | SampledAcceptor


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
        target_cache: TreeKVCache,
        drafter: Drafter | None,
        backend: SdpaBackend,
        acceptor: Acceptor,
        stats: GenerationStats,
        *,
        prompt_len: int,
        max_new_tokens: int,
        eos_token_ids: set[int],
        sync_cuda_timing: bool = False,
    ):
        """drafter: expands each step's tree (None: the target alone, the tree is the root).
        target_cache must hold prompt_len + max_new_tokens + the drafter's max_nodes entries."""
        self.target, self.target_cache, self.drafter = target, target_cache, drafter
        self.backend, self.acceptor = backend, acceptor
        self.stats, self.stopwatch = stats, Stopwatch(stats, sync_cuda_timing)
        self.max_new_tokens, self.eos_token_ids = max_new_tokens, eos_token_ids
        device = target.device
        max_depth = drafter.max_depth if drafter is not None else 0
        self.out = torch.zeros(prompt_len + max_new_tokens + max_depth + 1, dtype=torch.long, device=device)
        self.length = 0  # tokens in self.out
        self.new_tokens = 0
        self.pending: torch.Tensor | None = None  # (1, m) accepted tokens the draft has not seen
        self._root_only = TreeTopology((-1,), (0,)).tensors(device)
        self._steps = torch.arange(max_depth + 1, device=device)  # (D+1,)

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor) -> None:
        """Cache every prompt token but the last, which becomes the first step's root.
        input_ids: LongTensor (1, T)."""
        t = input_ids.shape[1]
        self.out[:t] = input_ids[0]
        self.length = t
        self.pending = input_ids[:, -1:]  # (1, 1)
        with self.stopwatch("time_prefill"):
            caches = [(self.target, self.target_cache)]
            if self.drafter is not None:
                caches.append((self.drafter.model, self.drafter.cache))
            for model, cache in caches:
                for start in range(0, t - 1, PREFILL_CHUNK):
                    chunk = input_ids[:, start : min(start + PREFILL_CHUNK, t - 1)]  # (1, c)
                    c = chunk.shape[1]
                    pos = torch.arange(start, start + c, device=chunk.device)[None]  # (1, c)
                    causal = torch.ones(c, c, dtype=torch.bool, device=chunk.device).tril()
                    self.backend.forward(model, cache, chunk, pos, causal, last_only=True)
                    cache.commit_all()
                    self.stats.prefill_forwards += 1

    # ------------------------------------------------------------------ one step
    def step(self) -> StepResult:
        """Draft, verify, accept, commit; returns the tokens this step emitted."""
        root_pos = self.length - 1
        with self.stopwatch("time_draft"):
            tree = self.draft(root_pos)
        with self.stopwatch("time_verify"):
            p_logits = self.verify(tree, root_pos)
        with self.stopwatch("time_other"):
            acc = self.acceptor.accept(tree, p_logits)
            return self.commit(tree, acc)

    def draft(self, root_pos: int) -> DraftTree:
        if self.drafter is None:  # target alone: the tree is just the root
            valid = torch.ones(1, dtype=torch.bool, device=self.out.device)
            return DraftTree(self._root_only, self.pending[0, -1:], valid, None)
        tree = self.drafter.draft(self.pending, root_pos)
        self.stats.draft_forwards += self.drafter.forwards_per_step
        return tree

    def verify(self, tree: DraftTree, root_pos: int) -> torch.Tensor:
        """Target logits at every node, in one forward: FloatTensor (N, V)."""
        self.stats.target_forwards += 1
        pos = (root_pos + tree.structure.depth)[None]  # (1, N)
        return self.backend.forward(self.target, self.target_cache, tree.tokens[None], pos, tree.structure.ancestors)

    def commit(self, tree: DraftTree, acc: Acceptance) -> StepResult:
        s, d = tree.structure, tree.structure.max_depth
        drafted = tree.tokens[acc.path[1:]]  # (D,) accepted drafts first, then padding
        emitted = torch.cat([drafted, acc.next_token[None]])  # (D+1,)
        emitted = torch.where(self._steps[: d + 1] == acc.num_accepted, acc.next_token, emitted)  # (D+1,)
        proposed = tree.valid[1:].sum()
        ranks = s.ranks[acc.path[1:]]  # (D,)
        last_ran = s.draft_slot[acc.path[acc.num_accepted]] >= 0  # did the draft run the last accepted node?
        # The one host synchronisation of the step: everything below is bookkeeping on ints.
        info = torch.cat([acc.num_accepted[None], proposed[None], last_ran[None], emitted, ranks]).tolist()
        a, proposed, last_ran, tokens = info[0], info[1], info[2], info[3 : info[0] + 4]
        self.stats.accepted_ranks.append(info[d + 4 : d + 4 + a])

        self.target_cache.commit(acc.path, a + 1)
        if self.drafter is not None:
            # the draft keeps the accepted nodes it ran; an accepted node it never ran (a leaf)
            # is the last one on the path, and is fed to it next step with the new root
            kept = a if last_ran or a == 0 else a - 1
            self.drafter.cache.commit(s.draft_slot[acc.path[1:]], kept)
            self.drafter.observe(a)
            self.pending = emitted[None, a - 1 : a + 1] if kept < a else emitted[None, a : a + 1]
        else:
            self.pending = emitted[None, :1]

        keep = min(len(tokens), self.max_new_tokens - self.new_tokens)
        for i, tok in enumerate(tokens[:keep]):
            if tok in self.eos_token_ids:
                keep = i + 1
                break
        tokens = tokens[:keep]
        self.out[self.length : self.length + keep] = emitted[:keep]
        self.length += keep
        self.new_tokens += keep
        self.stats.accepted_lengths.append(a)
        self.stats.draft_tokens_proposed += proposed
        finished = self.new_tokens >= self.max_new_tokens or (keep > 0 and tokens[-1] in self.eos_token_ids)
        return StepResult(tokens=tokens, num_accepted=a, finished=finished)

    @property
    def sequences(self) -> torch.Tensor:
        """LongTensor (1, T + new)."""
        return self.out[None, : self.length].clone()
