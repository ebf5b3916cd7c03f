"""Drafting ahead (overlap=True): greedy output stays the target's own, sampled output keeps the
target's distribution (chi-square on the first three tokens, where a drafted-ahead tree is
verified), and the schedule does what it claims (hits resume the next tree, saved forwards)."""

import pytest
import torch

import treespec
from treespec.acceptance.sampling import SamplingConfig
from treespec.drafting.ahead import AheadPlan, OverlapConfig
from treespec.drafting.base import GreedyProposer
from treespec.drafting.dynamic import DynamicDrafter, DynamicTreeConfig
from treespec.drafting.static import TreeDrafter
from treespec.engine.checks import ArgumentError
from treespec.engine.loop import SpeculativeEngine
from treespec.testing import sabotaged, tiny_model
from treespec.tree.topology import TreeTopology

from chisq import ALPHA, E2E_PROMPT, POWER, e2e_pair, exact_joint, pvalue, sample_counts

PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11]])
NEW = 40


@pytest.fixture(scope="module")
def target():
    return tiny_model(0)


@pytest.fixture(scope="module")
def drafts(target):
    return {"self": target, "unrelated": tiny_model(7, hidden_size=16, num_layers=1), "partial": sabotaged(target, period=3)}


CASES = [
    ("tree", [2, 2, 1], OverlapConfig()),
    ("tree", [2, 2, 1], OverlapConfig(leaves=2, candidates=2, levels=2)),
    ("tree", [4, 2, 2, 1], OverlapConfig(leaves=3, candidates=3, levels=4)),
    ("tree", TreeTopology.from_parents([-1, 0, 0, 0, 1, 1, 2, 4]), OverlapConfig(leaves=2, levels=2)),
    ("linear", "chain-4", OverlapConfig()),
    ("linear", "chain-4", OverlapConfig(levels=3)),
    ("tree", [4], OverlapConfig(candidates=1)),
    ("tree", "dynamic", OverlapConfig()),
    ("tree", DynamicTreeConfig(width=2, children=3, depth=3, budget=8), OverlapConfig(leaves=3, candidates=2)),
]


def reference(target):
    return target.generate(PROMPT, do_sample=False, max_new_tokens=NEW, pad_token_id=0)


@pytest.mark.parametrize("method,tree,config", CASES, ids=[f"{m}-{t}-{c.leaves}-{c.candidates}-{c.levels}" for m, t, c in CASES])
@pytest.mark.parametrize("draft_kind", ["self", "unrelated", "partial"])
def test_greedy_output_is_the_targets_with_overlap(target, drafts, method, tree, config, draft_kind):
    out = treespec.generate(target, drafts[draft_kind], PROMPT, max_new_tokens=NEW, method=method, tree=tree,
                            eos_token_id=[], overlap=config)
    assert torch.equal(out.sequences, reference(target))
    st = out.stats
    assert st.ahead_steps == len(st.accepted_lengths)
    # every hit saves `levels` forwards of the next step (none after the last step)
    assert st.draft_forwards_saved in (st.ahead_hits * config.levels, (st.ahead_hits - 1) * config.levels)
    if draft_kind == "self":  # drafts always right: the draft's own path is accepted, and every step hits
        if not isinstance(tree, (DynamicTreeConfig, str)):  # a static tree: down to its whole depth
            depth = len(st.accepted_ranks[0])
            assert all(a == depth for a in st.accepted_lengths[:-1])
        assert st.ahead_hits >= len(st.accepted_lengths) - 1
    if draft_kind == "unrelated":
        assert st.ahead_hit_rate < 0.5


def test_a_hit_skips_the_drafted_levels_on_the_critical_path(target):
    """Drafts always right and levels = the tree's depth: after the first step the whole next
    tree is drafted ahead, so no draft forward is left before a verification."""
    out = treespec.generate(target, target, PROMPT, max_new_tokens=NEW, tree=[2, 2, 1], eos_token_id=[],
                            overlap=OverlapConfig(levels=3))
    st = out.stats
    assert st.draft_forwards == 3  # the first step's tree only
    assert st.draft_forwards_ahead == 4 * st.ahead_steps  # end point, guesses, next levels 1 and 2


def record_trees(target, draft, overlap, tree):
    """Every step's drafted tree (tokens, q logits) of a greedy run."""
    trees, real = [], SpeculativeEngine.draft

    def draft_and_record(self, root_pos):
        tree = real(self, root_pos)
        trees.append((tree.tokens.clone(), tree.q_logits.clone()))
        return tree

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SpeculativeEngine, "draft", draft_and_record)
        treespec.generate(target, draft, PROMPT, max_new_tokens=NEW, tree=tree, eos_token_id=[], overlap=overlap)
    return trees


DYNAMIC = DynamicTreeConfig(width=2, children=3, depth=3, budget=8)


def resumed_trees_match_fresh_ones(target, draft, tree=(2, 2, 1)) -> bool:
    """Greedy drafts are deterministic, so a run with overlap drafts the very trees of a run
    without it, step by step; on resumed steps their levels come from the ahead work and from
    the retained cache entries, and must still equal the fresh ones (tokens, and q up to
    float rounding)."""
    overlap = OverlapConfig(leaves=2, candidates=3, levels=1 if tree is DYNAMIC else 2)
    fresh = record_trees(target, draft, False, list(tree) if tree is not DYNAMIC else tree)
    ahead = record_trees(target, draft, overlap, list(tree) if tree is not DYNAMIC else tree)
    return len(fresh) == len(ahead) and all(
        torch.equal(t0, t1) and torch.allclose(q0, q1, atol=1e-4) for (t0, q0), (t1, q1) in zip(fresh, ahead))


@pytest.mark.parametrize("tree", [(2, 2, 1), DYNAMIC], ids=["static", "dynamic"])
@pytest.mark.parametrize("draft_kind", ["self", "partial"])
def test_resumed_trees_equal_freshly_drafted_ones(target, drafts, draft_kind, tree):
    assert resumed_trees_match_fresh_ones(target, drafts[draft_kind], tree)


def test_a_dynamic_resume_from_the_wrong_guess_fails_the_same_check(target, drafts, monkeypatch):
    real = DynamicDrafter.resume
    monkeypatch.setattr(DynamicDrafter, "resume", lambda self, guess: real(self, (guess + 1) % self.plan.num_guesses))
    assert not resumed_trees_match_fresh_ones(target, drafts["self"], DYNAMIC)


@pytest.mark.parametrize("bug", ["wrong_guess_restored", "retained_entries_shifted", "nothing_retained"])
def test_a_broken_resume_fails_the_same_check(target, drafts, monkeypatch, bug):
    """The check above can fail: a resume that restores another guess's levels, or keeps the
    wrong draft cache entries, drafts other trees (verification still keeps the output exact)."""
    if bug == "wrong_guess_restored":
        real = TreeDrafter.resume
        monkeypatch.setattr(TreeDrafter, "resume", lambda self, guess: real(self, (guess + 1) % self.plan.num_guesses))
    else:
        real_init = AheadPlan.__init__

        def init(self, *args, **kwargs):
            real_init(self, *args, **kwargs)
            if bug == "retained_entries_shifted":
                self.hit_slots = self.hit_slots.roll(1, dims=1)
            else:
                self.retain = 0

        monkeypatch.setattr(AheadPlan, "__init__", init)
    try:
        same = resumed_trees_match_fresh_ones(target, drafts["self"])
    except RuntimeError:  # nothing retained: the next level's mask no longer fits the cache
        same = False
    assert not same


def test_unsupported_overlap_fails_before_any_work(target):
    for tree, method in [("adaptive", "tree"), (None, "autoregressive")]:
        with pytest.raises(ArgumentError, match="static tree"):
            treespec.generate(target, target, PROMPT, max_new_tokens=4, method=method, tree=tree, overlap=True)
    with pytest.raises(ArgumentError, match="one level"):
        treespec.generate(target, target, PROMPT, max_new_tokens=4, tree="dynamic", overlap=OverlapConfig(levels=2))
    with pytest.raises(ArgumentError, match="lookup"):
        treespec.generate(target, target, PROMPT, max_new_tokens=4, tree=[2, 1], overlap=True, lookup=True)
    with pytest.raises(ArgumentError, match="levels <= 2"):
        treespec.generate(target, target, PROMPT, max_new_tokens=4, tree=[2, 1], overlap=OverlapConfig(levels=3))
    with pytest.raises(ValueError, match="candidates"):
        OverlapConfig(candidates=0)


# ---------------------------------------------------------------------- distribution (T > 0)
DRAWS = 800  # ~40 s a case on 2 cores


@pytest.fixture(scope="module")
def small():
    # chisq.e2e_pair: p and q far apart yet overlapping, over a vocabulary of 8, small enough
    # that K = 4 guesses often contain the target's next token, so that many steps resume
    return e2e_pair()


def sample_triples(target, draft, tree, cfg, seed, draws=DRAWS):
    return sample_counts(target, draft, E2E_PROMPT, cfg, seed=seed, draws=draws, new_tokens=3, tree=tree,
                         overlap=OverlapConfig(candidates=4, levels=1))


def pvalues(counts, exact) -> list[float]:
    """The first two tokens jointly, and the second and third jointly: the third token comes
    from a resumed tree on most draws, the pairs keep the test's cells few."""
    return [pvalue(counts.sum(2), exact.sum(2)), pvalue(counts.sum(0), exact.sum(0))]


SMALL_DYNAMIC = DynamicTreeConfig(width=1, children=2, depth=1, budget=2)  # a hit at depth 1: the 3rd token is resumed
OVERLAP_CASES = [([1], SamplingConfig(temperature=1.0)), ([2, 1], SamplingConfig(temperature=0.8, top_k=6)),
                 (SMALL_DYNAMIC, SamplingConfig(temperature=1.0))]


@pytest.mark.parametrize("tree,cfg", OVERLAP_CASES, ids=["chain1-T1", "tree21-T0.8-k6", "dynamic-T1"])
def test_sampled_tokens_follow_the_target_with_overlap(small, tree, cfg):
    target, draft = small
    samples = sample_triples(target, draft, tree, cfg, seed=3)
    assert samples.ahead_hits > DRAWS // 5  # resumed trees decide many third tokens: there is something to test
    assert min(pvalues(samples.counts, exact_joint(target, E2E_PROMPT, cfg, tokens=3))) > ALPHA


def test_ahead_drafts_that_are_not_draws_from_q_fail_the_same_test(small, monkeypatch):
    """A broken variant: the ahead work proposes the draft's top-k at T > 0 (forgetting to
    sample), while verification treats the next tree's first level drafted below the guess
    as draws from q."""
    real = TreeDrafter.draft_ahead

    def greedy_ahead(self, root_pos):
        proposer, self.proposer = self.proposer, GreedyProposer()
        try:
            return real(self, root_pos)
        finally:
            self.proposer = proposer

    monkeypatch.setattr(TreeDrafter, "draft_ahead", greedy_ahead)
    target, draft = small
    cfg = SamplingConfig(temperature=1.0)
    samples = sample_triples(target, draft, [1], cfg, seed=4, draws=1500)  # 800 gave p = 2e-6
    assert min(pvalues(samples.counts, exact_joint(target, E2E_PROMPT, cfg, tokens=3))) < POWER


def test_a_dynamic_resume_that_drafts_greedily_fails_the_same_test(small, monkeypatch):
    """A dynamic tree drafts only its next root ahead, so top-k guesses would not be a bug there
    (a guess is used only when it equals the target's token, and nothing drafted below it is
    verified). A broken variant that is: the resumed step proposes its tree's children by the
    draft's top-k at T > 0, while verification treats them as draws from q."""
    real = DynamicDrafter.draft

    def greedy_when_resumed(self, pending, root_pos):
        if self._resume is None:
            return real(self, pending, root_pos)
        proposer, self.proposer = self.proposer, GreedyProposer()
        try:
            return real(self, pending, root_pos)
        finally:
            self.proposer = proposer

    monkeypatch.setattr(DynamicDrafter, "draft", greedy_when_resumed)
    target, draft = small
    cfg = SamplingConfig(temperature=1.0)
    samples = sample_triples(target, draft, SMALL_DYNAMIC, cfg, seed=4)
    assert min(pvalues(samples.counts, exact_joint(target, E2E_PROMPT, cfg, tokens=3))) < POWER
