"""Lossless stochastic verification of a sampled draft tree. Pure functions, no models.

p is the target's distribution, q the draft's (both already processed by
`sampling.logits_to_probs` with the same `SamplingConfig`). The algorithm and why it is lossless:
docs/sampling.md.

Two variants, chosen by `without_replacement`:

* True (the default): each node's k children are k draws *without replacement* from q
  (Gumbel-top-k), verified by recursive rejection sampling (RSD, Jeon et al. 2024; Sequoia,
  Chen et al. 2024): after a sibling x is rejected, the residual becomes norm(max(r - qc, 0)) and
  x is removed from the draft distribution qc for the next sibling.
* False: the k children are i.i.d. draws from q, verified by SpecInfer's multi-step speculative
  sampling (Miao et al. 2023): the residual is updated the same way but q stays q.

Without replacement is the default because it never spends a branch on a duplicate sibling: k
slots carry k distinct candidates, so more of the target's mass is covered per node and the
acceptance rate is higher (most visibly when q is peaked, i.e. exactly when drafts are good).

Conventions shared by every function here:

* Batch: an optional leading batch dimension B. `sample_children` accepts any leading shape
  (..., V); `rejection_accept` accepts (N,)/(N, V) inputs (no batch: the engine, one sequence)
  or (B, N)/(B, N, V) (B independent trees, e.g. 50k trials in the tests) and returns an
  `Acceptance` with or without the batch dimension accordingly.
* No host synchronisation: no `.item()`, `.tolist()` or Python branching on tensor values;
  Python loops run only over the tree depth D and the max width K.
* Randomness comes only from the `generator` argument (None = torch's default generator of
  the tensors' device), so a seeded generator makes every result reproducible.
* Probabilities are computed in float32 at least (half precision inputs are upcast).
"""

from __future__ import annotations

import torch

from treespec.tree.topology import TreeTensors, TreeTopology
from treespec.acceptance.greedy import Acceptance

__all__ = ["sample_children", "rejection_accept"]


# --------------------------------------------------------------------------- drafting


def sample_children(
    q: torch.Tensor,
    k: int,
    *,
    without_replacement: bool = True,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k candidate children for each of F frontier nodes.

    q: FloatTensor (B, F, V) (any leading shape (..., V)) draft distribution at each node.
    Returns (tokens LongTensor (B, F, k), valid BoolTensor (B, F, k)), slots in draw order:
    slot j is the j-th draw, and that order is the rank order the verifier tries them in.
    Keep it: re-sorting the children (e.g. by q) breaks losslessness.

    without_replacement=False: k i.i.d. draws from q (duplicates possible); every slot is
        valid unless the row of q has no mass at all.
    without_replacement=True (default): k distinct tokens, a sequential draw without
        replacement (Gumbel-top-k: the k largest log q + Gumbel noise, in decreasing order).
        When q has fewer than k tokens with mass, the extra slots are invalid (valid=False,
        token 0); the verifier skips them.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a whole number >= 0, got {k!r}")
    q = _as_float(q)
    vocab = q.shape[-1]
    if without_replacement:
        u = _uniform(q.shape, q, generator)
        gumbel = -torch.log(-torch.log(u))  # u in (0, 1) -> finite Gumbel(0, 1) noise
        keys = torch.where(q > 0, torch.log(q) + gumbel, -float("inf"))
        take = min(k, vocab)
        top_keys, tokens = torch.topk(keys, take, dim=-1)  # sorted: slot order = draw order
        valid = top_keys > -float("inf")
        tokens = torch.where(valid, tokens, 0)
        if take < k:  # more slots than the vocabulary has tokens: the extra ones are invalid
            pad = q.shape[:-1] + (k - take,)
            tokens = torch.cat([tokens, tokens.new_zeros(pad)], dim=-1)
            valid = torch.cat([valid, valid.new_zeros(pad)], dim=-1)
        return tokens, valid
    tokens = _sample_categorical(q, generator, num=k)
    valid = q.gather(-1, tokens) > 0
    return torch.where(valid, tokens, 0), valid


# --------------------------------------------------------------------------- verification


def rejection_accept(
    tree: TreeTensors | TreeTopology,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    *,
    without_replacement: bool = True,
    generator: torch.Generator | None,
    point_mass: torch.Tensor | None = None,
) -> Acceptance:
    """Walk the tree from the root, accepting children by (recursive) rejection sampling.

    tree: the tree's structure (`TreeTopology.tensors(device)`, or a dynamic drafter's).
    tokens: LongTensor (B, N) or (N,): draft token at each node (tokens[..., 0], the root, is
        ignored: it is already accepted).
    valid: BoolTensor like tokens: False for slots that hold no real draw (see
        `sample_children`); such nodes, and so their subtrees, are never accepted. valid[..., 0]
        is ignored.
    p: FloatTensor (B, N, V) or (N, V): p[:, i] = target distribution of the token after node i.
    q: FloatTensor like p: q[:, i] = the draft distribution node i's children were drawn from
        (i.i.d. or without replacement, in rank order, as `sample_children` does).
    point_mass: BoolTensor like tokens, or None: nodes proposed deterministically (prompt
        lookup), whose proposal law is q = delta at their token. Such a child x is accepted with
        probability r[x], a rejection updates r = norm(max(r - delta_x, 0)) (r without x) and
        leaves qc alone. A node's point-mass children must come after its q-drawn children in
        rank order (docs/sampling.md, "Deterministic candidates").

    At the current node u: r = p[u], qc = q[u]; the children are tried in rank order, a child
    with token x being accepted with probability min(1, r[x] / qc[x]). On acceptance the walk
    moves to that child (r = p[child], qc = q[child]); on rejection r = norm(max(r - qc, 0))
    and, without replacement, qc = qc with x removed and renormalised. If no child is accepted,
    next_token ~ r (the residual, or p[u] itself at a leaf: the bonus token).

    Returns Acceptance with path (B, D+1), num_accepted (B,), next_token (B,) (no batch
    dimension if `tokens` had none). The accepted tokens followed by next_token are distributed
    exactly as the target's own samples (docs/sampling.md).
    """
    unbatched = tokens.dim() == 1
    if unbatched:
        tokens, valid, p, q = tokens[None], valid[None], p[None], q[None]
        point_mass = None if point_mass is None else point_mass[None]
    p, q = _as_float(p), _as_float(q)
    batch = tokens.shape[0]
    device = tokens.device
    if isinstance(tree, TreeTopology):
        tree = tree.tensors(device)
    children, depth = tree.children, tree.depth  # (N, K), (N,)
    width, max_depth = children.shape[1], tree.max_depth

    rows = torch.arange(batch, device=device)
    node = torch.zeros(batch, dtype=torch.long, device=device)  # current (last accepted) node
    alive = torch.ones(batch, dtype=torch.bool, device=device)  # still walking down
    r = p[:, 0]  # (B, V) residual target at the current node
    coins = _uniform((batch, max_depth, width), p, generator)  # one coin per (depth, rank)
    path = [node]
    for d in range(max_depth):
        node, alive, r = _depth_step(
            children, tokens, valid, p, q, rows, node, alive, r, coins[:, d], without_replacement, point_mass
        )
        path.append(node)
    # the walk stopped at `node`: r is its residual after the rejections (or p[node] itself
    # when it is a leaf / all its children were invalid): the target's next token.
    next_token = _sample_categorical(r, generator)
    out = Acceptance(path=torch.stack(path, dim=1), num_accepted=depth[node], next_token=next_token)
    if unbatched:
        out = Acceptance(path=out.path[0], num_accepted=out.num_accepted[0], next_token=out.next_token[0])
    return out


def _depth_step(
    children: torch.Tensor,
    tokens: torch.Tensor,
    valid: torch.Tensor,
    p: torch.Tensor,
    q: torch.Tensor,
    rows: torch.Tensor,
    node: torch.Tensor,
    alive: torch.Tensor,
    r: torch.Tensor,
    coins: torch.Tensor,
    without_replacement: bool,
    point_mass: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level: try the children of `node` in rank order. Returns (node, alive, r) after it:
    where a child was accepted, node = that child, alive stays True and r = p[child]; elsewhere
    node is unchanged, alive = False and r = the residual after this level's rejections (frozen
    from now on: it is what next_token is drawn from)."""
    kids = children[node]  # (B, K)
    qc = q[rows, node]  # (B, V) the draft distribution the next sibling was drawn from
    accepted = torch.zeros_like(alive)
    chosen = node
    for rank in range(kids.shape[1]):
        child = kids[:, rank]  # (B,) -1 where node has fewer children
        safe = child.clamp(min=0)
        x = tokens[rows, safe]  # (B,)
        tried = alive & ~accepted & (child >= 0) & valid[rows, safe]
        pm = None if point_mass is None else point_mass[rows, safe]  # (B,)
        accepted, chosen, r, qc = _sibling_step(tried, accepted, chosen, safe, x, r, qc, coins[:, rank], without_replacement, pm)
    r = torch.where(accepted[:, None], p[rows, chosen], r)
    return chosen, accepted, r


def _sibling_step(
    tried: torch.Tensor,
    accepted: torch.Tensor,
    chosen: torch.Tensor,
    child: torch.Tensor,
    x: torch.Tensor,
    r: torch.Tensor,
    qc: torch.Tensor,
    coin: torch.Tensor,
    without_replacement: bool,
    pm: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Try one child (token x, drawn from qc, or a point mass where pm) against the residual
    r where `tried`."""
    qx = qc.gather(-1, x[:, None])[:, 0]
    if pm is not None:  # q = delta_x: q[x] = 1
        qx = torch.where(pm, 1.0, qx)
    rx = r.gather(-1, x[:, None])[:, 0]
    # qx == 0: x cannot have been drawn from qc (a caller's invalid slot, or a duplicate that
    # was removed): treat it as absent rather than divide by zero.
    tried = tried & (qx > 0)
    take = coin < _accept_prob(rx, qx)
    acc = tried & take
    rej = tried & ~take
    accepted = accepted | acc
    chosen = torch.where(acc, child, chosen)
    # the residual uses qc *before* removing x: it is the distribution x was drawn from
    if pm is None:
        r = torch.where(rej[:, None], _residual(r, qc), r)
    else:  # norm(max(r - delta_x, 0)) is r without x; the q-drawn siblings' qc is untouched
        r = torch.where((rej & pm)[:, None], _remove_token(r, x), torch.where(rej[:, None], _residual(r, qc), r))
        rej = rej & ~pm
    if without_replacement:
        qc = torch.where(rej[:, None], _remove_token(qc, x), qc)
    return accepted, chosen, r, qc


def _accept_prob(rx: torch.Tensor, qx: torch.Tensor) -> torch.Tensor:
    """min(1, r[x] / q[x]); 0 where q[x] == 0 (such a child is skipped anyway)."""
    return torch.where(qx > 0, rx / qx.clamp(min=torch.finfo(qx.dtype).tiny), 0.0).clamp(max=1.0)


def _residual(r: torch.Tensor, qc: torch.Tensor) -> torch.Tensor:
    """norm(max(r - qc, 0)) row-wise (B, V).

    Its mass sum(max(r - qc, 0)) = TV(r, qc) is exactly the probability that a child drawn
    from qc is rejected, so in exact arithmetic it is > 0 whenever a rejection happened (mass 0
    means r <= qc everywhere with both summing to 1, i.e. r == qc, and then every child is
    accepted with probability min(1, r[x]/qc[x]) = 1). In floating point r ~= qc can still
    reject (with probability ~ rounding error) and leave only rounding noise; then we keep r
    itself, which equals the exact residual's best estimate up to that error instead of
    amplifying noise (or dividing 0 by 0).
    """
    diff = (r - qc).clamp(min=0)
    mass = diff.sum(dim=-1, keepdim=True)
    floor = 64 * torch.finfo(diff.dtype).eps
    return torch.where(mass > floor, diff / mass.clamp(min=floor), r)


def _remove_token(qc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """qc with token x removed and renormalised: the law of the next draw without replacement.
    If qc had no other token with mass (it can then draw no more children: those slots are
    invalid) the row stays all zero, and any further child is skipped."""
    out = qc.scatter(-1, x[:, None], 0.0)
    mass = out.sum(dim=-1, keepdim=True)
    return torch.where(mass > 0, out / mass.clamp(min=torch.finfo(out.dtype).tiny), out)


# --------------------------------------------------------------------------- primitives


def _as_float(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _uniform(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U(0, 1) strictly inside the interval (torch.rand can return exactly 0)."""
    u = torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    return u.clamp(min=torch.finfo(like.dtype).tiny)


def _sample_categorical(probs: torch.Tensor, generator: torch.Generator | None, num: int | None = None) -> torch.Tensor:
    """Inverse-CDF draws from unnormalised rows of probs (..., V): (...) or (..., num) i.i.d.

    Tokens with zero mass are never drawn (their CDF step is empty; a rounding overshoot at the
    top falls back to the last token with mass). A row with no mass at all yields token 0.
    No host sync, unlike torch.multinomial's argument checks.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[..., -1:]
    n = 1 if num is None else num
    u = torch.rand(probs.shape[:-1] + (n,), generator=generator, dtype=probs.dtype, device=probs.device) * total
    idx = torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True)
    vocab = probs.shape[-1]
    ids = torch.arange(vocab, device=probs.device)
    last = torch.where(probs > 0, ids, 0).amax(dim=-1, keepdim=True)  # last token with mass
    idx = torch.minimum(idx, last)
    return idx[..., 0] if num is None else idx
