"""Greedy exactness: treespec's output equals the target's own generate(do_sample=False)."""

import pytest
import torch

import treespec
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.testing import sabotaged, tiny_model

PROMPT = torch.tensor([[3, 17, 42, 8, 25, 11]])
NEW = 40


def reference(target, prompt, max_new_tokens, eos):
    return target.generate(
        prompt, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=0
    )


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def target(request):
    return tiny_model(0, arch=request.param)


@pytest.fixture(scope="module")
def drafts(target):
    arch = "llama" if "Llama" in type(target).__name__ else "qwen2"
    return {
        "self": target,
        "unrelated": tiny_model(7, arch=arch, hidden_size=16, num_layers=1),
        "partial": sabotaged(target, period=3),
    }


CASES = [
    ("autoregressive", None),
    ("linear", "chain-1"),
    ("linear", "chain-4"),
    ("tree", [4]),
    ("tree", [2, 2, 1]),
    ("tree", [4, 2, 2, 1]),
    ("tree", treespec.TreeTopology.from_parents([-1, 0, 0, 0, 1, 1, 2, 4])),
    ("tree", "dynamic"),
    ("tree", DynamicTreeConfig(width=2, children=3, depth=4, budget=9)),
    ("tree", "adaptive"),
]


@pytest.mark.parametrize("method,tree", CASES, ids=[f"{m}-{t}" for m, t in CASES])
@pytest.mark.parametrize("draft_kind", ["self", "unrelated", "partial"])
def test_matches_target_greedy(target, drafts, method, tree, draft_kind):
    ref = reference(target, PROMPT, NEW, eos=None)
    out = treespec.generate(target, drafts[draft_kind], PROMPT, max_new_tokens=NEW, method=method, tree=tree, eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    stats = out.stats
    assert stats.new_tokens == NEW
    assert sum(a + 1 for a in stats.accepted_lengths) >= NEW
    assert stats.target_forwards == len(stats.accepted_lengths)
    if method == "autoregressive":
        assert stats.tau == 1.0 and stats.draft_forwards == 0
    elif draft_kind == "self" and isinstance(tree, (str, list)) and tree not in ("dynamic", "adaptive"):
        depth = len(stats.accepted_ranks[0])
        assert all(a == depth for a in stats.accepted_lengths[:-1])  # everything accepted
        assert stats.tau > 1.5
    elif draft_kind == "self":
        assert stats.tau > 1.5
    elif draft_kind == "partial":  # some drafts accepted; a chain never gets past a wrong top-1
        assert max(stats.accepted_lengths) > 0
        if method == "linear":
            assert max(stats.accepted_lengths) <= 2


def test_partial_draft_gives_partial_acceptance(target, drafts):
    out = treespec.generate(target, drafts["partial"], PROMPT, max_new_tokens=NEW, method="linear", tree="chain-4", eos_token_id=[])
    # every third position is wrong: once aligned, each step accepts exactly 2 of its 4 drafts
    assert set(out.stats.accepted_lengths) <= {0, 1, 2}
    assert out.stats.accepted_lengths[1:].count(2) == len(out.stats.accepted_lengths) - 1


def test_unrelated_draft_is_rarely_accepted(target, drafts):
    out = treespec.generate(target, drafts["unrelated"], PROMPT, max_new_tokens=NEW, method="tree", tree=[4, 2, 2, 1], eos_token_id=[])
    assert out.stats.tau < 1.6


@pytest.mark.parametrize("method,tree", [("linear", "chain-4"), ("tree", [3, 2, 2, 1])])
def test_eos_inside_an_accepted_path(target, method, tree):
    free = reference(target, PROMPT, NEW, eos=None)[0, PROMPT.shape[1]:].tolist()
    eos = free[6]  # lands inside the second step's path when everything is accepted
    ref = reference(target, PROMPT, NEW, eos=eos)
    out = treespec.generate(target, target, PROMPT, max_new_tokens=NEW, method=method, tree=tree, eos_token_id=eos)
    assert torch.equal(out.sequences, ref)
    assert out.sequences[0, -1].item() == eos
    assert out.stats.new_tokens == free.index(eos) + 1


@pytest.mark.parametrize("max_new", [1, 3, 7, 12])
def test_max_new_tokens_inside_an_accepted_path(target, max_new):
    ref = reference(target, PROMPT, max_new, eos=None)
    out = treespec.generate(target, target, PROMPT, max_new_tokens=max_new, tree=[2, 2, 1, 1], eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.new_tokens == max_new


def test_single_token_prompt(target, drafts):
    prompt = PROMPT[:, :1]
    ref = reference(target, prompt, 16, eos=None)
    out = treespec.generate(target, drafts["partial"], prompt, max_new_tokens=16, tree=[2, 2], eos_token_id=[])
    assert torch.equal(out.sequences, ref)


def test_long_prompt_crosses_prefill_chunks(target, drafts, monkeypatch):
    import treespec.engine.loop as engine

    monkeypatch.setattr(engine, "EAGER_PREFILL_CHUNK", 4)  # the 6-token prompt takes two chunks
    ref = reference(target, PROMPT, 12, eos=None)
    out = treespec.generate(target, drafts["partial"], PROMPT, max_new_tokens=12, tree=[2, 1], eos_token_id=[])
    assert torch.equal(out.sequences, ref)
    assert out.stats.prefill_forwards == 2 * 2  # target and draft, two chunks each


def test_stream_yields_the_same_tokens(target, drafts):
    ts = treespec.stream(target, drafts["partial"], PROMPT, max_new_tokens=20, tree=[2, 2, 1], eos_token_id=[])
    steps = list(ts)
    flat = [t for s in steps for t in s]
    assert flat == ts.result.sequences[0, PROMPT.shape[1]:].tolist()
    assert len(steps) == ts.result.stats.target_forwards


def test_transformers_streamer_receives_every_token(target):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    c = Collect()
    out = treespec.generate(target, target, PROMPT, max_new_tokens=10, tree="chain-3", eos_token_id=[], streamer=c)
    assert c.ended and c.chunks[0] == PROMPT[0].tolist()
    assert [t for ch in c.chunks[1:] for t in ch] == out.sequences[0, PROMPT.shape[1]:].tolist()
