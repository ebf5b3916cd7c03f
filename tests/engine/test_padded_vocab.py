"""Padded vocabularies: one tokenizer, a draft with fewer embedding rows than the target (as
Qwen2.5-0.5B's 151,936 against Qwen2.5-7B's 152,064). Greedy stays token for token the target's,
and sampling stays distributed as the target's full p, padding ids included (docs/sampling.md)."""

import pytest
import torch

import treespec
from chisq import ALPHA, POWER, pvalue, sample_counts
from treespec.acceptance.sampling import SamplingConfig, logits_to_probs
from treespec.acceptance import acceptors
from treespec.testing import tiny_model

V_P, V_Q = 12, 8  # target rows, draft rows: ids 8..11 exist for the target only
PROMPT = torch.tensor([[3, 10, 7]])  # holds an id the draft does not have
DRAWS = 500


@pytest.fixture(scope="module")
def pair():
    # init 0.15: p puts real mass on the ids past the draft's range (checked below)
    target = tiny_model(11, vocab_size=V_P, init_std=0.15)
    draft = tiny_model(12, vocab_size=V_Q, hidden_size=16, num_layers=1, init_std=0.15)
    return target, draft


@pytest.mark.parametrize("method,tree", [("tree", [3, 2, 1]), ("linear", "chain-3"), ("tree", "dynamic")])
def test_greedy_is_exact(pair, method, tree):
    target, draft = pair
    new = 24
    ref = target.generate(PROMPT, do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    out = treespec.generate(target, draft, PROMPT, max_new_tokens=new, method=method, tree=tree, eos_token_id=[])
    assert torch.equal(out.sequences, ref)


def first_token_counts(target, draft, seed: int, draws: int) -> torch.Tensor:
    """(V_P,) counts of the first token over every id, padding included."""
    cfg = SamplingConfig(temperature=1.0)
    return sample_counts(target, draft, PROMPT, cfg, seed=seed, draws=draws, new_tokens=1, tree=[3, 2]).counts


@pytest.fixture(scope="module")
def p1(pair):
    with torch.no_grad():
        p = logits_to_probs(pair[0](PROMPT).logits[0, -1], SamplingConfig(temperature=1.0))  # (V_P,)
    assert p[V_Q:].sum() > 0.15, "the padding ids must carry mass, or the test could not see them dropped"
    return p


def test_first_token_follows_the_full_target_distribution(pair, p1):
    counts = first_token_counts(*pair, seed=0, draws=DRAWS)
    assert counts[V_Q:].sum() > 0
    assert pvalue(counts, p1) > ALPHA


def test_truncating_p_to_the_draft_range_fails_the_same_test(pair, p1, monkeypatch):
    accept = acceptors.SampledAcceptor.accept

    def truncated(self, tree, p_logits):  # the bug: p restricted to the ids the draft has
        return accept(self, tree, p_logits.masked_fill(torch.arange(V_P) >= V_Q, -float("inf")))

    monkeypatch.setattr(acceptors.SampledAcceptor, "accept", truncated)
    counts = first_token_counts(*pair, seed=1, draws=250)
    assert pvalue(counts, p1) < POWER


def test_a_draft_with_more_rows_than_the_target_is_refused(pair):
    target, draft = pair
    with pytest.raises(ValueError, match="the draft scores 12 token ids but the target only 8"):
        treespec.generate(draft, target, PROMPT[:, :1], max_new_tokens=2)
