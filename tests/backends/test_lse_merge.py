"""The cascade split of tree attention (treespec/backends/flash.py) against a dense reference, on the CPU:
prefix part + masked block part, merged by log-sum-exp, equals one masked softmax over all keys."""

import pytest
import torch

from treespec.backends.flash import (
    TreeAttentionMeta,
    block_attention,
    merge_attention,
    reference_prefix_attention,
    tree_attention_forward,
)


def dense_attention(q, k, v, visible, scale):
    """float64 reference. q (H, n, Dh); k, v (H_kv, S, Dh); visible (n, S) -> out (H, n, Dh), lse (H, n)."""
    h, hk = q.shape[0], k.shape[0]
    k = k.double().repeat_interleave(h // hk, dim=0)  # (H, S, Dh), query head h reads kv head h // g
    v = v.double().repeat_interleave(h // hk, dim=0)
    scores = (q.double() @ k.transpose(1, 2)) * scale  # (H, n, S)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with nothing visible -> 0
    return p @ v, lse


def random_case(gen, h, hk, n, s_pre, s_blk, dh=16):
    q = torch.randn(h, n, dh, generator=gen)
    k = torch.randn(hk, s_pre + s_blk, dh, generator=gen)
    v = torch.randn(hk, s_pre + s_blk, dh, generator=gen)
    block_mask = torch.rand(n, s_blk, generator=gen) < 0.5
    block_mask[:, -n:] |= torch.eye(n, dtype=torch.bool)  # every token sees itself
    return q, k, v, block_mask


@pytest.mark.parametrize("h,hk", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("s_pre", [0, 1, 37])
def test_merge_of_prefix_and_block_equals_dense(h, hk, s_pre):
    gen = torch.Generator().manual_seed(h * 100 + s_pre)
    n, s_blk, scale = 5, 9, 0.3
    q, k, v, block_mask = random_case(gen, h, hk, n, s_pre, s_blk)
    visible = torch.cat([torch.ones(n, s_pre, dtype=torch.bool), block_mask], dim=1)  # (n, S)
    ref_out, ref_lse = dense_attention(q, k, v, visible, scale)

    pre_out, pre_lse = dense_attention(q, k[:, :s_pre], v[:, :s_pre], torch.ones(n, s_pre, dtype=torch.bool), scale)
    bias = torch.zeros(n, s_blk).masked_fill(~block_mask, float("-inf"))
    blk_out, blk_lse = block_attention(q, k[:, s_pre:], v[:, s_pre:], bias, scale)
    out, lse = merge_attention(pre_out.float(), pre_lse.float(), blk_out, blk_lse)

    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_block_attention_matches_dense_and_grouped_bias_form():
    gen = torch.Generator().manual_seed(3)
    q, k, v, block_mask = random_case(gen, 6, 2, 7, 0, 11)
    bias = torch.zeros(7, 11).masked_fill(~block_mask, float("-inf"))
    ref_out, ref_lse = dense_attention(q, k, v, block_mask, 0.25)
    for b in (bias, bias.repeat(3, 1)):  # (n, s) and the precomputed (g*n, s) form
        out, lse = block_attention(q, k, v, b, 0.25)
        torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


def test_empty_parts_get_zero_weight():
    gen = torch.Generator().manual_seed(4)
    out_a, out_b = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
    lse_b = torch.randn(3, 2, generator=gen)
    empty = torch.full((3, 2), float("-inf"))
    out, lse = merge_attention(out_a, empty, out_b, lse_b)  # prefix empty: the block alone
    torch.testing.assert_close(out, out_b)
    torch.testing.assert_close(lse, lse_b)
    out, lse = merge_attention(out_a, empty, out_b, empty)  # nothing visible: 0, -inf, no NaN
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_fully_masked_block_rows_are_zero_not_nan():
    q, k, v = torch.randn(2, 3, 4), torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    bias = torch.zeros(3, 5)
    bias[1] = float("-inf")
    out, lse = block_attention(q, k, v, bias, 0.5)
    assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros(2, 4)) and torch.isneginf(lse[:, 1]).all()


def test_reference_prefix_follows_flash_conventions():
    """+inf lse for a row with no keys (what flash-attn returns), shapes (1, n, H, Dh) / (1, H, n)."""
    q = torch.randn(1, 3, 4, 8)
    kc, vc = torch.randn(1, 10, 2, 8), torch.randn(1, 10, 2, 8)
    out, lse = reference_prefix_attention(q, kc, vc, torch.tensor([0], dtype=torch.int32), 0.3)
    assert out.shape == (1, 3, 4, 8) and lse.shape == (1, 4, 3)
    assert torch.isposinf(lse).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("committed", [0, 1, 20])
def test_attention_function_equals_dense_masked_attention(committed):
    """The registered attention function on cache-shaped inputs (1, H_kv, S_max, Dh), with the
    block at slots committed .. committed + s - 1 and garbage after it."""
    gen = torch.Generator().manual_seed(committed)
    h, hk, n, s, dh, s_max, scale = 6, 2, 4, 7, 8, 40, 0.35
    query = torch.randn(1, h, n, dh, generator=gen)
    key, value = torch.randn(1, hk, s_max, dh, generator=gen), torch.randn(1, hk, s_max, dh, generator=gen)
    block_mask = torch.rand(n, s, generator=gen) < 0.5
    block_mask[:, -n:] |= torch.eye(n, dtype=torch.bool)
    meta = TreeAttentionMeta(
        cache_seqlens=torch.tensor([committed], dtype=torch.int32),
        block_index=committed + torch.arange(s),
        bias=torch.zeros(n, s).masked_fill(~block_mask, float("-inf")).repeat(h // hk, 1),
        prefix_attention=reference_prefix_attention,
    )
    out, weights = tree_attention_forward(None, query, key, value, None, scaling=scale, tree_attention=meta)
    assert weights is None and out.shape == (1, n, h, dh)
    visible = torch.zeros(n, s_max, dtype=torch.bool)
    visible[:, :committed] = True
    visible[:, committed : committed + s] = block_mask
    ref, _ = dense_attention(query[0], key[0], value[0], visible, scale)  # (H, n, Dh)
    torch.testing.assert_close(out[0].transpose(0, 1).double(), ref, atol=1e-5, rtol=1e-5)


def test_attention_function_without_metadata_says_how_to_use_it():
    with pytest.raises(RuntimeError, match="FlashBackend"):
        tree_attention_forward(None, torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4), None)


@pytest.mark.parametrize("s_pre", [0, 1, 23])
def test_one_softmax_fold_equals_merge(s_pre):
    """block_attention_with_prefix (the per-layer fast path) equals block + merge_attention."""
    from treespec.backends.flash import block_attention_with_prefix

    gen = torch.Generator().manual_seed(7 + s_pre)
    h, hk, n, s_blk, scale = 6, 2, 5, 8, 0.3
    q, k, v, block_mask = random_case(gen, h, hk, n, s_pre, s_blk)
    pre_out, pre_lse = dense_attention(q, k[:, :s_pre], v[:, :s_pre], torch.ones(n, s_pre, dtype=torch.bool), scale)
    bias = torch.zeros(n, s_blk).masked_fill(~block_mask, float("-inf"))
    blk_out, blk_lse = block_attention(q, k[:, s_pre:], v[:, s_pre:], bias, scale)
    ref, _ = merge_attention(pre_out.float(), pre_lse.float(), blk_out, blk_lse)
    got = block_attention_with_prefix(q, k[:, s_pre:], v[:, s_pre:], bias.repeat(h // hk, 1), scale,
                                      pre_out.nan_to_num(0.0).float(), pre_lse.float())
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
