"""Property tests: construction and the APS conv against the einsum definition, and the
invariances and bounds of the sharing level Φ, over randomly drawn small shapes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import apsfast
from conftest import assert_close

F64 = torch.float64

# The backend fixture only sets an environment variable; it is the same for every example.
with_fixture = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

seeds = st.integers(0, 2**31 - 1)
# Candidate widths: strictly ascending, 1..4 candidates, each ≤ 6.
width_sets = st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True).map(lambda w: tuple(sorted(w)))


def einsum_kernel(weight, P, Q):
    """Paper eq. 2 verbatim, identities standing in for missing transforms."""
    P = torch.eye(weight.shape[0], dtype=weight.dtype) if P is None else P
    Q = torch.eye(weight.shape[1], dtype=weight.dtype) if Q is None else Q
    return torch.einsum("ao,bi,ab...->oi...", P, Q, weight)


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


def random_rotation(n, gen):
    q, r = torch.linalg.qr(randn(gen, n, n))
    return q * torch.sign(torch.diagonal(r))


def max_score(widths):
    return sum(c * (len(widths) - a) for a, c in enumerate(widths))


@st.composite
def layer_shapes(draw, max_kernel_dims=2):
    C_out, C_in = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    c_o = draw(st.none() | st.integers(1, C_out))
    c_i = draw(st.none() | st.integers(1, C_in))
    kernel = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=max_kernel_dims)))
    return C_out, C_in, c_o, c_i, kernel


# --- construct and aps_conv2d -------------------------------------------------------------------

@with_fixture
@given(shape=layer_shapes(), seed=seeds)
def test_construct_shape_and_values(backend, shape, seed):
    C_out, C_in, c_o, c_i, kernel = shape
    g = torch.Generator().manual_seed(seed)
    weight = randn(g, C_out, C_in, *kernel)
    P = None if c_o is None else randn(g, C_out, c_o)
    Q = None if c_i is None else randn(g, C_in, c_i)
    out = apsfast.construct(weight, P, Q)
    assert out.shape == (C_out if c_o is None else c_o, C_in if c_i is None else c_i, *kernel)
    assert out.dtype == F64 and out.is_contiguous()
    assert_close(out, einsum_kernel(weight, P, Q))


@with_fixture
@given(shape=layer_shapes(), seed=seeds)
def test_construct_is_bilinear_in_transforms(backend, shape, seed):
    # W^{i,o} is linear in P, in Q and in W separately.
    C_out, C_in, c_o, c_i, kernel = shape
    g = torch.Generator().manual_seed(seed)
    weight, weight2 = randn(g, C_out, C_in, *kernel), randn(g, C_out, C_in, *kernel)
    P, P2 = randn(g, C_out, c_o or C_out), randn(g, C_out, c_o or C_out)
    Q = randn(g, C_in, c_i or C_in)
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
    pair = lambda lo, hi: st.integers(lo, hi) | st.tuples(st.integers(lo, hi), st.integers(lo, hi))
    stride, padding, dilation = draw(pair(1, 3)), draw(pair(0, 2)), draw(pair(1, 2))
    sp = lambda v, k: v if isinstance(v, tuple) else (v, v)
    (ph, pw), (dh, dw) = sp(padding, 0), sp(dilation, 0)
    # The input must cover the dilated kernel after padding.
    H = max(1, dh * (kh - 1) + 1 - 2 * ph) + draw(st.integers(0, 4))
    W = max(1, dw * (kw - 1) + 1 - 2 * pw) + draw(st.integers(0, 4))
    return dict(C_out=C_out, C_in=C_in, c_o=c_o, c_i=c_i, kernel=(kh, kw), stride=stride,
                padding=padding, dilation=dilation, N=draw(st.integers(1, 2)), H=H, W=W,
                use_Q=draw(st.booleans()), use_bias=draw(st.booleans()))


@with_fixture
@given(case=conv_cases(), seed=seeds)
def test_aps_conv2d_matches_conv_with_einsum_kernel(backend, case, seed):
    g = torch.Generator().manual_seed(seed)
    weight = randn(g, case["C_out"], case["C_in"], *case["kernel"])
    P = randn(g, case["C_out"], case["c_o"])
    Q = randn(g, case["C_in"], case["c_i"]) if case["use_Q"] else None
    bias = randn(g, case["C_out"]) if case["use_bias"] else None
    c_i = case["c_i"] if case["use_Q"] else case["C_in"]
    x = randn(g, case["N"], c_i, case["H"], case["W"])
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


@with_fixture
@given(C=st.integers(1, 6), c_o=st.integers(1, 6), k=st.integers(1, 3), pad=st.integers(0, 1),
       seed=seeds)
def test_aps_conv2d_depthwise(backend, C, c_o, k, pad, seed):
    assume(c_o <= C)
    g = torch.Generator().manual_seed(seed)
    weight, P = randn(g, C, 1, k, k), randn(g, C, c_o)
    x = randn(g, 2, c_o, k + 2, k + 1)
    out = apsfast.aps_conv2d(x, weight, P, None, padding=pad, groups=c_o)
    assert_close(out, F.conv2d(x, einsum_kernel(weight, P, None), padding=pad, groups=c_o))


# --- sharing level: invariances and bounds ------------------------------------------------------

@st.composite
def sides(draw, meta_min=1):
    """Random (not necessarily orthogonal) transforms of one side, with a permutation."""
    widths = draw(width_sets)
    meta = draw(st.integers(meta_min, 8))
    perm = draw(st.permutations(range(len(widths))))
    return meta, widths, perm


@given(p=sides(), q=sides(), seed=seeds)
def test_sharing_level_invariant_to_candidate_order(p, q, seed):
    g = torch.Generator().manual_seed(seed)
    Ps = [randn(g, p[0], c) for c in p[1]]
    Qs = [randn(g, q[0], c) for c in q[1]]
    phi = apsfast.sharing_level(Ps, Qs)
    assert_close(apsfast.sharing_level([Ps[a] for a in p[2]], [Qs[a] for a in q[2]]), phi)
    assert_close(apsfast.sharing_level([Ps[a] for a in p[2]], Qs), phi)
    # The two sides enter symmetrically: Φ = S(Q)·S(P).
    assert_close(apsfast.sharing_level(Qs, Ps), phi)
    assert_close(apsfast.sharing_level(Ps, None) * apsfast.sharing_level(None, Qs), phi)


@given(p=sides(), q=sides(), seed=seeds)
def test_sharing_level_invariant_to_meta_rotation(p, q, seed):
    g = torch.Generator().manual_seed(seed)
    Ps = [randn(g, p[0], c) for c in p[1]]
    Qs = [randn(g, q[0], c) for c in q[1]]
    R_p, R_q = random_rotation(p[0], g), random_rotation(q[0], g)
    phi = apsfast.sharing_level(Ps, Qs)
    assert_close(apsfast.sharing_level([R_p @ m for m in Ps], [R_q @ m for m in Qs]), phi)
    # Right-multiplying a candidate by an orthogonal c_a × c_a matrix (a change of basis
    # inside its range) leaves Φ unchanged too.
    Ps_rebased = [m @ random_rotation(m.shape[1], g) for m in Ps]
    assert_close(apsfast.sharing_level(Ps_rebased, Qs), phi)


@given(p_widths=width_sets, q_widths=width_sets, extra_p=st.integers(0, 3), extra_q=st.integers(0, 3),
       seed=seeds)
def test_sharing_level_between_independent_and_ordinal(p_widths, q_widths, extra_p, extra_q, seed):
    # For semi-orthogonal transforms: Σc_P·Σc_Q ≤ Φ ≤ Φ(ordinal) (Theorem 3.1). The lower
    # bound holds even when meta_width < Σ c (where it is not attained).
    meta_p, meta_q = p_widths[-1] + extra_p, q_widths[-1] + extra_q
    g = torch.Generator().manual_seed(seed)
    Ps = apsfast.init_transforms(meta_p, p_widths, "orthogonal", generator=g, dtype=F64)
    Qs = apsfast.init_transforms(meta_q, q_widths, "orthogonal", generator=g, dtype=F64)
    phi = float(apsfast.sharing_level(Ps, Qs))
    ordinal = apsfast.sharing_level(apsfast.init_transforms(meta_p, p_widths, "ordinal", dtype=F64),
                                    apsfast.init_transforms(meta_q, q_widths, "ordinal", dtype=F64))
    assert float(ordinal) == max_score(p_widths) * max_score(q_widths)
    lower = sum(p_widths) * sum(q_widths)
    assert lower * (1 - 1e-12) <= phi <= float(ordinal) * (1 + 1e-12)
    if meta_p >= sum(p_widths) and meta_q >= sum(q_widths):
        independent = apsfast.sharing_level(
            apsfast.init_transforms(meta_p, p_widths, "independent", dtype=F64),
            apsfast.init_transforms(meta_q, q_widths, "independent", dtype=F64))
        assert float(independent) == lower


@given(meta=st.integers(1, 12), widths=width_sets, mode=st.sampled_from(["ordinal", "independent", "orthogonal"]),
       seed=seeds)
def test_init_transforms_semi_orthogonal(meta, widths, mode, seed):
    assume(widths[-1] <= meta and (mode != "independent" or sum(widths) <= meta))
    Ms = apsfast.init_transforms(meta, widths, mode, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert [tuple(M.shape) for M in Ms] == [(meta, c) for c in widths]
    for M in Ms:
        torch.testing.assert_close(M.t() @ M, torch.eye(M.shape[1], dtype=F64), rtol=0, atol=1e-12)


# --- transition step ----------------------------------------------------------------------------

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
