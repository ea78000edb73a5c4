"""tpserve::rms_norm and tpserve::rope (csrc/decoder_ops.cpp) equal the formulas they replace, on the
fast path and on the ATen fallback (other dtypes), and trace as single ops."""

import pytest
import torch

from tracer.runtime import native_ops


def _rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


@pytest.mark.parametrize("shape", [(1, 1, 576), (2, 48, 64), (3, 5)])
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
