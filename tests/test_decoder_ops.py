"""tpserve::rms_norm, tpserve::rope and tpserve::cached_attention (csrc/decoder_ops.cpp) equal the
formulas they replace, on the fast path and on the ATen fallback (other dtypes), and trace as single
ops."""

import pytest
import torch
import torch.nn.functional as F

from tracer.runtime import native_ops


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 48, 64), (3, 5), (2, 77)])  # 77: 8 at a time + the rest
def test_rms_norm_equals_the_formula(shape):
    g = torch.Generator().manual_seed(len(shape))
    x, weight = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    torch.testing.assert_close(native_ops.rms_norm(x, weight, 1e-5), _rms_norm(x, weight, 1e-5), rtol=1e-5, atol=1e-6)
    xd = x.double()  # ATen fallback
    torch.testing.assert_close(native_ops.rms_norm(xd, weight.double(), 1e-5), _rms_norm(xd, weight.double(), 1e-5))


@pytest.mark.parametrize("b, length, heads", [(1, 1, 9), (2, 37, 3), (4, 1, 1)])
def test_rope_equals_the_formula_for_strided_inputs(b, length, heads):
    g = torch.Generator().manual_seed(heads)
    fused = torch.randn(b, length, heads * 64 + 32, generator=g)  # a projection's output, sliced: not contiguous
    x = fused[..., : heads * 64].unflatten(-1, (heads, 64))
    angles = torch.rand(b, length, 1, 64, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    torch.testing.assert_close(native_ops.rope(x, cos, sin), _rope(x, cos, sin), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native_ops.rope(x.double(), cos.double(), sin.double()),
                               _rope(x.double(), cos.double(), sin.double()))


def test_traced_as_one_op_each():
    weight = torch.randn(64)
    traced = torch.jit.trace(lambda x, c, s: native_ops.rope(native_ops.rms_norm(x, weight, 1e-6), c, s),
                             (torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64)))
    graph = str(traced.graph)
    assert "tpserve::rms_norm" in graph and "tpserve::rope" in graph and "aten::rsqrt" not in graph


def _attention(q, k, v, cache_k, cache_v, slots, positions, kv_index, context):
    """What the prefill graphs run: the new keys and values put into the cache rows, the rows' cache
    windows gathered, KV heads widened, SDPA with a causal-by-position mask."""
    rows = slots.unsqueeze(1).expand(positions.shape)
    cache_k.index_put_((rows, positions), k)
    cache_v.index_put_((rows, positions), v)
    keys = cache_k[:, :context].index_select(0, slots).index_select(2, kv_index)
    values = cache_v[:, :context].index_select(0, slots).index_select(2, kv_index)
    mask = (torch.arange(context).view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=mask)
    return out.transpose(1, 2)


@pytest.mark.parametrize("b, length, heads, kv_index, context", [
    (1, 1, 9, [0, 0, 0, 1, 1, 1, 2, 2, 2], 128),  # SmolLM2 at tp 1: grouped query heads
    (4, 1, 4, [0, 1, 1, 0], 64),                   # replicated / overlapping KV heads, a full step
    (2, 5, 2, [0, 1], 32),                         # several tokens per row
])
def test_cached_attention_writes_the_cache_and_equals_sdpa_over_it(b, length, heads, kv_index, context):
    g = torch.Generator().manual_seed(b * 10 + heads)
    rows, kv = 5, max(kv_index) + 1
    cache_k, cache_v = torch.randn(rows, 256, kv, 64, generator=g), torch.randn(rows, 256, kv, 64, generator=g)
    fused = torch.randn(b, length, (heads + 2 * kv) * 64, generator=g)  # q, k, v: one projection's output, split
    q, k, v = (t.unflatten(-1, (-1, 64)) for t in fused.split([heads * 64, kv * 64, kv * 64], -1))
    slots = torch.randperm(rows, generator=g)[:b]
    # positions: the first key, the middle, the window's last and past the window (sees all of it)
    starts = torch.tensor([0, context // 2, context - length, context + 7])[:b] if b > 1 else torch.tensor([37])
    positions = starts.unsqueeze(1) + torch.arange(length)
    kv_index = torch.tensor(kv_index)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    expected = _attention(q, k, v, expected_k, expected_v, slots, positions, kv_index, context)
    got = native_ops.cached_attention(q, k, v, cache_k, cache_v, slots, positions, kv_index, context, 64 ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(cache_k, expected_k) and torch.equal(cache_v, expected_v)  # written in place, nothing else
    fallback_k, fallback_v = cache_k.double(), cache_v.double()  # ATen fallback
    fallback = native_ops.cached_attention(q.double(), k.double(), v.double(), fallback_k, fallback_v, slots,
                                           positions, kv_index, context, 64 ** -0.5)
    torch.testing.assert_close(fallback, expected.double(), rtol=1e-4, atol=1e-5)


def test_cached_attention_refuses_a_slot_or_position_outside_the_cache():
    cache, new = torch.zeros(2, 16, 1, 64), torch.zeros(1, 1, 1, 64)
    with pytest.raises(RuntimeError, match="slot out of range"):
        native_ops.cached_attention(new, new, new, cache, cache, torch.tensor([2]), torch.tensor([[0]]),
                                    torch.tensor([0]), 16, 0.125)
    with pytest.raises(RuntimeError, match="position out of range"):
        native_ops.cached_attention(new, new, new, cache, cache, torch.tensor([1]), torch.tensor([[16]]),
                                    torch.tensor([0]), 16, 0.125)
    assert not cache.any()


def test_cached_attention_traces_as_one_op_that_writes_the_cache():
    cache_k, cache_v = torch.zeros(2, 16, 1, 64), torch.zeros(2, 16, 1, 64)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache_k", cache_k)
            self.register_buffer("cache_v", cache_v)
            self.register_buffer("kv_index", torch.tensor([0]))

        def forward(self, q, k, v, slots, positions):
            return native_ops.cached_attention(q, k, v, self.cache_k, self.cache_v, slots, positions,
                                               self.kv_index, 16, 0.125)

    x = torch.ones(1, 1, 1, 64)
    traced = torch.jit.trace(Step(), (x, x, x, torch.tensor([0]), torch.tensor([[0]])))
    assert "tpserve::cached_attention" in str(traced.graph) and "index_put" not in str(traced.graph)
    traced(x, 2 * x, 3 * x, torch.tensor([1]), torch.tensor([[5]]))
    assert torch.equal(traced.cache_k[1, 5], 2 * x[0, 0]) and torch.equal(traced.cache_v[1, 5], 3 * x[0, 0])
