"""construct and aps_conv2d against the einsum definition, on every CPU backend."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import apsfast
from apsfast import _backends
from conftest import assert_close

# (C_out, C_in, kernel, c_o, c_i): odd sizes, 1x1, non-square and kernel-free (linear) weights.
SHAPES = {
    "3x3": (8, 6, (3, 3), 5, 4),
    "odd": (7, 5, (3, 1), 3, 5),
    "1x1": (12, 9, (1, 1), 12, 2),
    "wide_out": (4, 16, (2, 2), 3, 11),
    "linear": (6, 10, (), 4, 7),
    "depthwise": (9, 1, (3, 3), 5, None),
}


def einsum_kernel(weight, P, Q):
    """Paper eq. 2 verbatim, with identities standing in for missing transforms."""
    P = torch.eye(weight.shape[0], dtype=weight.dtype) if P is None else P
    Q = torch.eye(weight.shape[1], dtype=weight.dtype) if Q is None else Q
    return torch.einsum("ao,bi,ab...->oi...", P, Q, weight)


def make(shape_id, dtype=torch.float64, use_P=True, use_Q=True, seed=0):
    C_out, C_in, kernel, c_o, c_i = SHAPES[shape_id]
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(C_out, C_in, *kernel, generator=g, dtype=torch.float64).to(dtype)
    P = torch.randn(C_out, c_o, generator=g, dtype=torch.float64).to(dtype) if use_P else None
    Q = torch.randn(C_in, c_i, generator=g, dtype=torch.float64).to(dtype) if use_Q and c_i else None
    return weight, P, Q


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("sides", ["PQ", "P", "Q", "none"])
def test_construct_values_float64(backend, shape_id, sides):
    weight, P, Q = make(shape_id, use_P="P" in sides, use_Q="Q" in sides)
    assert_close(apsfast.construct(weight, P, Q), einsum_kernel(weight, P, Q))


def standard_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape).stride()


@pytest.mark.parametrize("shape_id", SHAPES)
def test_outputs_have_standard_strides(backend, shape_id):
    # conv2d reads a kernel's memory format from its strides, unit dims included: a 1x1 kernel
    # with einsum's strides (c_i, 1, c_i, c_i) reads as channels_last, and PyTorch's CPU conv
    # backward at stride 2 then corrupts the heap (see test_nn's regression test).
    weight, P, Q = make(shape_id)
    weight.requires_grad_()
    out = apsfast.construct(weight, P, Q)
    assert out.stride() == standard_strides(out.shape)
    grads = torch.ops.apsfast.construct_backward(torch.ones_like(out), weight.detach(), P, Q, True,
                                                 P is not None, Q is not None)
    assert [g.stride() for g in grads] == [standard_strides(g.shape) for g in grads]
    (grouped,) = apsfast.construct_grouped([weight], [P], [Q])
    assert grouped.stride() == standard_strides(grouped.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape_id", ["3x3", "odd", "1x1"])
def test_construct_values_low_precision(backend, dtype, shape_id):
    weight, P, Q = make(shape_id, dtype)
    out = apsfast.construct(weight, P, Q)
    assert out.dtype == dtype
    expected = einsum_kernel(weight.double(), P.double(), Q.double())
    if dtype == torch.bfloat16:
        # At most twice the error of torch's own bf16 einsum against float64.
        err_torch = (einsum_kernel(weight, P, Q).double() - expected).abs().max()
        assert (out.double() - expected).abs().max() <= 2 * err_torch + 1e-6
    else:
        assert_close(out, expected)


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("sides", ["PQ", "P", "Q"])
def test_construct_gradcheck(backend, shape_id, sides):
    weight, P, Q = make(shape_id, use_P="P" in sides, use_Q="Q" in sides)
    inputs = [t.requires_grad_() if t is not None else None for t in (weight, P, Q)]
    assert torch.autograd.gradcheck(apsfast.construct, tuple(inputs))


@pytest.mark.parametrize("shape_id", ["3x3", "odd", "linear"])
def test_construct_grads_match_einsum(backend, shape_id):
    weight, P, Q = make(shape_id)
    grad = torch.randn(einsum_kernel(weight, P, Q).shape, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (weight, P, Q)]
    ours = torch.autograd.grad(apsfast.construct(*leaves), leaves, grad)
    ref_leaves = [t.clone().requires_grad_() for t in (weight, P, Q)]
    theirs = torch.autograd.grad(einsum_kernel(*ref_leaves), ref_leaves, grad)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_construct_skips_unneeded_grads(backend):
    weight, P, Q = make("3x3")
    weight.requires_grad_()
    apsfast.construct(weight, P, Q).sum().backward()
    assert weight.grad is not None and P.grad is None and Q.grad is None


def test_construct_non_contiguous_inputs(backend):
    weight, P, Q = make("3x3")
    # Same values, other memory layouts: channels_last weight, transposed P and Q.
    weight_cl = weight.to(memory_format=torch.channels_last)
    P_t = P.t().contiguous().t()
    Q_sliced = torch.stack([Q, Q], dim=2)[:, :, 0]
    assert not (weight_cl.is_contiguous() or P_t.is_contiguous() or Q_sliced.is_contiguous())
    assert_close(apsfast.construct(weight_cl, P_t, Q_sliced), einsum_kernel(weight, P, Q))


def test_construct_opcheck(backend):
    weight, P, Q = make("odd")
    for args in ((weight, P, Q), (weight, None, Q), (weight, P, None)):
        args = tuple(t.requires_grad_() if t is not None else None for t in args)
        torch.library.opcheck(torch.ops.apsfast.construct.default, args)


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), 1)])
def test_aps_conv2d_matches_conv_with_einsum_kernel(backend, stride, padding, dilation):
    weight, P, Q = make("3x3")
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    x = torch.randn(2, Q.shape[1], 9, 7, dtype=torch.float64)
    out = apsfast.aps_conv2d(x, weight, P, Q, bias, stride, padding, dilation)
    expected = F.conv2d(x, einsum_kernel(weight, P, Q), bias @ P, stride, padding, dilation)
    assert_close(out, expected)


def test_aps_conv2d_depthwise(backend):
    weight, P, _ = make("depthwise")
    x = torch.randn(3, P.shape[1], 6, 6, dtype=torch.float64).to(memory_format=torch.channels_last)
    out = apsfast.aps_conv2d(x, weight, P, None, padding=1, groups=P.shape[1])
    assert_close(out, F.conv2d(x, einsum_kernel(weight, P, None), padding=1, groups=P.shape[1]))


def test_aps_conv2d_gradcheck(backend):
    weight, P, Q = make("odd")
    x = torch.randn(2, Q.shape[1], 5, 4, dtype=torch.float64)
    bias = torch.randn(weight.shape[0], dtype=torch.float64)
    args = tuple(t.requires_grad_() for t in (x, weight, P, Q, bias))
    assert torch.autograd.gradcheck(lambda *a: apsfast.aps_conv2d(*a, padding=1), args)


def test_compile_fullgraph(backend):
    weight, P, Q = make("3x3", torch.float32)
    x = torch.randn(2, Q.shape[1], 6, 6)
    fn = torch.compile(lambda x: apsfast.aps_conv2d(x, weight, P, Q, padding=1).relu(),
                       backend="aot_eager", fullgraph=True)
    assert_close(fn(x), apsfast.aps_conv2d(x, weight, P, Q, padding=1).relu())


# --- errors: each names the argument, the value got and the value expected ------------------

def test_construct_errors():
    weight, P, Q = make("3x3", torch.float32)
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        apsfast.construct([1.0], P, Q)
    with pytest.raises(TypeError, match=r"weight must have a floating-point dtype, got torch.int64"):
        apsfast.construct(weight.long(), P, Q)
    with pytest.raises(ValueError, match=r"weight must have at least 2 dims .*got shape \(8,\)"):
        apsfast.construct(weight[:, 0, 0, 0], P, Q)
    with pytest.raises(ValueError, match=r"P must have 2 dims \(C_out, c_o\), got shape \(8,\)"):
        apsfast.construct(weight, P[:, 0], Q)
    with pytest.raises(ValueError, match=r"P.shape\[0\] must be 8 .*got 7"):
        apsfast.construct(weight, P[:7], Q)
    with pytest.raises(ValueError, match=r"Q.shape\[0\] must be 6 .*got 5"):
        apsfast.construct(weight, P, Q[:5])
    with pytest.raises(TypeError, match=r"Q has dtype torch.float64, expected torch.float32"):
        apsfast.construct(weight, P, Q.double())
    with pytest.raises(ValueError, match=r"P must have at least one column"):
        apsfast.construct(weight, P[:, :0], Q)


def test_aps_conv2d_errors():
    weight, P, Q = make("3x3", torch.float32)
    x = torch.randn(2, Q.shape[1], 5, 5)
    with pytest.raises(ValueError, match=r"input.shape\[1\] must be 4 .*got 5"):
        apsfast.aps_conv2d(torch.randn(2, 5, 5, 5), weight, P, Q)
    with pytest.raises(ValueError, match=r"input must have 4 dims"):
        apsfast.aps_conv2d(x[0], weight, P, Q)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64, expected torch.float32"):
        apsfast.aps_conv2d(x.double(), weight, P, Q)
    with pytest.raises(ValueError, match=r"bias.shape\[0\] must be 8 .*got 5"):
        apsfast.aps_conv2d(x, weight, P, Q, bias=torch.zeros(5))
    with pytest.raises(ValueError, match=r"groups=2 must divide the candidate output width c_o=5"):
        apsfast.aps_conv2d(torch.randn(2, 8, 5, 5), weight, P, Q, groups=2)
    with pytest.raises(ValueError, match=r"weight must have 4 dims"):
        apsfast.aps_conv2d(x, weight[..., 0], P, Q)


def test_forced_backend_never_falls_back(monkeypatch):
    weight, P, Q = make("3x3", torch.float32)
    monkeypatch.setenv(_backends.ENV_VAR, "cuda")  # not built without a CUDA torch
    with pytest.raises(_backends.BackendUnavailable, match="APSFAST_BACKEND=cuda"):
        apsfast.construct(weight, P, Q)
    monkeypatch.setenv(_backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="APSFAST_BACKEND must be one of"):
        apsfast.construct(weight, P, Q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_builds_in_float32_and_convs_in_low_precision(backend, dtype):
    weight, P, Q = make("3x3", torch.float32)
    x = torch.randn(2, Q.shape[1], 6, 6).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        kernel = apsfast.construct(weight.to(dtype), P.to(dtype), Q.to(dtype))
        out = apsfast.aps_conv2d(x, weight, P, Q, padding=1)
    # The construction accumulates in float32 whatever the inputs' dtype; the conv follows
    # autocast's dtype.
    assert kernel.dtype == torch.float32
    assert out.dtype == dtype
    expected = F.conv2d(x, einsum_kernel(weight, P, Q), padding=1)
    err_torch = (F.conv2d(x.to(dtype), einsum_kernel(weight, P, Q).to(dtype), padding=1).float() - expected).abs().max()
    assert (out.float() - expected).abs().max() <= 2 * err_torch + 1e-6
