"""Prompt lookup merged into the draft tree: the matcher, the merge, greedy exactness, and
losslessness at temperature > 0 (chi-square, with broken variants that must fail)."""

import pytest
import torch

import treespec
import treespec.acceptance.rejection as rejection
import treespec.acceptance.schemes as schemes
from chisq import ALPHA, POWER, Samples, exact_joint, pvalue, sample_counts
from treespec.acceptance.rejection import rejection_accept, sample_children
from treespec.acceptance.sampling import SamplingConfig
from treespec.tree.draft import DraftTree
from treespec.drafting.lookup import LookupConfig, find_continuations, merge_branches
from treespec.testing import cycle_order, tiny_cycle_model, tiny_model
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


def test_lookup_without_a_draft_model_or_with_another_verifier_fails_loudly(target):
    with pytest.raises(ValueError, match="lookup"):
        treespec.generate(target, None, PROMPT, max_new_tokens=4, method="autoregressive", lookup=True)
    draft = tiny_model(7, hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match="acceptance='rejection' only"):
        treespec.generate(target, draft, PROMPT, max_new_tokens=4, temperature=1.0, acceptance="traversal", lookup=True)


# --------------------------------------------------------------------------- T > 0: one node, exact
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
    assert pvalue(counts, p) > ALPHA


@pytest.mark.parametrize("bug", ["verified_with_q", "lookup_before_model_draws"])
def test_broken_point_mass_handling_fails(bug):
    counts, p, _ = one_node_trials(lookup_first=bug == "lookup_before_model_draws", point_mass=bug != "verified_with_q")
    assert pvalue(counts, p) < POWER


# --------------------------------------------------------------------------- T > 0: end to end
# The target repeats: after token c_i comes c_{i+1} of a cycle through the vocabulary with
# probability ~0.5-0.9, any other token with the rest (tiny_cycle_model). The prompt holds the
# cycle, once broken: it ends with "c1 c2", which earlier was followed by "c3 c4" (the likely
# continuation: lookup's first branch) and by "c5 c6" (an unlikely one: its second branch). The
# draft is either useless (confident about another cycle: its nodes are almost always rejected,
# and the lookup branch is tried against the residual) or useful (the same cycle, less sure: it
# often draws c3 itself, the lookup branch then merges into its node and continues below it).
CYCLE = cycle_order(8, 21)
E2E_PROMPT = torch.tensor([[CYCLE[i % 8] for i in [0, 1, 2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]]])
E2E_LOOKUP = LookupConfig(ngram_sizes=(1, 2), branches=2, length=2)
# case: draft, generate's tree arguments, sampling, the least share of accepted tokens that must
# come from lookup branches, draws for a broken variant (the correct one gets DRAWS)
E2E_CASES = {
    "useless-draft": ("useless", dict(tree=[2]), SamplingConfig(temperature=1.0), 0.5, 150),
    "useful-draft": ("useful", dict(method="linear", tree="chain-2"), SamplingConfig(temperature=0.8, top_k=6), 0.2, 250),
}
DRAWS = 600


@pytest.fixture(scope="module")
def cycle_models():
    return {
        "target": tiny_cycle_model(21),
        "useless": tiny_cycle_model(22),  # its own cycle: q far from p
        "useful": tiny_cycle_model(23, order_seed=21, confidence=1.5),  # the target's cycle, less sure
    }


def lookup_samples(models, case: str, seed: int, draws: int) -> tuple[Samples, torch.Tensor]:
    """Counts of the first two tokens with lookup on, and their exact law (V, V)."""
    draft, tree_args, cfg, _, _ = E2E_CASES[case]
    samples = sample_counts(models["target"], models[draft], E2E_PROMPT, cfg, seed=seed, draws=draws, lookup=E2E_LOOKUP,
                            **tree_args)
    return samples, exact_joint(models["target"], E2E_PROMPT, cfg)


def test_the_setting_is_what_the_tests_need(cycle_models):
    c = CYCLE
    tokens, valid = find_continuations(E2E_PROMPT[0], E2E_PROMPT.shape[1], E2E_LOOKUP)
    assert tokens.tolist() == [[c[3], c[4]], [c[5], c[6]]] and valid.all()
    joint = exact_joint(cycle_models["target"], E2E_PROMPT, SamplingConfig(temperature=1.0))
    p1 = joint.sum(1)
    assert 0.4 < p1[c[3]] < 0.9 and 0.3 < joint[c[3], c[4]] / p1[c[3]] < 0.9  # likely, far from certain
    assert (joint > 0).all()


def test_greedy_with_lookup_on_the_repeating_target(cycle_models):
    target, new = cycle_models["target"], 24
    ref = target.generate(E2E_PROMPT, do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    out = treespec.generate(target, cycle_models["useless"], E2E_PROMPT, max_new_tokens=new, tree=[2], lookup=E2E_LOOKUP,
                            eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.accepted_from_lookup > 3 * out.stats.accepted_from_model


@pytest.mark.parametrize("case", list(E2E_CASES))
def test_first_two_tokens_follow_the_target_with_lookup_on(cycle_models, case):
    samples, joint = lookup_samples(cycle_models, case, seed=3, draws=DRAWS)
    accepted = samples.accepted_from_lookup + samples.accepted_from_model
    assert samples.accepted_from_lookup > E2E_CASES[case][3] * accepted  # lookup branches were really accepted
    assert pvalue(samples.counts.sum(1), joint.sum(1)) > ALPHA  # first token
    assert pvalue(samples.counts, joint) > ALPHA  # first two tokens


def _verified_with_q(monkeypatch):
    original = schemes.VERIFIERS["rejection"]
    monkeypatch.setitem(schemes.VERIFIERS, "rejection", lambda *a, point_mass=None, **kw: original(*a, **kw))


def _accepted_without_test(monkeypatch):
    original = rejection._sibling_step

    def step(tried, accepted, chosen, child, x, r, qc, coin, wor, pm=None):
        if pm is not None:
            coin = torch.where(pm, 0.0, coin)  # a lookup child passes whenever p gives it any mass
        return original(tried, accepted, chosen, child, x, r, qc, coin, wor, pm)

    monkeypatch.setattr(rejection, "_sibling_step", step)


@pytest.mark.parametrize("bug", [_verified_with_q, _accepted_without_test], ids=lambda f: f.__name__[1:])
@pytest.mark.parametrize("case", list(E2E_CASES))
def test_broken_lookup_verification_fails_the_same_test(cycle_models, monkeypatch, case, bug):
    bug(monkeypatch)
    samples, joint = lookup_samples(cycle_models, case, seed=4, draws=E2E_CASES[case][4])
    assert pvalue(samples.counts, joint) < POWER
