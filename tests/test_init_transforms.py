"""init_transforms: the P and Q that Φ and the transition act on (ordinal, independent and
orthogonal selections, noise, dtypes and devices, argument errors)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, strategies as st

import apsfast
from cases import assert_semi_orthogonal, assert_unit_columns

F64 = torch.float64
MODES = ["ordinal", "independent", "orthogonal"]


@pytest.mark.parametrize("mode,widths", [
    ("ordinal", (3,)), ("ordinal", (1, 2, 5)), ("independent", (1, 2, 5)), ("independent", (2, 3, 4)),
    ("orthogonal", (3,)), ("orthogonal", (2, 3, 4)),
], ids=["ordinal-single", "ordinal-odd", "independent-odd", "independent-dense", "orthogonal-single",
        "orthogonal-dense"])
def test_init_shapes_and_semi_orthogonal(mode, widths):
    meta = sum(widths) + 1
    Ms = apsfast.init_transforms(meta, widths, mode, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert isinstance(Ms, list) and len(Ms) == len(widths)
    for M, c in zip(Ms, widths):
        assert M.shape == (meta, c) and M.dtype == F64
        assert_semi_orthogonal(M)


@pytest.mark.parametrize("mode,dtype", [("ordinal", torch.float32), ("independent", torch.bfloat16),
                                        ("orthogonal", torch.float64), ("orthogonal", torch.bfloat16)],
                         ids=["ordinal-f32", "independent-bf16", "orthogonal-f64", "orthogonal-bf16"])
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


def test_init_accepts_numpy_integers():
    Ms = apsfast.init_transforms(np.int64(8), [np.int64(2), 4], "independent", dtype=F64)
    assert [tuple(m.shape) for m in Ms] == [(8, 2), (8, 4)]


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



width_sets = st.lists(st.integers(1, 6), min_size=1, max_size=4, unique=True).map(lambda w: tuple(sorted(w)))


@given(meta=st.integers(1, 12), widths=width_sets, mode=st.sampled_from(["ordinal", "independent", "orthogonal"]),
       seed=st.integers(0, 2**31 - 1))
def test_init_transforms_semi_orthogonal(meta, widths, mode, seed):
    assume(widths[-1] <= meta and (mode != "independent" or sum(widths) <= meta))
    Ms = apsfast.init_transforms(meta, widths, mode, generator=torch.Generator().manual_seed(seed), dtype=F64)
    assert [tuple(M.shape) for M in Ms] == [(meta, c) for c in widths]
    for M in Ms:
        torch.testing.assert_close(M.t() @ M, torch.eye(M.shape[1], dtype=F64), rtol=0, atol=1e-12)

