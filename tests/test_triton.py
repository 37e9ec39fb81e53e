"""The Triton backend against the float64 reference, on CPU tensors under the interpreter.

Triton decides whether its kernels run in the interpreter when they are defined, i.e. when
triton is first imported: the environment variable must be set before the test process
starts (``make test`` sets it), so this module only checks it.
"""
from __future__ import annotations

import ast
import importlib
import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

from apsfast import reference
from conftest import assert_close

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("the Triton kernels run on CPU tensors only in the interpreter: set TRITON_INTERPRET=1 "
                "before starting pytest (make test does)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed")

tb = importlib.import_module("apsfast._backends.triton")
kconstruct = importlib.import_module("apsfast.kernels.construct")
ktransition = importlib.import_module("apsfast.kernels.transition")

if not tb.supports(torch.device("cpu"), torch.float32):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: its kernels were built for a GPU",
                allow_module_level=True)

LOW = [torch.float16, torch.bfloat16]


def rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def transform(C, c, seed=0, dtype=torch.float64):
    """A transform as the layers keep it: unit columns."""
    return F.normalize(rand(C, c, seed=seed), dim=0).to(dtype)


def meta_weight(C_out, C_in, *kernel, seed=0, dtype=torch.float64):
    """A meta-weight at the scale of a Kaiming init (outputs of order one)."""
    return (rand(C_out, C_in, *kernel, seed=seed) / math.sqrt(C_in * math.prod(kernel))).to(dtype)


def as64(t):
    return None if t is None else t.double()


def max_err(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def assert_low_precision(actual, expected64, torch_own):
    """At most twice the error of torch's own same-precision computation against float64."""
    assert actual.dtype == torch_own.dtype
    ours, theirs = max_err(actual, expected64), max_err(torch_own, expected64)
    assert ours <= 2 * theirs + 1e-6 * expected64.abs().max().item(), (ours, theirs)


# ---------------------------------------------------------------------------------------------
# construct
# ---------------------------------------------------------------------------------------------
# (C_out, C_in, kernel, c_o, c_i): odd sizes, several tiles along some dims, both product orders.
SHAPES = {
    "3x3": (37, 21, (3, 3), 19, 13),
    "1x1": (20, 70, (1, 1), 7, 66),
    "linear": (70, 90, (), 5, 80),
    "5x5-thin": (16, 3, (5, 5), 11, 3),
    "1x3-wide": (9, 17, (1, 3), 9, 5),
}


def make_layer(shape, variant, dtype, seed=0):
    C_out, C_in, kernel, c_o, c_i = shape
    weight = meta_weight(C_out, C_in, *kernel, seed=seed, dtype=dtype)
    P = transform(C_out, c_o, seed=seed + 1, dtype=dtype)
    Q = transform(C_in, c_i, seed=seed + 2, dtype=dtype)
    if variant == "P=None":
        P = None
    elif variant == "Q=None":
        Q = None
    elif variant == "identity":
        P = Q = None
    elif variant == "transposed":
        # Column-major transforms: P.t() of a contiguous [c_o, C_out].
        P, Q = P.t().contiguous().t(), Q.t().contiguous().t()
    elif variant == "strided":
        # Every other column of a wider matrix, and a non-contiguous weight.
        P = transform(C_out, 2 * c_o, seed=seed + 3, dtype=dtype)[:, ::2]
        Q = transform(C_in, 2 * c_i, seed=seed + 4, dtype=dtype)[:, 1::2]
        weight = meta_weight(C_out, 2 * C_in, *kernel, seed=seed + 5, dtype=dtype)[:, ::2]
    elif variant == "channels_last":
        weight = weight.to(memory_format=torch.channels_last)
    return weight, P, Q


VARIANTS = ["both", "P=None", "Q=None", "identity", "transposed", "strided", "channels_last"]
CASES = [pytest.param(shape, variant, id=f"{name}-{variant}") for name, shape in SHAPES.items()
         for variant in VARIANTS if not (variant == "channels_last" and len(shape[2]) != 2)]


@pytest.mark.parametrize("shape,variant", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_construct_values(shape, variant, dtype):
    weight, P, Q = make_layer(shape, variant, dtype)
    out = tb.construct(weight, P, Q)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, reference.construct(as64(weight), as64(P), as64(Q)), dtype)


@pytest.mark.parametrize("variant", ["both", "P=None", "transposed"])
@pytest.mark.parametrize("name", ["3x3", "linear", "1x1"])
@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_construct_low_precision(name, variant, dtype):
    weight, P, Q = make_layer(SHAPES[name], variant, dtype)
    out = tb.construct(weight, P, Q)
    assert out.is_contiguous()
    assert_low_precision(out, reference.construct(as64(weight), as64(P), as64(Q)),
                         reference.construct(weight, P, Q))


def test_construct_kernel_free_size_one():
    # S = 1 with a 2-D weight and a single output channel.
    weight, P, Q = meta_weight(3, 40, dtype=torch.float32), transform(3, 1, seed=1, dtype=torch.float32), None
    assert_close(tb.construct(weight, P, Q), reference.construct(as64(weight), as64(P), Q), torch.float32)


@pytest.mark.parametrize("variant", ["both", "P=None", "Q=None", "transposed", "channels_last"])
@pytest.mark.parametrize("name", ["3x3", "1x3-wide"])
def test_construct_backward(name, variant):
    weight, P, Q = make_layer(SHAPES[name], variant, torch.float32)
    grad = rand(*reference.construct(weight, P, Q).shape, seed=7, dtype=torch.float32)
    flags = (True, P is not None, Q is not None)
    ours = tb.construct_backward(grad, weight, P, Q, *flags)
    theirs = reference.construct_backward(as64(grad), as64(weight), as64(P), as64(Q), *flags)
    assert len(ours) == len(theirs) == sum(flags)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32 and a.is_contiguous()
        assert_close(a, b, torch.float32)


def test_construct_backward_expanded_grad():
    # The gradient of out.sum() arrives expanded (all strides 0).
    weight, P, Q = make_layer(SHAPES["3x3"], "transposed", torch.float32)
    grad = torch.ones((), dtype=torch.float32).expand(19, 13, 3, 3)
    ours = tb.construct_backward(grad, weight, P, Q, True, True, True)
    theirs = reference.construct_backward(as64(grad), as64(weight), as64(P), as64(Q), True, True, True)
    for a, b in zip(ours, theirs):
        assert a.is_contiguous()
        assert_close(a, b, torch.float32)


def test_construct_backward_only_flagged():
    weight, P, Q = make_layer(SHAPES["3x3"], "both", torch.float32)
    grad = rand(19, 13, 3, 3, seed=7, dtype=torch.float32)
    dQ, = tb.construct_backward(grad, weight, P, Q, False, False, True)
    expected, = reference.construct_backward(as64(grad), as64(weight), as64(P), as64(Q), False, False, True)
    assert_close(dQ, expected, torch.float32)


# ---------------------------------------------------------------------------------------------
# construct_grouped
# ---------------------------------------------------------------------------------------------
# Heterogeneous layers: (C_out, C_in, kernel, c_o or None, c_i or None, layout).
GROUP = [(37, 21, (3, 3), 19, 13, "transposed"), (7, 1, (3, 3), 3, None, "contiguous"),
         (12, 70, (1, 1), None, 66, "channels_last"), (5, 5, (), 2, 3, "contiguous"),
         (9, 4, (1, 3), None, None, "contiguous"), (80, 6, (), 70, 5, "contiguous")]


def make_group(dtype):
    weights, Ps, Qs = [], [], []
    for l, (C_out, C_in, kernel, c_o, c_i, layout) in enumerate(GROUP):
        w = meta_weight(C_out, C_in, *kernel, seed=10 * l, dtype=dtype)
        P = None if c_o is None else transform(C_out, c_o, seed=10 * l + 1, dtype=dtype)
        Q = None if c_i is None else transform(C_in, c_i, seed=10 * l + 2, dtype=dtype)
        if layout == "transposed":
            P, Q = P.t().contiguous().t(), Q.t().contiguous().t()
        elif layout == "channels_last":
            w = w.to(memory_format=torch.channels_last)
        weights.append(w)
        Ps.append(P)
        Qs.append(Q)
    return weights, Ps, Qs


class _CountLaunches:
    """Stands in for a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_construct_grouped_one_launch_per_stage(monkeypatch):
    weights, Ps, Qs = make_group(torch.float32)
    counter = _CountLaunches(kconstruct._construct_grouped_kernel)
    monkeypatch.setattr(kconstruct, "_construct_grouped_kernel", counter)
    outs = tb.construct_grouped(weights, Ps, Qs)
    assert counter.launches == 2
    assert len(outs) == len(GROUP)
    for out, w, P, Q in zip(outs, weights, Ps, Qs):
        assert out.dtype == torch.float32 and out.is_contiguous()
        assert_close(out, reference.construct(as64(w), as64(P), as64(Q)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
def test_construct_grouped_dtypes(dtype):
    weights, Ps, Qs = make_group(dtype)
    for out, w, P, Q in zip(tb.construct_grouped(weights, Ps, Qs), weights, Ps, Qs):
        expected = reference.construct(as64(w), as64(P), as64(Q))
        if dtype == torch.float64:
            assert_close(out, expected)
        else:
            assert_low_precision(out, expected, reference.construct(w, P, Q))


def test_construct_grouped_single_products_only(monkeypatch):
    # No layer has two products: the second stage does not launch.
    weights, Ps, Qs = make_group(torch.float32)
    Qs = [None] * len(Qs)
    counter = _CountLaunches(kconstruct._construct_grouped_kernel)
    monkeypatch.setattr(kconstruct, "_construct_grouped_kernel", counter)
    outs = tb.construct_grouped(weights, Ps, Qs)
    assert counter.launches == 1
    for out, w, P in zip(outs, weights, Ps):
        assert_close(out, reference.construct(as64(w), as64(P), None), torch.float32)


# ---------------------------------------------------------------------------------------------
# transition_step_all
# ---------------------------------------------------------------------------------------------
def make_sides(dtype, seed=0):
    """Four sides: a P/Q pair (C < n and C ≥ n), a lone side spanning several tiles (given as
    a column-major view), and a lone side with C < n over several Gram tiles."""
    g = torch.Generator().manual_seed(seed)
    layout = [((20, 30), [4, 10, 16], 1), ((40, 9), [2, 7], 0), ((100, 70), [20, 30, 20], -1),
              ((66, 80), [3, 5, 72], -1)]
    Ms, widths, counts, partner = [], [], [], []
    for (C, n), ws, p in layout:
        M = F.normalize(torch.randn(C, n, generator=g, dtype=torch.float64), dim=0).to(dtype)
        Ms.append(M)
        widths.extend(ws)
        counts.append(len(ws))
        partner.append(p)
    Ms[2] = Ms[2].t().contiguous().t()
    return Ms, widths, counts, partner


@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_transition_matches_reference(dtype, relative):
    Ms, widths, counts, partner = make_sides(dtype)
    before = [M.clone() for M in Ms]
    expected_Ms = [M.double().clone() for M in Ms]
    tau = 1e-2 if relative else 1e-4  # relative steps lack the partner's S ~ 1e2
    for _ in range(2):  # the second step reuses the cached tables and workspace
        phi = tb.transition_step_all(Ms, widths, counts, partner, tau, relative)
        expected = reference.transition_step_all(expected_Ms, widths, counts, partner, tau, relative)
        assert phi.dim() == 0 and phi.dtype == dtype
        assert_close(phi, expected, dtype)
        for M, E in zip(Ms, expected_Ms):
            assert M.dtype == dtype
            assert_close(M, E, dtype)
    for M, B in zip(Ms, before):
        assert (M - B).abs().max() > 1e-4  # every side moved
        assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=dtype))
    assert not Ms[2].is_contiguous()  # updated in place through its strides


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_transition_low_precision(dtype):
    Ms, widths, counts, partner = make_sides(dtype)
    own = [M.clone() for M in Ms]
    exact = [M.double().clone() for M in Ms]
    phi = tb.transition_step_all(Ms, widths, counts, partner, 1e-4)
    phi_own = reference.transition_step_all(own, widths, counts, partner, 1e-4)
    phi_exact = reference.transition_step_all(exact, widths, counts, partner, 1e-4)
    assert phi.dtype == torch.float32
    assert abs(phi.item() - phi_exact.item()) <= 2 * abs(phi_own.item() - phi_exact.item()) + 1e-5 * phi_exact.item()
    for M, O, E in zip(Ms, own, exact):
        assert M.dtype == dtype
        assert_low_precision(M, E, O)


def test_transition_lone_sides_and_tau():
    # Only single-sided layers (factor 1), one of them a single block; a larger τ.
    g = torch.Generator().manual_seed(5)
    Ms = [F.normalize(torch.randn(C, n, generator=g), dim=0) for C, n in ((8, 24), (33, 17))]
    widths, counts, partner = [8, 16, 17], [2, 1], [-1, -1]
    expected_Ms = [M.double().clone() for M in Ms]
    phi = tb.transition_step_all(Ms, widths, counts, partner, 3e-3)
    assert_close(phi, reference.transition_step_all(expected_Ms, widths, counts, partner, 3e-3), torch.float32)
    for M, E in zip(Ms, expected_Ms):
        assert_close(M, E, torch.float32)


def test_transition_two_launches(monkeypatch):
    Ms, widths, counts, partner = make_sides(torch.float32, seed=3)
    counters = {}
    for name in ("_transition_gram_kernel", "_transition_update_kernel"):
        counters[name] = _CountLaunches(getattr(ktransition, name))
        monkeypatch.setattr(ktransition, name, counters[name])
    tb.transition_step_all(Ms, widths, counts, partner, 1e-4)
    assert [c.launches for c in counters.values()] == [1, 1]


# ---------------------------------------------------------------------------------------------
# aps_conv1x1
# ---------------------------------------------------------------------------------------------
# (N, C_out, C_in, c_o or None, c_i or None, H, W, x layout, weight 2-D?)
CONV = {
    "both": (2, 40, 30, 20, 17, 5, 7, "nchw", False),
    "channels_last": (2, 40, 30, 20, 17, 5, 7, "channels_last", False),
    "P=None": (1, 24, 36, None, 19, 3, 9, "nchw", True),
    "Q=None": (2, 40, 30, 33, None, 4, 4, "channels_last", False),
    "identity": (2, 12, 10, None, None, 3, 5, "nchw", False),
    "wide-ci": (1, 24, 300, 9, 270, 3, 3, "nchw", False),
    "strided-x": (2, 16, 24, 8, 12, 6, 6, "sliced", True),
}


def make_conv(case, dtype):
    N, C_out, C_in, c_o, c_i, H, W, layout, flat = case
    weight = meta_weight(C_out, C_in, *(() if flat else (1, 1)), seed=1, dtype=dtype)
    P = None if c_o is None else transform(C_out, c_o, seed=2, dtype=dtype)
    Q = None if c_i is None else transform(C_in, c_i, seed=3, dtype=dtype)
    x = rand(N, C_in if c_i is None else c_i, H, W, seed=4, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = rand(N, 2 * x.shape[1], H, 2 * W, seed=5, dtype=dtype)[:, ::2, :, ::2]
    return x, weight, P, Q


def conv_reference(x, weight, P, Q):
    kernel = reference.construct(weight.reshape(weight.shape[0], weight.shape[1], 1, 1), P, Q)
    return F.conv2d(x, kernel)


@pytest.mark.parametrize("name", list(CONV))
def test_conv1x1_values(name):
    x, weight, P, Q = make_conv(CONV[name], torch.float32)
    y = tb.aps_conv1x1(x, weight, P, Q)
    assert y.dtype == torch.float32
    if CONV[name][7] == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert_close(y, conv_reference(as64(x), as64(weight), as64(P), as64(Q)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float64, *LOW], ids=str)
def test_conv1x1_dtypes(dtype):
    x, weight, P, Q = make_conv(CONV["both"], dtype)
    y = tb.aps_conv1x1(x, weight, P, Q)
    expected = conv_reference(as64(x), as64(weight), as64(P), as64(Q))
    if dtype == torch.float64:
        assert_close(y, expected)
    else:
        kernel = reference.construct(weight.reshape(*weight.shape[:2], 1, 1), P, Q)
        assert_low_precision(y, expected, torch.einsum("oi,nihw->nohw", kernel[:, :, 0, 0], x))


# ---------------------------------------------------------------------------------------------
# Missed stores, dispatch, module rules
# ---------------------------------------------------------------------------------------------
def test_every_output_element_is_stored(monkeypatch):
    """Outputs and workspaces start as NaN: an element a kernel forgets to write (or a
    workspace entry read before it is written) shows up as NaN."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(ktransition, "_PLANS", {})
    for variant in ("both", "P=None", "Q=None", "strided"):
        weight, P, Q = make_layer(SHAPES["3x3"], variant, torch.float32)
        assert_close(tb.construct(weight, P, Q), reference.construct(as64(weight), as64(P), as64(Q)), torch.float32)
    weights, Ps, Qs = make_group(torch.float16)
    for out, w, P, Q in zip(tb.construct_grouped(weights, Ps, Qs), weights, Ps, Qs):
        assert not out.isnan().any()
    Ms, widths, counts, partner = make_sides(torch.float32, seed=1)
    expected_Ms = [M.double().clone() for M in Ms]
    phi = tb.transition_step_all(Ms, widths, counts, partner, 1e-4)
    assert_close(phi, reference.transition_step_all(expected_Ms, widths, counts, partner, 1e-4), torch.float32)
    for M, E in zip(Ms, expected_Ms):
        assert_close(M, E, torch.float32)
    for name in ("both", "wide-ci", "channels_last"):
        x, weight, P, Q = make_conv(CONV[name], torch.float32)
        assert_close(tb.aps_conv1x1(x, weight, P, Q), conv_reference(as64(x), as64(weight), as64(P), as64(Q)),
                     torch.float32)


def test_supports():
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        assert tb.supports(cpu, dtype)
    for dtype in (torch.int32, torch.complex64):
        assert not tb.supports(cpu, dtype)


def test_adapter_imports_no_reference_or_other_backend():
    tree = ast.parse(inspect.getsource(tb))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith(("apsfast.reference", "apsfast._backends")) for name in imported), imported
