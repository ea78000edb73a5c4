"""tpserve::linear (csrc/linear.cpp): the few-row weight-streaming kernel (one pass up to 8 rows,
tile by tile up to 64 rows on 2+ threads, 24 on one) equals F.linear."""

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


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 24, 25, 40, 64, 65])
@pytest.mark.parametrize("features", [(576, 1536), (577, 33), (7, 5)])  # K multiple of 8, ragged, tiny
def test_linear_equals_f_linear(rows, features, threads):
    k, n = features
    g = torch.Generator().manual_seed(rows * 1000 + k)
    x = torch.randn(rows, 1, k, generator=g)
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (None, b):
        got, want = native_ops.linear(x, w, bias), F.linear(x, w, bias)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


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


@pytest.mark.parametrize("rows", [1, 3, 4, 8, 9, 40, 64])
def test_linear_int8_equals_f_linear_with_the_dequantized_weight(rows, threads):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 577, generator=g), torch.randn(1536, 577, generator=g), torch.randn(1536, generator=g)
    scale = w.abs().amax(dim=1) / 127
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    dequantized = q.float() * scale[:, None]
    assert (dequantized - w).abs().max() <= scale.max() / 2 + 1e-6  # rounding: half a step at most
    for bias in (None, b):
        torch.testing.assert_close(native_ops.linear_int8(x, q, scale, bias), F.linear(x, dequantized, bias),
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
def test_linear_int4_equals_f_linear_with_the_dequantized_weight(rows, threads):
    g = torch.Generator().manual_seed(rows)
    x, w, b = torch.randn(rows, 1, 576, generator=g), torch.randn(200, 576, generator=g), torch.randn(200, generator=g)
    packed, d, m, dequantized = _q4_1(w)
    assert (dequantized - w).abs().max() <= d.max() / 2 + 1e-6  # rounding: half a step at most
    for bias in (None, b):
        torch.testing.assert_close(native_ops.linear_int4(x, packed, d, m, bias), F.linear(x, dequantized, bias),
                                   rtol=1e-5, atol=2e-4)


def test_int4_layer_packs_as_the_kernel_reads_and_refuses_ragged_groups():
    from tracer.parallel_layers.layers import ColumnParallelLinear

    layer = ColumnParallelLinear(64, 48, bias=True)
    x = torch.randn(3, 64)
    _, _, _, dequantized = _q4_1(layer.weight.detach())
    layer.quantize_int4()
    assert layer.qweight.dtype == torch.uint8 and tuple(layer.qweight.shape) == (48, 32)
    torch.testing.assert_close(layer(x), F.linear(x, dequantized, layer.bias), rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="divisible by 32"):
        ColumnParallelLinear(48, 16).quantize_int4()
