"""A fuzz of the public ops with malformed tensors.

Arguments start well formed (consistent shapes, float dtypes, CPU) and then take up to two
mutations: another rank, dtype (integer, bool, complex, half), size (zero included), the meta
device, a NaN, a non-contiguous layout, a missing transform. Each call either raises a clear
TypeError / ValueError, or returns what the plain definition returns (NaN where it has NaN):
never a crash, a hang, or a silently different answer. Runs on the reference and the C++
backend (a crash in a compiled one would kill the run); ``hypothesis`` events count accepted
and refused calls. Sections follow the ops.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import apsfast
from apsfast import reference
from apsfast._backends import BackendUnavailable
from cases import CPU_FAST

FUZZ = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow], deadline=None)
MUTATIONS = ("rank", "dtype", "size", "zero", "meta", "nan", "layout", "none")
BAD_DTYPES = (torch.int64, torch.bool, torch.complex64, torch.float16, torch.bfloat16, torch.float64)


def mutate(t: torch.Tensor, kind: str, draw) -> torch.Tensor | None:
    if kind == "rank":
        return t.unsqueeze(0) if draw(st.booleans()) or t.dim() == 0 else t.reshape(-1)
    if kind == "dtype":
        dtype = draw(st.sampled_from(BAD_DTYPES))
        return torch.ones(t.shape, dtype=torch.bool, device=t.device) if dtype == torch.bool else t.to(dtype)
    if kind in ("size", "zero") and t.dim():
        dim = draw(st.integers(0, t.dim() - 1))
        size = 0 if kind == "zero" else max(t.shape[dim] + draw(st.sampled_from([-1, 1])), 0)
        shape = list(t.shape)
        shape[dim] = size
        values = torch.randn(shape, dtype=torch.float64, device=t.device)
        return values > 0 if t.dtype == torch.bool else values.to(t.dtype)
    if kind == "meta":
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    if kind == "nan" and t.numel() and (t.is_floating_point() or t.is_complex()):
        t = t.clone()
        t[torch.unravel_index(torch.tensor(draw(st.integers(0, t.numel() - 1))), t.shape)] = float("nan")
        return t
    if kind == "layout" and t.dim() >= 2:
        return t.transpose(0, 1).contiguous().transpose(0, 1)
    if kind == "none":
        return None
    return t


@st.composite
def mutated(draw, tensors: dict[str, torch.Tensor | None],
            optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor | None]:
    """``tensors`` with up to two mutations, each of a random one of them; only the
    ``optional`` ones may become ``None``."""
    out = dict(tensors)
    for _ in range(draw(st.integers(0, 2))):
        name = draw(st.sampled_from(sorted(out)))
        if out[name] is not None:
            kinds = MUTATIONS if name in optional else tuple(k for k in MUTATIONS if k != "none")
            out[name] = mutate(out[name], draw(st.sampled_from(kinds)), draw)
    return out


def randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


# --- construct and aps_conv2d -------------------------------------------------------------------

@st.composite
def construct_args(draw) -> dict[str, torch.Tensor | None]:
    C_out, C_in, c_o, c_i = (draw(st.integers(1, 6)) for _ in range(4))
    kernel = draw(st.sampled_from([(), (1, 1), (3, 3), (2, 1)]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    seed = draw(st.integers(0, 999))
    return draw(mutated({"weight": randn(C_out, C_in, *kernel, seed=seed, dtype=dtype),
                         "P": randn(C_out, c_o, seed=seed + 1, dtype=dtype),
                         "Q": randn(C_in, c_i, seed=seed + 2, dtype=dtype)}, optional=("P", "Q")))


def definition(weight, P, Q) -> torch.Tensor:
    """Eq. 2 by einsum; a missing transform is the identity, applied as no product at all
    (a product with an identity matrix would spread a NaN over every output)."""
    out = weight.double()
    if P is not None:
        out = torch.einsum("ao,ab...->ob...", P.double(), out)
    if Q is not None:
        out = torch.einsum("bi,ob...->oi...", Q.double(), out)
    return out


def comparable(*ts) -> bool:
    """Values to compare against the float64 definition: float32/64 CPU tensors."""
    return all(t is None or (t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)) for t in ts)


def assert_like(out: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, equal_nan=True)


def call(fn, *args, **kwargs):
    """``fn(...)``, or ``None`` after a clear refusal (recorded as a hypothesis event)."""
    try:
        out = fn(*args, **kwargs)
    except (TypeError, ValueError, BackendUnavailable) as error:  # the last: a forced backend's dtype
        event(f"refused: {type(error).__name__}")
        return None
    event("accepted")
    return out


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@FUZZ
@given(args=construct_args())
def test_construct(target, args):
    weight, P, Q = args["weight"], args["P"], args["Q"]
    out = call(apsfast.construct, weight, P, Q)
    if out is None:
        return
    expected_shape = definition(torch.zeros(weight.shape), *(None if M is None else torch.zeros(M.shape)
                                                             for M in (P, Q))).shape
    assert out.shape == expected_shape and out.dtype == weight.dtype and out.device == weight.device
    if comparable(weight, P, Q):
        assert_like(out, definition(weight, P, Q))


@st.composite
def conv_args(draw):
    args = draw(construct_args())
    geometry = dict(stride=draw(st.sampled_from([1, 1, 2, (1, 2), 0, -1])),
                    padding=draw(st.sampled_from([0, 0, 1, -1])), dilation=draw(st.sampled_from([1, 1, 2, 0])))
    weight, Q = args["weight"], args["Q"]
    if Q is not None and Q.dim() == 2:
        c_i = Q.shape[1]
    else:
        c_i = weight.shape[1] if weight.dim() >= 2 else 1
    size = draw(st.integers(0, 6))
    x = randn(draw(st.integers(0, 2)), c_i, size, size, seed=7, dtype=weight.dtype if weight.is_floating_point()
              else torch.float32)
    return {**args, "x": draw(st.sampled_from([x, x[:, :, ::2], x.double(), x.unsqueeze(0)]))}, geometry


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@FUZZ
@given(case=conv_args())
def test_aps_conv2d(target, case):
    args, geometry = case
    x, weight, P, Q = args["x"], args["weight"], args["P"], args["Q"]
    out = call(apsfast.aps_conv2d, x, weight, P, Q, **geometry)
    if out is not None and comparable(x, weight, P, Q):
        expected = torch.nn.functional.conv2d(x.double(), definition(weight, P, Q), **geometry)
        assert_like(out, expected)


# --- sharing_level and the transition -----------------------------------------------------------

@st.composite
def sides(draw) -> list[list[torch.Tensor] | None]:
    """A layer's (Ps, Qs): column blocks of unit-norm columns, then mutated."""
    layer = []
    for _ in range(2):
        if draw(st.integers(0, 3)) == 0:
            layer.append(None)
            continue
        C = draw(st.integers(1, 7))
        widths = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        seed = draw(st.integers(0, 999))
        dtype = draw(st.sampled_from([torch.float64, torch.float32]))
        blocks = {str(a): torch.nn.functional.normalize(randn(C, w, seed=seed + a, dtype=dtype), dim=0)
                  for a, w in enumerate(widths)}
        mutated_blocks = draw(mutated(blocks, optional=tuple(blocks)))
        layer.append([mutated_blocks[str(a)] for a in range(len(widths)) if mutated_blocks[str(a)] is not None])
    return layer


def phi_definition(Ps, Qs) -> torch.Tensor:
    """Eq. 4 by its pairwise sum, in float64."""
    def score(Ms):
        Ms = [M.double() for M in Ms]
        return sum(((Ms[a].t() @ Ms[b]) ** 2).sum() for a in range(len(Ms)) for b in range(a, len(Ms)))
    factors = [score(Ms) for Ms in (Ps, Qs) if Ms is not None]
    return factors[0] * factors[1] if len(factors) == 2 else factors[0]


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@FUZZ
@given(layer=sides(), tau=st.sampled_from([1e-3, 1e-2, 0.0, -1.0, float("nan")]))
def test_sharing_level_and_transition_step(target, layer, tau):
    Ps, Qs = layer
    phi = call(apsfast.sharing_level, Ps, Qs)
    ok = phi is not None and comparable(*(Ps or []), *(Qs or []))
    if ok:
        assert_like(phi, phi_definition(Ps, Qs))
    twins = [None if Ms is None else [M.clone() for M in Ms] for Ms in layer]
    before = call(apsfast.transition_step, *twins, tau)
    if before is None:
        return
    assert phi is not None and tau > 0  # a step is taken only where Φ is defined
    if ok:
        assert_like(before, phi_definition(Ps, Qs))
        expected = [None if Ms is None else [M.double().clone() for M in Ms] for Ms in layer]
        reference.transition_step(*expected, tau)
        for got, want in zip(twins, expected):
            for g, w in zip(got or [], want or []):
                assert_like(g, w)


@pytest.mark.parametrize("target", CPU_FAST, indirect=True)
@FUZZ
@given(layers=st.lists(sides(), min_size=0, max_size=3), relative=st.sampled_from([False, True, 1, None]))
def test_transition_step_all(target, layers, relative):
    twins = [[None if Ms is None else [M.clone() for M in Ms] for Ms in layer] for layer in layers]
    phi = call(apsfast.transition_step_all, twins, 1e-2, relative=relative)
    if phi is None:
        return
    assert isinstance(relative, bool) and layers
    if all(comparable(*(Ps or []), *(Qs or [])) for Ps, Qs in layers):
        assert_like(phi, sum(phi_definition(Ps, Qs) for Ps, Qs in layers))
        for layer, twin in zip(layers, twins):
            expected = [None if Ms is None else [M.double().clone() for M in Ms] for Ms in layer]
            reference.transition_step(*expected, 1e-2, relative)
            for got, want in zip(twin, expected):
                for g, w in zip(got or [], want or []):
                    assert_like(g, w)


# --- init_transforms ----------------------------------------------------------------------------

@FUZZ
@given(meta=st.integers(-2, 12),
       widths=st.one_of(st.lists(st.integers(1, 6), min_size=1, max_size=3, unique=True).map(sorted),
                        st.lists(st.integers(-1, 12), min_size=0, max_size=4)),
       mode=st.sampled_from(["ordinal", "independent", "orthogonal", "slimmable"]),
       noise=st.sampled_from([0.0, 1e-3, -1.0, float("nan")]))
def test_init_transforms(meta, widths, mode, noise):
    Ms = call(apsfast.init_transforms, meta, widths, mode, noise=noise, dtype=torch.float64)
    if Ms is None:
        return
    assert [tuple(M.shape) for M in Ms] == [(meta, w) for w in widths]
    for M in Ms:
        torch.testing.assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=torch.float64))
        torch.testing.assert_close(M.t() @ M, torch.eye(M.shape[1], dtype=torch.float64), atol=1e-2, rtol=0)


def test_unmutated_arguments_are_accepted():
    # The fuzz reaches the valid region: with no mutation every op computes.
    accepted = []

    @FUZZ
    @given(C=st.integers(1, 6), c=st.integers(1, 6), seed=st.integers(0, 99))
    def probe(C, c, seed):
        weight, P = randn(C, C, 3, 3, seed=seed), randn(C, c, seed=seed + 1)
        assert_like(apsfast.construct(weight, P, P), definition(weight, P, P))
        Ms = [torch.nn.functional.normalize(P, dim=0)]
        apsfast.transition_step_all([(Ms, None)], 1e-3)
        accepted.append(1)

    probe()
    assert accepted


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_tau_and_noise_are_refused(value):
    Ms = apsfast.init_transforms(6, (2, 3), "ordinal", dtype=torch.float64)
    with pytest.raises(ValueError, match="tau must be a finite float > 0"):
        apsfast.transition_step(Ms, None, value)
    with pytest.raises(ValueError, match="noise must be a finite float"):
        apsfast.init_transforms(6, (2, 3), noise=value)
