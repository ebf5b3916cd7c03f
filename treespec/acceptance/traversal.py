"""Traversal verification of a sampled draft tree: leaf-to-root, sequence-level. Pure functions.

Traversal Verification (Weng et al., NeurIPS 2025, arXiv 2505.12398) visits the tree in
depth-first post-order (children in rank order, a node after its subtree) and decides at each
node whether the *sequence* from the root to it is kept, instead of deciding token by token from
the root down. A child rejected by token-level verification takes its whole subtree with it;
here a deep descendant with a high sequence-level ratio can still be accepted. On a chain it is
block verification (Sun et al., ICLR 2025; `treespec.acceptance.block`), optimal for one chain.

The per-node quantities, in our notation (p target, q draft, both processed by the same
`SamplingConfig`); every node u carries a target measure T_u (not normalised, mass M_u <= 1)
and the draft law Q_u of its next child still to try:

    root:               T = p[root], M = 1, Q = q[root]
    entering child c    w_c = min(1, T_u[x_c] / Q_u[x_c]);  T_c = w_c p[c], M_c = w_c, Q_c = q[c]
    (token x_c) of u:   then u forgets c ("c failed"):  D = max(T_u - Q_u, 0), m = sum(D),
                        T_u = D / (1 - M_u + m),  M_u = m / (1 - M_u + m),
                        Q_u = Q_u without x_c, renormalised (children drawn without replacement)
    leaving u:          stop here with probability M_u (its final mass): emit the path to u,
                        then next_token ~ T_u / M_u (a leaf: p[u]; else a residual)

None of T, M, Q depends on the coins: the state at every node is a function of the tokens, p and
q alone, so all nodes are computed first (one pass over the nodes) and the coins then pick the
first node in post-order whose coin falls below its final M (the root's M is 1: the walk always
ends). Why this is lossless, for children drawn i.i.d. or without replacement: docs/sampling.md.

Conventions: as `treespec.acceptance.rejection` (optional batch dimension B, no host
synchronisation, randomness only from `generator`, float32 at least).
"""

from __future__ import annotations

import torch

from treespec.acceptance.greedy import Acceptance
from treespec.acceptance.rejection import _accept_prob, _as_float, _remove_token, _sample_categorical, _uniform
from treespec.tree.topology import TreeTensors, TreeTopology

__all__ = ["traversal_accept", "expected_accepted", "postorder_keys"]


def traversal_accept(
    tree: TreeTensors | TreeTopology,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    without_replacement: bool = True,
    generator: torch.Generator | None,
) -> Acceptance:
    """Traversal verification of the tree; same inputs and outputs as `rejection_accept`.

    tree: the tree's structure (`TreeTopology.tensors(device)`, or a dynamic drafter's).
    tokens: LongTensor (B, N) or (N,) draft token at each node (tokens[..., 0] ignored).
    valid: BoolTensor like tokens; an invalid node and its subtree are never accepted.
    p: FloatTensor (B, N, V) or (N, V) target distribution after each node.
    q: FloatTensor like p: the law node i's children were drawn from, in rank order, i.i.d.
        (without_replacement=False) or without replacement (True), as `sample_children` does.
    Returns Acceptance with path (B, D+1), num_accepted (B,), next_token (B,) (no batch
    dimension if `tokens` had none).
    """
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens, valid, p, q = tokens[None], valid[None], p[None], q[None]
    p, q = _as_float(p), _as_float(q)
    if isinstance(tree, TreeTopology):
        tree = tree.tensors(tokens.device)
    batch, n = tokens.shape
    rows = torch.arange(batch, device=tokens.device)
    mass, target = _node_states(tree, tokens, valid, p, q, without_replacement)  # (B, N), (B, N, V)
    usable = _usable(tree, valid)  # (B, N)
    coins = _uniform((batch, n), p, generator)
    stops = usable & (coins < mass)
    stops[:, 0] = True  # M_root = 1 (up to rounding): the traversal always ends at the root at the latest
    key = postorder_keys(tree)  # (N,)
    last = torch.where(stops, key, key.max() + 1).argmin(dim=-1)  # (B,) first stop in post-order
    next_token = _sample_categorical(target[rows, last], generator)  # T_last, unnormalised
    path = tree.paths[last]  # (B, D+1)
    path = torch.where(path >= 0, path, last[:, None])
    out = Acceptance(path=path, num_accepted=tree.depth[last], next_token=next_token)
    if unbatched:
        out = Acceptance(path=out.path[0], num_accepted=out.num_accepted[0], next_token=out.next_token[0])
    return out


def expected_accepted(
    tree: TreeTensors | TreeTopology,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    without_replacement: bool = True,
) -> torch.Tensor:
    """E[accepted drafts | the tree] under traversal verification, exactly (no coins drawn): the
    walk stops at node u with probability M_u times the product of (1 - M_v) over the nodes v
    before u in post-order (independent coins, M the final masses). Arguments as
    `traversal_accept`; returns float64 (B,) (() without a batch dimension)."""
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens, valid, p, q = tokens[None], valid[None], p[None], q[None]
    p, q = _as_float(p), _as_float(q)
    if isinstance(tree, TreeTopology):
        tree = tree.tensors(tokens.device)
    mass, _ = _node_states(tree, tokens, valid, p, q, without_replacement)  # (B, N)
    h = torch.where(_usable(tree, valid), mass, 0.0).double()  # (B, N)
    h[:, 0] = 1.0  # the walk always ends at the root at the latest
    order = postorder_keys(tree).argsort()  # (N,)
    h, depth = h[:, order], tree.depth[order].double()
    survive = torch.cumprod(torch.cat([h.new_ones(h.shape[0], 1), 1 - h[:, :-1]], dim=1), dim=1)  # (B, N)
    out = (h * survive * depth).sum(dim=-1)  # (B,)
    return out[0] if unbatched else out


def _usable(tree: TreeTensors, valid: torch.Tensor) -> torch.Tensor:
    """BoolTensor (B, N): the node and all its ancestors are valid (the root always is)."""
    ok = valid.clone()
    ok[:, 0] = True
    return ~(tree.ancestors[None] & ~ok[:, None, :]).any(dim=-1)


def _node_states(
    tree: TreeTensors, tokens: torch.Tensor, valid: torch.Tensor, p: torch.Tensor, q: torch.Tensor, without_replacement: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every node's final (M, T): mass (B, N) and target measure (B, N, V) after all its children
    failed. One pass over the nodes in (depth, parent, rank) order, so that a parent is entered
    before its children and siblings update it in the order they were drawn."""
    batch, n = tokens.shape
    usable = _usable(tree, valid)  # (B, N)
    target = p.clone()  # (B, N, V) row u = T_u (the root's is p[root]; others set on entry)
    draft = q.clone() if without_replacement else q  # (B, N, V) row u = Q_u
    mass = torch.zeros(batch, n, dtype=p.dtype, device=p.device)  # (B, N)
    mass[:, 0] = 1.0
    k = tree.children.shape[1]
    order = (tree.depth * n + tree.parents.clamp(min=0)) * k + tree.ranks  # (N,) root first
    order = order.argsort()
    for i in range(1, n):
        node = order[i : i + 1]  # (1,) a tensor index: no host sync, dynamic trees included
        u = tree.parents[node].clamp(min=0)  # (1,) a padding node's -1 reads the root, harmlessly: it is not live
        t_u = target.index_select(1, u)[:, 0]  # (B, V)
        q_u = draft.index_select(1, u)[:, 0]  # (B, V)
        m_u = mass.index_select(1, u)[:, 0]  # (B,)
        x = tokens.index_select(1, node)  # (B, 1)
        qx, tx = q_u.gather(-1, x)[:, 0], t_u.gather(-1, x)[:, 0]  # (B,)
        # a child drawn with q[x] == 0 cannot exist (invalid slot): it is absent, u is unchanged
        live = usable.index_select(1, node)[:, 0] & (qx > 0)  # (B,)
        w = torch.where(live, _accept_prob(tx, qx), 0.0)  # (B,) sequence-level ratio, capped at 1
        mass.index_copy_(1, node, w[:, None])
        target.index_copy_(1, node, (w[:, None] * p.index_select(1, node)[:, 0])[:, None])
        new_t, new_m = _after_failure(t_u, q_u, m_u)
        new_t = torch.where(live[:, None], new_t, t_u)
        new_m = torch.where(live, new_m, m_u)
        target.index_copy_(1, u, new_t[:, None])
        mass.index_copy_(1, u, new_m[:, None])
        if without_replacement:
            new_q = torch.where(live[:, None], _remove_token(q_u, x[:, 0]), q_u)
            draft.index_copy_(1, u, new_q[:, None])
    return mass, target


def _after_failure(t_u: torch.Tensor, q_u: torch.Tensor, m_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_u, M_u) after a child drawn from Q_u and its whole subtree failed: (B, V), (B,).

    D = max(T_u - Q_u, 0) is the part of T_u the child did not cover; the child fails with
    probability den = 1 - M_u + sum(D), and given that, u must still produce D / den. den ~ 0
    (M_u = 1 and T_u = Q_u) means the child could not fail: keep T_u rather than amplify
    rounding noise (as `rejection._residual` does)."""
    diff = (t_u - q_u).clamp(min=0)  # (B, V)
    m = diff.sum(dim=-1)  # (B,)
    den = 1.0 - m_u + m
    floor = 64 * torch.finfo(diff.dtype).eps
    ok = den > floor
    den = den.clamp(min=floor)
    return torch.where(ok[:, None], diff / den[:, None], t_u), torch.where(ok, m / den, m_u)


def postorder_keys(tree: TreeTensors | TreeTopology) -> torch.Tensor:
    """LongTensor (N,): sorting nodes by it gives the depth-first post-order with children in rank
    order (descendants before their ancestor, an earlier sibling's subtree before a later one).

    The key is the path's ranks read as digits in base K+1, a missing level (below the node's
    depth) being digit K: larger than any rank, so an ancestor sorts after its descendants."""
    k = tree.children.shape[1]
    d = tree.max_depth
    if (k + 1) ** d >= 2**62:
        raise ValueError(f"tree too large for traversal verification keys: width {k}, depth {d}")
    paths = tree.paths[:, 1:]  # (N, D) ancestors at depths 1..D
    ranks = torch.as_tensor(tree.ranks, device=paths.device)
    digits = torch.where(paths >= 0, ranks[paths.clamp(min=0)], k)  # (N, D)
    weights = (k + 1) ** torch.arange(d - 1, -1, -1, device=paths.device)  # (D,)
    return (digits * weights).sum(dim=-1)
