"""apsfast::construct (+ construct_backward) and aps_conv2d: every backend against paper eq. 2
(the einsum, in float64), with gradients, gradcheck, opcheck, torch.compile, autocast,
argument errors and hypothesis properties."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import apsfast
from apsfast import reference
from cases import (nan_filled_empty, ALL, COMPILE, CPU, CPU_FAST, CUDA, NO_INTERPRETER, TRITON_ONLY, assert_matches, einsum_kernel, exact,
                   kernel_strides, meta_weight, randn, standard_strides, to, transform, with_layout)
from conftest import assert_close

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def make(shape, sides="PQ", layout="contiguous", dtype=F64, seed=0):
    """weight, P, Q of ``shape = (C_out, C_in, kernel, c_o, c_i)`` on the CPU; ``sides`` says
    which transforms exist (``c_i = None``: no Q, as for a depthwise conv)."""
    C_out, C_in, kernel, c_o, c_i = shape
    weight = meta_weight(C_out, C_in, kernel, seed, dtype)
    P = transform(C_out, c_o, seed + 1, dtype) if "P" in sides else None
    Q = transform(C_in, c_i, seed + 2, dtype) if "Q" in sides and c_i else None
    return with_layout(weight, P, Q, layout)


def case(name, shape, sides="PQ", layout="contiguous", dtype=F64):
    return pytest.param(shape, sides, layout, dtype, id=name)


# (C_out, C_in, kernel, c_o, c_i): odd sizes, both product orders, 1×1 and kernel-free (linear)
# weights, sizes over one 64-wide tile, every transform side, every layout and dtype.
CONSTRUCT = [
    case("3x3", (8, 6, (3, 3), 5, 4)),
    case("odd-P", (7, 5, (3, 1), 3, 5), "P"),
    case("odd-Q", (7, 5, (3, 1), 3, 5), "Q"),
    case("1x1-identity", (12, 9, (1, 1), 12, 2), "none"),
    case("1x1", (12, 9, (1, 1), 12, 2)),
    case("wide-out-Q-first", (4, 16, (2, 2), 3, 11)),
    case("linear", (6, 10, (), 4, 7)),
    case("depthwise", (9, 1, (3, 3), 5, None), "P"),
    case("linear-one-output-f32", (3, 40, (), 1, None), "P", dtype=F32),
    case("3x3-multi-tile-transposed-f32", (37, 21, (3, 3), 19, 13), layout="transposed", dtype=F32),
    case("3x3-strided-f32", (8, 6, (3, 3), 5, 4), layout="strided", dtype=F32),
    case("1x3-channels_last-f32", (9, 17, (1, 3), 9, 5), layout="channels_last", dtype=F32),
    case("5x5-thin-P-f32", (16, 3, (5, 5), 11, 3), "P", dtype=F32),
    case("1x1-multi-tile-f32", (72, 130, (1, 1), 65, 17), dtype=F32),
    # Above the C++ kernel's batched input-mode size (64k multiply-adds per GEMM): its copy path.
    case("3x3-large-in-mode-f32", (40, 100, (3, 3), 30, 80), dtype=F32),
    case("linear-multi-tile-Q-transposed-f32", (70, 90, (), 5, 80), "Q", "transposed", F32),
    case("3x3-multi-tile-bf16", (37, 21, (3, 3), 19, 13), dtype=BF16),
    case("linear-transposed-bf16", (70, 90, (), 5, 80), layout="transposed", dtype=BF16),
    case("1x1-P-bf16", (20, 70, (1, 1), 7, 66), "P", dtype=BF16),
    case("3x3-f16", (8, 6, (3, 3), 5, 4), dtype=F16),
    case("5x5-multi-tile-strided-f16", (33, 70, (5, 5), 31, 66), layout="strided", dtype=F16),
]


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("shape,sides,layout,dtype", CONSTRUCT)
def test_construct_values(target, shape, sides, layout, dtype):
    target.require(dtype)
    weight, P, Q = make(shape, sides, layout, dtype)
    out = apsfast.construct(*to(target.device, weight, P, Q))
    assert out.device.type == target.device.type and out.dtype == dtype
    # conv2d reads a kernel's memory format from its strides, unit dims included: a 1×1 kernel
    # with einsum's strides (c_i, 1, c_i, c_i) reads as channels_last, and PyTorch's CPU conv
    # backward at stride 2 then corrupts the heap (see test_nn's regression test). A
    # channels_last meta-weight with a spatial kernel gives a channels_last kernel.
    assert out.stride() == kernel_strides(out.shape, weight)
    assert_matches(out, einsum_kernel(*exact(weight, P, Q)), reference.construct(weight, P, Q))


# (shape, layout, gradients wanted, dtype)
BACKWARD = [
    pytest.param((8, 6, (3, 3), 5, 4), "contiguous", "WPQ", F64, id="3x3-WPQ"),
    pytest.param((7, 5, (3, 1), 3, 5), "contiguous", "W", F64, id="odd-W"),
    pytest.param((6, 10, (), 4, 7), "contiguous", "P", F64, id="linear-P"),
    pytest.param((9, 1, (3, 3), 5, None), "contiguous", "WP", F64, id="depthwise-WP"),
    pytest.param((9, 17, (1, 3), 9, 5), "transposed", "Q", F32, id="1x3-transposed-Q-f32"),
    pytest.param((37, 21, (3, 3), 19, 13), "channels_last", "WPQ", F32, id="3x3-multi-tile-channels_last-WPQ-f32"),
    pytest.param((72, 130, (1, 1), 65, 17), "contiguous", "WP", F32, id="1x1-multi-tile-WP-f32"),
    pytest.param((40, 100, (3, 3), 30, 80), "contiguous", "WPQ", F64, id="3x3-large-in-mode-WPQ"),
    # A tie of the two orders (square meta-weight, c_o = c_i): dW takes Q first, its input mode
    # over 64k multiply-adds per GEMM but not last (the C++ kernel batches it).
    pytest.param((100, 100, (3, 3), 80, 80), "contiguous", "W", F32, id="3x3-tie-W-f32"),
    pytest.param((8, 6, (3, 3), 5, 4), "contiguous", "WPQ", BF16, id="3x3-WPQ-bf16"),
    pytest.param((33, 70, (5, 5), 31, 66), "transposed", "W", BF16, id="5x5-multi-tile-transposed-W-bf16"),
]


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("shape,layout,need,dtype", BACKWARD)
def test_construct_backward(target, scoped, shape, layout, need, dtype):
    target.require(dtype)
    # dP and dQ are BLAS GEMMs on some backends: compare them at full-precision reductions.
    scoped.setattr(torch.backends.cuda.matmul, "allow_bf16_reduced_precision_reduction", False)
    weight, P, Q = make(shape, "PQ", layout, dtype)
    grad = randn(*einsum_kernel(*exact(weight, P, Q)).shape, seed=7, dtype=dtype)
    flags = ("W" in need, "P" in need, "Q" in need)
    ours = torch.ops.apsfast.construct_backward(*to(target.device, grad, weight, P, Q), *flags)
    expected = reference.construct_backward(*exact(grad, weight, P, Q), *flags)
    same_precision = reference.construct_backward(grad, weight, P, Q, *flags)
    assert len(ours) == len(expected) == sum(flags)
    for a, e, s in zip(ours, expected, same_precision):
        assert a.dtype == dtype and a.stride() == standard_strides(a.shape)
        assert_matches(a, e, s)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_construct_backward_expanded_grad_and_no_transforms(target):
    # The gradient of out.sum() arrives expanded (all strides 0).
    weight, P, Q = make((37, 21, (3, 3), 19, 13), layout="transposed", dtype=F32)
    grad = torch.ones((), dtype=F32).expand(19, 13, 3, 3)
    ours = torch.ops.apsfast.construct_backward(*to(target.device, grad, weight, P, Q), True, True, True)
    for a, b in zip(ours, reference.construct_backward(*exact(grad, weight, P, Q), True, True, True)):
        assert a.is_contiguous()
        assert_close(a, b, F32)
    # Without transforms dW is the gradient itself.
    weight, _, _ = make((7, 5, (3, 1), 3, 5))
    grad = randn(*weight.shape, seed=3)
    (dW,) = torch.ops.apsfast.construct_backward(*to(target.device, grad, weight), None, None, True, False, False)
    assert_close(dW, grad)


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("shape", [(8, 6, (3, 3), 5, 4), (7, 5, (3, 1), 3, 5), (6, 10, (), 4, 7)],
                         ids=["3x3", "odd", "linear"])
def test_construct_grads_match_einsum(target, shape):
    # Autograd through the public function: weight, P and Q all trained.
    weight, P, Q = make(shape)
    grad = randn(*einsum_kernel(weight, P, Q).shape, seed=5)
    leaves = [t.clone().to(target.device).requires_grad_() for t in (weight, P, Q)]
    ours = torch.autograd.grad(apsfast.construct(*leaves), leaves, grad.to(target.device))
    ref_leaves = [t.clone().requires_grad_() for t in (weight, P, Q)]
    theirs = torch.autograd.grad(einsum_kernel(*ref_leaves), ref_leaves, grad)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_construct_skips_unneeded_grads(target):
    weight, P, Q = to(target.device, *make((8, 6, (3, 3), 5, 4)))
    weight.requires_grad_()
    apsfast.construct(weight, P, Q).sum().backward()
    assert weight.grad is not None and P.grad is None and Q.grad is None


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
@pytest.mark.parametrize("shape,sides", [((7, 5, (3, 1), 3, 5), "PQ"), ((4, 6, (2, 2), 3, 5), "P"),
                                         ((4, 6, (2, 2), 3, 5), "Q"), ((5, 7, (), 3, 4), "PQ")],
                         ids=["odd-PQ", "2x2-P", "2x2-Q", "linear-PQ"])
def test_construct_gradcheck(target, shape, sides):
    inputs = [None if t is None else t.to(target.device).requires_grad_() for t in make(shape, sides)]
    assert torch.autograd.gradcheck(apsfast.construct, tuple(inputs))


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_construct_opcheck(target):
    weight, P, Q = to(target.device, *make((7, 5, (3, 1), 3, 5)))
    for args in ((weight, P, Q), (weight, None, Q), (weight, P, None)):
        args = tuple(t.requires_grad_() if t is not None else None for t in args)
        torch.library.opcheck(torch.ops.apsfast.construct.default, args)


@pytest.mark.parametrize("target", COMPILE, indirect=True)
def test_aps_conv2d_compile_fullgraph(target):
    weight, P, Q = to(target.device, *make((8, 6, (3, 3), 5, 4), dtype=F32))
    x = randn(2, 4, 6, 6, dtype=F32).to(target.device)
    fn = torch.compile(lambda x: apsfast.aps_conv2d(x, weight, P, Q, padding=1).relu(),
                       backend="aot_eager", fullgraph=True)
    assert_close(fn(x), apsfast.aps_conv2d(x, weight, P, Q, padding=1).relu())


# --- aps_conv2d ---------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (1, 0), 1)],
                         ids=["plain", "strided", "dilated", "pairs"])
def test_aps_conv2d_matches_conv_with_einsum_kernel(target, stride, padding, dilation):
    weight, P, Q = make((8, 6, (3, 3), 5, 4))
    bias = randn(8, seed=3)
    x = randn(2, 4, 9, 7, seed=4)
    out = apsfast.aps_conv2d(*to(target.device, x, weight, P, Q, bias), stride, padding, dilation)
    assert_close(out, F.conv2d(x, einsum_kernel(weight, P, Q), bias @ P, stride, padding, dilation))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_aps_conv2d_depthwise_channels_last(target):
    weight, P, _ = make((9, 1, (3, 3), 5, None), "P")
    x = randn(3, 5, 6, 6, seed=2).to(memory_format=torch.channels_last)
    out = apsfast.aps_conv2d(*to(target.device, x, weight, P), None, padding=1, groups=5)
    assert_close(out, F.conv2d(x, einsum_kernel(weight, P, None), padding=1, groups=5))


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_aps_conv2d_gradcheck(target):
    weight, P, Q = make((3, 3, (2, 1), 2, 2))
    x, bias = randn(1, 2, 3, 3, seed=5), randn(3, seed=6)
    args = tuple(t.to(target.device).requires_grad_() for t in (x, weight, P, Q, bias))
    assert torch.autograd.gradcheck(lambda *a: apsfast.aps_conv2d(*a, padding=1), args)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
@pytest.mark.parametrize("dtype", [BF16, F16], ids=str)
def test_autocast_builds_in_float32_and_convs_in_low_precision(target, dtype):
    device = target.device.type
    weight, P, Q = make((8, 6, (3, 3), 5, 4), dtype=F32)
    x = randn(2, 4, 6, 6, dtype=F32).to(memory_format=torch.channels_last)
    with torch.autocast(device, dtype=dtype):
        kernel = apsfast.construct(*to(target.device, weight.to(dtype), P.to(dtype), Q.to(dtype)))
        out = apsfast.aps_conv2d(*to(target.device, x, weight, P, Q), padding=1)
    # The construction accumulates in float32 whatever the inputs' dtype; the conv follows
    # autocast's dtype.
    assert kernel.dtype == F32
    assert out.dtype == dtype
    expected = F.conv2d(x, einsum_kernel(weight, P, Q), padding=1)
    own = F.conv2d(*to(target.device, x.to(dtype), einsum_kernel(weight, P, Q).to(dtype)), padding=1)
    err_torch = (own.float().cpu() - expected).abs().max()
    assert (out.float().cpu() - expected).abs().max() <= 2 * err_torch + 1e-6


# --- Triton: every element stored ---------------------------------------------------------------

@pytest.mark.parametrize("target", TRITON_ONLY, indirect=True)
@pytest.mark.parametrize("sides,layout", [("PQ", "contiguous"), ("P", "contiguous"), ("Q", "contiguous"),
                                          ("PQ", "strided")], ids=["PQ", "P", "Q", "strided"])
def test_every_output_element_is_stored(target, monkeypatch, sides, layout):
    """Outputs and workspaces start as NaN: an element a kernel forgets to write (or a
    workspace entry read before it is written) shows up as NaN."""
    nan_empty = nan_filled_empty()

    weight, P, Q = make((37, 21, (3, 3), 19, 13), sides, layout, F32)
    monkeypatch.setattr(torch, "empty", nan_empty)
    out = apsfast.construct(*to(target.device, weight, P, Q))
    assert_close(out, einsum_kernel(*exact(weight, P, Q)), F32)


# --- errors: each names the argument, the value got and the value expected ----------------------

def test_construct_errors():
    weight, P, Q = make((8, 6, (3, 3), 5, 4), dtype=F32)
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
    weight, P, Q = make((8, 6, (3, 3), 5, 4), dtype=F32)
    x = randn(2, 4, 5, 5, dtype=F32)
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


# --- properties over random small shapes (hypothesis) -------------------------------------------

# The target fixture only sets an environment variable; it is the same for every example.
with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
seeds = st.integers(0, 2**31 - 1)


@st.composite
def layer_shapes(draw, max_kernel_dims=2):
    C_out, C_in = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    c_o = draw(st.none() | st.integers(1, C_out))
    c_i = draw(st.none() | st.integers(1, C_in))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_kernel_dims)))
    return C_out, C_in, c_o, c_i, kernel


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@with_fixture
@given(shape=layer_shapes(), seed=seeds)
def test_construct_shape_and_values_property(target, shape, seed):
    C_out, C_in, c_o, c_i, kernel = shape
    weight = randn(C_out, C_in, *kernel, seed=seed)
    P = None if c_o is None else randn(C_out, c_o, seed=seed + 1)
    Q = None if c_i is None else randn(C_in, c_i, seed=seed + 2)
    out = apsfast.construct(weight, P, Q)
    assert out.shape == (C_out if c_o is None else c_o, C_in if c_i is None else c_i, *kernel)
    assert out.dtype == F64 and out.is_contiguous()
    assert_close(out, einsum_kernel(weight, P, Q))


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@with_fixture
@given(shape=layer_shapes(), seed=seeds)
def test_construct_is_bilinear_in_transforms(target, shape, seed):
    # W^{i,o} is linear in P, in Q and in W separately.
    C_out, C_in, c_o, c_i, kernel = shape
    weight, weight2 = randn(C_out, C_in, *kernel, seed=seed), randn(C_out, C_in, *kernel, seed=seed + 1)
    P, P2 = randn(C_out, c_o or C_out, seed=seed + 2), randn(C_out, c_o or C_out, seed=seed + 3)
    Q = randn(C_in, c_i or C_in, seed=seed + 4)
    a, b = 0.7, -1.3
    assert_close(apsfast.construct(weight, a * P + b * P2, Q),
                 a * apsfast.construct(weight, P, Q) + b * apsfast.construct(weight, P2, Q))
    assert_close(apsfast.construct(a * weight + b * weight2, P, Q),
                 a * apsfast.construct(weight, P, Q) + b * apsfast.construct(weight2, P, Q))


@st.composite
def conv_cases(draw):
    C_out, C_in = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    c_o, c_i = draw(st.integers(1, C_out)), draw(st.integers(1, C_in))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    pair = lambda lo, hi: st.integers(lo, hi) | st.tuples(st.integers(lo, hi), st.integers(lo, hi))  # noqa: E731
    stride, padding, dilation = draw(pair(1, 3)), draw(pair(0, 2)), draw(pair(1, 2))
    two = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    (ph, pw), (dh, dw) = two(padding), two(dilation)
    # The input must cover the dilated kernel after padding.
    H = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 4))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 4))
    return dict(C_out=C_out, C_in=C_in, c_o=c_o, c_i=c_i, kernel=(kh, kw), stride=stride,
                padding=padding, dilation=dilation, N=draw(st.integers(1, 2)), H=H, W=W,
                use_Q=draw(st.booleans()), use_bias=draw(st.booleans()))


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@with_fixture
@given(case=conv_cases(), seed=seeds)
def test_aps_conv2d_property(target, case, seed):
    weight = randn(case["C_out"], case["C_in"], *case["kernel"], seed=seed)
    P = randn(case["C_out"], case["c_o"], seed=seed + 1)
    Q = randn(case["C_in"], case["c_i"], seed=seed + 2) if case["use_Q"] else None
    bias = randn(case["C_out"], seed=seed + 3) if case["use_bias"] else None
    c_i = case["c_i"] if case["use_Q"] else case["C_in"]
    x = randn(case["N"], c_i, case["H"], case["W"], seed=seed + 4)
    args = (case["stride"], case["padding"], case["dilation"])
    out = apsfast.aps_conv2d(x, weight, P, Q, bias, *args)
    expected = F.conv2d(x, einsum_kernel(weight, P, Q), None if bias is None else bias @ P, *args)

    def two(v):
        return v if isinstance(v, tuple) else (v, v)
    (sh, sw), (ph, pw), (dh, dw) = map(two, args)
    kh, kw = case["kernel"]
    H_out = (case["H"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    W_out = (case["W"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    assert out.shape == (case["N"], case["c_o"], H_out, W_out)
    assert_close(out, expected)


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@with_fixture
@given(C=st.integers(1, 6), c_o=st.integers(1, 6), k=st.integers(1, 3), pad=st.integers(0, 1), seed=seeds)
def test_aps_conv2d_depthwise_property(target, C, c_o, k, pad, seed):
    assume(c_o <= C)
    weight, P = randn(C, 1, k, k, seed=seed), randn(C, c_o, seed=seed + 1)
    x = randn(2, c_o, k + 2, k + 1, seed=seed + 2)
    out = apsfast.aps_conv2d(x, weight, P, None, padding=pad, groups=c_o)
    assert_close(out, F.conv2d(x, einsum_kernel(weight, P, None), padding=pad, groups=c_o))


@pytest.mark.parametrize("target", [CPU, CUDA], indirect=True)
def test_compiled_op_errors_name_the_argument(target):
    # The C++ libraries share one set of argument checks (csrc/common/checks.h).
    weight, P, Q = to(target.device, *make((8, 6, (3, 3), 5, 4), dtype=F32))
    with pytest.raises(RuntimeError, match=r"P\.shape\[0\] must be weight\.shape\[0\] = 8, got 6"):
        torch.ops.apsfast.construct(weight, Q, None)
    with pytest.raises(RuntimeError, match=r"Q has dtype Double, expected Float"):
        torch.ops.apsfast.construct(weight, P, Q.double())
    with pytest.raises(RuntimeError, match=r"weight must have at least 2 dims \(C_out, C_in, \*kernel\), got 1"):
        torch.ops.apsfast.construct(weight[:, 0, 0, 0], None, None)
    with pytest.raises(RuntimeError, match=r"grad must have the candidate kernel's shape"):
        torch.ops.apsfast.construct_backward(weight, weight, P, Q, True, False, False)
    with pytest.raises(RuntimeError, match=r"need_Q is set but Q is None"):
        torch.ops.apsfast.construct_backward(weight[:5], weight, P, None, False, False, True)
