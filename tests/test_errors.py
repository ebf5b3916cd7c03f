"""Bad input gets a clear error before any work starts."""

import pytest
import torch

import treespec
from treespec.testing import tiny_model

P = torch.tensor([[3, 4, 5]])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(input_ids=torch.tensor([[3, 4], [5, 6]])), ValueError, "batch size 2"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "prompt is empty"),
        (dict(input_ids=torch.tensor([3, 4])), ValueError, r"shape \(1, T\)"),
        (dict(input_ids=torch.tensor([[3.0, 4.0]])), TypeError, "LongTensor"),
        (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.5), ValueError, "max_new_tokens"),
        (dict(method="beam"), ValueError, "unknown method"),
        (dict(tree=[2, 0]), treespec.TreeShapeError, ">= 1"),
        (dict(tree="huge"), treespec.TreeShapeError, "unknown tree preset"),
        (dict(tree=[]), treespec.TreeShapeError, "autoregressive"),
        (dict(method="linear", tree=[2, 1]), treespec.TreeShapeError, "chain"),
        (dict(input_ids=torch.ones(1, 600, dtype=torch.long)), ValueError, "context"),
        (dict(max_new_tokens=600), ValueError, "lower max_new_tokens"),
        (dict(attention="magic"), ValueError, "attention backend"),
    ],
)
def test_bad_arguments(target, unrelated_draft, kwargs, error, match):
    args = dict(input_ids=P, max_new_tokens=4, tree=[2, 1])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        treespec.generate(target, unrelated_draft, args.pop("input_ids"), **args)


def test_missing_draft(target):
    with pytest.raises(ValueError, match="needs a draft model"):
        treespec.generate(target, None, P, max_new_tokens=4, method="tree")
    # the target alone needs none
    assert treespec.generate(target, None, P, max_new_tokens=4, method="autoregressive").stats.new_tokens == 4


def test_different_vocabularies(target):
    other = tiny_model(2, vocab_size=80)
    with pytest.raises(ValueError, match="different vocabulary sizes"):
        treespec.generate(target, other, P, max_new_tokens=4)


def test_unsupported_attention_implementation(target):
    draft = tiny_model(5)
    draft.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        treespec.generate(target, draft, P, max_new_tokens=4)


@pytest.mark.parametrize("kwargs,match", [(dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k")])
def test_bad_sampling_settings(target, unrelated_draft, kwargs, match):
    with pytest.raises(ValueError, match=match):
        treespec.generate(target, unrelated_draft, P, max_new_tokens=4, **kwargs)
