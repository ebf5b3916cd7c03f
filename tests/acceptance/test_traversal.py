"""Statistical tests of traversal verification (treespec.acceptance.traversal).

Same harness as tests/acceptance/test_rejection.py (tests/chisq.py: a synthetic Markov language over V=8
tokens, ~30k trials verified in one batched call, chi-square of the emitted tokens against the
target's exact law), plus p/q built from random logits through `logits_to_probs` at several
temperatures, top-k and top-p, and one end-to-end run through `generate` with a tiny model.
Every broken variant (monkeypatched helper) must fail the same test.
"""

from __future__ import annotations

import pytest
import torch

from chisq import (
    ALPHA, E2E_PROMPT, POWER, draw_trees, e2e_pair, emitted, exact_joint, logit_case, make_case, pvalue, pvalues, rows_for,
    sample_counts,
)
from treespec.acceptance import traversal
from treespec.acceptance.rejection import rejection_accept
from treespec.acceptance.sampling import SamplingConfig
from treespec.acceptance.traversal import postorder_keys, traversal_accept
from treespec.tree.topology import TreeTopology

TRIALS = 30_000

TREES = {
    "chain3": TreeTopology.from_widths([1, 1, 1]),
    "w3": TreeTopology.from_widths([3]),
    "w2x2": TreeTopology.from_widths([2, 2]),
    "w3x1x1": TreeTopology.from_widths([3, 1, 1]),
    # irregular: a wide root, one deep branch, one bushy branch
    "irregular": TreeTopology.from_parents([-1, 0, 0, 0, 1, 1, 2, 4, 4, 7]),
}


def run(topo, dists, without_replacement, seed, trials=TRIALS, verifier=traversal_accept):
    p1, p2, q1, q2 = dists
    gen = torch.Generator().manual_seed(seed)
    tokens, valid = draw_trees(topo, q1, q2, trials, without_replacement, gen)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    acc = verifier(topo, tokens, valid, p, q, without_replacement=without_replacement, generator=gen)
    return emitted(topo, tokens, acc, p2, 2, gen), acc


LOSSLESS = [
    ("chain3", "close", True),
    ("w3", "far", True),
    ("w3", "zeros", False),
    ("w2x2", "far", False),
    ("w2x2", "zeros", True),
    ("w3x1x1", "close", False),
    ("w3x1x1", "far", True),
    ("irregular", "far", True),
    ("irregular", "zeros", False),
]


@pytest.mark.parametrize("tree,case,wor", LOSSLESS, ids=["-".join(map(str, c)) for c in LOSSLESS])
def test_lossless(tree, case, wor):
    dists = make_case(case)
    seq, acc = run(TREES[tree], dists, wor, seed=len(tree) * 7 + len(case))
    pv = pvalues(seq, dists[0], dists[1])
    assert min(pv.values()) > ALPHA, pv
    mean = acc.num_accepted.float().mean().item()
    assert 0.05 < mean < TREES[tree].max_depth, mean


SAMPLED = [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_k=4),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=1.0, top_k=5, top_p=0.9, without_replacement=False),
]


@pytest.mark.parametrize("cfg", SAMPLED, ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}-wor{c.without_replacement}")
def test_lossless_under_temperature_top_k_top_p(cfg):
    dists = logit_case(cfg, seed=3)
    seq, _ = run(TREES["w3x1x1"], dists, cfg.without_replacement, seed=11)
    pv = pvalues(seq, dists[0], dists[1])
    assert min(pv.values()) > ALPHA, pv


# --------------------------------------------------------------------------- broken variants


def _failure_abs(t_u, q_u, m_u):
    # bug: |T - Q| instead of max(T - Q, 0): mass where the draft over-proposed
    diff = (t_u - q_u).abs()
    m = diff.sum(-1)
    den = 1 - m_u + m
    return diff / den[:, None], m / den


def _failure_not_renormalised(t_u, q_u, m_u):
    # bug: forgets that u's remaining chances are conditional on the child having failed
    diff = (t_u - q_u).clamp(min=0)
    return diff, diff.sum(-1)


def _failure_no_update(t_u, q_u, m_u):
    # bug: a failed child leaves its parent untouched (the rejected mass is counted again)
    return t_u, m_u


def _keys_deepest_first(tree):
    # bug: stop at the deepest passing node instead of the first one in post-order (a later
    # sibling's subtree is judged before an earlier one's parent had its turn)
    return -traversal.torch.as_tensor(tree.depth) * 1000 + torch.arange(tree.depth.shape[0])


BROKEN = [
    ("_after_failure", _failure_abs, "w3", "far", True),
    ("_after_failure", _failure_not_renormalised, "chain3", "close", True),
    ("_after_failure", _failure_no_update, "w2x2", "close", False),
    ("_remove_token", lambda q, x: q, "w3", "far", True),
    ("postorder_keys", _keys_deepest_first, "w3x1x1", "far", True),
]


@pytest.mark.parametrize("name,fake,tree,case,wor", BROKEN, ids=[f"{b[0]}-{b[1].__name__}" for b in BROKEN])
def test_broken_variant_is_caught(monkeypatch, name, fake, tree, case, wor):
    monkeypatch.setattr(traversal, name, fake)
    dists = make_case(case)
    seq, _ = run(TREES[tree], dists, wor, seed=5)
    assert min(pvalues(seq, dists[0], dists[1]).values()) < POWER


def test_broken_residual_sample_is_caught(monkeypatch):
    # bug: "accept without the residual correction": after stopping at an inner node, the next
    # token is drawn from p there instead of from what is left of T
    orig = traversal._node_states

    def states(tree, tokens, valid, p, q, wor):
        mass, _ = orig(tree, tokens, valid, p, q, wor)
        return mass, p

    monkeypatch.setattr(traversal, "_node_states", states)
    dists = make_case("far")
    seq, _ = run(TREES["w3"], dists, True, seed=6)
    assert min(pvalues(seq, dists[0], dists[1]).values()) < POWER


# --------------------------------------------------------------------------- structure and API


def test_postorder_keys():
    topo = TreeTopology.from_parents([-1, 0, 0, 1, 1, 2, 3])
    # depth-first, children in rank order, a node after its subtree
    assert postorder_keys(topo).argsort().tolist() == [6, 3, 4, 1, 5, 2, 0]


def test_identical_draft_accepts_everything():
    topo = TREES["w3x1x1"]
    p1, p2, _, _ = make_case("far")
    gen = torch.Generator().manual_seed(4)
    tokens, valid = draw_trees(topo, p1, p2, 3000, True, gen)
    p = rows_for(tokens, topo.depth, p1, p2)
    acc = traversal_accept(topo, tokens, valid, p, p.clone(), generator=gen)
    assert (acc.num_accepted == 3).all()
    assert (acc.path[:, 1] == 1).all()  # the first branch in post-order is accepted whole
    assert torch.equal(acc.path, topo.paths[acc.path[:, -1]])


def test_invalid_nodes_are_never_accepted():
    topo = TREES["w2x2"]
    dists = make_case("zeros")
    gen = torch.Generator().manual_seed(8)
    tokens, valid = draw_trees(topo, dists[2], dists[3], 20_000, True, gen)
    # the root's last slot is out (as when q has no second token left), and so its subtree;
    # only a last slot can be: the siblings after a drawn token were drawn without it
    valid[:, 2] = False
    p, q = rows_for(tokens, topo.depth, dists[0], dists[1]), rows_for(tokens, topo.depth, dists[2], dists[3])
    acc = traversal_accept(topo, tokens, valid, p, q, generator=gen)
    assert not torch.isin(acc.path, torch.tensor([2, 5, 6])).any()
    seq = emitted(topo, tokens, acc, dists[1], 2, gen)
    assert min(pvalues(seq, dists[0], dists[1]).values()) > ALPHA


def test_unbatched_matches_batch_of_one():
    topo = TREES["irregular"]
    p1, p2, q1, q2 = make_case("far")
    tokens, valid = draw_trees(topo, q1, q2, 1, True, torch.Generator().manual_seed(5))
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    for seed in range(10):
        a = traversal_accept(topo, tokens[0], valid[0], p[0], q[0], generator=torch.Generator().manual_seed(seed))
        b = traversal_accept(topo, tokens, valid, p, q, generator=torch.Generator().manual_seed(seed))
        assert a.path.shape == (topo.max_depth + 1,) and a.num_accepted.shape == () and a.next_token.shape == ()
        assert torch.equal(a.path, b.path[0]) and torch.equal(a.next_token, b.next_token[0])


def test_accepts_at_least_as_much_as_token_level_on_trees():
    """Not guaranteed tree by tree, but the paper's claim on average; here on the same drafts."""
    dists = make_case("far")
    _, trav = run(TREES["w2x2"], dists, True, seed=9, trials=20_000)
    _, rej = run(TREES["w2x2"], dists, True, seed=9, trials=20_000, verifier=rejection_accept)
    assert trav.num_accepted.float().mean() > rej.num_accepted.float().mean() + 0.01


def test_no_data_dependent_ops():
    """FakeTensorMode has no values: any .item()/.tolist()/bool() of a tensor (a host sync on
    GPU) raises there. Dynamic trees included: their structure is a tensor too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    topo = TREES["irregular"]
    n = topo.num_nodes
    with FakeTensorMode(allow_non_fake_inputs=True):
        p = torch.rand(4, n, 50).softmax(-1)
        q = torch.rand(4, n, 50).softmax(-1)
        tokens = torch.randint(0, 50, (4, n))
        for wor in (True, False):
            acc = traversal_accept(topo, tokens, torch.ones(4, n, dtype=torch.bool), p, q, without_replacement=wor, generator=None)
            assert acc.path.shape == (4, topo.max_depth + 1) and acc.next_token.shape == (4,)


# --------------------------------------------------------------------------- end to end


def test_generate_with_traversal_follows_the_target():
    target, draft = e2e_pair()
    cfg = SamplingConfig(temperature=1.0, top_p=0.95)
    counts = sample_counts(target, draft, E2E_PROMPT, cfg, seed=21, draws=700, tree=[3, 2], acceptance="traversal").counts
    joint = exact_joint(target, E2E_PROMPT, cfg)
    assert pvalue(counts.sum(1), joint.sum(1)) > ALPHA
    assert pvalue(counts, joint) > ALPHA


# --------------------------------------------------------------------------- expected_accepted
def _exact_and_drawn(topo, dists, wor, seed, trees=6, reps=4000):
    """Per drawn tree: expected_accepted, and the mean (and its standard error) of traversal_accept's
    num_accepted over `reps` verifications of that same tree."""
    p1, p2, q1, q2 = dists
    gen = torch.Generator().manual_seed(seed)
    tokens, valid = draw_trees(topo, q1, q2, trees, wor, gen)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    exact = traversal.expected_accepted(topo, tokens, valid, p, q, without_replacement=wor)  # (trees,)
    rep = lambda t: t.repeat_interleave(reps, dim=0)  # noqa: E731
    acc = traversal_accept(topo, rep(tokens), rep(valid), rep(p), rep(q), without_replacement=wor, generator=gen)
    drawn = acc.num_accepted.double().view(trees, reps)
    return exact, drawn.mean(dim=1), drawn.std(dim=1) / reps**0.5


def _agree(exact, mean, se) -> bool:
    return bool(((exact - mean).abs() <= 5 * se + 1e-3).all())


@pytest.mark.parametrize("tree,case,wor", [("w3x1x1", "far", True), ("irregular", "close", False), ("chain3", "far", True)])
def test_expected_accepted_is_the_mean_of_traversal(tree, case, wor):
    exact, mean, se = _exact_and_drawn(TREES[tree], make_case(case), wor, seed=11)
    assert _agree(exact, mean, se), (exact, mean)


def test_expected_accepted_check_catches_a_wrong_order(monkeypatch):
    # the same check fails when the expectation walks the tree in the wrong order
    real = traversal_accept

    def verify_with_real_order(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(traversal, "postorder_keys", postorder_keys)
            return real(*args, **kwargs)

    monkeypatch.setattr(traversal, "postorder_keys", _keys_deepest_first)
    monkeypatch.setitem(globals(), "traversal_accept", verify_with_real_order)
    exact, mean, se = _exact_and_drawn(TREES["w3x1x1"], make_case("far"), True, seed=11)
    assert not _agree(exact, mean, se)


def test_a_verifier_of_ones_own_verifies_the_sampled_steps():
    """acceptance= takes a TreeVerifier callable (treespec.acceptance.schemes): every sampled step
    verifies with it, and one that delegates to rejection_accept gives the default's output."""
    import treespec
    from treespec.testing import tiny_pair

    target, draft = tiny_pair(0)
    prompt = torch.tensor([[3, 5, 7, 9]])
    calls = []

    def recording(tree, tokens, valid, p, q, **kwargs):
        calls.append(tokens.shape)
        return rejection_accept(tree, tokens, valid, p, q, **kwargs)

    def run_with(acceptance):
        return treespec.generate(target, draft, prompt, max_new_tokens=12, tree=[2, 1], temperature=0.9,
                                 eos_token_id=[], acceptance=acceptance, generator=torch.Generator().manual_seed(0))  # fmt: skip

    out = run_with(recording)
    assert len(calls) == out.stats.target_forwards
    assert torch.equal(out.sequences, run_with("rejection").sequences)
