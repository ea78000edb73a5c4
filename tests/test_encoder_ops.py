"""tpserve::packed_attention (csrc/encoder_ops.cpp): texts packed end to end attend each to itself
alone, as SDPA over each text would, on the fast path and the ATen fallback; bad offsets refused."""

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
                                                           ([130, 2], 30, 12, 40), ([], 4, 2, 16)])
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
