"""Greedy exactness on the real Qwen2.5-Coder 0.5B -> 1.5B pair (fp32, CPU).

Runs whenever both GGUF files are in the cache (`treespec-demo` fetches them), so CI on a
machine that has them checks real models too; skipped otherwise.
"""

import pytest
import torch

import treespec
from treespec.loading.models import DEFAULT_DRAFT, DEFAULT_TARGET
from treespec.loading.weights import cached_gguf

pytestmark = [
    pytest.mark.real,
    pytest.mark.skipif(
        cached_gguf(DEFAULT_TARGET) is None or cached_gguf(DEFAULT_DRAFT) is None,
        reason="the real pair is not in the cache (run treespec-demo once to fetch it)",
    ),
]

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences what a hash map is.",
]


@pytest.fixture(scope="module")
def pair():
    from treespec.loading.models import load_pair

    torch.set_num_threads(max(1, torch.get_num_threads()))
    return load_pair()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_pair_greedy_exactness(pair, prompt):
    ids = pair.tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        ref = pair.target.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32)
    for method, tree in [("tree", [2, 2, 1]), ("linear", "chain-3")]:
        out = treespec.generate(pair.target, pair.draft, ids, max_new_tokens=32, method=method, tree=tree)
        assert torch.equal(out.sequences, ref), (method, pair.tokenizer.decode(out.sequences[0, ids.shape[1]:]))
        assert out.stats.tau > 1.0  # the real draft gets some tokens accepted
