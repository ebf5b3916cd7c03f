"""One tree forward equals running each root-to-leaf path alone; compacted caches equal caches
built token by token."""

import pytest
import torch
from transformers import DynamicCache

import treespec
from treespec.backends.compat import cache_kwargs
from treespec.backends.sdpa import SdpaBackend
from treespec.drafting.base import GreedyProposer
from treespec.drafting.static import TreeDrafter
from treespec.acceptance.acceptors import GreedyAcceptor
from treespec.engine.loop import SpeculativeEngine
from treespec.backends.kv_cache import TreeKVCache
from treespec.stats import GenerationStats
from treespec.testing import tiny_model
from treespec.tree.topology import TreeTopology

PROMPT = torch.tensor([[5, 9, 33, 2, 61, 14, 7]])


def full_logits(model, ids):
    """Logits of a plain causal forward over the whole sequence: (T, V)."""
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def prefilled(model, prompt):
    cache = TreeKVCache.for_model(model, 256)
    t = prompt.shape[1] - 1
    with torch.no_grad():
        SdpaBackend().forward(model, cache, prompt[:, :-1], torch.arange(t)[None], torch.ones(t, t, dtype=torch.bool).tril())
    cache.commit_all()
    return cache


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("widths", [[3, 2, 2], [1, 1, 1, 1], [5]])
def test_tree_forward_equals_each_path_alone(arch, widths):
    model = tiny_model(3, arch=arch)
    topo = TreeTopology.from_widths(widths)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (topo.num_nodes,), generator=gen)
    tokens[0] = PROMPT[0, -1]
    cache = prefilled(model, PROMPT)
    root_pos = PROMPT.shape[1] - 1
    with torch.no_grad():
        tree_logits = SdpaBackend().forward(model, cache, tokens[None], (root_pos + topo.depth)[None], topo.ancestors)
    for leaf in range(topo.level_starts[-2], topo.num_nodes):
        path = topo.paths[leaf]
        seq = torch.cat([PROMPT[0, :-1], tokens[path]])[None]
        ref = full_logits(model, seq)[root_pos:]
        torch.testing.assert_close(tree_logits[path], ref, atol=1e-5, rtol=1e-5)


def test_draft_tree_logits_equal_each_path_alone():
    draft = tiny_model(4)
    topo = TreeTopology.from_widths([3, 2, 2])
    cache = prefilled(draft, PROMPT)
    drafter = TreeDrafter(draft, topo, SdpaBackend(), cache, GreedyProposer())
    with torch.no_grad():
        tree = drafter.draft(PROMPT[:, -1:], PROMPT.shape[1] - 1)
    # nodes with children were run through the draft: their q logits are the draft's own
    for node in range(topo.level_starts[-2]):
        path = topo.paths[node][: int(topo.depth[node]) + 1]
        seq = torch.cat([PROMPT[0, :-1], tree.tokens[path]])[None]
        torch.testing.assert_close(tree.q_logits[node], full_logits(draft, seq)[-1], atol=1e-5, rtol=1e-5)
    # and the children are the top-k of those logits, best first
    top = tree.q_logits[0].topk(3).indices
    assert tree.tokens[1:4].tolist() == top.tolist()


def one_by_one_next_logits(model, seq):
    """Next-token logits after feeding `seq` one token at a time into a transformers cache."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        for i in range(seq.shape[1]):
            out = model(input_ids=seq[:, i : i + 1], use_cache=True, **cache_kwargs(model, cache))
    return out.logits[0, -1]


@pytest.mark.parametrize("steps", [1, 3])
def test_compacted_caches_equal_token_by_token_caches(steps):
    target, draft = tiny_model(0), tiny_model(0)  # draft == target: long accepted paths
    draft.load_state_dict(target.state_dict())
    with torch.no_grad():  # make the draft slightly wrong so that paths are partly accepted
        draft.lm_head.weight.add_(0.02 * torch.randn(draft.lm_head.weight.shape, generator=torch.Generator().manual_seed(1)))
    topo = TreeTopology.from_widths([3, 2, 2, 1])
    drafter = TreeDrafter(draft, topo, SdpaBackend(), TreeKVCache.for_model(draft, 256), GreedyProposer())
    engine = SpeculativeEngine(
        target, TreeKVCache.for_model(target, 256), drafter, SdpaBackend(), GreedyAcceptor(), GenerationStats(),
        prompt_len=PROMPT.shape[1], max_new_tokens=64, eos_token_ids=set(),
    )
    with torch.no_grad():
        engine.prefill(PROMPT)
        for _ in range(steps):
            engine.step()
    seq = engine.sequences  # (1, T + new): the root of the next step is the last token
    backend = SdpaBackend()
    with torch.no_grad():
        # target cache holds all tokens but the last; draft cache the same, minus a pending leaf
        assert engine.target_cache.committed == seq.shape[1] - 1
        nxt = backend.forward(target, engine.target_cache, seq[:, -1:], torch.tensor([[seq.shape[1] - 1]]), torch.ones(1, 1, dtype=torch.bool))
        torch.testing.assert_close(nxt[-1], one_by_one_next_logits(target, seq), atol=1e-5, rtol=1e-5)
        pending = engine.pending
        m = pending.shape[1]
        assert engine.drafter.cache.committed == seq.shape[1] - m
        pos = torch.arange(seq.shape[1] - m, seq.shape[1])[None]
        dn = backend.forward(draft, engine.drafter.cache, pending, pos, torch.ones(m, m, dtype=torch.bool).tril())
        torch.testing.assert_close(dn[-1], one_by_one_next_logits(draft, seq), atol=1e-5, rtol=1e-5)
    assert sum(engine.stats.accepted_lengths) > 0
