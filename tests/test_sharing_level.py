"""apsfast::sharing_level: Φ of one layer (paper Definition 3.1, eq. 4) in closed form on
every backend, against the pairwise sum written from the paper, its gradient, a Monte-Carlo
estimate of Definition 3.1's cross-covariance, Theorem 3.1's extremes and hypothesis
invariances."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

import apsfast
from cases import ALL, COMPILE, NO_INTERPRETER, max_score, naive_phi, random_matrices, random_rotation, to
from conftest import assert_close

F64 = torch.float64

# Candidate width sets, ascending; odd sizes, a single candidate and a wide spread.
WIDTH_SETS = {
    "single": (3,),
    "odd": (1, 2, 5),
    "pow2": (4, 8, 16, 32, 64),
    "pair": (2, 7),
}


def on(target, Ms):
    return None if Ms is None else to(target.device, *Ms)


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("p_widths,q_widths,mode", [
    ((3,), (3,), "ordinal"), ((1, 2, 5), (2, 3, 6, 9), "ordinal"), ((4, 8, 16, 32, 64), (1, 2, 5), "orthogonal"),
    ((2, 7), (3,), "orthogonal"), ((1, 2, 5), (1, 2, 5), "orthogonal"), ((4, 8, 16, 32, 64), (2, 3, 6, 9), "random"),
    ((3,), (1, 2, 5), "random"), ((2, 7), (2, 3, 6, 9), "random"),
], ids=["ordinal-single-single", "ordinal-odd-four", "orthogonal-pow2-odd", "orthogonal-pair-single",
        "orthogonal-odd-odd", "random-pow2-four", "random-single-odd", "random-pair-four"])
def test_sharing_level_matches_double_sum(target, p_widths, q_widths, mode):
    meta_p, meta_q = p_widths[-1] + 3, q_widths[-1] + 2
    if mode == "random":  # general, non-orthogonal matrices: the identity Φ = S(Q)·S(P) still holds
        Ps, Qs = random_matrices(meta_p, p_widths, 1), random_matrices(meta_q, q_widths, 2)
    else:
        g = torch.Generator().manual_seed(3)
        Ps = apsfast.init_transforms(meta_p, p_widths, mode, generator=g, dtype=F64)
        Qs = apsfast.init_transforms(meta_q, q_widths, mode, generator=g, dtype=F64)
    out = apsfast.sharing_level(on(target, Ps), on(target, Qs))
    assert out.dim() == 0 and out.dtype == F64 and out.device.type == target.device.type
    assert_close(out, naive_phi(Ps, Qs))


@pytest.mark.parametrize("target", ALL, indirect=True)
@pytest.mark.parametrize("widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
def test_sharing_level_one_side_none(target, widths):
    Ms = random_matrices(widths[-1] + 1, widths, 4)
    assert_close(apsfast.sharing_level(on(target, Ms), None), naive_phi(Ms, None))
    assert_close(apsfast.sharing_level(None, on(target, Ms)), naive_phi(None, Ms))
    # None is the same as one candidate of a single unit column: ‖pᵀp‖² = 1.
    unit = [F.normalize(torch.ones(5, 1, dtype=F64), dim=0)]
    assert_close(apsfast.sharing_level(on(target, Ms), on(target, unit)), apsfast.sharing_level(on(target, Ms), None))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_sharing_level_meta_width_smaller_than_widths_sum(target):
    # C < n = Σ c_a: the Gram may be formed on the meta side; values must not change.
    Ps = random_matrices(3, (1, 2, 3), 5)
    Qs = random_matrices(9, (4, 5), 6)
    assert_close(apsfast.sharing_level(on(target, Ps), on(target, Qs)), naive_phi(Ps, Qs))


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_sharing_level_float32_and_views(target):
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(7)).to(target.device)
    Ps = [base[:, :2], base[:, 2:5], base[:, 5:10]]  # non-contiguous column views
    Qs = [m.t().contiguous().t() for m in on(target, random_matrices(4, (1, 3), 8, torch.float32))]
    out = apsfast.sharing_level(Ps, Qs)
    assert out.dtype == torch.float32
    expected = naive_phi([p.double().cpu() for p in Ps], [q.double().cpu() for q in Qs])
    torch.testing.assert_close(out.double().cpu(), expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_sharing_level_gradient_matches_autograd_of_double_sum(target):
    Ps, Qs = random_matrices(5, (1, 2, 4), 9), random_matrices(6, (2, 3), 10)
    leaves = [m.clone().to(target.device).requires_grad_() for m in Ps + Qs]
    ours = torch.autograd.grad(apsfast.sharing_level(leaves[:3], leaves[3:]), leaves)
    ref_leaves = [m.clone().to(target.device).requires_grad_() for m in Ps + Qs]
    theirs = torch.autograd.grad(naive_phi(ref_leaves[:3], ref_leaves[3:]), ref_leaves)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


@pytest.mark.parametrize("target", ALL, indirect=True)
def test_sharing_level_gradcheck(target):
    Ps, Qs = random_matrices(4, (1, 3), 11), random_matrices(3, (2, 3), 12)
    leaves = tuple(m.to(target.device).requires_grad_() for m in Ps + Qs)
    assert torch.autograd.gradcheck(lambda *m: apsfast.sharing_level(list(m[:2]), list(m[2:])), leaves)
    assert torch.autograd.gradcheck(lambda *m: apsfast.sharing_level(None, list(m)), leaves[2:])


@pytest.mark.parametrize("target", NO_INTERPRETER, indirect=True)
def test_sharing_level_opcheck(target):
    Ps, Qs = on(target, random_matrices(4, (1, 3), 13)), on(target, random_matrices(3, (2, 3), 14))
    for args in ((Ps, Qs), ([], Qs), (Ps, [])):
        args = tuple([M.requires_grad_() for M in Ms] for Ms in args)
        torch.library.opcheck(torch.ops.apsfast.sharing_level.default, args)


@pytest.mark.parametrize("target", COMPILE, indirect=True)
def test_sharing_level_compile_fullgraph(target):
    Ps, Qs = on(target, random_matrices(5, (2, 3), 15)), on(target, random_matrices(4, (1, 4), 16))
    fn = torch.compile(lambda Ps, Qs: apsfast.ops.sharing_level(Ps, Qs) * 2, backend="aot_eager", fullgraph=True)
    assert_close(fn(Ps, Qs), 2 * naive_phi(*([M.cpu() for M in Ms] for Ms in (Ps, Qs))))


# --- Definition 3.1: Φ is the cross-covariance of candidate kernels under W ~ N(0, 1) ---------

MC_META = 7

MC_P_WIDTHS = (2, 5)  # Σ = 7: independent selection fits the meta width exactly

MC_Q_WIDTHS = (3, 4)

MC_SAMPLES = 4000


def _mc_transforms(mode):
    g = torch.Generator().manual_seed(21)
    Ps = apsfast.init_transforms(MC_META, MC_P_WIDTHS, mode, generator=g, dtype=F64)
    Qs = apsfast.init_transforms(MC_META, MC_Q_WIDTHS, mode, generator=g, dtype=F64)
    return Ps, Qs


def _squared_norm_unbiased(X, Y):
    """Unbiased estimate of ‖E[x yᵀ]‖²_F from N paired samples of zero-mean x, y (rows).

    The plug-in ‖Ĉ‖² with Ĉ = XᵀY / N is biased upward by (1/N) Σ_{jk} Var(x_j y_k); dropping
    the n = m terms of N² ‖Ĉ‖² = Σ_{n,m} (x_nᵀ x_m)(y_nᵀ y_m) removes that bias exactly.
    """
    N = X.shape[0]
    C_hat = X.t() @ Y / N
    diagonal = ((X ** 2).sum(1) * (Y ** 2).sum(1)).sum()
    return (N * N * (C_hat ** 2).sum() - diagonal) / (N * (N - 1)), C_hat


@pytest.mark.parametrize("kernel", [(1, 1), (2, 2)], ids=["1x1", "2x2"])
@pytest.mark.parametrize("mode", ["ordinal", "independent", "orthogonal"])
def test_definition_3_1_monte_carlo(mode, kernel):
    Ps, Qs = _mc_transforms(mode)
    g = torch.Generator().manual_seed(1234)
    # N iid meta-weights [C, C, kh, kw] with N(0, 1) entries, stacked on a trailing axis:
    # construct contracts the two channel modes only, so the sample axis rides along.
    W = torch.randn(MC_META, MC_META, *kernel, MC_SAMPLES, generator=g, dtype=F64)
    taps = math.prod(kernel)
    cands = {}
    for o, P in enumerate(Ps):
        for i, Q in enumerate(Qs):
            cand = apsfast.construct(W, P, Q)  # [c_o, c_i, kh, kw, N]
            assert cand.shape == (P.shape[1], Q.shape[1], *kernel, MC_SAMPLES)
            cands[i, o] = cand.reshape(-1, MC_SAMPLES).t()  # [N, c_o·c_i·kh·kw]
    # The batched call builds what one call per sample builds.
    for n in (0, MC_SAMPLES - 1):
        single = apsfast.construct(W[..., n].contiguous(), Ps[-1], Qs[0])
        assert_close(single.reshape(-1), cands[0, len(Ps) - 1][n])

    total_est = total_tol = 0.0
    for i in range(len(Qs)):
        for i_t in range(i, len(Qs)):
            for o in range(len(Ps)):
                for o_t in range(o, len(Ps)):
                    X, Y = cands[i, o], cands[i_t, o_t]
                    # Cov(W^{i,o}[o',i',s], W^{ĩ,õ}[o'',i'',s']) = (PᵀP̃)[o',o''] (QᵀQ̃)[i',i''] δ_{ss'}:
                    # taps are independent, so the full tensor norm is taps × the closed form.
                    PtP, QtQ = Ps[o].t() @ Ps[o_t], Qs[i].t() @ Qs[i_t]
                    closed = (PtP ** 2).sum() * (QtQ ** 2).sum()
                    expected_cov = torch.einsum("ab,cd,st->acsbdt", PtP, QtQ, torch.eye(taps, dtype=F64))
                    expected_cov = expected_cov.reshape(X.shape[1], Y.shape[1])
                    est, C_hat = _squared_norm_unbiased(X, Y)
                    # Entry-wise: with semi-orthogonal transforms every x_j, y_k has unit variance,
                    # so each Ĉ entry has std ≤ sqrt(2/N) ≈ 0.022; 6 sigma over ≤ 2·10³ entries.
                    assert (C_hat - expected_cov).abs().max() <= 6 * math.sqrt(2 / MC_SAMPLES)
                    # Norm: std(est) ≲ sqrt(8/N)·‖C‖ + sqrt(2 d1 d2)/N (linear + quadratic noise
                    # terms); ‖C‖² ≤ 20·taps gives ≤ 1.1 % relative std at N = 4000. Allow 5 sigma.
                    full = taps * closed
                    sigma = (math.sqrt(8 / MC_SAMPLES) * float(full.sqrt())
                             + math.sqrt(2 * X.shape[1] * Y.shape[1]) / MC_SAMPLES)
                    assert abs(float(est - full)) <= 5 * sigma, (i, i_t, o, o_t, float(est), float(full))
                    if closed >= 1:  # the "few percent" statement, where Φ is not ~0
                        assert abs(float(est / full) - 1) <= 0.06
                    total_est += float(est) / taps
                    total_tol += 5 * sigma / taps
    phi = float(apsfast.sharing_level(Ps, Qs))
    assert abs(total_est - phi) <= total_tol
    assert abs(total_est / phi - 1) <= 0.05


def test_definition_3_1_independent_pairs_are_uncorrelated():
    # Disjoint supports: every cross pair (i, o) ≠ (ĩ, õ) has exactly zero closed-form φ.
    Ps, Qs = _mc_transforms("independent")
    assert float(((Ps[0].t() @ Ps[1]) ** 2).sum()) == 0.0
    assert float(((Qs[0].t() @ Qs[1]) ** 2).sum()) == 0.0
    assert float(apsfast.sharing_level(Ps, Qs)) == sum(MC_P_WIDTHS) * sum(MC_Q_WIDTHS)


# --- Theorem 3.1 --------------------------------------------------------------------------------

@pytest.mark.parametrize("widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
def test_theorem_3_1_extremes(widths):
    meta = sum(widths) + 1
    ordinal = apsfast.init_transforms(meta, widths, "ordinal", dtype=F64)
    independent = apsfast.init_transforms(meta, widths, "independent", dtype=F64)
    phi_max = apsfast.sharing_level(ordinal, ordinal)
    phi_min = apsfast.sharing_level(independent, independent)
    assert float(phi_max) == max_score(widths) ** 2
    assert float(phi_min) == sum(widths) ** 2  # exact: identity columns, integer sums
    assert float(apsfast.sharing_level(ordinal, None)) == max_score(widths)
    assert float(apsfast.sharing_level(independent, None)) == sum(widths)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        Ps = apsfast.init_transforms(meta, widths, "orthogonal", generator=g, dtype=F64)
        Qs = apsfast.init_transforms(meta, widths, "orthogonal", generator=g, dtype=F64)
        phi = float(apsfast.sharing_level(Ps, Qs))
        if len(widths) == 1:  # one candidate: every semi-orthogonal set has the same Φ
            assert phi == pytest.approx(float(phi_max), rel=1e-12)
        else:
            assert float(phi_min) < phi < float(phi_max)


@pytest.mark.parametrize("p_widths,q_widths", [((1, 2, 5), (2, 3)), ((3, 4, 9), (1, 6)), ((2, 7), (5,))])
def test_theorem_3_1_ordinal_is_max_independent_is_min_different_sides(p_widths, q_widths):
    meta_p, meta_q = sum(p_widths), sum(q_widths) + 2
    phi_max = apsfast.sharing_level(apsfast.init_transforms(meta_p, p_widths, "ordinal", dtype=F64),
                                    apsfast.init_transforms(meta_q, q_widths, "ordinal", dtype=F64))
    phi_min = apsfast.sharing_level(apsfast.init_transforms(meta_p, p_widths, "independent", dtype=F64),
                                    apsfast.init_transforms(meta_q, q_widths, "independent", dtype=F64))
    assert float(phi_max) == max_score(p_widths) * max_score(q_widths)
    assert float(phi_min) == sum(p_widths) * sum(q_widths)
    for seed in range(8):
        g = torch.Generator().manual_seed(100 + seed)
        # Random semi-orthogonal sets, including noisy (non-orthogonal) perturbations re-projected.
        Ps = apsfast.init_transforms(meta_p, p_widths, "orthogonal", generator=g, dtype=F64)
        Qs = apsfast.init_transforms(meta_q, q_widths, "orthogonal", generator=g, dtype=F64)
        phi = apsfast.sharing_level(Ps, Qs)
        assert float(phi_min) - 1e-9 <= float(phi) <= float(phi_max) + 1e-9


def test_theorem_3_1_range_conditions_not_just_coordinates():
    # The extremes depend only on ranges: rotate the meta space of the ordinal (nested ranges)
    # and independent (mutually orthogonal ranges) sets and Φ keeps its extreme values.
    widths = (1, 2, 5)
    meta = 9
    R = random_rotation(meta, 31)
    ordinal = [R @ m for m in apsfast.init_transforms(meta, widths, "ordinal", dtype=F64)]
    independent = [R @ m for m in apsfast.init_transforms(meta, widths, "independent", dtype=F64)]
    assert float(apsfast.sharing_level(ordinal, None)) == pytest.approx(max_score(widths), rel=1e-12)
    assert float(apsfast.sharing_level(independent, None)) == pytest.approx(sum(widths), rel=1e-12)
    # Nested ranges with different bases inside each range are still maximal.
    nested = [R[:, :c] @ random_rotation(c, 40 + c) for c in widths]
    assert float(apsfast.sharing_level(nested, nested)) == pytest.approx(max_score(widths) ** 2, rel=1e-12)


# --- properties (hypothesis) --------------------------------------------------------------------

seeds = st.integers(0, 2**31 - 1)
# Candidate widths: strictly ascending, 1..4 candidates, each ≤ 6.
width_sets = st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True).map(lambda w: tuple(sorted(w)))


def randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=F64)


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


# --- errors -------------------------------------------------------------------------------------

def test_sharing_level_errors():
    Ps = apsfast.init_transforms(6, (2, 4), dtype=F64)
    with pytest.raises(ValueError, match=r"Ps and Qs are both None"):
        apsfast.sharing_level(None, None)
    with pytest.raises(TypeError, match=r"Ps must be a non-empty sequence .*got Tensor"):
        apsfast.sharing_level(Ps[1], None)
    with pytest.raises(ValueError, match=r"Ps\[1\]\.shape\[0\] must be 6"):
        apsfast.sharing_level([Ps[0], Ps[1][:5]], None)
    with pytest.raises(TypeError, match=r"Qs\[0\] has dtype torch.float32"):
        apsfast.sharing_level(Ps, [torch.ones(3, 1)])
    with pytest.raises(TypeError, match=r"Qs\[0\] must be a torch.Tensor, got int"):
        apsfast.sharing_level(None, [3])
    with pytest.raises(ValueError, match=r"Qs\[0\] is on device meta, expected cpu \(the device of Ps\[0\]\)"):
        apsfast.sharing_level(Ps, [torch.empty(3, 2, dtype=F64, device="meta")])

