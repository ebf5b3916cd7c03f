"""End to end: the first two tokens `treespec.generate` samples are distributed exactly as the
target's own, computed from its logits (chi-square), for tree and linear speculation."""

import pytest
import torch

import treespec
import treespec.acceptance.rejection as rejection
from chisq import ALPHA, E2E_PROMPT as PROMPT, POWER, e2e_pair, exact_joint, pvalue, sample_counts
from treespec.acceptance.sampling import SamplingConfig
from treespec.drafting.dynamic import DynamicTreeConfig
from treespec.tree.topology import TreeTopology

DRAWS = 1500  # ~20 s a case on 2 cores; the broken verifiers fail with far fewer


@pytest.fixture(scope="module")
def models():
    return e2e_pair()


def sample_pairs(target, draft, method, tree, cfg, seed, draws=DRAWS) -> torch.Tensor:
    return sample_counts(target, draft, PROMPT, cfg, seed=seed, draws=draws, method=method, tree=tree).counts


CASES = [
    ("tree", [3, 2], SamplingConfig(temperature=1.0)),
    ("tree", [2, 2], SamplingConfig(temperature=0.7, top_p=0.9)),
    ("tree", [4], SamplingConfig(temperature=1.3, top_k=5)),
    ("linear", "chain-3", SamplingConfig(temperature=1.0, top_k=6, top_p=0.95)),
    ("autoregressive", None, SamplingConfig(temperature=0.9)),
    ("tree", DynamicTreeConfig(width=2, children=3, depth=3, budget=8), SamplingConfig(temperature=1.0)),
    ("tree", "adaptive", SamplingConfig(temperature=0.8, top_k=6)),
    # an optimizer-shaped irregular tree: ranks 0-1 at depths 1-2, a chain below
    ("tree", TreeTopology.from_parents([-1, 0, 0, 1, 1, 2, 3, 6, 7]), SamplingConfig(temperature=1.0)),
]


@pytest.mark.parametrize("method,tree,cfg", CASES, ids=[f"{m}-{t}-{c.temperature}-{c.top_k}-{c.top_p}" for m, t, c in CASES])
def test_first_two_tokens_follow_the_target(models, method, tree, cfg):
    target, draft = models
    counts = sample_pairs(target, draft, method, tree, cfg, seed=sum(map(ord, f"{method}{tree}")))
    joint = exact_joint(target, PROMPT, cfg)
    assert pvalue(counts.sum(1), joint.sum(1)) > ALPHA  # first token
    assert pvalue(counts, joint) > ALPHA  # first two tokens


def test_i_i_d_children_variant_is_lossless_too(models, monkeypatch):
    target, draft = models
    import treespec.engine.speculator as generation

    monkeypatch.setattr(generation, "SamplingConfig", lambda **kw: SamplingConfig(**kw, without_replacement=False))
    cfg = SamplingConfig(temperature=1.0)
    counts = sample_pairs(target, draft, "tree", [3, 2], cfg, seed=5)
    assert pvalue(counts, exact_joint(target, PROMPT, cfg)) > ALPHA


@pytest.mark.parametrize(
    "bug",
    [
        "accept_every_draft",  # a verifier that trusts the draft: emits q's distribution
        "residual_without_max",  # norm(|p - q|) instead of norm(max(p - q, 0))
    ],
)
def test_broken_verifier_fails_the_same_test(models, monkeypatch, bug):
    target, draft = models
    if bug == "accept_every_draft":
        monkeypatch.setattr(rejection, "_accept_prob", lambda rx, qx: torch.ones_like(rx))
    else:
        def broken(r, qc):
            d = (r - qc).abs()
            return d / d.sum(-1, keepdim=True).clamp_min(1e-30)

        monkeypatch.setattr(rejection, "_residual", broken)
    cfg = SamplingConfig(temperature=1.0)
    counts = sample_pairs(target, draft, "tree", [3, 2], cfg, seed=9, draws=800)
    assert pvalue(counts, exact_joint(target, PROMPT, cfg)) < POWER


def test_seeded_generator_reproduces_a_run(models):
    target, draft = models
    runs = [
        treespec.generate(target, draft, PROMPT, max_new_tokens=12, tree=[2, 2], temperature=1.0,
                          generator=torch.Generator().manual_seed(42), eos_token_id=[]).sequences
        for _ in range(2)
    ]
    assert torch.equal(*runs)


def test_greedy_ignores_top_k_and_top_p(models):
    target, draft = models
    a = treespec.generate(target, draft, PROMPT, max_new_tokens=8, tree=[2, 2], eos_token_id=[])
    b = treespec.generate(target, draft, PROMPT, max_new_tokens=8, tree=[2, 2], top_k=3, top_p=0.5, eos_token_id=[])
    assert torch.equal(a.sequences, b.sequences)


def test_generator_on_the_wrong_device_is_a_clear_error(models):
    target, draft = models

    class FakeGen(torch.Generator):
        @property
        def device(self):
            return torch.device("meta")

    with pytest.raises(ValueError, match="generator is on"):
        treespec.generate(target, draft, PROMPT, max_new_tokens=2, temperature=1.0, generator=FakeGen())
