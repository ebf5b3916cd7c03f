"""Bad input gets a clear error before any work starts."""

import numpy as np
import pytest
import torch

import treespec
from treespec.engine.checks import ArgumentError
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


def test_a_draft_with_more_token_ids_than_the_target(target):
    other = tiny_model(2, vocab_size=80)  # fewer is fine (tests/engine/test_padded_vocab.py), more is not
    with pytest.raises(ValueError, match="the draft scores 80 token ids but the target only 64"):
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


@pytest.mark.parametrize("ids,bad", [([[3, 64, 5]], 64), ([[3, -1, 5]], -1), ([[3, 10**6]], 10**6)])
def test_token_ids_outside_the_vocabulary(target, unrelated_draft, ids, bad):
    with pytest.raises(ArgumentError, match=rf"token id {bad}, outside the target's vocabulary 0\.\.63") as info:
        treespec.generate(target, unrelated_draft, torch.tensor(ids), max_new_tokens=4)
    assert info.value.argument == "input_ids"


@pytest.mark.parametrize("value", [np.int64(4), np.int32(4), torch.tensor(4), torch.tensor(4, dtype=torch.int32)])
def test_integral_numpy_and_torch_scalars_are_ints(target, unrelated_draft, value):
    want = treespec.generate(target, unrelated_draft, P, max_new_tokens=4, eos_token_id=[]).sequences
    got = treespec.generate(target, unrelated_draft, P, max_new_tokens=value, eos_token_id=[]).sequences
    assert torch.equal(got, want)
    eos = int(want[0, P.shape[1] + 1])  # the second new token: generation stops there
    got = treespec.generate(target, unrelated_draft, P, max_new_tokens=4, eos_token_id=type(value)(eos) if not isinstance(value, torch.Tensor) else torch.tensor(eos))
    assert torch.equal(got.sequences, want[:, : P.shape[1] + 2])


@pytest.mark.parametrize("value", [np.float64(4.0), torch.tensor(4.0), torch.tensor([4]), True, "4"])
def test_max_new_tokens_that_is_not_a_whole_number(target, value):
    with pytest.raises(ArgumentError, match="max_new_tokens must be a whole number >= 1"):
        treespec.generate(target, None, P, max_new_tokens=value, method="autoregressive")


@pytest.mark.parametrize(
    "eos,match",
    [("</s>", r"got the string '</s>'; convert it first: tokenizer.convert_tokens_to_ids"),
     (["</s>", 2], "got the string"), (2.5, "must be a token id"), ([1, None], "must be a token id"),
     (torch.tensor(1.0), "must be a token id")],
)  # fmt: skip
def test_bad_eos_token_id(target, eos, match):
    with pytest.raises(ArgumentError, match=match):
        treespec.generate(target, None, P, max_new_tokens=4, method="autoregressive", eos_token_id=eos)


def test_eos_token_id_as_tensors_and_lists(target):
    want = treespec.generate(target, None, P, max_new_tokens=6, method="autoregressive", eos_token_id=[]).sequences
    stop = int(want[0, -3])
    first = P.shape[1] + (want[0, P.shape[1]:] == stop).nonzero()[0, 0].item() + 1
    for eos in (torch.tensor([stop, 63]), [np.int64(stop)], (stop,)):
        got = treespec.generate(target, None, P, max_new_tokens=6, method="autoregressive", eos_token_id=eos)
        assert torch.equal(got.sequences, want[:, :first])


def test_iterating_a_stream_twice(target, unrelated_draft):
    s = treespec.stream(target, unrelated_draft, P, max_new_tokens=4)
    tokens = [t for step in s for t in step]
    assert len(tokens) <= 4 and s.result is not None
    with pytest.raises(RuntimeError, match=r"iterated already .* call treespec.stream\(...\) again"):
        iter(s)  # refused at once, not at the first next()


def test_vanishing_temperature_is_the_greedy_limit(target, unrelated_draft):
    from treespec.acceptance.sampling import SamplingConfig, logits_to_probs

    logits = torch.randn(5, 64) * 30
    probs = logits_to_probs(logits, SamplingConfig(temperature=1e-40))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 64).float())
    greedy = treespec.generate(target, unrelated_draft, P, max_new_tokens=12, eos_token_id=[]).sequences
    g = torch.Generator().manual_seed(0)
    for t in (1e-40, 1e-30):
        cold = treespec.generate(target, unrelated_draft, P, max_new_tokens=12, eos_token_id=[], temperature=t, generator=g)
        assert torch.equal(cold.sequences, greedy)
