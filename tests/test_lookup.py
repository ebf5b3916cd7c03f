"""Prompt lookup merged into the draft tree: the matcher, the merge, greedy exactness, and
losslessness at temperature > 0 (chi-square, with broken variants that must fail)."""

import pytest
import torch
from scipy.stats import chisquare

import treespec
import treespec.acceptance.schemes as schemes
from treespec.acceptance.rejection import rejection_accept, sample_children
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.drafting.base import DraftTree
from treespec.drafting.lookup import LookupConfig, find_continuations, merge_branches
from treespec.testing import tiny_model
from treespec.tree.topology import TreeShapeError, TreeTopology


# --------------------------------------------------------------------------- matcher
def ctx(*tokens, pad=4):
    return torch.tensor(list(tokens) + [0] * pad)


def test_most_recent_longest_match_and_its_continuation():
    context = ctx(5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6)  # ends with "5 6": seen at 0 and 5
    tokens, valid = find_continuations(context, 12, LookupConfig(ngram_sizes=(1, 2), branches=1, length=4))
    assert tokens[0].tolist() == [7, 1, 2, 5] and valid.all()  # the most recent "5 6" (at 5)


def test_longer_ngram_wins_over_a_more_recent_shorter_one():
    context = ctx(1, 2, 3, 4, 9, 3, 8, 1, 2, 3)  # "1 2 3" at 0; "3" alone more recently at 5
    tokens, valid = find_continuations(context, 10, LookupConfig(ngram_sizes=(1, 3), branches=1, length=2))
    assert tokens[0].tolist() == [4, 9] and valid.all()
    tokens, _ = find_continuations(context, 10, LookupConfig(ngram_sizes=(1,), branches=1, length=2))
    assert tokens[0].tolist() == [8, 1]


def test_continuation_stops_at_the_end_of_the_context_and_ignores_what_lies_beyond():
    context = torch.tensor([4, 5, 6, 4, 5, 99, 99, 99])  # only 5 tokens are real
    tokens, valid = find_continuations(context, 5, LookupConfig(ngram_sizes=(2,), branches=1, length=4))
    assert valid[0].tolist() == [True, True, True, False]  # 6 4 5, then nothing is known
    assert tokens[0, :3].tolist() == [6, 4, 5]


def test_no_match_gives_only_padding():
    tokens, valid = find_continuations(ctx(1, 2, 3, 4), 4, LookupConfig(ngram_sizes=(1, 2), branches=2, length=3))
    assert not valid.any()


def test_branches_propose_distinct_first_tokens():
    context = ctx(7, 1, 7, 2, 7, 1, 7, 3, 7)  # after "7": 1, 2, 1, 3
    tokens, valid = find_continuations(context, 9, LookupConfig(ngram_sizes=(1,), branches=4, length=1))
    firsts = tokens[valid[:, 0], 0].tolist()
    assert firsts == [3, 1, 2]  # most recent first, each token once; the 4th branch is padding
    assert valid[:, 0].tolist() == [True, True, True, False]


def test_bad_config_fails_loudly():
    with pytest.raises(TreeShapeError, match="ngram_sizes"):
        LookupConfig(ngram_sizes=(0,))
    with pytest.raises(TreeShapeError, match="branches"):
        LookupConfig(branches=0)
    with pytest.raises(TypeError, match="lookup must be"):
        treespec.generate(tiny_model(0), tiny_model(1), torch.tensor([[1, 2]]), max_new_tokens=2, lookup="yes")


# --------------------------------------------------------------------------- merge
def model_tree(widths, tokens):
    topo = TreeTopology.from_widths(widths)
    t = torch.tensor(tokens)
    return DraftTree(topo.tensors("cpu"), t, torch.ones_like(t, dtype=torch.bool), None)


def check_consistent(tree: DraftTree):
    """parents, depth, paths, ancestors and children describe one tree; valid siblings distinct."""
    s = tree.structure
    n = s.parents.shape[0]
    for i in range(1, n):
        p = int(s.parents[i])
        assert p < i and int(s.depth[i]) == int(s.depth[p]) + 1
        assert s.ancestors[i].tolist() == (s.ancestors[p] | (torch.arange(n) == i)).tolist()
        assert int(s.paths[i, s.depth[i]]) == i and s.paths[i, : s.depth[i]].tolist() == s.paths[p, : s.depth[i]].tolist()
        if tree.valid[i]:
            assert int(s.children[p, s.ranks[i]]) == i
    for u in range(n):
        kids = [int(c) for c in s.children[u] if c >= 0 and tree.valid[c]]
        toks = [int(tree.tokens[c]) for c in kids]
        assert len(toks) == len(set(toks)), f"duplicate siblings below node {u}"


def test_lookup_token_equal_to_a_model_child_merges_into_it():
    # model tree [2, 1]: root -> (10, 11), 10 -> 20, 11 -> 21
    tree = model_tree([2, 1], [0, 10, 11, 20, 21])
    lk_tokens = torch.tensor([[11, 21, 30, 31], [12, 40, 0, 0]])
    lk_valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    merged = merge_branches(tree, lk_tokens, lk_valid)
    s = merged.structure
    assert merged.tokens.shape == (5 + 8,) and s.max_depth == 4
    # branch 0: 11 and 21 exist already (slots 5, 6 padding); 30 hangs below node 4 (token 21)
    assert merged.valid[5:9].tolist() == [False, False, True, True]
    assert int(s.parents[7]) == 4 and int(s.parents[8]) == 7 and s.depth[8] == 4
    # branch 1: 12 is new below the root, with rank K + 1 = 3, then 40 below it
    assert merged.valid[9:13].tolist() == [True, True, False, False]
    assert int(s.parents[9]) == 0 and int(s.ranks[9]) == 3 and int(s.parents[10]) == 9
    assert merged.lookup.tolist() == [False] * 5 + [True] * 8
    assert (s.draft_slot[5:] == -1).all()
    check_consistent(merged)


def test_merge_keeps_the_shape_whatever_matched():
    tree = model_tree([2, 2], [0, 1, 2, 3, 4, 5, 6])
    shapes = set()
    for toks, ok in [([[1, 3]], [[True, True]]), ([[9, 9]], [[True, True]]), ([[0, 0]], [[False, False]])]:
        m = merge_branches(tree, torch.tensor(toks), torch.tensor(ok))
        shapes.add((m.tokens.shape, m.structure.ancestors.shape, m.structure.children.shape, m.structure.paths.shape))
        check_consistent(m)
    assert len(shapes) == 1


# --------------------------------------------------------------------------- greedy exactness
PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11, 3, 17, 42, 8]])
NEW = 40


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def reference(target):
    # the tiny target falls into a cycle: the output repeats itself, so lookup has work to do
    return target.generate(PROMPT, do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize(
    "draft_kind,method,tree",
    [("useless", "tree", [2, 2, 1]), ("useless", "linear", "chain-3"), ("useless", "tree", "dynamic"), ("self", "tree", [2, 1])],
)
def test_greedy_output_is_the_targets_with_lookup_on(target, reference, draft_kind, method, tree):
    draft = tiny_model(7, hidden_size=16, num_layers=1) if draft_kind == "useless" else target
    out = treespec.generate(target, draft, PROMPT, max_new_tokens=NEW, method=method, tree=tree, lookup=True, eos_token_id=[])
    assert torch.equal(out.sequences, reference)
    st = out.stats
    assert st.accepted_from_model + st.accepted_from_lookup == sum(st.accepted_lengths)
    if draft_kind == "useless":
        assert st.accepted_from_lookup > 0


def test_lookup_saves_target_forwards_when_the_output_repeats(target, reference):
    draft = tiny_model(7, hidden_size=16, num_layers=1)
    off, on = (
        treespec.generate(target, draft, PROMPT, max_new_tokens=NEW, tree=[2, 1], lookup=lk, eos_token_id=[])
        for lk in (False, LookupConfig(branches=1, length=6))
    )
    assert torch.equal(off.sequences, reference) and torch.equal(on.sequences, reference)
    assert off.stats.accepted_from_lookup == 0
    assert on.stats.target_forwards < off.stats.target_forwards


def test_lookup_without_a_draft_model_fails_loudly(target):
    with pytest.raises(ValueError, match="lookup"):
        treespec.generate(target, None, PROMPT, max_new_tokens=4, method="autoregressive", lookup=True)


# --------------------------------------------------------------------------- T > 0: one node, exact
def pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value, cells with small expectation pooled; zero-probability cells must be empty."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    assert counts[probs == 0].sum() == 0, "sampled a token the target gives probability 0"
    expected = probs * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    assert keep.sum() >= 3, "degenerate distribution: the test would have no power"
    return chisquare(obs[keep].numpy(), exp[keep].numpy() * obs[keep].sum().item() / exp[keep].sum().item()).pvalue


def one_node_trials(lookup_first: bool, point_mass: bool, trials=60_000, seed=0):
    """Root with k=2 children drawn from q without replacement plus a lookup child c (present
    only when the model did not draw it: the merge); returns the first emitted token's counts
    and p."""
    g = torch.Generator().manual_seed(seed)
    v, c = 6, 2
    p = torch.tensor([0.05, 0.1, 0.4, 0.2, 0.15, 0.1])
    q = torch.tensor([0.4, 0.3, 0.15, 0.05, 0.05, 0.05])  # far from p; c is drawn (merged away) 1 time in 4
    drawn, _ = sample_children(q.expand(trials, v), 2, generator=g)  # (B, 2)
    lk = torch.full((trials, 1), c)
    present = (drawn != c).all(dim=1, keepdim=True)  # (B, 1)
    if lookup_first:  # the broken order: the deterministic candidate before the model's draws
        tokens = torch.cat([torch.zeros(trials, 1, dtype=torch.long), lk, drawn], dim=1)
        valid = torch.cat([torch.ones(trials, 1, dtype=torch.bool), present, torch.ones(trials, 2, dtype=torch.bool)], 1)
        pm = torch.tensor([False, True, False, False])
    else:
        tokens = torch.cat([torch.zeros(trials, 1, dtype=torch.long), drawn, lk], dim=1)
        valid = torch.cat([torch.ones(trials, 3, dtype=torch.bool), present], dim=1)
        pm = torch.tensor([False, False, False, True])
    topo = TreeTopology.from_widths([3])
    acc = rejection_accept(
        topo, tokens, valid, p.expand(trials, 4, v).clone(), q.expand(trials, 4, v).clone(), generator=g,
        point_mass=pm.expand(trials, 4) if point_mass else None,
    )
    first = torch.where(acc.num_accepted > 0, tokens.gather(1, acc.path[:, 1:2])[:, 0], acc.next_token)
    return torch.bincount(first, minlength=v).float(), p, (acc.num_accepted > 0) & (acc.path[:, 1] == 3)


def test_point_mass_after_the_model_draws_is_exact():
    counts, p, lookup_taken = one_node_trials(lookup_first=False, point_mass=True)
    assert lookup_taken.any()  # the lookup child was really accepted sometimes
    assert pvalue(counts, p) > 1e-3


@pytest.mark.parametrize("bug", ["verified_with_q", "lookup_before_model_draws"])
def test_broken_point_mass_handling_fails(bug):
    counts, p, _ = one_node_trials(lookup_first=bug == "lookup_before_model_draws", point_mass=bug != "verified_with_q")
    assert pvalue(counts, p) < 1e-6


# --------------------------------------------------------------------------- T > 0: end to end
V = 8
E2E_PROMPT = torch.tensor([[3, 6, 5, 2, 3]])  # ends with "3": lookup proposes 6 5 (and 2 3 ...)
E2E_LOOKUP = LookupConfig(ngram_sizes=(1, 2), branches=2, length=2)
DRAWS = 800  # ~10 s on 2 idle cores; the broken variant fails with far fewer


@pytest.fixture(scope="module")
def pair():
    # as in test_sampling_e2e: p and q far apart yet overlapping, no token with p ~ 1
    return tiny_model(11, vocab_size=V, init_std=0.15), tiny_model(12, vocab_size=V, hidden_size=16, num_layers=1, init_std=0.15)


def exact_joint(target, cfg: SamplingConfig) -> torch.Tensor:
    """p(x1) p(x2 | x1) from the target's logits: FloatTensor (V, V)."""
    with torch.no_grad():
        p1 = logits_to_probs(target(E2E_PROMPT).logits[0, -1], cfg)  # (V,)
        seqs = torch.cat([E2E_PROMPT.repeat(V, 1), torch.arange(V)[:, None]], dim=1)  # (V, T+1)
        p2 = logits_to_probs(target(seqs).logits[:, -1], cfg)  # (V, V)
    return p1[:, None] * p2


def sample_pairs(target, draft, cfg, seed, draws=DRAWS):
    g = torch.Generator().manual_seed(seed)
    counts, from_lookup = torch.zeros(V, V), 0
    t = E2E_PROMPT.shape[1]
    for _ in range(draws):
        out = treespec.generate(target, draft, E2E_PROMPT, max_new_tokens=2, tree=[2], eos_token_id=[], lookup=E2E_LOOKUP,
                                temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=g)
        x1, x2 = out.sequences[0, t:].tolist()
        counts[x1, x2] += 1
        from_lookup += out.stats.accepted_from_lookup
    return counts, from_lookup


E2E_UNDERPOWERED = pytest.mark.skip(reason="underpowered: in this setup lookup nodes are accepted in ~3% of draws, so the broken variant passes too; needs a prompt/model pair where lookup fires often (issue 13, open). Point-mass verification is checked exactly by the one-node chi-square tests above.")


@E2E_UNDERPOWERED
def test_first_two_tokens_follow_the_target_with_lookup_on(pair):
    target, draft = pair
    cfg = SamplingConfig(temperature=1.0)
    counts, from_lookup = sample_pairs(target, draft, cfg, seed=3)
    assert from_lookup > DRAWS // 10  # lookup branches were really accepted
    joint = exact_joint(target, cfg)
    assert pvalue(counts.sum(1), joint.sum(1)) > 1e-3  # first token
    assert pvalue(counts, joint) > 1e-3  # first two tokens


@E2E_UNDERPOWERED
def test_lookup_verified_as_if_drawn_from_q_fails_the_same_test(pair, monkeypatch):
    target, draft = pair
    original = schemes.VERIFIERS["rejection"]
    monkeypatch.setitem(schemes.VERIFIERS, "rejection", lambda *a, point_mass=None, **kw: original(*a, **kw))
    cfg = SamplingConfig(temperature=1.0)
    counts, _ = sample_pairs(target, draft, cfg, seed=4, draws=300)
    assert pvalue(counts, exact_joint(target, cfg)) < 1e-6
