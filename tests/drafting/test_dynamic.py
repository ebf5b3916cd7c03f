"""Dynamic (EAGLE-2 style) and adaptive trees: structure, exactness, depth choice."""

import pytest
import torch

import treespec
from treespec.backends.sdpa import SdpaBackend
from treespec.drafting.base import GreedyProposer, SampledProposer
from treespec.drafting.adaptive import AdaptiveTreeConfig, choose_depth
from treespec.drafting.dynamic import DynamicDrafter, DynamicTreeConfig
from treespec.backends.kv_cache import TreeKVCache
from treespec.acceptance.sampling import SamplingConfig
from treespec.testing import tiny_model
from treespec.tree.topology import TreeShapeError, TreeTopology

PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11]])


def drafted_tree(proposer, cfg, seed=0):
    draft = tiny_model(seed)
    cache = TreeKVCache.for_model(draft, 256)
    t = PROMPT.shape[1] - 1
    with torch.no_grad():
        SdpaBackend().forward(draft, cache, PROMPT[:, :-1], torch.arange(t)[None], torch.ones(t, t, dtype=torch.bool).tril())
        cache.commit_all()
        return draft, DynamicDrafter(draft, cfg, SdpaBackend(), cache, proposer).draft(PROMPT[:, -1:], t)


@pytest.mark.parametrize("cfg", [DynamicTreeConfig(width=2, children=3, depth=3, budget=8), DynamicTreeConfig()])
@pytest.mark.parametrize("sampled", [False, True])
def test_dynamic_structure_is_a_consistent_tree(cfg, sampled):
    proposer = SampledProposer(SamplingConfig(temperature=1.0), torch.Generator().manual_seed(1)) if sampled else GreedyProposer()
    draft, tree = drafted_tree(proposer, cfg)
    s = tree.structure
    n = tree.tokens.shape[0]
    assert n == 1 + (cfg.pool_size if sampled else cfg.budget)
    # the same structure rebuilt from (parents, ranks) by the static TreeTopology
    topo = TreeTopology(tuple(s.parents.tolist()), tuple(s.ranks.tolist()))
    assert torch.equal(topo.depth, s.depth)
    assert torch.equal(topo.ancestors, s.ancestors)
    assert torch.equal(topo.children[:, : s.children.shape[1]], s.children[:, : topo.children.shape[1]])
    assert torch.equal(topo.paths[:, : topo.max_depth + 1], s.paths[:, : topo.max_depth + 1])
    assert tree.tokens[0] == PROMPT[0, -1]
    # nodes the draft ran have their own q logits, equal to a plain forward over their path
    ran = (s.draft_slot >= 0).nonzero().flatten().tolist()
    assert ran and all(s.depth[i] < cfg.depth for i in ran)
    for i in ran[:4]:
        path = s.paths[i][: int(s.depth[i]) + 1]
        seq = torch.cat([PROMPT[0, :-1], tree.tokens[path]])[None]
        with torch.no_grad():
            ref = draft(input_ids=seq).logits[0, -1]
        torch.testing.assert_close(tree.q_logits[i], ref, atol=1e-5, rtol=1e-5)


def test_greedy_dynamic_keeps_the_best_scored_nodes():
    cfg = DynamicTreeConfig(width=2, children=3, depth=3, budget=5)
    draft, tree = drafted_tree(GreedyProposer(), cfg)
    s = tree.structure
    logq = torch.log_softmax(tree.q_logits, -1)
    score = torch.zeros(tree.tokens.shape[0])
    for i in range(1, score.shape[0]):
        score[i] = score[s.parents[i]] + logq[s.parents[i], tree.tokens[i]]
    # every expanded node's best child is at least as likely as any child of a worse parent kept
    assert (score[1:] <= 0).all()
    assert s.depth.max() >= 1 and tree.valid.all()


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(width=0), "width"), (dict(width=5, children=4), "cannot exceed"), (dict(budget=1000), "budget"), (dict(depth=-1), "depth")],
)
def test_dynamic_config_errors(kwargs, match):
    with pytest.raises(TreeShapeError, match=match):
        DynamicTreeConfig(**kwargs)


def test_adaptive_config_errors():
    with pytest.raises(TreeShapeError, match="min_depth"):
        AdaptiveTreeConfig(min_depth=4, max_depth=2)


def test_adaptive_depth_follows_acceptance():
    cfg = AdaptiveTreeConfig(min_depth=1, max_depth=8, draft_cost=0.2)
    always = [(4, 4)] * 16  # every draft of a depth-4 tree accepted
    never = [(4, 0)] * 16
    assert choose_depth(always, cfg) == 8
    assert choose_depth(never, cfg) == 1
    half = [(4, a) for a in [0, 1, 2, 1] * 4]
    assert 1 <= choose_depth(half, cfg) < choose_depth(always, cfg)


def test_adaptive_logs_its_choices_and_is_exact():
    target = tiny_model(0)
    ref = target.generate(PROMPT, do_sample=False, max_new_tokens=30, pad_token_id=0, eos_token_id=None)
    out = treespec.generate(target, target, PROMPT, max_new_tokens=30, tree="adaptive", eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    choices = out.stats.tree_choices
    assert len(choices) == out.stats.target_forwards
    assert choices[-1] > choices[0]  # a perfect draft makes the tree deeper


def test_deep_narrow_budget_fits_the_draft_cache():
    """The draft's scratch holds (depth-1) frontiers, which can exceed the verified budget."""
    target = tiny_model(0)
    cfg = DynamicTreeConfig(width=4, children=4, depth=8, budget=16)
    ref = target.generate(PROMPT, do_sample=False, max_new_tokens=20, pad_token_id=0, eos_token_id=None)
    out = treespec.generate(target, target, PROMPT, max_new_tokens=20, tree=cfg, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
