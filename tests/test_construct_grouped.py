"""apsfast::construct_grouped: the kernels of many layers in one call, on every backend,
against per-layer einsum (paper eq. 2) in float64."""
from __future__ import annotations


import pytest
import torch

import apsfast
from apsfast import reference
from cases import (CountLaunches, nan_filled_empty, ALL, COMPILE, CPU, CUDA, NO_INTERPRETER, TRITON_ONLY, assert_matches, einsum_kernel, exact,
                   kernel_strides, meta_weight, randn, to, transform)
from conftest import assert_close

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16

# Heterogeneous layers: (C_out, C_in, kernel, c_o or None, c_i or None, layout): both
# transforms, P only, Q only, none, transposed transforms, channels_last weights (1×1: a
# standard kernel; 3×3: a channels_last one, also from a channel slice of a wider meta-weight,
# as an exact-selection input side gives) and layers over several 64-wide tiles.
LAYERS = [(37, 21, (3, 3), 19, 13, "transposed"), (7, 1, (3, 3), 3, None, "contiguous"),
          (12, 70, (1, 1), None, 66, "channels_last"), (5, 5, (), 2, 3, "contiguous"),
          (9, 4, (1, 3), None, None, "contiguous"), (80, 6, (), 70, 5, "contiguous"),
          (10, 6, (3, 3), 4, 5, "channels_last"), (10, 6, (3, 3), 4, None, "channels_last_slice"),
          (9, 4, (2, 2), None, None, "channels_last"), (8, 6, (3, 3), 5, 4, "contiguous")]


def make_layers(dtype=F64, layers=LAYERS, seed=0):
    weights, Ps, Qs = [], [], []
    for l, (C_out, C_in, kernel, c_o, c_i, layout) in enumerate(layers):
        w = meta_weight(C_out, C_in, kernel, seed + 10 * l, dtype)
        P = None if c_o is None else transform(C_out, c_o, seed + 10 * l + 1, dtype)
        Q = None if c_i is None else transform(C_in, c_i, seed + 10 * l + 2, dtype)
        if layout == "transposed":
            P, Q = (None if M is None else M.t().contiguous().t() for M in (P, Q))
        elif layout == "channels_last":
            w = w.to(memory_format=torch.channels_last)
        elif layout == "channels_last_slice":
            wider = meta_weight(C_out, C_in + 3, kernel, seed + 10 * l, dtype).to(memory_format=torch.channels_last)
            w = wider[:, 2:2 + C_in]
        weights.append(w)
        Ps.append(P)
        Qs.append(Q)
    return weights, Ps, Qs


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("dtype", [F64, F32, BF16, F16], ids=str)
def test_grouped_values(target, dtype):
    target.require(dtype)
    weights, Ps, Qs = make_layers(dtype)
    kernels = apsfast.construct_grouped(*(to(target.device, *ts) for ts in (weights, Ps, Qs)))
    assert len(kernels) == len(weights)
    for k, w, P, Q in zip(kernels, weights, Ps, Qs):
        assert k.dtype == dtype and k.stride() == kernel_strides(k.shape, w)
        assert_matches(k, einsum_kernel(*exact(w, P, Q)), reference.construct(w, P, Q))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_grouped_weight_grads(target):
    # The backward is itself one grouped construction with the transposed transforms.
    weights, Ps, Qs = make_layers()
    Ps, Qs = to(target.device, *Ps), to(target.device, *Qs)
    leaves = [w.clone().to(target.device).requires_grad_() for w in weights]
    kernels = apsfast.construct_grouped(leaves, Ps, Qs)
    grads = [randn(*k.shape, seed=l) for l, k in enumerate(kernels)]
    torch.autograd.backward(kernels, to(target.device, *grads))
    ref_leaves = [w.clone().requires_grad_() for w in weights]
    torch.autograd.backward([einsum_kernel(w, *exact(P, Q)) for w, P, Q in zip(ref_leaves, Ps, Qs)], grads)
    for ours, theirs in zip(leaves, ref_leaves):
        assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_grouped_trained_transforms_get_gradients(target):
    # A layer whose P requires grad is built per layer, so its P still gets a gradient.
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(layers=LAYERS[-3:]))
    Ps[2].requires_grad_()
    kernels = apsfast.construct_grouped(weights, Ps, Qs)
    kernels[2].sum().backward()
    P_ref = exact(Ps[2])[0].requires_grad_()
    einsum_kernel(*exact(weights[2]), P_ref, *exact(Qs[2])).sum().backward()
    assert_close(Ps[2].grad, P_ref.grad)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_grouped_edge_cases(target):
    # Only copies: no product at all, fresh tensors.
    weights, _, _ = make_layers(F32)
    inputs = to(target.device, *weights[:2])
    for out, w, x in zip(torch.ops.apsfast.construct_grouped(inputs, [None, None], [None, None]), weights, inputs):
        assert out.data_ptr() != x.data_ptr()
        assert_close(out, w)
    # An empty candidate (c_o = 0) beside a real layer: an empty kernel, the other one intact.
    (w,), (P,), (Q,) = make_layers(layers=LAYERS[-1:])
    outs = torch.ops.apsfast.construct_grouped(to(target.device, w, w), to(target.device, P[:, :0], P),
                                               to(target.device, Q, Q))
    assert outs[0].shape == (0, Q.shape[1], 3, 3)
    assert_close(outs[1], einsum_kernel(w, P, Q))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_grouped_emits_the_requested_dtype(target):
    # float32 meta-weights, bfloat16 kernels (an autocast run's): the float32 kernels rounded
    # once, in their layout, as a cast per layer gives; the gradients reach the float32
    # weights as through that cast.
    target.require(BF16)
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(F32))
    leaves, twins = ([w.detach().requires_grad_() for w in weights] for _ in range(2))
    kernels = apsfast.construct_grouped(leaves, Ps, Qs, dtype=BF16)
    cast = [k.to(BF16) for k in apsfast.construct_grouped(twins, Ps, Qs)]
    for k, c, w in zip(kernels, cast, weights):
        assert k.dtype == BF16 and k.stride() == c.stride() == kernel_strides(k.shape, w)
        assert torch.equal(k, c)
    grads = to(target.device, *(randn(*k.shape, seed=l, dtype=BF16) for l, k in enumerate(kernels)))
    torch.autograd.backward(kernels, grads)
    torch.autograd.backward(cast, grads)
    for ours, theirs in zip(leaves, twins):
        assert ours.grad.dtype == F32
        assert_close(ours.grad, theirs.grad)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype or None, got torch.int32"):
        apsfast.construct_grouped(weights, Ps, Qs, dtype=torch.int32)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_grouped_gradcheck(target):
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(layers=[
        (4, 3, (2, 2), 3, 2, "contiguous"), (3, 1, (3, 1), 2, None, "contiguous"), (5, 4, (), None, 3, "transposed")]))
    leaves = tuple(w.requires_grad_() for w in weights)
    assert torch.autograd.gradcheck(lambda *w: apsfast.construct_grouped(list(w), Ps, Qs), leaves)
    # The backward is a grouped construction itself, so it is differentiable in turn.
    assert torch.autograd.gradgradcheck(lambda *w: apsfast.construct_grouped(list(w), Ps, Qs), leaves)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_grouped_eager_function_matches_the_op(target):
    # Outside torch.compile the grouped construction runs as a plain autograd function (less
    # host time than the custom op); both give the same kernels and meta-weight gradients,
    # also when emitting another dtype.
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(F32))
    for dtype in (None, BF16):
        results = []
        for build in (apsfast.ops.build_grouped, torch.ops.apsfast.construct_grouped):
            leaves = [w.detach().clone().requires_grad_() for w in weights]
            kernels = build(leaves, Ps, Qs, dtype)
            torch.autograd.backward([k.float().square().sum() for k in kernels])
            results.append(([k.detach() for k in kernels], [w.grad for w in leaves],
                            [k.grad_fn is not None for k in kernels]))
        (k0, g0, f0), (k1, g1, f1) = results
        assert f0 == f1 == [True] * len(weights)
        for a, b in zip(k0 + g0, k1 + g1):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(a, b)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_grouped_opcheck(target):
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(layers=LAYERS[-3:]))
    for dtype in (None, F32):  # built in float64, emitted in float64 or float32
        torch.library.opcheck(torch.ops.apsfast.construct_grouped.default,
                              ([w.detach().requires_grad_() for w in weights], Ps, Qs, dtype))


@pytest.mark.parametrize("target", COMPILE, indirect=True)
def test_grouped_under_compile(target):
    weights, Ps, Qs = (to(target.device, *ts) for ts in make_layers(F32))
    fn = torch.compile(lambda ws: [k.sum() for k in apsfast.construct_grouped(ws, Ps, Qs)],
                       backend="aot_eager", fullgraph=True)
    for a, b in zip(fn(weights), [k.sum() for k in apsfast.construct_grouped(weights, Ps, Qs)]):
        assert_close(a, b)


# --- Triton: launches and stores ----------------------------------------------------------------

@pytest.mark.parametrize("target", TRITON_ONLY, indirect=True)
@pytest.mark.parametrize("with_Q,launches", [(True, 2), (False, 1)], ids=["two-stages", "single-products-only"])
def test_grouped_one_triton_launch_per_stage(target, monkeypatch, with_Q, launches):
    # Stage 1 runs every first product, stage 2 the second ones; without any layer having two
    # products the second stage does not launch.
    from apsfast.kernels import construct as kconstruct
    weights, Ps, Qs = make_layers(F32)
    Qs = Qs if with_Q else [None] * len(Qs)
    counter = CountLaunches(kconstruct._construct_grouped_kernel)
    monkeypatch.setattr(kconstruct, "_construct_grouped_kernel", counter)
    outs = apsfast.construct_grouped(*(to(target.device, *ts) for ts in (weights, Ps, Qs)))
    assert counter.launches == launches
    for out, w, P, Q in zip(outs, weights, Ps, Qs):
        assert_close(out, einsum_kernel(*exact(w, P, Q)), F32)


@pytest.mark.parametrize("target", TRITON_ONLY, indirect=True)
def test_every_grouped_output_element_is_stored(target, monkeypatch):
    """Outputs and the workspace start as NaN: a missed store shows up as NaN."""
    nan_empty = nan_filled_empty()

    weights, Ps, Qs = make_layers(F16)
    monkeypatch.setattr(torch, "empty", nan_empty)
    for out in apsfast.construct_grouped(*(to(target.device, *ts) for ts in (weights, Ps, Qs))):
        assert not out.isnan().any()


# --- errors -------------------------------------------------------------------------------------

def test_grouped_errors():
    weights, Ps, Qs = make_layers(F32, layers=[
        (8, 6, (3, 3), 5, 4, "contiguous"), (7, 1, (3, 3), 3, None, "contiguous"), (12, 9, (1, 1), None, 2, "contiguous"),
        (5, 5, (), 2, 3, "contiguous"), (9, 4, (1, 3), 9, 4, "contiguous")])
    with pytest.raises(TypeError, match="weights must be a non-empty sequence"):
        apsfast.construct_grouped([], [], [])
    with pytest.raises(ValueError, match="Ps must be a sequence of 5 transforms"):
        apsfast.construct_grouped(weights, Ps[:4], Qs)
    with pytest.raises(ValueError, match=r"layer 2: Q.shape\[0\] must be 9"):
        apsfast.construct_grouped(weights, Ps, Qs[:2] + [torch.zeros(4, 2)] + Qs[3:])
    with pytest.raises(TypeError, match=r"layer 1: weight has dtype torch.float64, expected torch.float32"):
        apsfast.construct_grouped([weights[0], weights[1].double()], Ps[:2], [Qs[0], None])


@pytest.mark.parametrize("target", [CPU, CUDA], indirect=True)
def test_compiled_op_errors_name_the_argument(target):
    # The C++ libraries share one set of argument checks (csrc/common/checks.h).
    (w,), (P,), (Q,) = (to(target.device, *ts) for ts in make_layers(F32, layers=LAYERS[-1:]))
    with pytest.raises(RuntimeError, match=r"Qs\[1\]\.shape\[0\] must be weight\.shape\[1\] = 6, got 8"):
        torch.ops.apsfast.construct_grouped([w, w], [P, P], [Q, P])
    with pytest.raises(RuntimeError, match=r"weights\[1\] has dtype Double, expected Float \(that of weights\[0\]\)"):
        torch.ops.apsfast.construct_grouped([w, w.double()], [P, None], [Q, None])
    with pytest.raises(RuntimeError, match=r"Ps and Qs must have one entry per weight \(2\), got 1 and 2"):
        torch.ops.apsfast.construct_grouped([w, w], [P], [Q, Q])
