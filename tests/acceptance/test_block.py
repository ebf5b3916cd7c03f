"""Statistical tests of block verification (treespec.acceptance.block), chains only.

Harness of tests/acceptance/test_rejection.py (tests/chisq.py: synthetic Markov language over V=8,
chi-square of the first two and three emitted tokens against the target's exact law), p/q from
random logits at several temperatures / top-k / top-p, broken variants that must fail, the
equivalence with traversal verification on a chain, the expected-length claim against
token-level verification, and one end-to-end run through
`generate(method="linear", acceptance="block")`.
"""

from __future__ import annotations

import pytest
import torch

import treespec
from chisq import (
    ALPHA, E2E_PROMPT, POWER, V, draw_trees, e2e_pair, emitted, exact_joint, logit_case, make_case, pvalue, pvalues, rows_for,
    sample_counts,
)
from treespec.acceptance import block
from treespec.acceptance.block import block_accept
from treespec.acceptance.rejection import rejection_accept
from treespec.acceptance.sampling import SamplingConfig
from treespec.acceptance.traversal import traversal_accept
from treespec.tree.topology import TreeTopology

TRIALS = 30_000


def run(depth, dists, seed, trials=TRIALS, verifier=block_accept, length=3):
    topo = TreeTopology.chain(depth)
    p1, p2, q1, q2 = dists
    gen = torch.Generator().manual_seed(seed)
    tokens, valid = draw_trees(topo, q1, q2, trials, True, gen)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    acc = verifier(topo, tokens, valid, p, q, generator=gen)
    return emitted(topo, tokens, acc, p2, length, gen), acc


@pytest.mark.parametrize("depth,case", [(1, "far"), (2, "close"), (3, "far"), (3, "zeros"), (5, "close")])
def test_lossless(depth, case):
    dists = make_case(case)
    seq, acc = run(depth, dists, seed=depth * 13 + len(case))
    pv = pvalues(seq, dists[0], dists[1])
    assert min(pv.values()) > ALPHA, pv
    assert 0.05 < acc.num_accepted.float().mean().item() < depth


@pytest.mark.parametrize(
    "cfg", [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.0, top_k=4), SamplingConfig(temperature=1.3, top_p=0.8)],
    ids=lambda c: f"t{c.temperature}-k{c.top_k}-p{c.top_p}",
)
def test_lossless_under_temperature_top_k_top_p(cfg):
    dists = logit_case(cfg, seed=4)
    seq, _ = run(3, dists, seed=12)
    assert min(pvalues(seq, dists[0], dists[1]).values()) > ALPHA


# --------------------------------------------------------------------------- broken variants


def _token_level_weights(px, qx, usable):
    # bug: per-token ratios min(1, p/q) instead of the running sequence-level weight
    w = torch.where(usable, (px / qx.clamp(min=1e-30)).clamp(max=1.0), 0.0)
    return torch.cat([w.new_ones(w.shape[0], 1), w], dim=1)


def _residual_without_weight(w, p, q):
    # bug: "accept without the residual correction": the plain token-level residual max(p - q, 0)
    return (p - q).clamp(min=0)


def _stop_prob_is_weight(w, m):
    # bug: stop at an inner node with probability w_i, ignoring that its child already failed
    return w


BROKEN = [
    ("_sequence_weights", _token_level_weights, "far"),
    ("_residual", _residual_without_weight, "far"),
    ("_stop_prob", _stop_prob_is_weight, "close"),
]


@pytest.mark.parametrize("name,fake,case", BROKEN, ids=[b[1].__name__ for b in BROKEN])
def test_broken_variant_is_caught(monkeypatch, name, fake, case):
    monkeypatch.setattr(block, name, fake)
    dists = make_case(case)
    seq, _ = run(3, dists, seed=7)
    assert min(pvalues(seq, dists[0], dists[1]).values()) < POWER


def _shallowest_past_root(stops):
    # bug: keep the shallowest passing prefix past the root instead of the deepest one
    # (forward instead of backward order)
    n = stops.shape[-1]
    steps = torch.arange(n)
    first = torch.where(stops & (steps > 0), steps, n).amin(dim=-1)
    return torch.where(first == n, 0, first)


def test_first_stop_instead_of_last_is_caught(monkeypatch):
    monkeypatch.setattr(block, "_deepest", _shallowest_past_root)
    dists = make_case("close")
    seq, _ = run(3, dists, seed=8)
    assert min(pvalues(seq, dists[0], dists[1]).values()) < POWER


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("case", ["close", "far", "zeros"])
def test_same_law_as_traversal_on_a_chain(case):
    """Block verification is traversal verification on a chain: with the same coins they pick
    the same prefix, and the same next token up to float rounding of the residual."""
    topo = TreeTopology.chain(4)
    p1, p2, q1, q2 = make_case(case)
    tokens, valid = draw_trees(topo, q1, q2, 5000, True, torch.Generator().manual_seed(1))
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    a = block_accept(topo, tokens, valid, p, q, generator=torch.Generator().manual_seed(2))
    b = traversal_accept(topo, tokens, valid, p, q, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.num_accepted, b.num_accepted) and torch.equal(a.path, b.path)
    assert (a.next_token == b.next_token).float().mean() > 0.999


@pytest.mark.parametrize("case", ["far", "zeros"])
def test_accepts_more_than_token_level_on_average(case):
    """Block (= traversal on a chain) verification never accepts less than token-level speculative
    sampling in expectation (Sun et al., Theorem 2): estimated on the same 30k drafted chains."""
    dists = make_case(case)
    _, blk = run(4, dists, seed=3)
    _, trav = run(4, dists, seed=3, verifier=traversal_accept)
    _, tok = run(4, dists, seed=3, verifier=rejection_accept)
    n = blk.num_accepted.float()
    se = (n.std() / TRIALS**0.5).item()
    assert n.mean() > tok.num_accepted.float().mean() + 3 * se
    assert trav.num_accepted.float().mean() > tok.num_accepted.float().mean() + 3 * se


def test_invalid_draft_cuts_the_chain():
    dists = make_case("far")
    topo = TreeTopology.chain(3)
    gen = torch.Generator().manual_seed(9)
    tokens, valid = draw_trees(topo, dists[2], dists[3], 20_000, True, gen)
    valid[:, 2] = False
    p, q = rows_for(tokens, topo.depth, dists[0], dists[1]), rows_for(tokens, topo.depth, dists[2], dists[3])
    acc = block_accept(topo, tokens, valid, p, q, generator=gen)
    assert (acc.num_accepted <= 1).all() and (acc.num_accepted == 1).any()
    seq = emitted(topo, tokens, acc, dists[1], 2, gen)
    assert min(pvalues(seq, dists[0], dists[1]).values()) > ALPHA


def test_a_tree_is_refused():
    topo = TreeTopology.from_widths([2, 1])
    n = topo.num_nodes
    with pytest.raises(ValueError, match="needs a chain"):
        block_accept(topo, torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.bool), torch.rand(n, V), torch.rand(n, V),
                     generator=None)


def test_unbatched_and_no_data_dependent_ops():
    from torch._subclasses.fake_tensor import FakeTensorMode

    topo = TreeTopology.chain(3)
    dists = make_case("far")
    tokens, valid = draw_trees(topo, dists[2], dists[3], 1, True, torch.Generator().manual_seed(5))
    p, q = rows_for(tokens, topo.depth, dists[0], dists[1]), rows_for(tokens, topo.depth, dists[2], dists[3])
    a = block_accept(topo, tokens[0], valid[0], p[0], q[0], generator=torch.Generator().manual_seed(1))
    b = block_accept(topo, tokens, valid, p, q, generator=torch.Generator().manual_seed(1))
    assert a.path.shape == (4,) and a.num_accepted.shape == () and torch.equal(a.path, b.path[0])
    with FakeTensorMode(allow_non_fake_inputs=True):
        p = torch.rand(4, 4, 50).softmax(-1)
        acc = block_accept(topo, torch.randint(0, 50, (4, 4)), torch.ones(4, 4, dtype=torch.bool), p, p, generator=None)
        assert acc.path.shape == (4, 4) and acc.next_token.shape == (4,)


# --------------------------------------------------------------------------- end to end


def test_generate_linear_with_block_follows_the_target():
    target, draft = e2e_pair()
    cfg = SamplingConfig(temperature=1.0, top_k=6)
    counts = sample_counts(target, draft, E2E_PROMPT, cfg, seed=22, draws=700, method="linear", tree="chain-3",
                           acceptance="block").counts
    joint = exact_joint(target, E2E_PROMPT, cfg)
    assert pvalue(counts.sum(1), joint.sum(1)) > ALPHA
    assert pvalue(counts, joint) > ALPHA


def test_generate_refuses_block_for_a_tree_and_ignores_it_when_greedy():
    target, draft = e2e_pair()
    with pytest.raises(ValueError, match="single chain"):
        treespec.generate(target, draft, E2E_PROMPT, max_new_tokens=2, tree=[2, 2], temperature=1.0, acceptance="block")
    with pytest.raises(ValueError, match="unknown acceptance"):
        treespec.generate(target, draft, E2E_PROMPT, max_new_tokens=2, temperature=1.0, acceptance="blocks")
    greedy = [treespec.generate(target, draft, E2E_PROMPT, max_new_tokens=8, method="linear", tree="chain-3", eos_token_id=[],
                                acceptance=a).sequences for a in ("rejection", "block", "traversal")]
    assert torch.equal(greedy[0], greedy[1]) and torch.equal(greedy[0], greedy[2])


# --------------------------------------------------------------------------- expected_accepted
def _exact_and_drawn(depth, dists, seed, chains=6, reps=4000):
    """Per drawn chain: block.expected_accepted, and the mean (and its standard error) of
    block_accept's num_accepted over `reps` verifications of that same chain."""
    topo = TreeTopology.chain(depth)
    p1, p2, q1, q2 = dists
    gen = torch.Generator().manual_seed(seed)
    tokens, valid = draw_trees(topo, q1, q2, chains, True, gen)
    p, q = rows_for(tokens, topo.depth, p1, p2), rows_for(tokens, topo.depth, q1, q2)
    exact = block.expected_accepted(tokens, valid, p, q)  # (chains,)
    rep = lambda t: t.repeat_interleave(reps, dim=0)  # noqa: E731
    acc = block_accept(topo, rep(tokens), rep(valid), rep(p), rep(q), generator=gen)
    drawn = acc.num_accepted.double().view(chains, reps)
    return exact, drawn.mean(dim=1), drawn.std(dim=1) / reps**0.5


def _agree(exact, mean, se) -> bool:
    return bool(((exact - mean).abs() <= 5 * se + 1e-3).all())


@pytest.mark.parametrize("depth,case", [(3, "far"), (4, "close"), (3, "zeros")])
def test_expected_accepted_is_the_mean_of_block(depth, case):
    exact, mean, se = _exact_and_drawn(depth, make_case(case), seed=13)
    assert _agree(exact, mean, se), (exact, mean)


def test_expected_accepted_check_catches_a_wrong_stop_probability(monkeypatch):
    # the same check fails when the expectation uses a wrong h_i (block_accept keeps the right one)
    real_stop, real_accept = block._stop_prob, block_accept

    def verify_with_real_stop(*args, **kwargs):
        with monkeypatch.context() as m:
            m.setattr(block, "_stop_prob", real_stop)
            return real_accept(*args, **kwargs)

    monkeypatch.setattr(block, "_stop_prob", _stop_prob_is_weight)
    monkeypatch.setitem(globals(), "block_accept", verify_with_real_stop)
    exact, mean, se = _exact_and_drawn(3, make_case("close"), seed=13)
    assert not _agree(exact, mean, se)
