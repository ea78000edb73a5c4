"""tpserve::rms_norm, tpserve::rope, tpserve::swiglu and tpserve::cached_attention (csrc/decoder_ops.cpp) equal the
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


@pytest.mark.parametrize("shape", [(1, 1, 3072), (2, 40, 1536), (3, 18)])  # 18: 8 at a time + the rest
def test_swiglu_equals_the_formula(shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.randn(*shape, generator=g) * 4
    gate_up.view(-1)[:4] = torch.tensor([-100.0, 100.0, -88.5, 0.0])  # e^-g past fp32's range, and 0
    gate, up = gate_up.chunk(2, -1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(native_ops.swiglu(gate_up), expected, rtol=1e-6, atol=1e-6)
    gate, up = gate_up.double().chunk(2, -1)  # ATen fallback
    torch.testing.assert_close(native_ops.swiglu(gate_up.double()), F.silu(gate) * up)
    assert not native_ops.swiglu(gate_up).isnan().any()


def _attention(q, k, v, cache_k, cache_v, slots, positions, kv_index, context):
    """What the prefill graphs run: the new keys and values put into the cache rows, the rows' cache
    windows gathered, KV heads widened, SDPA with a causal-by-position mask."""
    rows = slots.unsqueeze(1).expand(positions.shape)
    cache_k.transpose(1, 2).index_put_((rows, positions), k)
    cache_v.transpose(1, 2).index_put_((rows, positions), v)
    keys = cache_k[:, :, :context].index_select(0, slots).index_select(1, kv_index)
    values = cache_v[:, :, :context].index_select(0, slots).index_select(1, kv_index)
    mask = (torch.arange(context).view(1, 1, -1) <= positions.unsqueeze(-1)).unsqueeze(1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask)
    return out.transpose(1, 2).flatten(-2)


@pytest.mark.parametrize("simd", ["native", "avx2"])
@pytest.mark.parametrize("b, length, heads, kv_index, context, d", [
    (1, 1, 9, [0, 0, 0, 1, 1, 1, 2, 2, 2], 128, 64),  # SmolLM2 at tp 1: grouped query heads
    (4, 1, 4, [0, 1, 1, 0], 64, 64),                   # replicated / overlapping KV heads, a full step
    (2, 5, 2, [0, 1], 32, 64),                         # several tokens per row
    (1, 3, 10, [0] * 5 + [1] * 5, 40, 32),             # runs longer than one group; head size 32
    (2, 2, 4, [0, 0, 1, 1], 24, 128),                  # head size 128
    (1, 2, 2, [0, 0], 16, 24),                         # head size 24: one head at a time (AVX2)
    (1, 1, 9, [0, 0, 0, 1, 1, 1, 2, 2, 2], 512, 64),  # a lone row's step at a long context: heads over threads
])
def test_cached_attention_writes_the_cache_and_equals_sdpa_over_it(b, length, heads, kv_index, context, d, simd,
                                                                   monkeypatch):
    if simd == "avx2":
        monkeypatch.setenv("TPSERVE_SIMD", "avx2")
    g = torch.Generator().manual_seed(b * 10 + heads)
    rows, kv = 5, max(kv_index) + 1
    size = max(256, context)
    cache_k, cache_v = torch.randn(rows, kv, size, d, generator=g), torch.randn(rows, kv, size, d, generator=g)
    qkv = torch.randn(b, length, (heads + 2 * kv) * d, generator=g)  # q, k, v: one projection's output
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([heads * d, kv * d, kv * d], -1))
    angles = torch.rand(b, length, 1, d, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(rows, generator=g)[:b]
    # positions: the first key, the middle, the window's last and past the window (sees all of it)
    starts = torch.tensor([0, context // 2, context - length, context + 7])[:b]
    if b == 1:
        starts = torch.tensor([37 + context // 2])
    positions = starts.unsqueeze(1) + torch.arange(length)
    kv_index = torch.tensor(kv_index)
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    expected = _attention(_rope(q, cos, sin), _rope(k, cos, sin), v, expected_k, expected_v, slots, positions,
                          kv_index, context)
    got = native_ops.cached_attention(qkv, cos, sin, cache_k, cache_v, slots, positions, kv_index, context, d ** -0.5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache_k, expected_k, rtol=1e-6, atol=1e-6)  # written in place, nothing else
    assert torch.equal(cache_v, expected_v)
    fallback_k, fallback_v = cache_k.double(), cache_v.double()  # ATen fallback
    fallback = native_ops.cached_attention(qkv.double(), cos.double(), sin.double(), fallback_k, fallback_v, slots,
                                           positions, kv_index, context, d ** -0.5)
    torch.testing.assert_close(fallback, expected.double(), rtol=1e-4, atol=1e-5)


def test_cached_attention_refuses_a_slot_or_position_outside_the_cache_or_a_qkv_of_another_width():
    cache, new, angle = torch.zeros(2, 1, 16, 64), torch.zeros(1, 1, 3 * 64), torch.zeros(1, 1, 1, 64)
    with pytest.raises(RuntimeError, match="slot out of range"):
        native_ops.cached_attention(new, angle, angle, cache, cache, torch.tensor([2]), torch.tensor([[0]]),
                                    torch.tensor([0]), 16, 0.125)
    with pytest.raises(RuntimeError, match="position out of range"):
        native_ops.cached_attention(new, angle, angle, cache, cache, torch.tensor([1]), torch.tensor([[16]]),
                                    torch.tensor([0]), 16, 0.125)
    with pytest.raises(RuntimeError, match=r"qkv must be \[b, L, 256\]"):
        native_ops.cached_attention(new, angle, angle, cache, cache, torch.tensor([1]), torch.tensor([[1]]),
                                    torch.tensor([0, 0]), 16, 0.125)
    assert not cache.any()


def test_cached_attention_traces_as_one_op_that_writes_the_cache():
    cache_k, cache_v = torch.zeros(2, 1, 16, 64), torch.zeros(2, 1, 16, 64)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache_k", cache_k)
            self.register_buffer("cache_v", cache_v)
            self.register_buffer("kv_index", torch.tensor([0]))

        def forward(self, qkv, cos, sin, slots, positions):
            return native_ops.cached_attention(qkv, cos, sin, self.cache_k, self.cache_v, slots, positions,
                                               self.kv_index, 16, 0.125)

    x, no_turn = torch.ones(1, 1, 64), (torch.ones(1, 1, 1, 64), torch.zeros(1, 1, 1, 64))
    traced = torch.jit.trace(Step(), (torch.cat((x, x, x), -1), *no_turn, torch.tensor([0]), torch.tensor([[0]])))
    assert "tpserve::cached_attention" in str(traced.graph) and "index_put" not in str(traced.graph)
    traced(torch.cat((x, 2 * x, 3 * x), -1), *no_turn, torch.tensor([1]), torch.tensor([[5]]))
    assert torch.equal(traced.cache_k[1, :, 5], 2 * x[0]) and torch.equal(traced.cache_v[1, :, 5], 3 * x[0])


@pytest.mark.parametrize("simd", ["native", "avx2"])
@pytest.mark.parametrize("window, rotary, qk_norm, d", [
    (8, 64, False, 64),    # Mistral / Gemma 3's sliding layers: the last 8 positions only
    (-1, 48, False, 64),   # Phi-3's partial rotary: the first 48 of 64 values turn
    (-1, 128, True, 128),  # Qwen3's QK-norm, head size 128
    (5, 32, True, 64),     # all at once
])
def test_cached_attention_windows_partial_rotary_and_qk_norm(window, rotary, qk_norm, d, simd, monkeypatch):
    """The families' variations against the formulas: an RMS norm over each head of q and k first, a
    rotation of the first `rotary` values, a mask keeping the last `window` positions."""
    if simd == "avx2":
        monkeypatch.setenv("TPSERVE_SIMD", "avx2")
    g = torch.Generator().manual_seed(window + rotary)
    b, length, heads, kv_index, context, rows = 2, 3, 4, [0, 0, 1, 1], 64, 4
    cache_k, cache_v = torch.randn(rows, 2, context, d, generator=g), torch.randn(rows, 2, context, d, generator=g)
    qkv = torch.randn(b, length, (heads + 4) * d, generator=g)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([heads * d, 2 * d, 2 * d], -1))
    angles = torch.rand(b, length, 1, rotary, generator=g) * 6
    cos, sin = angles.cos(), angles.sin()
    q_norm, k_norm = (torch.rand(d, generator=g) + 0.5 for _ in range(2)) if qk_norm else (None, None)
    if qk_norm:
        q, k = _rms_norm(q, q_norm, 1e-6), _rms_norm(k, k_norm, 1e-6)

    def turned(x):
        return torch.cat((_rope(x[..., :rotary], cos, sin), x[..., rotary:]), -1)

    slots, positions = torch.tensor([3, 1]), torch.tensor([[20, 21, 22], [40, 41, 42]])
    expected_k, expected_v = cache_k.clone(), cache_v.clone()
    rows_ = slots.unsqueeze(1).expand(positions.shape)
    expected_k.transpose(1, 2).index_put_((rows_, positions), turned(k))
    expected_v.transpose(1, 2).index_put_((rows_, positions), v)
    keys = expected_k.index_select(0, slots).index_select(1, torch.tensor(kv_index))
    values = expected_v.index_select(0, slots).index_select(1, torch.tensor(kv_index))
    key = torch.arange(context).view(1, 1, -1)
    seen = key <= positions.unsqueeze(-1)
    if window > 0:
        seen &= key > positions.unsqueeze(-1) - window
    expected = F.scaled_dot_product_attention(turned(q).transpose(1, 2), keys, values, attn_mask=seen.unsqueeze(1))
    expected = expected.transpose(1, 2).flatten(-2)
    got = native_ops.cached_attention(qkv, cos, sin, cache_k, cache_v, slots, positions, torch.tensor(kv_index),
                                      context, d ** -0.5, window, q_norm, k_norm, 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cache_k, expected_k, rtol=1e-5, atol=1e-5)
    fallback = native_ops.cached_attention(qkv.double(), cos.double(), sin.double(), cache_k.double(),
                                           cache_v.double(), slots, positions, torch.tensor(kv_index), context,
                                           d ** -0.5, window, None if q_norm is None else q_norm.double(),
                                           None if k_norm is None else k_norm.double(), 1e-6)  # ATen
    torch.testing.assert_close(fallback.float(), expected, rtol=1e-4, atol=1e-5)


def test_partial_rope_turns_only_the_first_values():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, 64, generator=g)
    angles = torch.rand(2, 5, 1, 48, generator=g) * 6
    expected = torch.cat((_rope(x[..., :48], angles.cos(), angles.sin()), x[..., 48:]), -1)
    torch.testing.assert_close(native_ops.rope(x, angles.cos(), angles.sin()), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native_ops.rope(x.double(), angles.cos().double(), angles.sin().double()),
                               expected.double(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (2, 40, 1536), (3, 18)])
def test_geglu_equals_the_formula(shape):
    g = torch.Generator().manual_seed(shape[-1])
    gate_up = torch.randn(*shape, generator=g) * 4
    gate_up.view(-1)[:4] = torch.tensor([-100.0, 100.0, -9.0, 0.0])
    gate, up = gate_up.chunk(2, -1)
    expected = F.gelu(gate, approximate="tanh") * up
    torch.testing.assert_close(native_ops.geglu(gate_up), expected, rtol=1e-5, atol=1e-5)
    gate, up = gate_up.double().chunk(2, -1)  # ATen fallback
    torch.testing.assert_close(native_ops.geglu(gate_up.double()), F.gelu(gate, approximate="tanh") * up)
    assert not native_ops.geglu(gate_up).isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the fast path, the ATen fallback
@pytest.mark.parametrize("window", [1, 5])
def test_a_ring_cache_attends_as_the_whole_row(window, dtype):
    """A sliding layer's ring (position p at p % ring, the first window - 1 mirrored past it) answers what
    the cache of every position answers, through a sequence many rings long: chunks of up to 3 tokens
    with padding written past the real ones (as prompt buckets do), then single tokens, in two rows."""
    g = torch.Generator().manual_seed(window)
    d, kv_index, span, context = 64, torch.tensor([0, 0, 1]), 3, 64
    ring = window + span - 1
    full = [torch.zeros(3, 2, context, d, dtype=dtype) for _ in range(2)]
    rings = [torch.zeros(3, 2, ring + window - 1, d, dtype=dtype) for _ in range(2)]
    at = {0: 0, 2: 0}  # cache row -> its next position
    pieces = [(0, 3, 2), (2, 3, 3), (0, 3, 3), (2, 2, 2), (0, 3, 1)] + [(r, 1, 1) for _ in range(25) for r in (0, 2)]
    for row, length, real in pieces:  # `real` tokens, then padding at the next positions
        qkv = torch.randn(1, length, 7 * d, generator=g, dtype=dtype)
        angles = torch.rand(1, length, 1, d, generator=g, dtype=dtype) * 6
        positions = torch.arange(at[row], at[row] + length).unsqueeze(0)
        slots = torch.tensor([row])
        expected = native_ops.cached_attention(qkv, angles.cos(), angles.sin(), *full, slots, positions, kv_index,
                                               context, 0.125, window)
        got = native_ops.cached_attention(qkv, angles.cos(), angles.sin(), *rings, slots, positions, kv_index,
                                          context, 0.125, window, ring=ring)
        torch.testing.assert_close(got[:, :real], expected[:, :real], rtol=1e-5, atol=1e-6)
        at[row] += real
    assert max(at.values()) > 4 * ring
    with pytest.raises(RuntimeError, match="a ring of 3 needs"):  # no room for 3 tokens and a window of 5
        native_ops.cached_attention(qkv.new_zeros(1, 3, 7 * d), angles.cos()[:, :1].expand(1, 3, 1, d),
                                    angles.sin()[:, :1].expand(1, 3, 1, d), *rings, slots, positions.new_zeros(1, 3),
                                    kv_index, context, 0.125, 5, ring=3)
