"""construct_grouped: the kernels of many layers in one call, against per-layer einsum."""
from __future__ import annotations

import pytest
import torch

import apsfast
from conftest import assert_close
from test_construct import einsum_kernel

# Heterogeneous layers: (C_out, C_in, kernel, c_o or None, c_i or None).
LAYERS = [(8, 6, (3, 3), 5, 4), (7, 1, (3, 3), 3, None), (12, 9, (1, 1), None, 2),
          (5, 5, (), 2, 3), (9, 4, (1, 3), 9, 4)]


def make_layers(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    weights = [rand(C_out, C_in, *k) for C_out, C_in, k, _, _ in LAYERS]
    Ps = [None if c_o is None else rand(C_out, c_o) for C_out, _, _, c_o, _ in LAYERS]
    Qs = [None if c_i is None else rand(C_in, c_i) for _, C_in, _, _, c_i in LAYERS]
    return weights, Ps, Qs


def test_grouped_values_and_grads(backend):
    weights, Ps, Qs = make_layers()
    leaves = [w.clone().requires_grad_() for w in weights]
    kernels = apsfast.construct_grouped(leaves, Ps, Qs)
    expected = [einsum_kernel(w, P, Q) for w, P, Q in zip(weights, Ps, Qs)]
    for k, e in zip(kernels, expected):
        assert_close(k, e)
    grads = [torch.randn_like(e) for e in expected]
    torch.autograd.backward(kernels, grads)
    ref_leaves = [w.clone().requires_grad_() for w in weights]
    torch.autograd.backward([einsum_kernel(w, P, Q) for w, P, Q in zip(ref_leaves, Ps, Qs)], grads)
    for ours, theirs in zip(leaves, ref_leaves):
        assert_close(ours.grad, theirs.grad)


def test_grouped_gradcheck(backend):
    weights, Ps, Qs = make_layers()
    leaves = tuple(w.requires_grad_() for w in weights[:3])
    assert torch.autograd.gradcheck(lambda *w: apsfast.construct_grouped(list(w), Ps[:3], Qs[:3]), leaves)


def test_grouped_trained_transforms_get_gradients(backend):
    # A layer whose P requires grad is built per layer, so its P still gets a gradient.
    weights, Ps, Qs = make_layers()
    Ps[0].requires_grad_()
    kernels = apsfast.construct_grouped(weights, Ps, Qs)
    kernels[0].sum().backward()
    P_ref = Ps[0].detach().clone().requires_grad_()
    einsum_kernel(weights[0], P_ref, Qs[0]).sum().backward()
    assert_close(Ps[0].grad, P_ref.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grouped_low_precision(backend, dtype):
    weights, Ps, Qs = make_layers(dtype)
    for k, w, P, Q in zip(apsfast.construct_grouped(weights, Ps, Qs), weights, Ps, Qs):
        assert k.dtype == dtype
        expected = einsum_kernel(w.double(), None if P is None else P.double(), None if Q is None else Q.double())
        err_torch = (einsum_kernel(w, P, Q).double() - expected).abs().max()
        assert (k.double() - expected).abs().max() <= 2 * err_torch + 1e-5


def test_grouped_opcheck(backend):
    weights, Ps, Qs = make_layers()
    torch.library.opcheck(torch.ops.apsfast.construct_grouped.default,
                          ([w.requires_grad_() for w in weights], Ps, Qs))


def test_grouped_under_compile(backend):
    weights, Ps, Qs = make_layers(torch.float32)
    fn = torch.compile(lambda ws: [k.sum() for k in apsfast.construct_grouped(ws, Ps, Qs)],
                       backend="aot_eager", fullgraph=True)
    for a, b in zip(fn(weights), [k.sum() for k in apsfast.construct_grouped(weights, Ps, Qs)]):
        assert_close(a, b)


def test_grouped_errors():
    weights, Ps, Qs = make_layers(torch.float32)
    with pytest.raises(TypeError, match="weights must be a non-empty sequence"):
        apsfast.construct_grouped([], [], [])
    with pytest.raises(ValueError, match="Ps must be a sequence of 5 transforms"):
        apsfast.construct_grouped(weights, Ps[:4], Qs)
    with pytest.raises(ValueError, match=r"layer 2: Q.shape\[0\] must be 9"):
        apsfast.construct_grouped(weights, Ps, Qs[:2] + [Qs[2][:4]] + Qs[3:])
    with pytest.raises(TypeError, match=r"layer 1: weight has dtype torch.float64, expected torch.float32"):
        apsfast.construct_grouped([weights[0], weights[1].double()], Ps[:2],
                                  [Qs[0], None])
