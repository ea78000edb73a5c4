"""tpserve::packed_attention (csrc/encoder_ops.cpp): texts packed end to end attend each to itself
alone, as SDPA over each text would, on the fast paths (queries grouped per head where the head size is
32, 64 or 128 and the CPU has AVX-512; one query at a time otherwise, and with a window or a bias) and
the ATen fallback; bad offsets refused."""

import pytest
import torch
import torch.nn.functional as F

from tracer.runtime import native_ops


def _per_text(q, k, v, lengths):
    """SDPA over each text on its own; tokens after the last text stay 0."""
    out, start = torch.zeros_like(q), 0
    for n in lengths:
        if n:
            heads = [t[start:start + n].transpose(0, 1) for t in (q, k, v)]
            out[start:start + n] = F.scaled_dot_product_attention(*heads).transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize("lengths, padding, heads, dim", [([5, 0, 17, 64, 1, 3], 9, 6, 32), ([1], 0, 1, 8),
                                                           ([130, 2], 30, 12, 40), ([], 4, 2, 16),
                                                           ([3, 70, 9], 5, 4, 64), ([33, 6], 0, 2, 128)])
def test_each_text_attends_to_itself_alone(lengths, padding, heads, dim):
    g = torch.Generator().manual_seed(sum(lengths) + heads)
    tokens = sum(lengths) + padding
    fused = torch.randn(tokens, 3 * heads * dim, generator=g)  # a projection's output, sliced: strided
    q, k, v = (fused[:, i * heads * dim:(i + 1) * heads * dim].unflatten(1, (heads, dim)) for i in range(3))
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    expected = _per_text(q, k, v, lengths)
    got = native_ops.packed_attention(q, k, v, offsets, dim ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    fallback = native_ops.packed_attention(q.double(), k.double(), v.double(), offsets, dim ** -0.5)  # ATen
    torch.testing.assert_close(fallback, _per_text(q.double(), k.double(), v.double(), lengths))
    # read in place (BERT's fused q / k / v) or, k and v apart by different strides, copied first
    for inputs in ((q, k.contiguous(), v), (q.contiguous(), k.contiguous(), v.contiguous())):
        torch.testing.assert_close(native_ops.packed_attention(*inputs, offsets, dim ** -0.5), expected,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("offsets, message", [([1, 4], "run from 0"), ([0, 9], "at most 8 tokens"),
                                              ([0, 5, 3], "must not decrease")])
def test_offsets_outside_the_tokens_are_refused(offsets, message):
    x = torch.randn(8, 2, 8)
    with pytest.raises(RuntimeError, match=message):
        native_ops.packed_attention(x, x, x, torch.tensor(offsets), 1.0)


def test_traced_as_one_op():
    def attend(q, k, v, lengths):
        return native_ops.packed_attention(q, k, v, torch.cat([lengths[:1] * 0, lengths.cumsum(0)]), 8 ** -0.5)

    x = torch.randn(6, 2, 8)
    traced = torch.jit.trace(attend, (x, x, x, torch.tensor([2, 3])))
    assert "tpserve::packed_attention" in str(traced.graph) and "softmax" not in str(traced.graph)
    y = torch.randn(10, 2, 8)  # another shape and other texts through the same graph
    torch.testing.assert_close(traced(y, y, y, torch.tensor([4, 1])), _per_text(y, y, y, [4, 1]))


def _per_text_masked(q, k, v, lengths, left, right, bias):
    """Each text on its own through SDPA, with an explicit mask of the window and the relative bias
    (bias[h, clamp(s - t, -M, M) + M]), key/value heads widened to the query heads."""
    per_kv = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(per_kv, 1), v.repeat_interleave(per_kv, 1)
    out, start = torch.zeros_like(q), 0
    for n in lengths:
        if n:
            t = torch.arange(n)
            distance = t.view(1, -1) - t.view(-1, 1)  # [query, key]: s - t
            allowed = torch.ones(n, n, dtype=torch.bool)
            if left >= 0:
                allowed &= distance >= -left
            if right >= 0:
                allowed &= distance <= right
            mask = torch.zeros(q.size(1), n, n, dtype=q.dtype).masked_fill(~allowed, float("-inf"))
            if bias is not None:
                most = (bias.size(1) - 1) // 2
                mask = mask + bias[:, (distance.clamp(-most, most) + most)].to(q.dtype)
            heads = [x[start:start + n].transpose(0, 1) for x in (q, k, v)]
            out[start:start + n] = F.scaled_dot_product_attention(*heads, attn_mask=mask).transpose(0, 1)
        start += n
    return out


@pytest.mark.parametrize("left, right, with_bias, kv_heads", [
    (64 // 16, 64 // 16, False, 4),  # a local layer (ModernBERT's window, scaled down)
    (-1, 0, False, 2),               # causal: a decoder as an embedder, grouped-query heads
    (-1, -1, True, 4),               # MPNet's relative position bias
    (3, 0, True, 1),                 # all at once, one key/value head
])
def test_windows_relative_bias_and_grouped_heads(left, right, with_bias, kv_heads):
    g = torch.Generator().manual_seed(left + 7 * right + kv_heads)
    lengths, padding, heads, dim = [9, 1, 0, 23, 4], 5, 4, 16
    tokens = sum(lengths) + padding
    q = torch.randn(tokens, heads, dim, generator=g)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=g) for _ in range(2))
    bias = torch.randn(heads, 2 * 6 + 1, generator=g) if with_bias else None
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    expected = _per_text_masked(q, k, v, lengths, left, right, bias)
    got = native_ops.packed_attention(q, k, v, offsets, dim ** -0.5, left, right, bias)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    fallback = native_ops.packed_attention(q.double(), k.double(), v.double(), offsets, dim ** -0.5, left, right,
                                           None if bias is None else bias.double())  # ATen
    torch.testing.assert_close(fallback, _per_text_masked(q.double(), k.double(), v.double(), lengths, left, right,
                                                          None if bias is None else bias.double()))
