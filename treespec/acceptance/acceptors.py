"""The acceptors the engine calls each step: greedy (temperature 0) and sampled (a lossless
stochastic verifier for the processed p against q). Pure: no models, no state but the sampling
settings and the generator.

Dimension letters: docs/dimensions.md (N nodes, V vocabulary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from treespec.acceptance.greedy import Acceptance, greedy_accept
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.acceptance.schemes import VERIFIERS, TreeVerifier
from treespec.tree.draft import DraftTree


@dataclass
class GreedyAcceptor:
    """Temperature 0: the longest path that matches the target's argmax."""

    def accept(self, tree: DraftTree, p_logits: torch.Tensor) -> Acceptance:
        return greedy_accept(tree.structure, tree.tokens, tree.valid, p_logits)


@dataclass
class SampledAcceptor:
    """Temperature > 0: a lossless stochastic verifier for the processed p, chosen by
    `acceptance` ("rejection", "traversal" or "block": treespec.acceptance.schemes; or a TreeVerifier)."""

    config: SamplingConfig
    generator: torch.Generator
    acceptance: str | TreeVerifier = "rejection"

    def accept(self, tree: DraftTree, p_logits: torch.Tensor) -> Acceptance:
        p = logits_to_probs(p_logits, self.config)  # (N, V)
        q = p if tree.q_logits is None else logits_to_probs(tree.q_logits, self.config)  # (N, V_q); unused without drafts
        if q.shape[-1] < p.shape[-1]:  # a draft with fewer (padding) rows: q is 0 on the ids it lacks
            q = torch.nn.functional.pad(q, (0, p.shape[-1] - q.shape[-1]))  # (N, V)
        # lookup nodes: q = delta at their token (docs/sampling.md); only token-level rejection
        # takes them, which `stream` checks before any work
        lookup = {} if tree.lookup is None else {"point_mass": tree.lookup}
        verify = VERIFIERS[self.acceptance] if isinstance(self.acceptance, str) else self.acceptance
        return verify(
            tree.structure, tree.tokens, tree.valid, p, q,
            without_replacement=self.config.without_replacement, generator=self.generator, **lookup,
        )


Acceptor = GreedyAcceptor | SampledAcceptor
