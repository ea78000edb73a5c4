"""tpserve::linear (csrc/linear.cpp): the few-row weight-streaming kernels (one pass up to 8 rows;
with AVX-512 the column kernel up to 96; tile by tile up to 64 rows on 2+ threads, 24 on one) equal
F.linear; tpserve::linear_int8 / int4 (csrc/linear_quantized.cpp) equal F.linear with the dequantized
weights up to their rounding of the inputs to 16 bits (or 8, input_bits=8: the encoder's), and the
layers store their groups as those kernels read them; with `rows`, all three compute a bucket's real
rows only."""

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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 16, 17, 24, 25, 33, 40, 48, 49, 64, 65, 96, 97])
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


def test_linear_rows_do_not_depend_on_the_other_rows(simd):
    """A row's result does not depend on the rows computed with it (a generation step's tokens on the
    sequences batched with it, a text's embedding on the texts packed with it): up to 8 rows, and up to 64
    (2 threads) on the row kernels alone, each row gives exactly what it gives alone; with AVX-512, 9 to 96
    rows go to the column kernel (in chunks of 48 beyond 48), which sums in another order, and each row
    gives exactly what it gives in any other call of 9 to 96 rows."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("no AVX2: tpserve::linear leaves every shape to ATen, which promises no such thing")
    columns = simd == "avx512" and torch.backends.cpu.get_cpu_capability() == "AVX512"
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(96, 584, generator=g), torch.randn(203, 584, generator=g), torch.randn(203, generator=g)
        alone = torch.cat([native_ops.linear(x[i:i + 1], w, b) for i in range(64)])
        for rows in (2, 3, 4, 5, 7, 8) if columns else (2, 3, 4, 5, 7, 8, 9, 13, 24, 40, 64):
            assert torch.equal(native_ops.linear(x[:rows], w, b), alone[:rows]), rows
        if columns:
            many = native_ops.linear(x, w, b)
            for first, rows in ((0, 9), (0, 13), (0, 16), (0, 17), (0, 33), (5, 20), (30, 18), (16, 32), (0, 48),
                                (0, 49), (3, 64), (10, 86)):
                assert torch.equal(native_ops.linear(x[first:first + rows], w, b), many[first:first + rows]), rows
            assert not torch.equal(many[:64], alone)  # another order of sums: the test would see a mix-up
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


def _min_max_groups(w: torch.Tensor, bits: int):
    """Reference grouping, written independently of the layer's: per 32 input features, minimum m
    and step d = (max - m) / (2^bits - 1), both as float16 holds them; q unpacked, one byte each.
    Returns the kernels' arguments (native_ops.quantized_blocks) and the weights they hold."""
    rows, k = w.shape
    groups = w.view(rows, k // 32, 32)
    m = groups.amin(-1).half().float()
    d = ((groups.amax(-1) - m) / (2**bits - 1)).half().float()
    q = torch.round((groups - m[..., None]) / d[..., None]).clamp(0, 2**bits - 1).to(torch.uint8)
    assert ((q.float() * d[..., None] + m[..., None]) - groups).abs().amax() <= d.max() / 2 + 1e-3  # half a step
    args = native_ops.quantized_blocks(q.view(rows, k), d.half(), m.half(), bits)
    return args, (q.float() * d[..., None] + m[..., None]).view(rows, k), m.repeat_interleave(32, -1)


def _assert_within_input_rounding(y, x, values, minimums, bias=None, input_bits=16):
    """y equals F.linear(x, values, bias) up to the kernels' 16-bit rounding of each input group
    (csrc/quantized_blocks.h: |x - x'| <= max|x over its group| / 65024; 8 bits: / 254), bounded per
    output by sum_k |w_k - m_k| |x_k - x'_k|, and fp32's summation."""
    x2 = x.reshape(-1, x.shape[-1])
    top = x2.abs().view(x2.shape[0], -1, 32).amax(-1).repeat_interleave(32, -1)
    bound = F.linear(top, (values - minimums).abs()) / (65024 if input_bits == 16 else 254)
    expected = F.linear(x2, values, bias)
    error = (y.reshape(expected.shape) - expected).abs()
    assert (error <= bound + 1e-5 * expected.abs() + 1e-5).all(), (error - bound).max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 24, 37, 64, 65, 300])
def test_quantized_linear_equals_f_linear_with_the_dequantized_weight(bits, rows, threads, simd):
    g = torch.Generator().manual_seed(rows)
    n = 1536 if bits == 8 else 203  # 203: a last block of 11 rows
    x, w, b = torch.randn(rows, 1, 576, generator=g), torch.randn(n, 576, generator=g), torch.randn(n, generator=g)
    (q, d, m), values, minimums = _min_max_groups(w, bits)
    assert torch.equal(native_ops.quantized_values(q, d, m, bits), values)
    op = native_ops.linear_int8 if bits == 8 else native_ops.linear_int4
    for bias in (None, b):
        y = op(x, q, d, m, bias)
        assert y.shape == (rows, 1, n)
        _assert_within_input_rounding(y, x, values, minimums, bias)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_inputs_keep_16_bits(bits):
    """The bound above is not slack: inputs rounded to 8 bits per group (llama.cpp's Q8_1) break it."""
    g = torch.Generator().manual_seed(bits)
    x, w = torch.randn(4, 576, generator=g), torch.randn(64, 576, generator=g)
    (q, d, m), values, minimums = _min_max_groups(w, bits)
    groups = x.view(4, -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    coarse = (torch.round(groups / step) * step).view(4, 576)
    with pytest.raises(AssertionError):
        _assert_within_input_rounding(F.linear(coarse, values), x, values, minimums)
    _assert_within_input_rounding((native_ops.linear_int8 if bits == 8 else native_ops.linear_int4)(x, q, d, m), x,
                                  values, minimums)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 37, 300])
def test_quantized_linear_with_8_bit_inputs(bits, rows, simd):
    """input_bits=8: each group of inputs rounded to step * q (step = max|x| / 127, q in -127..127) and
    the rest exact: F.linear of those rounded inputs, to fp32's summation (the minimum's term uses the
    exact sum: the bound of the rounding holds too, and the 16-bit one does not)."""
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 576, generator=g), torch.randn(80, 576, generator=g), torch.randn(80, generator=g)
    (q, d, m), values, minimums = _min_max_groups(w, bits)
    op = native_ops.linear_int8 if bits == 8 else native_ops.linear_int4
    y = op(x, q, d, m, b, input_bits=8)
    groups = x.view(rows, -1, 32)
    step = groups.abs().amax(-1, keepdim=True) / 127
    rounded = (torch.round(groups / step) * step).view(rows, 576)
    expected = F.linear(rounded, values - minimums, b) + F.linear(x, minimums)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=2e-4)
    _assert_within_input_rounding(y, x, values, minimums, b, input_bits=8)
    with pytest.raises(AssertionError):
        _assert_within_input_rounding(y, x, values, minimums, b)
    with pytest.raises(RuntimeError, match="input_bits is 8 or 16"):
        op(x, q, d, m, b, input_bits=4)


@pytest.mark.parametrize("rows", [1, 16, 37, 400])
def test_bf16_linear_is_one_bfloat16_gemm(rows):
    """linear_bf16: x rounded to bfloat16 times the bfloat16 weights (products exact, fp32 sums), the
    sum rounded to bfloat16 (at most 2^-8 of it: 8 significant bits), then the fp32 bias."""
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 384, generator=g), torch.randn(1536, 384, generator=g), torch.randn(1536, generator=g)
    y = native_ops.linear_bf16(x, w.bfloat16(), b)
    exact = F.linear(x.bfloat16().double(), w.bfloat16().double())
    assert y.dtype == torch.float32 and y.shape == (rows, 1536)
    assert ((y - b - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * exact.abs().max()).all()
    assert (y - F.linear(x, w, b)).abs().max() > 1e-3  # really rounded: not fp32
    with pytest.raises(RuntimeError, match="weight must be bfloat16"):
        native_ops.linear_bf16(x, w, b)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "int4"])
@pytest.mark.parametrize("total, used", [(40, 37), (40, 1), (8, 5), (100, 70), (12, 0), (12, 12)])
def test_rows_compute_the_real_rows_and_zero_the_padding(kind, total, used):
    """rows = a bucket's real rows: those equal the op without rows, the padding rows come back zero."""
    g = torch.Generator().manual_seed(total + used)
    x, w, b = torch.randn(1, total, 576, generator=g), torch.randn(200, 576, generator=g), torch.randn(200, generator=g)
    if kind == "fp32":
        def op(x, rows=None):
            return native_ops.linear(x, w, b, rows)
    elif kind == "bf16":
        def op(x, rows=None):
            return native_ops.linear_bf16(x, w.bfloat16(), b, rows)
    else:
        bits = 8 if kind == "int8" else 4
        args, _, _ = _min_max_groups(w, bits)
        quantized = native_ops.linear_int8 if kind == "int8" else native_ops.linear_int4

        def op(x, rows=None):
            return quantized(x, *args, b, rows)
    y = op(x, torch.tensor([used]))
    assert y.shape == (1, total, 200)
    # bf16: the GEMM's rows run as one shape whatever `used` is; a sum may round to the next bfloat16
    rtol, atol = (1e-2, 1e-2) if kind == "bf16" else (1e-5, 1e-4)
    torch.testing.assert_close(y[:, :used], op(x[:, :used]), rtol=rtol, atol=atol)
    assert torch.equal(y[:, used:], torch.zeros(1, total - used, 200))


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_rows_equal_each_row_alone(bits, simd):
    """A step's or a prompt's rows give exactly what each gives alone: a sequence's tokens do not
    depend on the sequences batched with it (each input row is quantized alone)."""
    g = torch.Generator().manual_seed(bits)
    x, w = torch.randn(12, 576, generator=g), torch.randn(203, 576, generator=g)  # 203: a short last block
    args, _, _ = _min_max_groups(w, bits)
    op = native_ops.linear_int8 if bits == 8 else native_ops.linear_int4
    for rows in (1, 2, 3, 4, 5, 8, 12):
        together = op(x[:rows], *args)
        for i in range(rows):
            assert torch.equal(together[i], op(x[i:i + 1], *args)[0]), (rows, i)


@pytest.mark.parametrize("bits", [8, 4])
def test_a_non_finite_input_row_spoils_only_its_own_outputs(bits, simd):
    """A NaN or inf in one row (one sequence) gives non-finite outputs for that row, as F.linear
    does, and leaves the other rows exactly as they are alone."""
    g = torch.Generator().manual_seed(bits)
    x, w = torch.randn(3, 576, generator=g), torch.randn(40, 576, generator=g)
    args, _, _ = _min_max_groups(w, bits)
    op = native_ops.linear_int8 if bits == 8 else native_ops.linear_int4
    for bad in (float("nan"), float("inf")):
        x[1, 100] = bad
        y = op(x, *args)
        assert not torch.isfinite(y[1]).any()
        assert torch.equal(y[0], op(x[:1], *args)[0]) and torch.equal(y[2], op(x[2:], *args)[0])


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_layer_stores_as_the_kernel_reads_and_refuses_ragged_groups(bits):
    from tracer.parallel_layers.layers import ColumnParallelLinear

    layer = ColumnParallelLinear(64, 48, bias=True)
    weight, x = layer.weight.detach().clone(), torch.randn(3, 64)
    _, expected, _ = _min_max_groups(weight, bits)
    layer.quantize(bits)
    assert layer.qweight.dtype == torch.uint8 and tuple(layer.qweight.shape) == (48, 64 * bits // 8)
    assert layer.scale.dtype == layer.minimum.dtype == torch.float16
    stored = native_ops.quantized_values(layer.qweight, layer.scale, layer.minimum, bits)
    minimums = native_ops.quantized_values(torch.zeros_like(layer.qweight), layer.scale, layer.minimum, bits)
    if bits == 4:
        assert torch.equal(stored, expected)
    else:  # per group min-max or symmetric, whichever is closer: never worse than min-max
        worst = (stored - weight).view(48, 2, 32).abs().amax(-1)
        assert (worst <= (expected - weight).view(48, 2, 32).abs().amax(-1) + 1e-7).all()
    _assert_within_input_rounding(layer(x), x, stored, minimums, layer.bias)
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
    values = native_ops.quantized_values(layer.qweight, layer.scale, layer.minimum, 8)
    assert torch.equal(values, weight), (values - weight).abs().max()
    scale = d.squeeze(-1).half()
    _, blocked, _ = native_ops.quantized_blocks(torch.zeros(16, 64, dtype=torch.uint8), scale, scale, 8)
    assert torch.equal(layer.scale, blocked)
