"""The transition (paper eq. 5): ``transition_step`` of one layer and ``transition_step_all`` of a
network, both through apsfast::transition_step_all on every backend, against a projected step
by autograd of the pairwise Φ written from the paper and against the reference."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import apsfast
from apsfast import reference
from apsfast.sharing import matmul_precision
from cases import (CountLaunches, nan_filled_empty, ALL, CPU, CPU_FAST, CUDA, NO_INTERPRETER, TRITON_INTERPRETED, TRITON_ONLY, assert_matches,
                   assert_unit_columns, exact, max_err, max_score, naive_phi, random_matrices, random_rotation, to,
                   transform)
from conftest import assert_close
from guard import MATMUL_PRECISION

F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16


def pgd_step_autograd(Ps, Qs, tau):
    """Eq. 5 by hand: ∂Φ/∂p by autograd of the naive double sum, then p ← normalise(p − τ g)."""
    Ps_leaf = None if Ps is None else [m.detach().cpu().clone().requires_grad_() for m in Ps]
    Qs_leaf = None if Qs is None else [m.detach().cpu().clone().requires_grad_() for m in Qs]
    leaves = (Ps_leaf or []) + (Qs_leaf or [])
    phi = naive_phi(Ps_leaf, Qs_leaf)
    grads = torch.autograd.grad(phi, leaves)
    new = []
    for m, g in zip(leaves, grads):
        step = m.detach() - tau * g
        new.append(step / step.norm(dim=0, keepdim=True))
    n_p = 0 if Ps is None else len(Ps)
    return phi.detach(), (new[:n_p] if Ps is not None else None), (new[n_p:] if Qs is not None else None)


def noisy(meta, widths, mode, seed, noise=0.05, device="cpu"):
    return to(device, *apsfast.init_transforms(meta, widths, mode, noise=noise,
                                               generator=torch.Generator().manual_seed(seed), dtype=F64))


# --- one layer: transition_step -----------------------------------------------------------------

@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("sides,mode", [("PQ", "ordinal"), ("PQ", "orthogonal"), ("PQ", "random"),
                                        ("P", "orthogonal"), ("Q", "random"), ("Q", "ordinal")],
                         ids=["PQ-ordinal", "PQ-orthogonal", "PQ-random", "P-orthogonal", "Q-random", "Q-ordinal"])
def test_transition_step_matches_autograd_pgd(target, sides, mode):
    if mode == "random":  # general matrices, columns not normalised: the step projects them
        Ps, Qs = random_matrices(7, (1, 2, 5), 50), random_matrices(6, (2, 3), 51)
    else:
        Ps, Qs = noisy(7, (1, 2, 5), mode, 52), noisy(6, (2, 3), mode, 53)
    Ps = to(target.device, *Ps) if "P" in sides else None
    Qs = to(target.device, *Qs) if "Q" in sides else None
    tau = 0.3 / float(naive_phi(*(None if Ms is None else exact(*Ms) for Ms in (Ps, Qs))))
    phi_exp, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    before = [m.clone() for m in (Ps or []) + (Qs or [])]
    phi = apsfast.transition_step(Ps, Qs, tau)
    assert phi.dim() == 0
    assert_close(phi, phi_exp)
    for got, want, old in zip((Ps or []) + (Qs or []), (Ps_exp or []) + (Qs_exp or []), before):
        assert_close(got, want)
        assert_unit_columns(got)
        assert not torch.equal(got, old)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_transition_step_returns_phi_before_and_updates_all_sides_together(target):
    Ps, Qs = noisy(8, (2, 3, 6), "orthogonal", 60, device=target.device), noisy(5, (1, 4), "orthogonal", 61,
                                                                              device=target.device)
    phi_before = apsfast.sharing_level(Ps, Qs)
    # All gradients at the current point: stepping P alone then Q alone (with the new P)
    # would differ; transition_step must equal the joint step.
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, 1e-3)
    out = apsfast.transition_step(Ps, Qs, 1e-3)
    assert_close(out, phi_before)
    assert float(apsfast.sharing_level(Ps, Qs)) != float(out)
    for got, want in zip(Ps + Qs, Ps_exp + Qs_exp):
        assert_close(got, want)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_transition_step_float32(target):
    Ps, Qs = noisy(7, (2, 5), "orthogonal", 62), noisy(6, (3,), "orthogonal", 63)
    Ps32, Qs32 = to(target.device, *(m.float() for m in Ps)), to(target.device, *(m.float() for m in Qs))
    tau = 0.3 / float(naive_phi(Ps, Qs))
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    phi = apsfast.transition_step(Ps32, Qs32, tau)
    assert phi.dtype == F32
    for got, want in zip(Ps32 + Qs32, Ps_exp + Qs_exp):
        assert got.dtype == F32
        assert_close(got, want, F32)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_transition_step_on_views_updates_base_tensor(target):
    widths = (2, 3, 5)
    offsets = [0, 2, 5]
    base_p = torch.cat(noisy(12, widths, "orthogonal", 70), dim=1).to(target.device)  # [12, 10]
    base_q = torch.cat(noisy(6, (1, 4), "orthogonal", 71), dim=1).t().contiguous().t().to(target.device)
    Ps = [base_p[:, o:o + c] for o, c in zip(offsets, widths)]
    Qs = [base_q[:, :1], base_q[:, 1:5]]
    assert all(p._base is base_p for p in Ps)
    tau = 0.3 / float(naive_phi(exact(*Ps), exact(*Qs)))
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    apsfast.transition_step(Ps, Qs, tau)
    assert_close(base_p, torch.cat(Ps_exp, dim=1))
    assert_close(base_q, torch.cat(Qs_exp, dim=1))
    # The views still alias the base.
    assert all(p.data_ptr() == base_p[:, o].data_ptr() for p, o in zip(Ps, offsets))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_transition_step_on_overlapping_views_steps_from_one_point(target):
    # Nested views of one tensor: every transform must step from the same (old) point.
    base = torch.cat(noisy(9, (4,), "orthogonal", 72), dim=1).to(target.device)
    Ps = [base[:, :2], base[:, :4]]
    tau = 0.3 / float(naive_phi(exact(*Ps), None))
    _, Ps_exp, _ = pgd_step_autograd([p.clone() for p in Ps], None, tau)
    apsfast.transition_step(Ps, None, tau)
    # The wider view is written last, so the base holds its step for all four columns.
    assert_close(base, Ps_exp[1])


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_transition_step_on_parameters(target):
    Ps = [torch.nn.Parameter(m) for m in noisy(7, (2, 5), "ordinal", 72, device=target.device)]
    Qs = [torch.nn.Parameter(m) for m in noisy(6, (3, 6), "ordinal", 73, device=target.device)]
    tau = 0.3 / float(naive_phi(exact(*Ps), exact(*Qs)))
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    phi = apsfast.transition_step(Ps, Qs, tau)
    assert not phi.requires_grad
    for got, want in zip(Ps + Qs, Ps_exp + Qs_exp):
        assert isinstance(got, torch.nn.Parameter) and got.grad is None
        assert_close(got.detach(), want)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_transition_from_noisy_ordinal_decreases_phi(target):
    widths = (2, 4, 8)
    g = torch.Generator().manual_seed(80)
    Ps = to(target.device, *apsfast.init_transforms(14, widths, "ordinal", noise=1e-3, generator=g, dtype=F64))
    Qs = to(target.device, *apsfast.init_transforms(14, widths, "ordinal", noise=1e-3, generator=g, dtype=F64))
    phi0 = float(apsfast.sharing_level(Ps, Qs))
    phi_max, phi_min = max_score(widths) ** 2, sum(widths) ** 2
    assert phi0 == pytest.approx(phi_max, rel=1e-4)
    # ∂Φ/∂p scales with Φ (the other side's S times this side's Gram), so τ ∝ 1/Φ keeps the
    # step size fixed; 0.5/Φ is well inside the stable range (≳ 3/Φ makes columns collapse).
    tau = 0.5 / phi0
    values = [float(apsfast.transition_step(Ps, Qs, tau)) for _ in range(50)]
    values.append(float(apsfast.sharing_level(Ps, Qs)))
    if target.backend == "reference":
        assert values[0] == phi0  # one code path for Φ and the step: the same float
    else:
        # The step's Φ comes from the backend's fused transition, sharing_level's from its own
        # sums: the same value up to float64 rounding.
        assert_close(torch.tensor(values[0]), torch.tensor(phi0))
    assert all(b <= a for a, b in zip(values, values[1:]))  # monotone descent
    assert values[-1] < 0.9 * phi0  # it left the maximum
    assert values[-1] >= phi_min - 1e-9  # and never beats Theorem 3.1's minimum
    for M in Ps + Qs:
        assert_unit_columns(M)


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("sides", ["PQ", "P", "Q"])
def test_transition_exact_ordinal_is_stationary(target, sides):
    widths = (1, 2, 5)
    Ps = to(target.device, *apsfast.init_transforms(9, widths, "ordinal", dtype=F64)) if "P" in sides else None
    Qs = to(target.device, *apsfast.init_transforms(6, (3, 6), "ordinal", dtype=F64)) if "Q" in sides else None
    before = [m.clone() for m in (Ps or []) + (Qs or [])]
    expected = float(naive_phi(*(None if Ms is None else exact(*Ms) for Ms in (Ps, Qs))))
    phi = apsfast.transition_step(Ps, Qs, 1e-3)
    assert float(phi) == expected
    for got, old in zip((Ps or []) + (Qs or []), before):
        torch.testing.assert_close(got, old, rtol=0, atol=1e-15)
    # The independent selection (the minimum) is stationary too.
    Is = to(target.device, *apsfast.init_transforms(9, widths, "independent", dtype=F64))
    old = [m.clone() for m in Is]
    apsfast.transition_step(Is, None, 1e-3)
    for got, o in zip(Is, old):
        torch.testing.assert_close(got, o, rtol=0, atol=1e-15)


# --- a network: transition_step_all ------------------------------------------------------------

def network(dtype=F64):
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


def layer_matrices(layer):
    return [side.matrix for side in (layer.out_transforms, layer.in_transforms) if side is not None]


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_network_matches_per_layer_reference_steps(target):
    layers = network()
    perturb(layers)
    twins = copy.deepcopy(layers)
    layers = [layer.to(target.device) for layer in layers]
    phi = apsfast.transition_step_all([(l.P, l.Q) for l in layers], 1e-3)
    expected = sum(reference.transition_step(t.P, t.Q, 1e-3) for t in twins)
    assert_close(phi, expected)
    for layer, twin in zip(layers, twins):
        for got, want in zip(layer_matrices(layer), layer_matrices(twin)):
            assert_close(got, want)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_direct_backend_call_matches_the_op(target):
    # apsfast.ops.step_sides, what a search's transition calls outside torch.compile, steps
    # the sides as the op does, in place, and moves their version counters as the op does.
    gen = torch.Generator().manual_seed(4)
    sides = [torch.cat(apsfast.init_transforms(12, (2, 5, 9), "orthogonal", generator=gen, dtype=F64), dim=1),
             torch.cat(apsfast.init_transforms(7, (3, 6), "orthogonal", generator=gen, dtype=F64), dim=1),
             torch.cat(apsfast.init_transforms(10, (4, 8), "orthogonal", generator=gen, dtype=F64), dim=1)]
    ours, theirs = to(target.device, *[m.clone() for m in sides]), to(target.device, *[m.clone() for m in sides])
    args = ([2, 5, 9, 3, 6, 4, 8], [3, 2, 2], [1, 0, -1], 1e-3, True)
    versions = [m._version for m in ours]
    phi = apsfast.ops.step_sides(ours, *args)
    expected = torch.ops.apsfast.transition_step_all(theirs, *args)
    assert torch.equal(phi, expected)
    for a, b, start, version in zip(ours, theirs, sides, versions):
        assert torch.equal(a, b) and not torch.equal(a.cpu(), start)
        assert a._version > version


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_loose_tensors_are_updated_in_place(target):
    Ps = apsfast.init_transforms(20, (2, 6, 12), "orthogonal", generator=torch.Generator().manual_seed(3), dtype=F64)
    Qs = [m.t().contiguous().t() for m in apsfast.init_transforms(9, (3, 5), "orthogonal", dtype=F64)]
    Ps2, Qs2 = [p.clone() for p in Ps], [q.clone() for q in Qs]
    Ps, Qs = to(target.device, *Ps), to(target.device, *Qs)
    phi = apsfast.transition_step_all([(Ps, Qs), (None, Qs[:1])], 1e-3)
    expected = reference.transition_step(Ps2, Qs2, 1e-3)
    for a, b in zip(Ps + Qs, Ps2 + Qs2):
        assert_close(a, b)
    assert phi > expected.to(phi.device)  # the second layer adds its own Φ


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_network_phi_falls_and_columns_stay_unit(target):
    layers = network()
    perturb(layers)
    layers = [layer.to(target.device) for layer in layers]
    pairs = [(l.P, l.Q) for l in layers]
    first = apsfast.transition_step_all(pairs, 1e-4)
    for _ in range(20):
        last = apsfast.transition_step_all(pairs, 1e-4)
    assert last < first
    for layer in layers:
        for M in layer_matrices(layer):
            assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=M.dtype))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_network_float32_matches_float64(target):
    layers64 = network()
    perturb(layers64)
    layers32 = [copy.deepcopy(l).float().to(target.device) for l in layers64]
    phi64 = apsfast.transition_step_all([(l.P, l.Q) for l in layers64], 1e-4)
    phi32 = apsfast.transition_step_all([(l.P, l.Q) for l in layers32], 1e-4)
    assert_close(phi32, phi64.float(), F32)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_relative_steps_each_side_as_if_it_were_alone(target):
    # ∂Φ/∂P = S(Q) ∂S(P)/∂P: without the partner factor, a side steps as a one-sided layer would.
    layers = network()
    perturb(layers)
    twins = copy.deepcopy(layers)
    layers = [layer.to(target.device) for layer in layers]
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
        for got, want in zip(layer_matrices(layer), layer_matrices(twin)):
            assert_close(got, want)




@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
def test_relative_rate_does_not_grow_with_the_widths(target, one_thread):
    # The paper's CIFAR space ({16, 32, 64, 96} on both sides, meta = Σ widths) from a perturbed
    # ordinal start: eq. 5's own scale (S ~ 400 per side) overshoots at τ = 1e-2 and Φ climbs
    # past its ordinal maximum (the columns align); the relative step descends smoothly.
    phis = {}
    for relative in (False, True):
        torch.manual_seed(0)
        layer = apsfast.nn.APSConv2d((16, 32, 64, 96), (16, 32, 64, 96), 1, sharing="transitional", dtype=F64)
        start = float(layer.sharing_level())  # the ordinal maximum, 384² (Theorem 3.1)
        phis[relative] = [float(layer.transition_step(1e-2, relative=relative)) for _ in range(150)]
        phis[relative].append(float(layer.sharing_level()))
    assert start == 384 ** 2
    assert max(phis[False][-50:]) > start
    relative = phis[True]
    assert relative[-1] < 0.5 * start and all(b <= a * (1 + 1e-9) for a, b in zip(relative[5:], relative[6:]))


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("rows,cols", [(5, 9), (9, 5), (7, 7)], ids=["wide", "tall", "square"])
def test_every_aspect_matches_reference(target, rows, cols, relative):
    # Sides narrower than their candidates (C < n, e.g. ordinal meta = max width) take the
    # M Mᵀ route in the compiled kernels, taller ones the MᵀM route.
    g = torch.Generator().manual_seed(rows * 10 + cols)
    widths = [2, cols - 2]
    twins = [F.normalize(torch.randn(rows, cols, generator=g, dtype=F64), dim=0) for _ in range(3)]
    Ms = [M.clone().to(target.device) for M in twins]
    args = (widths * 3, [2, 2, 2], [1, 0, -1], 1e-2, relative)
    phi = torch.ops.apsfast.transition_step_all(Ms, *args)
    expected = reference.transition_step_all(twins, *args)
    assert_close(phi, expected)
    for M, twin in zip(Ms, twins):
        assert_close(M, twin)


# Sides of a batched step: (rows, block widths, partner). Tall sides (rows ≥ cols) use the
# [cols, cols] Gram, wide ones M Mᵀ and the per-block Gram; several span more than one tile.
SIDES = {
    "mixed": [(130, (30, 50), 1),        # tall, 2 × 2 Gram tiles
              (100, (20, 45, 70), 0),    # wide: M Mᵀ over 2 × 2 tiles, blocks across tile borders
              (9, (2, 3, 4), -1),        # a one-sided layer, wide
              (12, (3, 5), 4),           # tall
              (7, (1, 4, 6), 3),         # wide
              (66, (66,), -1)],          # square: tall by the rows ≥ cols rule, one block
    "lone": [(8, (8, 16), -1), (33, (17,), -1)],  # only single-sided layers, one a single block
    # The CPU kernel runs a layer this large on all threads and halves its Grams recursively
    # (blocks across the split at column 160); the small layers beside it share the threads.
    "large": [(300, (60, 100, 140), 1),     # tall, 300 × 300 Gram: two levels of halving
              (260, (100, 160, 260), 0),    # wide: M Mᵀ and the last block's Gram halved
              (12, (3, 5), 3),              # small layers, one a pair
              (7, (1, 4, 6), 2),
              (9, (2, 3, 4), -1)],
}


def transition_inputs(sides: str, dtype, layout: str, seed: int = 0):
    """Unit-column sides in ``dtype`` on the CPU, the flat widths / counts / partner, and for
    ``layout == "view"`` the NaN-filled tensors the sides are views of (so a stray read shows
    up as NaN and a stray write in the rest); ``column_major`` stores every side transposed."""
    Ms, widths, counts, partner, bases = [], [], [], [], []
    for s, (rows, ws, p) in enumerate(SIDES[sides]):
        M = transform(rows, sum(ws), seed + s, dtype)
        if layout == "column_major":
            M = M.t().contiguous().t()
        elif layout == "view":
            base = torch.full((rows + 3, sum(ws) + 5), math.nan, dtype=dtype)
            base[1:rows + 1, 2:sum(ws) + 2] = M
            M = base[1:rows + 1, 2:sum(ws) + 2]
            bases.append(base)
        Ms.append(M)
        widths.extend(ws)
        counts.append(len(ws))
        partner.append(p)
    return Ms, widths, counts, partner, bases


# (sides, dtype, layout, tau, relative)
BATCHED = [
    pytest.param("mixed", F64, "contiguous", 1e-4, False, id="mixed-f64"),
    pytest.param("mixed", F64, "column_major", 1e-2, True, id="mixed-column_major-relative-f64"),
    pytest.param("mixed", F32, "contiguous", 1e-5, False, id="mixed-small-tau-f32"),
    pytest.param("mixed", F32, "view", 1e-2, False, id="mixed-view-large-tau-f32"),
    pytest.param("mixed", F32, "column_major", 1e-2, True, id="mixed-column_major-relative-f32"),
    pytest.param("lone", F32, "contiguous", 3e-3, False, id="lone-f32"),
    pytest.param("mixed", BF16, "view", 1e-4, False, id="mixed-view-bf16"),
    pytest.param("mixed", F16, "contiguous", 1e-2, True, id="mixed-relative-f16"),
    pytest.param("large", F64, "contiguous", 1e-6, False, id="large-f64"),
    pytest.param("large", F32, "view", 1e-3, True, id="large-view-relative-f32"),
    pytest.param("large", BF16, "column_major", 1e-3, True, id="large-column_major-relative-bf16"),
]
# The interpreter (slow per program) takes one case per dtype family and layout kind.
INTERPRETED_BATCHED = ("mixed-column_major-relative-f64", "lone-f32", "mixed-view-bf16")
BATCHED_TARGETS = [pytest.param(t.values[0], *c.values, id=f"{c.id}-{t.id}", marks=t.marks)
                   for c in BATCHED for t in ALL if t is not TRITON_INTERPRETED or c.id in INTERPRETED_BATCHED]


@pytest.mark.parametrize("target,sides,dtype,layout,tau,relative", BATCHED_TARGETS, indirect=["target"])
def test_batched_step_matches_reference(target, sides, dtype, layout, tau, relative):
    target.require(dtype)
    Ms, widths, counts, partner, bases = transition_inputs(sides, dtype, layout)
    before = [M.clone() for M in Ms]
    exact_Ms, own_Ms = [M.double().clone() for M in Ms], [M.clone() for M in Ms]
    if bases:
        device_bases = [b.clone().to(target.device) for b in bases]
        mine = [db[1:M.shape[0] + 1, 2:M.shape[1] + 2] for db, M in zip(device_bases, Ms)]
    else:
        mine = [M.clone().to(target.device) for M in Ms]
    for _ in range(2):  # the second step reuses any plan cached by the first
        phi = torch.ops.apsfast.transition_step_all(mine, widths, counts, partner, tau, relative)
        phi_exact = reference.transition_step_all(exact_Ms, widths, counts, partner, tau, relative)
        phi_own = reference.transition_step_all(own_Ms, widths, counts, partner, tau, relative)
        assert phi.dim() == 0 and phi.device.type == target.device.type
        assert phi.dtype == (F64 if dtype == F64 else F32)
        if dtype in (BF16, F16):
            err, err_own = abs(phi.item() - phi_exact.item()), abs(phi_own.item() - phi_exact.item())
            assert err <= 2 * err_own + 1e-5 * phi_exact.item(), (err, err_own)
        else:
            assert_close(phi, phi_exact, dtype)
        for M, E, O in zip(mine, exact_Ms, own_Ms):
            assert M.dtype == dtype
            assert_matches(M, E, O)
    for M, B in zip(mine, before):
        if tau >= 1e-4:
            assert (M.cpu().double() - B.double()).abs().max() > 1e-4  # every side moved
        assert_unit_columns(M, 1e-2 if dtype in (BF16, F16) else 1e-5)
    if layout == "column_major":
        assert not mine[0].is_contiguous()  # updated in place through its strides
    for db in (device_bases if bases else ()):
        # Untouched outside the views: still NaN around every side.
        outside = torch.ones(db.shape, dtype=torch.bool)
        outside[1:-2, 2:-3] = False
        assert db.cpu()[outside].isnan().all()


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_partners_need_not_be_pairs(target):
    # partner is any other side: a chain and a cycle are scored and stepped as the reference does.
    sides = [(20, (4, 9)), (15, (5, 10)), (11, (2, 3)), (13, (6,)), (8, (1, 7))]
    Ms = [transform(rows, sum(ws), 30 + s) for s, (rows, ws) in enumerate(sides)]
    widths, counts, partner = [w for _, ws in sides for w in ws], [len(ws) for _, ws in sides], [1, 2, 0, 4, -1]
    expected = [M.clone() for M in Ms]
    mine = to(target.device, *Ms)
    phi = torch.ops.apsfast.transition_step_all(mine, widths, counts, partner, 1e-4)
    assert_close(phi, reference.transition_step_all(expected, widths, counts, partner, 1e-4))
    for M, E in zip(mine, expected):
        assert_close(M, E)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_batched_step_is_repeatable(target):
    # Scores are summed in a fixed order, so two runs from one point agree bit for bit.
    Ms, widths, counts, partner, _ = transition_inputs("mixed", F32, "contiguous")
    first, second = ([M.clone().to(target.device) for M in Ms] for _ in range(2))
    phi1 = torch.ops.apsfast.transition_step_all(first, widths, counts, partner, 1e-3)
    phi2 = torch.ops.apsfast.transition_step_all(second, widths, counts, partner, 1e-3)
    assert torch.equal(phi1, phi2)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_opcheck(target, relative):
    Ms = [torch.cat(apsfast.init_transforms(9, (2, 3), "orthogonal", dtype=F64), 1),
          torch.cat(apsfast.init_transforms(7, (1, 4), "orthogonal", dtype=F64), 1)]
    torch.library.opcheck(torch.ops.apsfast.transition_step_all.default,
                          (to(target.device, *Ms), [2, 3, 1, 4], [2, 2], [1, 0], 1e-3, relative))


# --- Triton: launches and stores ----------------------------------------------------------------

@pytest.mark.parametrize("target", TRITON_ONLY, indirect=True)
def test_triton_batched_step_is_two_launches(target, monkeypatch):
    from apsfast.kernels import transition as ktransition
    Ms, widths, counts, partner, _ = transition_inputs("mixed", F32, "contiguous", seed=3)
    counters = {}
    for name in ("_transition_gram_kernel", "_transition_update_kernel"):
        counters[name] = CountLaunches(getattr(ktransition, name))
        monkeypatch.setattr(ktransition, name, counters[name])
    torch.ops.apsfast.transition_step_all(to(target.device, *Ms), widths, counts, partner, 1e-4)
    assert [c.launches for c in counters.values()] == [1, 1]


@pytest.mark.parametrize("target", TRITON_ONLY, indirect=True)
def test_every_workspace_entry_is_written_before_read(target, monkeypatch):
    """The workspace starts as NaN: an entry read before it is written shows up as NaN."""
    from apsfast.kernels import transition as ktransition
    nan_empty = nan_filled_empty()

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(ktransition, "_PLANS", {})
    Ms, widths, counts, partner, _ = transition_inputs("mixed", F32, "contiguous", seed=1)
    expected_Ms = [M.double().clone() for M in Ms]
    mine = to(target.device, *Ms)
    phi = torch.ops.apsfast.transition_step_all(mine, widths, counts, partner, 1e-4)
    assert_close(phi, reference.transition_step_all(expected_Ms, widths, counts, partner, 1e-4), F32)
    for M, E in zip(mine, expected_Ms):
        assert_close(M, E, F32)


# --- errors -------------------------------------------------------------------------------------

def test_transition_step_errors():
    Ps = apsfast.init_transforms(6, (2, 4), dtype=F64)
    Qs = apsfast.init_transforms(5, (1, 3), dtype=F64)
    for tau, match in ((0.0, r"tau must be a finite float > 0, got 0.0"),
                       (-1e-3, r"tau must be a finite float > 0, got -0.001"),
                       (float("nan"), r"tau must be a finite float > 0, got nan"),
                       (float("inf"), r"tau must be a finite float > 0, got inf"),
                       (True, r"tau must be a finite float > 0, got True"),
                       ("0.1", r"tau must be a finite float > 0")):
        with pytest.raises(ValueError, match=match):
            apsfast.transition_step(Ps, Qs, tau)
    with pytest.raises(ValueError, match=r"Ps and Qs are both None"):
        apsfast.transition_step(None, None, 1e-3)
    with pytest.raises(ValueError, match=r"Ps\[1\]\.shape\[0\] must be 6 \(the meta width of Ps\[0\]\), got 7"):
        apsfast.transition_step([Ps[0], torch.zeros(7, 4, dtype=F64)], Qs, 1e-3)
    with pytest.raises(ValueError, match=r"Qs\[1\]\.shape\[0\] must be 5 .*got 4"):
        apsfast.transition_step(Ps, [Qs[0], torch.zeros(4, 3, dtype=F64)], 1e-3)
    with pytest.raises(TypeError, match=r"Qs\[0\] has dtype torch.float32, expected torch.float64 "
                                        r"\(the dtype of Ps\[0\]\)"):
        apsfast.transition_step(Ps, [q.float() for q in Qs], 1e-3)
    with pytest.raises(TypeError, match=r"Ps\[1\] has dtype torch.float32, expected torch.float64"):
        apsfast.transition_step([Ps[0], Ps[1].float()], Qs, 1e-3)
    with pytest.raises(TypeError, match=r"Ps\[1\] must be a torch.Tensor, got list"):
        apsfast.transition_step([Ps[0], [[1.0]]], Qs, 1e-3)
    with pytest.raises(TypeError, match=r"Qs\[0\] must have a floating-point dtype, got torch.int64"):
        apsfast.transition_step(Ps, [torch.ones(5, 2, dtype=torch.long)], 1e-3)
    with pytest.raises(ValueError, match=r"Ps\[0\] must have 2 dims \(meta_width, c_a\), got shape \(6,\)"):
        apsfast.transition_step([Ps[0][:, 0]], Qs, 1e-3)
    with pytest.raises(TypeError, match=r"Ps must be a non-empty sequence .*got Tensor"):
        apsfast.transition_step(Ps[0], Qs, 1e-3)
    with pytest.raises(TypeError, match=r"Qs must be a non-empty sequence .*got Tensor"):
        apsfast.transition_step(Ps, Qs[1], 1e-3)
    with pytest.raises(TypeError, match=r"Ps must be a non-empty sequence .*got list"):
        apsfast.transition_step([], Qs, 1e-3)
    with pytest.raises(TypeError, match=r"Qs must be a non-empty sequence .*got generator"):
        apsfast.transition_step(Ps, (q for q in Qs), 1e-3)


def test_transition_step_errors_leave_inputs_untouched():
    Ps = noisy(6, (2, 4), "ordinal", 90)
    Qs = noisy(5, (1, 3), "ordinal", 91)
    before = [m.clone() for m in Ps + Qs]
    with pytest.raises(TypeError):
        apsfast.transition_step(Ps, Qs + [torch.zeros(5, 2, dtype=torch.float32)], 1e-3)
    with pytest.raises(ValueError):
        apsfast.transition_step(Ps, Qs, -1.0)
    assert all(torch.equal(a, b) for a, b in zip(Ps + Qs, before))


# --- the matmul precision of the step ------------------------------------------------------------

def matmul_settings():
    """The global float32 matmul precision (None where the getter cannot read it) and the two
    per-backend settings that torch.set_float32_matmul_precision writes."""
    try:
        overall = torch.get_float32_matmul_precision()
    except RuntimeError:  # set through the per-backend API to a mix of levels
        overall = None
    return overall, torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def keep_matmul_settings(scoped):
    scoped.keep(*MATMUL_PRECISION)


@pytest.mark.parametrize("found", ["default", "highest", "medium", "per-backend"])
def test_precision_holds_for_the_call_only(found, keep_matmul_settings, monkeypatch):
    if found == "per-backend":  # set through the newer API: the global getter raises
        torch.backends.cuda.matmul.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision = "ieee", "bf16"
    elif found != "default":
        torch.set_float32_matmul_precision(found)
    before = matmul_settings()
    seen, step = [], apsfast.ops.transition_step_all

    def spy(*args):
        seen.append(matmul_settings())
        out = step(*args)
        assert matmul_settings() == seen[-1]  # the kernel puts back what it changes
        return out

    monkeypatch.setattr(apsfast.ops, "transition_step_all", spy)
    pairs = [(l.P, l.Q) for l in network(F32)]
    for precision in ("medium", "high", "highest", None):
        apsfast.transition_step_all(pairs, 1e-3, precision=precision)
        assert matmul_settings() == before
    # What torch.set_float32_matmul_precision sets: (CUDA, oneDNN) per level.
    assert [s[1:] for s in seen] == [("tf32", "bf16"), ("tf32", "tf32"), ("ieee", "ieee"), before[1:]]
    if found != "per-backend":
        assert [s[0] for s in seen] == ["medium", "high", "highest", before[0]]


def test_precision_errors_name_the_argument(keep_matmul_settings):
    layers = network(F32)
    before, settings = [M.clone() for l in layers for M in layer_matrices(l)], matmul_settings()
    for bad in ("low", "HIGHEST", 1):
        with pytest.raises(ValueError, match=rf"precision must be one of 'highest', 'high', 'medium', got {bad!r}"):
            apsfast.transition_step_all([(l.P, l.Q) for l in layers], 1e-3, precision=bad)
    assert all(torch.equal(a, b) for a, b in zip((M for l in layers for M in layer_matrices(l)), before))
    assert matmul_settings() == settings


def near_ordinal_inputs(sides: str, seed: int = 0):
    """The sides of SIDES[sides] as APS-T starts them: ordinal transforms plus 1e-3 noise."""
    g = torch.Generator().manual_seed(seed)
    Ms = [torch.cat(apsfast.init_transforms(rows, ws, "ordinal", noise=1e-3, generator=g, dtype=F32), 1)
          for rows, ws, _ in SIDES[sides]]
    return (Ms, [w for _, ws, _ in SIDES[sides] for w in ws], [len(ws) for _, ws, _ in SIDES[sides]],
            [p for _, _, p in SIDES[sides]])


@pytest.mark.parametrize("target", [CPU], indirect=True)
@pytest.mark.parametrize("start", ["random", "near_ordinal"])
def test_medium_precision_keeps_the_grams_float32(target, start, keep_matmul_settings):
    # "medium": the gradient GEMMs of large layers run in bf16 (oneDNN), every Gram in float32:
    # Φ is the float32 one to the bit, near the ordinal start too (columns ~e_i, whose largest
    # entry rounds to 1 in bf16). The steps err at most twice as much as the reference's torch
    # matmuls at that setting, and the setting is put back. How far torch's own bf16 Gram strays
    # is oneDNN's rounding on the processor at hand (1e-3 relative on one, 8e-7 on another), so
    # it is not asserted.
    if start == "random":
        Ms, widths, counts, partner, _ = transition_inputs("large", F32, "contiguous", seed=5)
    else:
        Ms, widths, counts, partner = near_ordinal_inputs("large", seed=5)
    exact_Ms, own_Ms, full_Ms = [M.double() for M in Ms], [M.clone() for M in Ms], [M.clone() for M in Ms]
    args = (widths, counts, partner, 1e-3, True)
    with matmul_precision("medium"):
        settings = matmul_settings()
        phi = torch.ops.apsfast.transition_step_all(Ms, *args)
        assert matmul_settings() == settings
        reference.transition_step_all(own_Ms, *args)
    phi_full = torch.ops.apsfast.transition_step_all(full_Ms, *args)
    reference.transition_step_all(exact_Ms, *args)
    assert phi.item() == phi_full.item()
    for M, E, O in zip(Ms, exact_Ms, own_Ms):
        assert max_err(M, E) <= 2 * max_err(O, E) + 1e-5
        assert_unit_columns(M, 1e-5)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # else "medium" computes in float32
        assert not all(torch.equal(M, F) for M, F in zip(Ms, full_Ms))  # the large layer's step


def test_transition_step_all_errors():
    layers = network(F32)
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


@pytest.mark.parametrize("target", [CPU, CUDA], indirect=True)
def test_compiled_op_errors_name_the_argument(target):
    # The C++ libraries share one set of argument checks (csrc/common/checks.h).
    Ms = [torch.ones(4, 5, device=target.device)]
    with pytest.raises(RuntimeError, match=r"the widths of side 0 must sum to Ms\[0\]\.shape\[1\] = 5, got 4"):
        torch.ops.apsfast.transition_step_all(Ms, [1, 3], [2], [-1], 1e-3)
    with pytest.raises(RuntimeError, match=r"partner\[0\] must be -1 or another side's index"):
        torch.ops.apsfast.transition_step_all(Ms, [5], [1], [0], 1e-3)
    with pytest.raises(RuntimeError, match=r"widths must hold at least 3 block widths"):
        torch.ops.apsfast.transition_step_all(Ms, [5], [3], [-1], 1e-3)
    with pytest.raises(RuntimeError, match=r"Ms\[1\] has dtype Double, expected Float"):
        torch.ops.apsfast.transition_step_all(Ms + [Ms[0].double()], [5, 5], [1, 1], [1, 0], 1e-3)
    with pytest.raises(RuntimeError, match=r"Ms\[0\] is updated in place and must not have overlapping"):
        torch.ops.apsfast.transition_step_all([torch.ones(4, 1, device=target.device).expand(4, 5)],
                                              [5], [1], [-1], 1e-3)


# --- properties (hypothesis) --------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
width_sets = st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True).map(lambda w: tuple(sorted(w)))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


@given(p_widths=width_sets, q_widths=st.none() | width_sets, extra=st.integers(0, 3),
       noise=st.floats(1e-3, 0.5), seed=seeds)
def test_transition_small_step_descends_and_keeps_unit_columns(p_widths, q_widths, extra, noise, seed):
    g = torch.Generator().manual_seed(seed)
    Ps = apsfast.init_transforms(p_widths[-1] + extra, p_widths, "orthogonal", noise=noise, generator=g, dtype=F64)
    Qs = None if q_widths is None else apsfast.init_transforms(
        q_widths[-1] + extra, q_widths, "orthogonal", noise=noise, generator=g, dtype=F64)
    phi_before = apsfast.sharing_level(Ps, Qs)
    tau = 1e-4 / float(phi_before)
    out = apsfast.transition_step(Ps, Qs, tau)
    assert_close(out, phi_before)
    # A small projected step moves along the tangent of −∂Φ: Φ does not go up (first order:
    # dΦ = −τ Σ ‖(I − ppᵀ) ∂Φ/∂p‖² ≤ 0, second order O(τ²) is far below rounding here).
    assert float(apsfast.sharing_level(Ps, Qs)) <= float(phi_before) * (1 + 1e-12)
    for M in Ps + (Qs or []):
        torch.testing.assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=F64), rtol=0, atol=1e-12)


@given(p_widths=width_sets, q_widths=width_sets, extra=st.integers(0, 3), seed=seeds)
def test_transition_step_equivariant_to_meta_rotation(p_widths, q_widths, extra, seed):
    # Φ is rotation invariant, so its gradient rotates with the meta space: step(R M) = R step(M).
    g = torch.Generator().manual_seed(seed)
    meta_p, meta_q = p_widths[-1] + extra, q_widths[-1] + extra
    Ps = [randn(g, meta_p, c) for c in p_widths]
    Qs = [randn(g, meta_q, c) for c in q_widths]
    R_p, R_q = random_rotation(meta_p, g), random_rotation(meta_q, g)
    Ps_rot, Qs_rot = [R_p @ m for m in Ps], [R_q @ m for m in Qs]
    tau = 0.1 / float(apsfast.sharing_level(Ps, Qs))
    apsfast.transition_step(Ps, Qs, tau)
    apsfast.transition_step(Ps_rot, Qs_rot, tau)
    for a, b in zip(Ps_rot, Ps):
        torch.testing.assert_close(a, R_p @ b, rtol=1e-9, atol=1e-9)
    for a, b in zip(Qs_rot, Qs):
        torch.testing.assert_close(a, R_q @ b, rtol=1e-9, atol=1e-9)
