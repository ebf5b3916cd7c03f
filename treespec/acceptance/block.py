"""Block verification of a drafted chain (method="linear"). Pure functions.

Block Verification (Sun, Mendlovic, Leviathan, Aharoni, Ro, Beirami, Suresh; ICLR 2025, arXiv
2403.10444) decides on the whole chain at once instead of token by token. In our notation, for a
chain X_1..X_D drafted from q (node i holds X_i; p[i], q[i] are the target and draft laws of
the token after node i):

    w_0 = 1,   w_i = min(1, w_{i-1} p[i-1][X_i] / q[i-1][X_i])             (sequence-level ratio)
    h_i = m_i / (1 - w_i + m_i),   m_i = sum_x max(w_i p[i][x] - q[i][x], 0)  for i < D;  h_D = w_D
    stop = the largest i with coin_i < h_i (i = 0 always qualifies: h_0 = 1)
    emit X_1..X_stop, then next_token ~ p[D] if stop = D, else ~ max(w_stop p[stop] - q[stop], 0)

It accepts at least as much as token-level speculative sampling on every chain and is optimal
among verifiers that see only the chain's conditionals (the paper's Theorem 2). It is traversal
verification restricted to a chain (`treespec.acceptance.traversal`); this module is the
chain-only fast path: every quantity is computed for all positions at once (no loop over the
nodes), the sequential min of w_i being a cumulative maximum in log space. Why it is lossless:
docs/sampling.md.

vLLM implements block verification for chains (its rejection sampler); this is our own
implementation from the paper's description, cross-checked by the chi-square tests.

Conventions: as `treespec.acceptance.rejection` (optional batch dimension B, no host
synchronisation, randomness only from `generator`, float32 at least).
"""

from __future__ import annotations

import torch

from treespec.acceptance.greedy import Acceptance
from treespec.acceptance.rejection import _as_float, _sample_categorical, _uniform
from treespec.tree.topology import TreeTensors, TreeTopology

__all__ = ["block_accept", "check_chain", "expected_accepted"]


def check_chain(tree: TreeTensors | TreeTopology) -> None:
    """Raise ValueError unless the tree is one chain (a shape check, no host sync)."""
    n = tree.paths.shape[0]
    if tree.children.shape[1] != 1 or n != tree.max_depth + 1:
        raise ValueError(
            f"block verification needs a chain (one child per node), got {n} nodes of depth {tree.max_depth}; "
            "use acceptance='block' with method='linear', or acceptance='traversal' for trees"
        )


def block_accept(
    tree: TreeTensors | TreeTopology,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    without_replacement: bool = True,
    generator: torch.Generator | None,
) -> Acceptance:
    """Block verification of a chain; same inputs and outputs as `rejection_accept`.

    tree: a chain: N = D+1 nodes, node i at depth i (`TreeTopology.chain(D)`).
    tokens: LongTensor (B, N) or (N,) draft tokens (tokens[..., 0], the root, ignored).
    valid: BoolTensor like tokens; the chain is cut before its first invalid node.
    p: FloatTensor (B, N, V) or (N, V) target distribution after each node.
    q: FloatTensor like p: q[:, i] = the law X_{i+1} was drawn from.
    without_replacement: ignored (one child per node: both drafting schemes are the same).
    Returns Acceptance with path (B, D+1), num_accepted (B,), next_token (B,) (no batch
    dimension if `tokens` had none).
    """
    check_chain(tree)
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens, valid, p, q = tokens[None], valid[None], p[None], q[None]
    p, q = _as_float(p), _as_float(q)
    batch, n = tokens.shape
    device = tokens.device
    x = tokens[:, 1:, None]  # (B, D, 1) X_1..X_D
    px = p[:, :-1].gather(-1, x)[..., 0]  # (B, D) p[i-1][X_i]
    qx = q[:, :-1].gather(-1, x)[..., 0]  # (B, D)
    # X_i is usable if it and every earlier draft are valid draws (q[X] > 0: an invalid slot otherwise)
    usable = torch.cumprod((valid[:, 1:] & (qx > 0)).to(torch.uint8), dim=1).bool()  # (B, D)
    w = _sequence_weights(px, qx, usable)  # (B, N) w_0..w_D
    has_child = torch.cat([usable, usable.new_zeros(batch, 1)], dim=1)  # (B, N) node i's child X_{i+1} is usable
    diff = _residual(w, p, q)  # (B, N, V)
    h = torch.where(has_child, _stop_prob(w, diff.sum(dim=-1)), w)  # (B, N) a leaf stops with w_i
    reach = torch.cat([usable.new_ones(batch, 1), usable], dim=1)  # (B, N)
    coins = _uniform((batch, n), p, generator)
    stops = reach & (coins < h)
    stops[:, 0] = True  # h_0 = 1 up to rounding
    steps = torch.arange(n, device=device)  # (N,)
    last = _deepest(stops)  # (B,)
    rows = torch.arange(batch, device=device)
    resid = torch.where(has_child[rows, last, None], diff[rows, last], p[rows, last])  # (B, V)
    next_token = _sample_categorical(resid, generator)
    path = torch.minimum(steps[None], last[:, None])  # (B, N) chain node i sits at depth i
    out = Acceptance(path=path, num_accepted=last, next_token=next_token)
    if unbatched:
        out = Acceptance(path=out.path[0], num_accepted=out.num_accepted[0], next_token=out.next_token[0])
    return out


def expected_accepted(tokens: torch.Tensor, valid: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """E[accepted drafts | the chain] under block verification, exactly (no coins drawn): the
    stop is the deepest node whose coin passes, P(stop = i) = h_i times the product of (1 - h_j)
    over j > i. Arguments as `block_accept`; returns float64 (B,) (() without a batch dimension)."""
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens, valid, p, q = tokens[None], valid[None], p[None], q[None]
    p, q = _as_float(p), _as_float(q)
    x = tokens[:, 1:, None]  # (B, D, 1)
    px, qx = p[:, :-1].gather(-1, x)[..., 0], q[:, :-1].gather(-1, x)[..., 0]  # (B, D)
    usable = torch.cumprod((valid[:, 1:] & (qx > 0)).to(torch.uint8), dim=1).bool()  # (B, D)
    w = _sequence_weights(px, qx, usable)  # (B, N)
    has_child = torch.cat([usable, usable.new_zeros(usable.shape[0], 1)], dim=1)  # (B, N)
    h = torch.where(has_child, _stop_prob(w, _residual(w, p, q).sum(-1)), w).double()  # (B, N)
    h = torch.where(torch.cat([usable.new_ones(usable.shape[0], 1), usable], dim=1), h, 0.0)
    h[:, 0] = 1.0
    fail = (1 - h).flip(1)  # (B, N) deepest first
    after = torch.cumprod(torch.cat([fail.new_ones(fail.shape[0], 1), fail[:, :-1]], dim=1), dim=1).flip(1)
    out = (h * after * torch.arange(h.shape[1], dtype=torch.float64, device=h.device)).sum(dim=-1)  # (B,)
    return out[0] if unbatched else out


def _deepest(stops: torch.Tensor) -> torch.Tensor:
    """LongTensor (B,): the deepest node whose coin passed (B, N). Deepest, not first: the
    decisions run backwards from the leaf, so a passing node is only reached if every deeper
    one failed."""
    steps = torch.arange(stops.shape[-1], device=stops.device)
    return torch.where(stops, steps, -1).amax(dim=-1)


def _residual(w: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """max(w_i p[i] - q[i], 0): FloatTensor (B, N, V), what node i must still produce once its
    child failed (unnormalised; its mass is m_i)."""
    return (w[..., None] * p - q).clamp(min=0)


def _stop_prob(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """h_i = m_i / (1 - w_i + m_i) (B, N): the chance to stop at node i once everything below
    it failed (that failure has probability 1 - w_i + m_i). A denominator ~ 0 means w_i = 1 and
    p[i] = q[i]: the child could not fail; h_i = w_i = 1 then, as traversal verification does."""
    den = 1.0 - w + m
    floor = 64 * torch.finfo(w.dtype).eps
    return torch.where(den > floor, m / den.clamp(min=floor), w)


def _sequence_weights(px: torch.Tensor, qx: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """w_i = min(1, w_{i-1} px_i / qx_i), w_0 = 1: FloatTensor (B, D+1), 0 past an unusable draft.

    In logs l_i = log(px_i / qx_i) this is L_i = min(0, L_{i-1} + l_i), whose solution is
    L_i = S_i - max_{j <= i} S_j with S the partial sums (S_0 = 0): one cumsum and one cummax
    instead of a loop over the chain. log 0 = -inf propagates to w = 0 as the recursion does."""
    ratio = torch.where(usable, px / qx.clamp(min=torch.finfo(qx.dtype).tiny), 0.0)  # (B, D)
    logs = torch.log(ratio)  # -inf where the target gives the draft probability 0
    zero = logs.new_zeros(logs.shape[0], 1)
    s = torch.cat([zero, logs.cumsum(dim=1)], dim=1)  # (B, D+1)
    # -inf - (-inf) would be NaN: once s is -inf the weight is 0 for good
    log_w = torch.where(s > -float("inf"), s - s.cummax(dim=1).values, -float("inf"))
    return log_w.exp().clamp(max=1.0)
