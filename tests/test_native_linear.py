"""tpserve::linear (csrc/linear.cpp): the few-row weight-streaming kernel (one pass up to 8 rows,
tile by tile up to 64 rows on 2+ threads, 24 on one) equals F.linear; tpserve::linear_int8 / int4
(csrc/linear_quantized.cpp) equal F.linear with the dequantized weights, and the layers store
their groups as those kernels read them; with `rows`, all three compute a bucket's real rows only."""

import pytest
import torch
import torch.nn.functional as F

from tracer.runtime import native_ops


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(params=["avx512", "avx2"])
def simd(request, monkeypatch):
    """The kernels' 16-lane path (where the CPU has AVX-512) and the 8-lane one."""
    monkeypatch.setenv("TPSERVE_SIMD", request.param)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 24, 25, 40, 64, 65])
@pytest.mark.parametrize("features", [(576, 1536), (577, 33), (7, 5)])  # K multiple of 8, ragged, tiny
def test_linear_equals_f_linear(rows, features, threads, simd):
    k, n = features
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, 1, k, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        got, want = native_ops.linear(x, w, bias), F.linear(x, w, bias)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


def test_linear_rows_equal_each_row_alone(simd):
    """Up to 64 rows (2 threads: one pass, or passes over tiles) each row gives exactly what it gives
    alone: a generation step's tokens do not depend on the sequences batched with it, nor a prompt's
    rows on the bucket's other rows."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: tpserve::linear leaves every shape to ATen, which promises no such thing")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(64, 584, generator=g), torch.randn(203, 584, generator=g), torch.randn(203, generator=g)
        alone = torch.cat([native_ops.linear(x[i:i + 1], w, b) for i in range(64)])
        for rows in (2, 3, 4, 5, 7, 8, 9, 13, 24, 40, 64):
            assert torch.equal(native_ops.linear(x[:rows], w, b), alone[:rows]), rows
    finally:
        torch.set_num_threads(before)


def test_linear_takes_strided_inputs_and_leaves_other_dtypes_to_aten():
    x = torch.randn(8, 64)[::2]  # 4 rows, not contiguous
    w = torch.randn(48, 64)
    torch.testing.assert_close(native_ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-4)
    xd, wd = x.double(), w.double()
    assert torch.equal(native_ops.linear(xd, wd), F.linear(xd, wd))


def test_traced_graph_records_the_op():
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(16, 32), requires_grad=False)

        def forward(self, x):
            return native_ops.linear(x, self.weight)

    layer = Layer()
    traced = torch.jit.trace(layer, torch.randn(2, 32))
    assert "tpserve::linear" in str(traced.graph)
    x = torch.randn(3, 32)
    torch.testing.assert_close(traced(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-4)


def _groups_of_8_bits(w: torch.Tensor):
    """Reference 8-bit grouping, written independently of the layer's: per 32 input features,
    minimum m and step d = (max - m) / 255; q in 0..255 unpacked, one byte each."""
    rows, k = w.shape
    groups = w.view(rows, k // 32, 32)
    m = groups.amin(-1)
    d = (groups.amax(-1) - m) / 255
    q = torch.round((groups - m[..., None]) / d[..., None]).clamp(0, 255).to(torch.uint8)
    return q.view(rows, k), d, m, (q.float() * d[..., None] + m[..., None]).view(rows, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 24, 40, 64, 65])
def test_linear_int8_equals_f_linear_with_the_dequantized_weight(rows, threads, simd):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 576, generator=g), torch.randn(1536, 576, generator=g), torch.randn(1536, generator=g)
    q, d, m, dequantized = _groups_of_8_bits(w)
    assert (dequantized - w).abs().max() <= d.max() / 2 + 1e-6  # rounding: half a step at most
    for bias in (None, b):
        torch.testing.assert_close(native_ops.linear_int8(x, q, d, m, bias), F.linear(x, dequantized, bias),
                                   rtol=1e-5, atol=2e-4)


def _q4_1(w: torch.Tensor):
    """Reference 4-bit grouping, written independently of the layer's: per 32 input features,
    minimum m and step d = (max - m) / 15; packed bytes hold q[j] (low nibble) and q[j + 16]."""
    rows, k = w.shape
    groups = w.view(rows, k // 32, 32)
    m = groups.amin(-1)
    d = (groups.amax(-1) - m) / 15
    q = torch.round((groups - m[..., None]) / d[..., None]).clamp(0, 15).to(torch.uint8)
    packed = (q[..., :16] | (q[..., 16:] << 4)).reshape(rows, k // 2)
    return packed, d, m, (q.float() * d[..., None] + m[..., None]).view(rows, k)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 24, 25, 64, 65])
def test_linear_int4_equals_f_linear_with_the_dequantized_weight(rows, threads, simd):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1, 576, generator=g), torch.randn(200, 576, generator=g), torch.randn(200, generator=g)
    packed, d, m, dequantized = _q4_1(w)
    assert (dequantized - w).abs().max() <= d.max() / 2 + 1e-6  # rounding: half a step at most
    for bias in (None, b):
        torch.testing.assert_close(native_ops.linear_int4(x, packed, d, m, bias), F.linear(x, dequantized, bias),
                                   rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("kind", ["fp32", "int8", "int4"])
@pytest.mark.parametrize("total, used", [(40, 37), (40, 1), (8, 5), (100, 70), (12, 0), (12, 12)])
def test_rows_compute_the_real_rows_and_zero_the_padding(kind, total, used):
    """rows = a bucket's real rows: those equal the op without rows, the padding rows come back zero
    (the streaming kernels up to 64 rows, ATen's GEMM beyond)."""
    g = torch.Generator().manual_seed(total + used)
    x, w, b = torch.randn(1, total, 576, generator=g), torch.randn(200, 576, generator=g), torch.randn(200, generator=g)
    if kind == "fp32":
        def op(x, rows=None):
            return native_ops.linear(x, w, b, rows)
    else:
        q, d, m, _ = (_groups_of_8_bits if kind == "int8" else _q4_1)(w)
        quantized = native_ops.linear_int8 if kind == "int8" else native_ops.linear_int4

        def op(x, rows=None):
            return quantized(x, q, d, m, b, rows)
    y = op(x, torch.tensor([used]))
    assert y.shape == (1, total, 200)
    torch.testing.assert_close(y[:, :used], op(x[:, :used]), rtol=1e-5, atol=1e-4)
    assert torch.equal(y[:, used:], torch.zeros(1, total - used, 200))


@pytest.mark.parametrize("bits, reference", [(8, _groups_of_8_bits), (4, _q4_1)])
def test_quantized_rows_equal_each_row_alone(bits, reference, simd):
    """A generation step's rows (up to 8) give exactly what each gives alone: a sequence's tokens
    do not depend on the sequences batched with it."""
    g = torch.Generator().manual_seed(bits)
    x, w = torch.randn(8, 576, generator=g), torch.randn(203, 576, generator=g)  # 203: ragged weight-row blocks
    q, d, m, _ = reference(w)
    op = native_ops.linear_int8 if bits == 8 else native_ops.linear_int4
    for rows in range(1, 9):
        together = op(x[:rows], q, d, m)
        for i in range(rows):
            assert torch.equal(together[i], op(x[i:i + 1], q, d, m)[0]), (rows, i)


@pytest.mark.parametrize("bits, reference, width", [(8, _groups_of_8_bits, 64), (4, _q4_1, 32)])
def test_quantized_layer_stores_as_the_kernel_reads_and_refuses_ragged_groups(bits, reference, width):
    from tracer.parallel_layers.layers import ColumnParallelLinear

    layer = ColumnParallelLinear(64, 48, bias=True)
    weight, x = layer.weight.detach().clone(), torch.randn(3, 64)
    _, _, _, expected = reference(weight)
    layer.quantize(bits)
    assert layer.qweight.dtype == torch.uint8 and tuple(layer.qweight.shape) == (48, width)
    q = layer.qweight.view(48, 2, width // 2)
    if bits == 4:
        q = torch.cat([q & 15, q >> 4], -1)
    stored = (q.float() * layer.scale[..., None] + layer.minimum[..., None]).view(48, 64)
    if bits == 4:
        assert torch.equal(stored, expected)
    else:  # per group min-max or symmetric, whichever is closer: never worse than min-max
        worst = (stored - weight).view(48, 2, 32).abs().amax(-1)
        assert (worst <= (expected - weight).view(48, 2, 32).abs().amax(-1) + 1e-7).all()
    torch.testing.assert_close(layer(x), F.linear(x, stored, layer.bias), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 32"):
        ColumnParallelLinear(48, 16).quantize(bits)


def test_int8_groups_hold_a_symmetric_q8_0_block_exactly():
    """A group on a symmetric grid (w = d * q, q in -127..127: GGUF's Q8_0) is stored as such
    (scale d, minimum -128 d), where a min-max grid would round it; min-max groups stay min-max."""
    from tracer.parallel_layers.layers import ColumnParallelLinear

    g = torch.Generator().manual_seed(0)
    d = (torch.rand(16, 2, 1, generator=g) * 0.01 + 0.001).half().float()  # Q8_0's scales are fp16
    q = torch.randint(-126, 127, (16, 2, 32), generator=g).float()
    q[..., 0] = 127  # the block's largest magnitude, as Q8_0's quantizer makes it
    q[..., 1] = -50
    layer = ColumnParallelLinear(64, 16, bias=False)
    weight = (q * d).view(16, 64)
    layer.weight.data.copy_(weight)
    layer.quantize(8)
    values = (layer.qweight.view(16, 2, 32).float() * layer.scale[..., None] + layer.minimum[..., None]).view(16, 64)
    assert torch.equal(values, weight), (values - weight).abs().max()
    assert torch.equal(layer.scale, d.squeeze(-1))
