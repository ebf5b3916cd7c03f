"""Statistical tests of the stochastic verifier (treespec.rejection). No models.

A synthetic two-context language over V=8 tokens: the target emits x1 ~ p1 and then every next
token from p2[previous token] (a Markov chain, so the second token depends on the first); the
draft does the same with q1, q2. For each trial a draft tree is sampled with `sample_children`
(depth-1 nodes from q1, a node below token x from q2[x]), verified with `rejection_accept`, and
the emitted sequence (accepted tokens, then next_token, then -- if the step emitted fewer tokens
than we look at -- fresh tokens from p2[previous], as the next decoding steps would draw them)
is compared with the target's own law by a chi-square test. ~50k independent trials run as one
batched call; every generator is seeded, so the suite is deterministic. The harness (the
language, tree drawing, emitted sequence, chi-square) lives in tests/chisq.py.

The same harness must reject deliberately broken verifiers (monkeypatched helpers), which shows
the tests have power against each classic bug.
"""

from __future__ import annotations

import pytest
import torch

from chisq import ALPHA, POWER, V, draw_trees, emitted, make_case, pvalues, rows_for, sample_pvalue
from treespec.acceptance import rejection
from treespec.acceptance.rejection import rejection_accept, sample_children
from treespec.tree.topology import TreeTopology

TRIALS = 50_000

TREES = {
    "chain2": [1, 1],
    "chain3": [1, 1, 1],
    "w2": [2],
    "w3": [3],
    "w2x2": [2, 2],
}


def run(tree: str, case: str, without_replacement: bool, seed: int = 0, trials: int = TRIALS, length: int = 2):
    topo = TreeTopology.from_widths(TREES[tree])
    p1, p2, q1, q2 = make_case(case)
    gen = torch.Generator().manual_seed(seed)
    tokens, valid = draw_trees(topo, q1, q2, trials, without_replacement, gen)
    p = rows_for(tokens, topo.depth, p1, p2)
    q = rows_for(tokens, topo.depth, q1, q2)
    acc = rejection_accept(topo, tokens, valid, p, q, without_replacement=without_replacement, generator=gen)
    seq = emitted(topo, tokens, acc, p2, length, gen)
    return seq, acc, (p1, p2)


# --------------------------------------------------------------------------- lossless


@pytest.mark.parametrize("without_replacement", [True, False], ids=["wor", "iid"])
@pytest.mark.parametrize("case", ["close", "far", "zeros"])
@pytest.mark.parametrize("tree", list(TREES))
def test_lossless(tree, case, without_replacement):
    length = 3 if tree == "chain3" else 2
    seq, acc, (p1, p2) = run(tree, case, without_replacement, length=length)
    pv = pvalues(seq, p1, p2)
    assert min(pv.values()) > ALPHA, pv
    # the test is not vacuous: drafts get accepted and rejected
    mean_acc = acc.num_accepted.float().mean().item()
    assert 0.05 < mean_acc < TREES[tree].__len__(), mean_acc


# --------------------------------------------------------------------------- broken verifiers


def _residual_unclamped(r, qc):
    # bug: max(., 0) missing. r - qc sums to 0, so it cannot be normalised as is; the "fix" a
    # buggy implementation would reach for is abs() before normalising, which puts residual
    # mass on tokens where the draft over-proposes (qc > r) instead of only where r > qc.
    diff = (r - qc).abs()
    mass = diff.sum(-1, keepdim=True)
    return torch.where(mass > 0, diff / mass.clamp(min=1e-30), r)


def _accept_prob_inverted(rx, qx):
    # bug: min(1, q/p) instead of min(1, p/q)
    return (qx / rx.clamp(min=1e-30)).clamp(max=1.0)


def _residual_not_updated(r, qc):
    # bug: after a rejection the next sibling (and the fallback sample) still use the old
    # target, so the rejected sibling's mass is counted again
    return r


def _remove_token_noop(qc, x):
    # bug (without replacement): the rejected token stays in q although the next sibling was
    # drawn from q with it removed
    return qc


BUGS = {
    "no_clamp": ("_residual", _residual_unclamped),
    "q_over_p": ("_accept_prob", _accept_prob_inverted),
    "no_residual_update": ("_residual", _residual_not_updated),
    "no_removal": ("_remove_token", _remove_token_noop),
}

# (bug, tree, case, variant): each bug on shapes/distributions where it really changes the law
BROKEN = [
    ("no_clamp", "w2", "far", True),
    ("no_clamp", "chain2", "far", False),
    ("q_over_p", "chain2", "far", True),
    ("q_over_p", "w2", "close", False),
    ("no_residual_update", "chain2", "close", True),
    ("no_residual_update", "w3", "zeros", False),
    ("no_removal", "w3", "far", True),
    ("no_removal", "w2x2", "zeros", True),
]


@pytest.mark.parametrize("bug,tree,case,without_replacement", BROKEN, ids=["-".join(map(str, b)) for b in BROKEN])
def test_broken_verifier_is_caught(monkeypatch, bug, tree, case, without_replacement):
    name, fake = BUGS[bug]
    monkeypatch.setattr(rejection, name, fake)
    seq, _, (p1, p2) = run(tree, case, without_replacement)
    pv = pvalues(seq, p1, p2)
    assert min(pv.values()) < POWER, pv


def test_no_removal_is_harmless_for_iid():
    # sanity of the harness: _remove_token is only used without replacement
    seq, _, (p1, p2) = run("w3", "far", False)
    assert min(pvalues(seq, p1, p2).values()) > ALPHA


# --------------------------------------------------------------------------- sample_children


@pytest.mark.parametrize("case", ["far", "zeros"])
def test_sample_children_iid_law(case):
    _, _, q1, _ = make_case(case)
    gen = torch.Generator().manual_seed(1)
    tok, ok = sample_children(q1.expand(TRIALS, 1, V), 3, without_replacement=False, generator=gen)
    assert tok.shape == ok.shape == (TRIALS, 1, 3) and ok.all()
    for j in range(3):
        assert sample_pvalue(tok[:, 0, j], q1) > ALPHA
    # independence of the slots: the pair (slot 0, slot 2) has law q1 x q1
    assert sample_pvalue(tok[:, 0, 0] * V + tok[:, 0, 2], q1[:, None] * q1[None, :]) > ALPHA


@pytest.mark.parametrize("case", ["far", "zeros"])
def test_sample_children_without_replacement_law(case):
    _, _, q1, _ = make_case(case)
    gen = torch.Generator().manual_seed(2)
    tok, ok = sample_children(q1.expand(TRIALS, 1, V), 3, without_replacement=True, generator=gen)
    tok, ok = tok[:, 0], ok[:, 0]
    support = int((q1 > 0).sum())
    # exactly min(k, support) valid slots, always the first ones, distinct, with mass
    assert (ok.sum(-1) == min(3, support)).all()
    assert (ok[:, :-1] | ~ok[:, 1:]).all()
    assert (q1[tok][ok] > 0).all()
    assert (tok[~ok] == 0).all()
    both = ok[:, 0] & ok[:, 1]
    assert (tok[both, 0] != tok[both, 1]).all()
    # sequential draw without replacement: P(a, b) = q(a) q(b) / (1 - q(a)), b != a
    pair = q1[:, None] * q1[None, :] / (1 - q1[:, None]).clamp(min=1e-12)
    pair.fill_diagonal_(0)
    assert sample_pvalue(tok[:, 0], q1) > ALPHA
    assert sample_pvalue(tok[:, 0] * V + tok[:, 1], pair) > ALPHA


def test_sample_children_more_slots_than_tokens():
    q = torch.tensor([[0.5, 0.25, 0.25]])
    gen = torch.Generator().manual_seed(0)
    tok, ok = sample_children(q, 5, without_replacement=True, generator=gen)
    assert tok.shape == (1, 5) and ok.tolist() == [[True, True, True, False, False]]
    assert sorted(tok[0, :3].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="k must be"):
        sample_children(q, -1, without_replacement=True, generator=gen)


# --------------------------------------------------------------------------- edge cases and API


@pytest.mark.parametrize("without_replacement", [True, False])
def test_all_children_invalid_samples_from_p(without_replacement):
    topo = TreeTopology.from_widths([3, 2])
    p1, p2, q1, q2 = make_case("far")
    gen = torch.Generator().manual_seed(3)
    tokens, _ = draw_trees(topo, q1, q2, TRIALS, without_replacement, gen)
    valid = torch.zeros_like(tokens, dtype=torch.bool)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    acc = rejection_accept(topo, tokens, valid, p, q, without_replacement=without_replacement, generator=gen)
    assert (acc.num_accepted == 0).all() and (acc.path == 0).all()
    assert sample_pvalue(acc.next_token, p1) > ALPHA


@pytest.mark.parametrize("without_replacement", [True, False])
def test_identical_draft_is_always_accepted(without_replacement):
    topo = TreeTopology.from_widths([2, 1, 1])
    p1, p2, _, _ = make_case("far")
    gen = torch.Generator().manual_seed(4)
    tokens, valid = draw_trees(topo, p1, p2, 5_000, without_replacement, gen)
    p = rows_for(tokens, topo.depth, p1, p2)
    acc = rejection_accept(topo, tokens, valid, p, p.clone(), without_replacement=without_replacement, generator=gen)
    assert (acc.num_accepted == 3).all()
    # rank 0 is accepted first: the path goes through node 1
    assert (acc.path[:, 1] == 1).all()
    # the path is consistent with the topology
    assert torch.equal(acc.path, topo.paths[acc.path[:, -1]])


def test_unbatched_matches_batch_of_one_and_is_reproducible():
    topo = TreeTopology.from_widths([2, 2])
    p1, p2, q1, q2 = make_case("far")
    tokens, valid = draw_trees(topo, q1, q2, 1, True, torch.Generator().manual_seed(5))
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    for seed in range(20):
        a = rejection_accept(topo, tokens[0], valid[0], p[0], q[0], generator=torch.Generator().manual_seed(seed))
        b = rejection_accept(topo, tokens, valid, p, q, generator=torch.Generator().manual_seed(seed))
        assert a.path.shape == (topo.max_depth + 1,) and a.num_accepted.shape == () and a.next_token.shape == ()
        assert torch.equal(a.path, b.path[0]) and torch.equal(a.num_accepted, b.num_accepted[0])
        assert torch.equal(a.next_token, b.next_token[0])
        # path padding repeats the last accepted node
        assert (a.path[a.num_accepted :] == a.path[a.num_accepted]).all()


def test_half_precision_inputs():
    topo = TreeTopology.from_widths([2])
    p1, p2, q1, q2 = make_case("close")
    gen = torch.Generator().manual_seed(6)
    tokens, valid = draw_trees(topo, q1, q2, 1000, True, gen)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    acc = rejection_accept(topo, tokens, valid, p.bfloat16(), q.half(), generator=gen)
    assert acc.next_token.dtype == torch.long and (acc.next_token < V).all()


def test_residual_guards():
    r = torch.tensor([[0.25, 0.25, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4]])
    # identical rows: the residual has no mass; fall back to r instead of 0/0
    out = rejection._residual(r, r.clone())
    assert torch.isfinite(out).all() and torch.equal(out, r)
    # rounding-level difference: still r, not amplified noise
    noisy = r + torch.tensor([1e-8, -1e-8, 0.0, 0.0])
    assert torch.equal(rejection._residual(r, noisy), r)
    qc = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.4, 0.2, 0.1, 0.3]])
    expect = (r - qc).clamp(min=0)
    expect = expect / expect.sum(-1, keepdim=True)
    torch.testing.assert_close(rejection._residual(r, qc), expect)
    # removing the only token with mass leaves a zero row (no NaN); further children are skipped
    one = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    assert torch.equal(rejection._remove_token(one, torch.tensor([1])), torch.zeros(1, 4))
    # 0/0 accept probability
    assert rejection._accept_prob(torch.tensor([0.0, 0.3, 0.9]), torch.tensor([0.0, 0.6, 0.3])).tolist() == [0.0, 0.5, 1.0]


def _run_fake(topo: TreeTopology) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    n = topo.num_nodes
    # the topology's own tensors are real CPU tensors: allow them as inputs
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.rand(4, n, 50).softmax(-1)
        p = torch.rand(4, n, 50).softmax(-1)
        for wor in (True, False):
            tok, ok = sample_children(q[:, :2], 3, without_replacement=wor, generator=None)
            assert tok.shape == ok.shape == (4, 2, 3)
            tokens = torch.randint(0, 50, (4, n))
            acc = rejection_accept(topo, tokens, torch.ones(4, n, dtype=torch.bool), p, q, without_replacement=wor, generator=None)
            assert acc.path.shape == (4, topo.max_depth + 1) and acc.next_token.shape == (4,)


def test_no_data_dependent_ops(monkeypatch):
    """Runs under FakeTensorMode (shapes only, no values): any .item()/.tolist()/bool() of a
    tensor, i.e. a host sync on GPU, raises there."""
    topo = TreeTopology.from_widths([2, 2, 1])
    _run_fake(topo)
    # the check has teeth: a helper that branches on a tensor value is caught
    orig = rejection._accept_prob

    def syncing(rx, qx):
        if (qx > 0).all():
            return orig(rx, qx)
        return orig(rx, qx)

    monkeypatch.setattr(rejection, "_accept_prob", syncing)
    with pytest.raises(Exception, match="local_scalar_dense"):
        _run_fake(topo)


def test_without_replacement_accepts_more_with_peaked_draft():
    """Not a correctness property, the reason for the default: with a peaked draft i.i.d.
    siblings are often duplicates (a wasted branch); distinct siblings cover more of p."""
    rates = {}
    for wor in (True, False):
        _, acc, _ = run("w3", "zeros", wor, trials=20_000)
        rates[wor] = acc.num_accepted.float().mean().item()
    assert rates[True] > rates[False] + 0.01, rates
