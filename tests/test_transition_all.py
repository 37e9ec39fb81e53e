"""transition_step_all: every layer's transition in one call, against per-layer steps."""
from __future__ import annotations

import copy

import pytest
import torch

import apsfast
from apsfast import reference
from conftest import assert_close


def network(dtype=torch.float64):
    torch.manual_seed(0)
    return [apsfast.nn.APSConv2d(3, (4, 8, 16), 3, dtype=dtype),                # P only
            apsfast.nn.APSConv2d((4, 8, 16), (2, 6, 12), 3, dtype=dtype),       # P and Q
            apsfast.nn.APSConv2d((2, 6, 12), (2, 6, 12), 3, groups="depthwise", dtype=dtype),
            apsfast.nn.APSLinear((2, 6, 12), 10, dtype=dtype)]                  # Q only


def perturb(layers, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for side in (layer.out_transforms, layer.in_transforms):
                if side is not None:
                    side.matrix.add_(1e-2 * torch.randn(side.matrix.shape, generator=g, dtype=side.matrix.dtype))
                    side.matrix.div_(side.matrix.norm(dim=0, keepdim=True))


def test_matches_per_layer_steps(backend):
    layers = network()
    perturb(layers)
    twins = copy.deepcopy(layers)
    phi = apsfast.transition_step_all([(l.P, l.Q) for l in layers], 1e-3)
    expected = sum(reference.transition_step(t.P, t.Q, 1e-3) for t in twins)
    assert_close(phi, expected)
    for layer, twin in zip(layers, twins):
        for name in ("out_transforms", "in_transforms"):
            if getattr(layer, name) is not None:
                assert_close(getattr(layer, name).matrix, getattr(twin, name).matrix)


def test_loose_tensors_are_updated_in_place(backend):
    Ps = apsfast.init_transforms(20, (2, 6, 12), "orthogonal", generator=torch.Generator().manual_seed(3),
                                 dtype=torch.float64)
    Qs = [m.t().contiguous().t() for m in apsfast.init_transforms(9, (3, 5), "orthogonal", dtype=torch.float64)]
    Ps2, Qs2 = [p.clone() for p in Ps], [q.clone() for q in Qs]
    phi = apsfast.transition_step_all([(Ps, Qs), (None, Qs2[:1])], 1e-3)
    expected = reference.transition_step(Ps2, Qs2, 1e-3)
    for a, b in zip(Ps + Qs, Ps2 + Qs2):
        assert_close(a, b)
    assert phi > expected  # the second layer adds its own Φ


def test_phi_falls_and_columns_stay_unit(backend):
    layers = network()
    perturb(layers)
    pairs = [(l.P, l.Q) for l in layers]
    first = apsfast.transition_step_all(pairs, 1e-4)
    for _ in range(20):
        last = apsfast.transition_step_all(pairs, 1e-4)
    assert last < first
    for layer in layers:
        for Ms in (layer.P, layer.Q):
            for M in Ms or ():
                assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=M.dtype))


def test_float32_matches_float64(backend):
    layers64 = network()
    perturb(layers64)
    layers32 = [copy.deepcopy(l).float() for l in layers64]
    phi64 = apsfast.transition_step_all([(l.P, l.Q) for l in layers64], 1e-4)
    phi32 = apsfast.transition_step_all([(l.P, l.Q) for l in layers32], 1e-4)
    assert_close(phi32, phi64.float(), torch.float32)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_opcheck(backend, relative):
    Ms = [torch.cat(apsfast.init_transforms(9, (2, 3), "orthogonal", dtype=torch.float64), 1),
          torch.cat(apsfast.init_transforms(7, (1, 4), "orthogonal", dtype=torch.float64), 1)]
    torch.library.opcheck(torch.ops.apsfast.transition_step_all.default,
                          (Ms, [2, 3, 1, 4], [2, 2], [1, 0], 1e-3, relative))


def test_relative_steps_each_side_as_if_it_were_alone(backend):
    # ∂Φ/∂P = S(Q) ∂S(P)/∂P: without the partner factor, a side steps as a one-sided layer would.
    layers = network()
    perturb(layers)
    twins = copy.deepcopy(layers)
    phi = apsfast.transition_step_all([(l.P, l.Q) for l in layers], 1e-2, relative=True)
    assert_close(phi, sum(reference.sharing_level(t.P, t.Q) for t in twins))
    for layer, twin in zip(layers, twins):
        for name, pair in (("out_transforms", (twin.P, None)), ("in_transforms", (None, twin.Q))):
            if getattr(layer, name) is not None:
                reference.transition_step(*pair, 1e-2)
                assert_close(getattr(layer, name).matrix, getattr(twin, name).matrix)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_autograd_transition_equals_the_closed_form(relative):
    # The plain-PyTorch baseline of the benchmarks computes the same step by autograd.
    layers = network()
    perturb(layers)
    twins = copy.deepcopy(layers)
    for layer, twin in zip(layers, twins):
        phi = reference.transition_step_autograd(layer.P, layer.Q, 1e-2, relative)
        assert_close(phi, reference.transition_step(twin.P, twin.Q, 1e-2, relative))
        for name in ("out_transforms", "in_transforms"):
            if getattr(layer, name) is not None:
                assert_close(getattr(layer, name).matrix, getattr(twin, name).matrix)


def test_relative_rate_does_not_grow_with_the_widths(backend):
    # The paper's CIFAR space ({16, 32, 64, 96} on both sides, meta = Σ widths) from a perturbed
    # ordinal start: eq. 5's own scale (S ~ 400 per side) overshoots at τ = 1e-2 and Φ climbs
    # past its ordinal maximum (the columns align); the relative step descends smoothly.
    phis = {}
    for relative in (False, True):
        torch.manual_seed(0)
        layer = apsfast.nn.APSConv2d((16, 32, 64, 96), (16, 32, 64, 96), 1, sharing="transitional",
                                     dtype=torch.float64)
        start = float(layer.sharing_level())  # the ordinal maximum, 384² (Theorem 3.1)
        phis[relative] = [float(layer.transition_step(1e-2, relative=relative)) for _ in range(150)]
        phis[relative].append(float(layer.sharing_level()))
    assert start == 384 ** 2
    assert max(phis[False][-50:]) > start
    relative = phis[True]
    assert relative[-1] < 0.5 * start and all(b <= a * (1 + 1e-9) for a, b in zip(relative[5:], relative[6:]))


def test_errors():
    layers = network(torch.float32)
    pairs = [(l.P, l.Q) for l in layers]
    with pytest.raises(ValueError, match="tau must be a finite float > 0"):
        apsfast.transition_step_all(pairs, 0.0)
    with pytest.raises(TypeError, match="layers must be a non-empty sequence"):
        apsfast.transition_step_all([], 1e-3)
    with pytest.raises(TypeError, match=r"layers\[1\] must be a \(Ps, Qs\) pair"):
        apsfast.transition_step_all([pairs[0], layers[1].P], 1e-3)
    with pytest.raises(ValueError, match=r"layers\[0\]: Ps and Qs are both None"):
        apsfast.transition_step_all([(None, None)], 1e-3)
    with pytest.raises(TypeError, match=r"layers\[1\]: transform has dtype torch.float64"):
        apsfast.transition_step_all([pairs[0], ([p.double() for p in layers[1].P], None)], 1e-3)


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("rows,cols", [(5, 9), (9, 5), (7, 7)], ids=["wide", "tall", "square"])
def test_every_aspect_matches_reference(backend, rows, cols, relative):
    # Sides narrower than their candidates (C < n, e.g. ordinal meta = max width) take the
    # M Mᵀ route in the compiled kernels, taller ones the MᵀM route.
    g = torch.Generator().manual_seed(rows * 10 + cols)
    widths = [2, cols - 2]
    Ms = [torch.nn.functional.normalize(torch.randn(rows, cols, generator=g, dtype=torch.float64), dim=0)
          for _ in range(3)]
    twins = [M.clone() for M in Ms]
    args = (widths * 3, [2, 2, 2], [1, 0, -1], 1e-2, relative)
    phi = torch.ops.apsfast.transition_step_all(Ms, *args)
    expected = reference.transition_step_all(twins, *args)
    assert_close(phi, expected)
    for M, twin in zip(Ms, twins):
        assert_close(M, twin)
