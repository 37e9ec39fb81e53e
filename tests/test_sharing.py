"""Sharing level Φ (paper Definition 3.1, eq. 4), Theorem 3.1, init_transforms and the
transition step (eq. 5), against naive implementations written from the paper."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import apsfast
from conftest import assert_close

F64 = torch.float64

# Candidate width sets, ascending; odd sizes, a single candidate and a wide spread.
WIDTH_SETS = {
    "single": (3,),
    "odd": (1, 2, 5),
    "pow2": (4, 8, 16, 32, 64),
    "pair": (2, 7),
}


# --- naive references, written from the definitions -------------------------------------------

def naive_phi(Ps, Qs):
    """Φ = Σ_{i≤ĩ} Σ_{o≤õ} ‖Q^{iᵀ} Q^{ĩ}‖²_F · ‖P^{oᵀ} P^{õ}‖²_F, as an explicit double sum.

    A side given as ``None`` has one candidate (the identity) and its factor is 1.
    """
    def pair(Ms, a, b):
        if Ms is None:
            return 1.0
        return ((Ms[a].transpose(0, 1) @ Ms[b]) ** 2).sum()

    n_in = 1 if Qs is None else len(Qs)
    n_out = 1 if Ps is None else len(Ps)
    total = 0.0
    for i in range(n_in):
        for i_t in range(i, n_in):
            for o in range(n_out):
                for o_t in range(o, n_out):
                    total = total + pair(Qs, i, i_t) * pair(Ps, o, o_t)
    return torch.as_tensor(total, dtype=F64)


def max_score(widths):
    """Largest S(M) over semi-orthogonal transforms: ‖M^{aᵀ}M^{ã}‖² ≤ min(c_a, c_ã) = c_a."""
    return sum(c * (len(widths) - a) for a, c in enumerate(widths))


def random_matrices(meta_width, widths, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(meta_width, c, generator=g, dtype=F64).to(dtype) for c in widths]


def random_rotation(n, seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def assert_semi_orthogonal(M, tol=1e-12):
    eye = torch.eye(M.shape[1], dtype=F64)
    torch.testing.assert_close(M.double().t() @ M.double(), eye, rtol=0, atol=tol)


def assert_unit_columns(M, tol=1e-12):
    norms = M.double().norm(dim=0)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=tol)


# --- sharing_level against the naive double sum -----------------------------------------------

@pytest.mark.parametrize("p_widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
@pytest.mark.parametrize("q_widths", [(3,), (1, 2, 5), (2, 3, 6, 9)], ids=["q1", "q3", "q4"])
@pytest.mark.parametrize("mode", ["ordinal", "orthogonal", "random"])
def test_sharing_level_matches_double_sum(p_widths, q_widths, mode):
    meta_p, meta_q = p_widths[-1] + 3, q_widths[-1] + 2
    if mode == "random":  # general, non-orthogonal matrices: the identity Φ = S(Q)·S(P) still holds
        Ps, Qs = random_matrices(meta_p, p_widths, 1), random_matrices(meta_q, q_widths, 2)
    else:
        g = torch.Generator().manual_seed(3)
        Ps = apsfast.init_transforms(meta_p, p_widths, mode, generator=g, dtype=F64)
        Qs = apsfast.init_transforms(meta_q, q_widths, mode, generator=g, dtype=F64)
    out = apsfast.sharing_level(Ps, Qs)
    assert out.dim() == 0 and out.dtype == F64
    assert_close(out, naive_phi(Ps, Qs))


@pytest.mark.parametrize("widths", WIDTH_SETS.values(), ids=WIDTH_SETS.keys())
def test_sharing_level_one_side_none(widths):
    Ms = random_matrices(widths[-1] + 1, widths, 4)
    assert_close(apsfast.sharing_level(Ms, None), naive_phi(Ms, None))
    assert_close(apsfast.sharing_level(None, Ms), naive_phi(None, Ms))
    # None is the same as one candidate of a single unit column: ‖pᵀp‖² = 1.
    unit = [F.normalize(torch.ones(5, 1, dtype=F64), dim=0)]
    assert_close(apsfast.sharing_level(Ms, unit), apsfast.sharing_level(Ms, None))


def test_sharing_level_meta_width_smaller_than_widths_sum():
    # C < n = Σ c_a: the Gram may be formed on the meta side; values must not change.
    Ps = random_matrices(3, (1, 2, 3), 5)
    Qs = random_matrices(9, (4, 5), 6)
    assert_close(apsfast.sharing_level(Ps, Qs), naive_phi(Ps, Qs))


def test_sharing_level_float32_and_views():
    base = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    Ps = [base[:, :2], base[:, 2:5], base[:, 5:10]]  # non-contiguous column views
    Qs = [m.t().contiguous().t() for m in random_matrices(4, (1, 3), 8, torch.float32)]
    out = apsfast.sharing_level(Ps, Qs)
    assert out.dtype == torch.float32
    expected = naive_phi([p.double() for p in Ps], [q.double() for q in Qs])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=0)


def test_sharing_level_gradient_matches_autograd_of_double_sum():
    Ps, Qs = random_matrices(5, (1, 2, 4), 9), random_matrices(6, (2, 3), 10)
    leaves = [m.clone().requires_grad_() for m in Ps + Qs]
    ours = torch.autograd.grad(apsfast.sharing_level(leaves[:3], leaves[3:]), leaves)
    ref_leaves = [m.clone().requires_grad_() for m in Ps + Qs]
    theirs = torch.autograd.grad(naive_phi(ref_leaves[:3], ref_leaves[3:]), ref_leaves)
    for a, b in zip(ours, theirs):
        assert_close(a, b)


def test_sharing_level_gradcheck():
    Ps, Qs = random_matrices(4, (1, 3), 11), random_matrices(3, (2, 3), 12)
    leaves = tuple(m.requires_grad_() for m in Ps + Qs)
    assert torch.autograd.gradcheck(lambda *m: apsfast.sharing_level(list(m[:2]), list(m[2:])), leaves)


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


# --- init_transforms ----------------------------------------------------------------------------

MODES = ["ordinal", "independent", "orthogonal"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("widths", [(3,), (1, 2, 5), (2, 3, 4)], ids=["single", "odd", "dense"])
def test_init_shapes_and_semi_orthogonal(mode, widths):
    meta = sum(widths) + 1
    Ms = apsfast.init_transforms(meta, widths, mode, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert isinstance(Ms, list) and len(Ms) == len(widths)
    for M, c in zip(Ms, widths):
        assert M.shape == (meta, c) and M.dtype == F64
        assert_semi_orthogonal(M)


def test_init_ordinal_is_nested_identity_columns():
    Ms = apsfast.init_transforms(9, (1, 2, 5, 9), "ordinal", dtype=F64)
    eye = torch.eye(9, dtype=F64)
    for M in Ms:
        assert torch.equal(M, eye[:, :M.shape[1]])
    for small, large in zip(Ms, Ms[1:]):
        assert torch.equal(large[:, :small.shape[1]], small)
    # Separate storage: writing one transform must not change another.
    Ms[0].add_(1.0)
    assert torch.equal(Ms[1], eye[:, :2])


def test_init_independent_has_disjoint_supports():
    widths = (1, 2, 5)
    Ms = apsfast.init_transforms(10, widths, "independent", dtype=F64)
    supports = [set(torch.nonzero(M.abs().sum(1)).flatten().tolist()) for M in Ms]
    for a, c in enumerate(widths):
        assert len(supports[a]) == c
        # Every column is a basis vector.
        assert torch.equal(Ms[a].abs().sum(0), torch.ones(c, dtype=F64))
        assert set(Ms[a].flatten().tolist()) <= {0.0, 1.0}
        for b in range(a + 1, len(widths)):
            assert not supports[a] & supports[b]
    # All Σ c columns together are orthonormal; exactly fits when meta_width == Σ widths.
    assert_semi_orthogonal(torch.cat(Ms, dim=1))
    tight = apsfast.init_transforms(8, widths, "independent", dtype=F64)
    assert torch.equal(torch.cat(tight, dim=1).abs().sum(1), torch.ones(8, dtype=F64))


def test_init_orthogonal_candidates_are_not_nested_or_disjoint():
    g = torch.Generator().manual_seed(5)
    Ms = apsfast.init_transforms(8, (2, 4), "orthogonal", generator=g, dtype=F64)
    cross = ((Ms[0].t() @ Ms[1]) ** 2).sum()
    assert 0 < float(cross) < 2  # neither disjoint (0) nor nested (c_0 = 2)


@pytest.mark.parametrize("mode", MODES)
def test_init_noise_keeps_unit_columns_and_perturbs(mode):
    widths, meta = (2, 3), 6
    clean = apsfast.init_transforms(meta, widths, mode, generator=torch.Generator().manual_seed(1), dtype=F64)
    noisy = apsfast.init_transforms(meta, widths, mode, noise=1e-3,
                                    generator=torch.Generator().manual_seed(1), dtype=F64)
    for M, N in zip(clean, noisy):
        assert_unit_columns(N)
        diff = (M - N).abs().max()
        if mode != "orthogonal":  # the orthogonal draw also consumes the generator differently
            assert 0 < float(diff) < 1e-2
        assert not torch.equal(M, N)
        # Noisy columns are no longer exactly orthonormal.
        assert float((N.t() @ N - torch.eye(N.shape[1], dtype=F64)).abs().max()) > 0
    # Noise perturbs Φ away from the ordinal maximum but only slightly.
    if mode == "ordinal":
        phi_clean, phi_noisy = apsfast.sharing_level(clean, clean), apsfast.sharing_level(noisy, noisy)
        assert float(phi_noisy) != float(phi_clean)
        assert float(phi_noisy) == pytest.approx(float(phi_clean), rel=1e-3)


@pytest.mark.parametrize("mode,noise", [("orthogonal", 0.0), ("ordinal", 0.1), ("independent", 0.1),
                                        ("orthogonal", 0.1)])
def test_init_generator_reproducible(mode, noise):
    def draw(seed):
        return apsfast.init_transforms(7, (2, 5), mode, noise=noise,
                                       generator=torch.Generator().manual_seed(seed), dtype=F64)
    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_init_dtype_and_device(mode, dtype):
    g = torch.Generator().manual_seed(2)
    Ms = apsfast.init_transforms(6, (1, 3), mode, noise=0.01, generator=g, dtype=dtype,
                                 device=torch.device("cpu"))
    for M in Ms:
        assert M.dtype == dtype and M.device.type == "cpu"
        assert_unit_columns(M.double(), tol=1e-2 if dtype == torch.bfloat16 else 1e-5)
    # Shape-only device: no data, but the layout, dtype and device are honoured.
    meta = apsfast.init_transforms(6, (1, 3), mode, noise=0.01, dtype=dtype, device="meta")
    assert [tuple(M.shape) for M in meta] == [(6, 1), (6, 3)]
    assert all(M.device.type == "meta" and M.dtype == dtype for M in meta)


def test_init_default_dtype_follows_torch_default():
    assert apsfast.init_transforms(4, (2,))[0].dtype == torch.get_default_dtype()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert apsfast.init_transforms(4, (2,), "orthogonal")[0].dtype == torch.float64
    finally:
        torch.set_default_dtype(previous)


def test_init_single_int_width_and_full_width():
    (M,) = apsfast.init_transforms(4, 4, "ordinal", dtype=F64)
    assert torch.equal(M, torch.eye(4, dtype=F64))
    (M,) = apsfast.init_transforms(4, (4,), "orthogonal", generator=torch.Generator().manual_seed(0), dtype=F64)
    assert_semi_orthogonal(M)
    torch.testing.assert_close(M @ M.t(), torch.eye(4, dtype=F64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((6, (2, 5), "independent"), {}, ValueError, r"meta_width.*sum\(widths\) = 7.*got meta_width=6"),
    ((4, (2, 5), "ordinal"), {}, ValueError, r"widths must not exceed meta_width=4"),
    ((4, (2, 5), "orthogonal"), {}, ValueError, r"widths must not exceed meta_width=4"),
    ((8, (5, 2), "ordinal"), {}, ValueError, r"widths must be strictly ascending"),
    ((8, (2, 2), "ordinal"), {}, ValueError, r"widths must be strictly ascending"),
    ((8, (0, 2), "ordinal"), {}, ValueError, r"widths must hold positive ints"),
    ((8, (1.5, 2), "ordinal"), {}, ValueError, r"widths must hold positive ints"),
    ((8, (), "ordinal"), {}, TypeError, r"widths must be a non-empty sequence"),
    ((8, "12", "ordinal"), {}, TypeError, r"widths must be a non-empty sequence"),
    ((8, (2, 4), "random"), {}, ValueError, r"mode must be one of .*got 'random'"),
    ((8, (2, 4), "Ordinal"), {}, ValueError, r"mode must be one of"),
    ((8, (2, 4), "ordinal"), {"noise": -0.1}, ValueError, r"noise must be a finite float ≥ 0, got -0.1"),
    ((8, (2, 4), "ordinal"), {"noise": float("nan")}, ValueError, r"noise must be a finite float"),
    ((8, (2, 4), "ordinal"), {"noise": float("inf")}, ValueError, r"noise must be a finite float"),
    ((8, (2, 4), "ordinal"), {"noise": "0.1"}, ValueError, r"noise must be a finite float"),
    ((8, (2, 4), "ordinal"), {"noise": True}, ValueError, r"noise must be a finite float ≥ 0, got True"),
    ((0, (2, 4), "ordinal"), {}, ValueError, r"meta_width must be a positive int, got 0"),
    ((-3, (2,), "ordinal"), {}, ValueError, r"meta_width must be a positive int, got -3"),
    ((8.0, (2,), "ordinal"), {}, ValueError, r"meta_width must be a positive int, got 8.0"),
    ((True, (1,), "ordinal"), {}, ValueError, r"meta_width must be a positive int, got True"),
], ids=["independent_too_narrow", "width_gt_meta", "width_gt_meta_orthogonal", "descending",
        "repeated", "zero_width", "float_width", "empty_widths", "str_widths", "bad_mode", "mode_case",
        "negative_noise", "nan_noise", "inf_noise", "str_noise", "bool_noise", "meta_zero", "meta_negative",
        "meta_float", "meta_bool"])
def test_init_errors(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        apsfast.init_transforms(*args, **kwargs)


# --- transition_step (eq. 5) --------------------------------------------------------------------

def pgd_step_autograd(Ps, Qs, tau):
    """Eq. 5 by hand: ∂Φ/∂p by autograd of the naive double sum, then p ← normalise(p − τ g)."""
    Ps_leaf = None if Ps is None else [m.detach().clone().requires_grad_() for m in Ps]
    Qs_leaf = None if Qs is None else [m.detach().clone().requires_grad_() for m in Qs]
    leaves = (Ps_leaf or []) + (Qs_leaf or [])
    phi = naive_phi(Ps_leaf, Qs_leaf)
    grads = torch.autograd.grad(phi, leaves)
    new = []
    for m, g in zip(leaves, grads):
        step = m.detach() - tau * g
        new.append(step / step.norm(dim=0, keepdim=True))
    n_p = 0 if Ps is None else len(Ps)
    return phi.detach(), (new[:n_p] if Ps is not None else None), (new[n_p:] if Qs is not None else None)


def _noisy(meta, widths, mode, seed, noise=0.05):
    return apsfast.init_transforms(meta, widths, mode, noise=noise,
                                   generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("sides", ["PQ", "P", "Q"])
@pytest.mark.parametrize("mode", ["ordinal", "orthogonal", "random"])
def test_transition_step_matches_autograd_pgd(sides, mode):
    if mode == "random":  # general matrices, columns not normalised: the step projects them
        Ps, Qs = random_matrices(7, (1, 2, 5), 50), random_matrices(6, (2, 3), 51)
    else:
        Ps, Qs = _noisy(7, (1, 2, 5), mode, 52), _noisy(6, (2, 3), mode, 53)
    Ps = Ps if "P" in sides else None
    Qs = Qs if "Q" in sides else None
    phi_ref = naive_phi(Ps, Qs)
    tau = 0.3 / float(phi_ref)
    phi_exp, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    before = [m.clone() for m in (Ps or []) + (Qs or [])]
    phi = apsfast.transition_step(Ps, Qs, tau)
    assert phi.dim() == 0
    assert_close(phi, phi_exp)
    for got, want, old in zip((Ps or []) + (Qs or []), (Ps_exp or []) + (Qs_exp or []), before):
        assert_close(got, want)
        assert_unit_columns(got)
        assert not torch.equal(got, old)


def test_transition_step_returns_phi_before_and_updates_all_sides_together():
    Ps, Qs = _noisy(8, (2, 3, 6), "orthogonal", 60), _noisy(5, (1, 4), "orthogonal", 61)
    phi_before = apsfast.sharing_level(Ps, Qs)
    # All gradients at the current point: stepping P alone then Q alone (with the new P)
    # would differ; transition_step must equal the joint step.
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, 1e-3)
    out = apsfast.transition_step(Ps, Qs, 1e-3)
    assert_close(out, phi_before)
    assert float(apsfast.sharing_level(Ps, Qs)) != float(out)
    for got, want in zip(Ps + Qs, Ps_exp + Qs_exp):
        assert_close(got, want)


def test_transition_step_float32():
    Ps, Qs = _noisy(7, (2, 5), "orthogonal", 62), _noisy(6, (3,), "orthogonal", 63)
    Ps32, Qs32 = [m.float() for m in Ps], [m.float() for m in Qs]
    tau = 0.3 / float(naive_phi(Ps, Qs))
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    phi = apsfast.transition_step(Ps32, Qs32, tau)
    assert phi.dtype == torch.float32
    for got, want in zip(Ps32 + Qs32, Ps_exp + Qs_exp):
        assert got.dtype == torch.float32
        assert_close(got, want, torch.float32)


def test_transition_step_on_views_updates_base_tensor():
    widths = (2, 3, 5)
    offsets = [0, 2, 5]
    base_p = torch.cat(_noisy(12, widths, "orthogonal", 70), dim=1)  # [12, 10]
    base_q = torch.cat(_noisy(6, (1, 4), "orthogonal", 71), dim=1).t().contiguous().t()  # column-major
    Ps = [base_p[:, o:o + c] for o, c in zip(offsets, widths)]
    Qs = [base_q[:, :1], base_q[:, 1:5]]
    assert all(p._base is base_p for p in Ps)
    tau = 0.3 / float(naive_phi(Ps, Qs))
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    apsfast.transition_step(Ps, Qs, tau)
    assert_close(base_p, torch.cat(Ps_exp, dim=1))
    assert_close(base_q, torch.cat(Qs_exp, dim=1))
    # The views still alias the base.
    assert all(p.data_ptr() == base_p[:, o].data_ptr() for p, o in zip(Ps, offsets))


def test_init_accepts_numpy_integers():
    import numpy as np
    Ms = apsfast.init_transforms(np.int64(8), [np.int64(2), 4], "independent", dtype=F64)
    assert [tuple(m.shape) for m in Ms] == [(8, 2), (8, 4)]


def test_transition_step_on_overlapping_views_steps_from_one_point():
    # Nested views of one tensor: every transform must step from the same (old) point.
    base = torch.cat(_noisy(9, (4,), "orthogonal", 72), dim=1)
    Ps = [base[:, :2], base[:, :4]]
    tau = 0.3 / float(naive_phi([p.clone() for p in Ps], None))
    _, Ps_exp, _ = pgd_step_autograd([p.clone() for p in Ps], None, tau)
    apsfast.transition_step(Ps, None, tau)
    # The wider view is written last, so the base holds its step for all four columns.
    assert_close(base, Ps_exp[1])


def test_transition_step_on_parameters():
    Ps = [torch.nn.Parameter(m) for m in _noisy(7, (2, 5), "ordinal", 72)]
    Qs = [torch.nn.Parameter(m) for m in _noisy(6, (3, 6), "ordinal", 73)]
    tau = 0.3 / float(naive_phi(Ps, Qs).detach())
    _, Ps_exp, Qs_exp = pgd_step_autograd(Ps, Qs, tau)
    phi = apsfast.transition_step(Ps, Qs, tau)
    assert not phi.requires_grad
    for got, want in zip(Ps + Qs, Ps_exp + Qs_exp):
        assert isinstance(got, torch.nn.Parameter) and got.grad is None
        assert_close(got.detach(), want)


def test_transition_from_noisy_ordinal_decreases_phi():
    widths = (2, 4, 8)
    g = torch.Generator().manual_seed(80)
    Ps = apsfast.init_transforms(14, widths, "ordinal", noise=1e-3, generator=g, dtype=F64)
    Qs = apsfast.init_transforms(14, widths, "ordinal", noise=1e-3, generator=g, dtype=F64)
    phi0 = float(apsfast.sharing_level(Ps, Qs))
    phi_max, phi_min = max_score(widths) ** 2, sum(widths) ** 2
    assert phi0 == pytest.approx(phi_max, rel=1e-4)
    # ∂Φ/∂p scales with Φ (the other side's S times this side's Gram), so τ ∝ 1/Φ keeps the
    # step size fixed; 0.5/Φ is well inside the stable range (≳ 3/Φ makes columns collapse).
    tau = 0.5 / phi0
    values = [float(apsfast.transition_step(Ps, Qs, tau)) for _ in range(50)]
    values.append(float(apsfast.sharing_level(Ps, Qs)))
    assert values[0] == phi0
    assert all(b <= a for a, b in zip(values, values[1:]))  # monotone descent
    assert values[-1] < 0.9 * phi0  # it left the maximum
    assert values[-1] >= phi_min - 1e-9  # and never beats Theorem 3.1's minimum
    for M in Ps + Qs:
        assert_unit_columns(M)


@pytest.mark.parametrize("sides", ["PQ", "P", "Q"])
def test_transition_exact_ordinal_is_stationary(sides):
    widths = (1, 2, 5)
    Ps = apsfast.init_transforms(9, widths, "ordinal", dtype=F64) if "P" in sides else None
    Qs = apsfast.init_transforms(6, (3, 6), "ordinal", dtype=F64) if "Q" in sides else None
    before = [m.clone() for m in (Ps or []) + (Qs or [])]
    phi = apsfast.transition_step(Ps, Qs, 1e-3)
    assert float(phi) == float(naive_phi(Ps, Qs))
    for got, old in zip((Ps or []) + (Qs or []), before):
        torch.testing.assert_close(got, old, rtol=0, atol=1e-15)
    # The independent selection (the minimum) is stationary too.
    Is = apsfast.init_transforms(9, widths, "independent", dtype=F64)
    old = [m.clone() for m in Is]
    apsfast.transition_step(Is, None, 1e-3)
    for got, o in zip(Is, old):
        torch.testing.assert_close(got, o, rtol=0, atol=1e-15)


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
    Ps = _noisy(6, (2, 4), "ordinal", 90)
    Qs = _noisy(5, (1, 3), "ordinal", 91)
    before = [m.clone() for m in Ps + Qs]
    with pytest.raises(TypeError):
        apsfast.transition_step(Ps, Qs + [torch.zeros(5, 2, dtype=torch.float32)], 1e-3)
    with pytest.raises(ValueError):
        apsfast.transition_step(Ps, Qs, -1.0)
    assert all(torch.equal(a, b) for a, b in zip(Ps + Qs, before))


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
