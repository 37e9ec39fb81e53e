"""The drop-in APS layers (APSConv2d, APSBatchNorm2d, APSLinear) against plain PyTorch."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear
from conftest import assert_close

F64 = torch.float64

# (stride, padding, dilation) variations of a dense conv.
GEOMETRIES = {
    "plain": (1, 0, 1),
    "pad1": (1, 1, 1),
    "stride2": (2, 1, 1),
    "dilated": (1, 2, 2),
    "mixed": ((2, 1), (1, 0), (1, 2)),
    "same": (1, "same", 2),
}


def rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def randomise(layer: nn.Module, seed: int = 1) -> nn.Module:
    """Give every float parameter (bias included) non-trivial values, the transforms excepted."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "transforms" not in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64).to(p.dtype))
    return layer


def ref_kernel(weight, P, Q):
    """Paper eq. 2 written out, with identities for missing transforms."""
    P = torch.eye(weight.shape[0], dtype=weight.dtype) if P is None else P
    Q = torch.eye(weight.shape[1], dtype=weight.dtype) if Q is None else Q
    return torch.einsum("ao,bi,abhw->oihw", P, Q, weight)


def ref_conv(layer: APSConv2d, x, weight=None, P=None, Q=None, bias=None):
    """The layer's output built by hand from its meta-weight and transforms.

    ``weight``/``P``/``Q``/``bias`` replace the layer's own tensors (for gradient checks).
    """
    c_in = x.shape[1]
    weight = layer.weight if weight is None else weight
    bias = layer.bias if bias is None else bias
    if layer.depthwise:
        index = layer.in_widths.index(c_in)
        if P is None and layer.P is not None:
            P = layer.P[index]
        kernel = ref_kernel(weight, P, None)
        groups = c_in
    else:
        if P is None and layer.P is not None:
            P = layer.P[layer.out_widths.index(layer.active_out)]
        if Q is None and layer.Q is not None:
            Q = layer.Q[layer.in_widths.index(c_in)]
        kernel = ref_kernel(weight, P, Q)
        groups = 1
    if bias is not None and P is not None:
        bias = bias @ P
    return F.conv2d(x, kernel, bias, layer.stride, layer.padding, layer.dilation, groups)


def conv_layer(in_widths=(3, 5, 7), out_widths=(3, 5, 7), kernel_size=3, sharing="transitional",
               seed=1, **kwargs):
    torch.manual_seed(seed)  # the transitional init noise comes from the global generator
    layer = APSConv2d(in_widths, out_widths, kernel_size, sharing=sharing, dtype=F64, **kwargs)
    return randomise(layer, seed)


def ordinal_score(widths):
    """S of one side with ordinal transforms: ‖M^{aᵀ} M^{ã}‖² = c_a for a ≤ ã, so
    S = Σ_a c_a·(number of candidates at least as wide)."""
    return sum(c * (len(widths) - a) for a, c in enumerate(widths))


# ---------------------------------------------------------------------------------------------
# APSConv2d forward
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("sharing", ["transitional", "ordinal", "independent"])
def test_conv_forward_every_candidate(backend, geometry, bias, sharing):
    stride, padding, dilation = GEOMETRIES[geometry]
    layer = conv_layer((3, 5, 7), (2, 5, 6), 3, sharing, stride=stride, padding=padding,
                       dilation=dilation, bias=bias)
    assert layer.active_out == 6
    for c_in, c_out in itertools.product(layer.in_widths, layer.out_widths):
        layer.active_out = c_out
        x = rand(2, c_in, 9, 8, seed=c_in)
        out = layer(x)
        expected = ref_conv(layer, x)
        assert out.shape == expected.shape and out.shape[1] == c_out
        assert out.dtype == F64
        assert_close(out, expected)
        assert_close(layer.candidate_kernel(c_in),
                     ref_kernel(layer.weight, layer.P[layer.out_widths.index(c_out)],
                                layer.Q[layer.in_widths.index(c_in)]))


@pytest.mark.parametrize("kind", ["channels_last", "spatial_slice", "channel_slice", "transposed"])
def test_conv_forward_non_contiguous_input(backend, kind):
    layer = conv_layer((3, 5), (4, 6), 3, padding=1, bias=True)
    layer.active_out = 4
    if kind == "channels_last":
        x = rand(2, 5, 7, 6).to(memory_format=torch.channels_last)
    elif kind == "spatial_slice":
        x = rand(2, 5, 14, 9)[:, :, ::2, 1:]
    elif kind == "channel_slice":
        x = rand(2, 8, 7, 6)[:, 2:7]
    else:
        x = rand(2, 5, 6, 7).transpose(2, 3)
    assert not x.is_contiguous()
    assert_close(layer(x), ref_conv(layer, x.contiguous()))


def test_conv_forward_channels_last_layer(backend):
    layer = conv_layer((3, 5), (4, 6), 3, padding=1).to(memory_format=torch.channels_last)
    x = rand(2, 5, 6, 6).to(memory_format=torch.channels_last)
    assert_close(layer(x), ref_conv(layer, x))


STRIDED_1X1 = """
import torch
from apsfast.nn import APSConv2d
torch.manual_seed(0)
layer = APSConv2d((4, 8, 16), (4, 8, 16), 1, stride=2)
layer.transition_step(1e-2, relative=True)  # dense P, Q: the kernel is constructed
layer.active_out = 16
for _ in range(300):
    layer(torch.randn(32, 4, 8, 8)).square().mean().backward()
"""


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_dense_strided_1x1_conv_trains_without_corrupting_memory(backend_name):
    # A 1x1 candidate kernel with einsum's strides made PyTorch's CPU conv backward at stride 2
    # write past its buffers (aborts or silently different results). One thread: it crashed
    # within a few steps there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "APSFAST_BACKEND": backend_name}
    done = subprocess.run([sys.executable, "-c", STRIDED_1X1], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_conv_fixed_input_width(backend, bias):
    layer = conv_layer(3, (4, 8), 3, padding=1, bias=bias)
    assert layer.Q is None and layer.in_transforms is None
    assert layer.in_widths == (3,) and layer.meta_in_width == 3
    assert layer.weight.shape == (layer.meta_out_width, 3, 3, 3)
    x = rand(2, 3, 6, 5)
    for c_out in (4, 8):
        layer.active_out = c_out
        out = layer(x)
        assert out.shape == (2, c_out, 6, 5)
        assert_close(out, ref_conv(layer, x))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_conv_single_output_width(backend, bias):
    layer = conv_layer((3, 5, 7), 4, 3, stride=2, bias=bias)
    assert layer.P is None and layer.out_transforms is None
    assert layer.out_widths == (4,) and layer.meta_out_width == 4 and layer.active_out == 4
    for c_in in (3, 5, 7):
        x = rand(2, c_in, 7, 7, seed=c_in)
        out = layer(x)
        assert out.shape == (2, 4, 3, 3)
        assert_close(out, ref_conv(layer, x))


def test_conv_both_sides_fixed(backend):
    layer = conv_layer(3, 4, 1, bias=True)
    assert layer.P is None and layer.Q is None
    x = rand(2, 3, 4, 4)
    assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias))
    assert_close(layer.sharing_level(), torch.ones((), dtype=F64))


# ---------------------------------------------------------------------------------------------
# APSConv2d gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_conv_grads_match_einsum(backend, bias):
    layer = conv_layer((3, 5, 7), (2, 4, 6), 3, padding=1, stride=(1, 2), bias=bias)
    for c_in, c_out in [(5, 4), (7, 2), (3, 6)]:
        layer.active_out = c_out
        layer.zero_grad(set_to_none=True)
        x = rand(2, c_in, 6, 7, seed=c_in).requires_grad_()
        out = layer(x)
        grad_out = rand(*out.shape, seed=100 + c_in)
        out.backward(grad_out)

        weight = layer.weight.detach().clone().requires_grad_()
        b = layer.bias.detach().clone().requires_grad_() if bias else None
        x_ref = x.detach().clone().requires_grad_()
        ref_conv(layer, x_ref, weight=weight, bias=b).backward(grad_out)

        assert_close(layer.weight.grad, weight.grad)
        assert_close(x.grad, x_ref.grad)
        if bias:
            assert_close(layer.bias.grad, b.grad)
        # Rows and columns of the meta-weight outside this candidate get gradient only through
        # the transforms: with dense transforms the whole meta-weight gets one.
        assert layer.weight.grad.shape == layer.weight.shape
        # The transforms are updated by the transition alone: no gradient by default.
        for side in (layer.out_transforms, layer.in_transforms):
            assert not side.matrix.requires_grad
            assert side.matrix.grad is None
        assert all(not m.requires_grad for m in layer.P + layer.Q)


@pytest.mark.parametrize("side", ["out", "in", "both"])
def test_conv_transform_grads_when_trained(backend, side):
    layer = conv_layer((3, 5, 7), (2, 4, 6), 3, padding=1, bias=True)
    sides = {"out": [layer.out_transforms], "in": [layer.in_transforms],
             "both": [layer.out_transforms, layer.in_transforms]}[side]
    for s in sides:
        s.matrix.requires_grad_(True)
    layer.active_out = 4
    x = rand(2, 5, 6, 6)
    out = layer(x)
    grad_out = rand(*out.shape, seed=7)
    out.backward(grad_out)

    P_mat = layer.out_transforms.matrix.detach().clone().requires_grad_(side in ("out", "both"))
    Q_mat = layer.in_transforms.matrix.detach().clone().requires_grad_(side in ("in", "both"))
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    P = P_mat[:, 2:6]  # the 4-wide candidate, after the 2-wide one
    Q = Q_mat[:, 3:8]  # the 5-wide candidate, after the 3-wide one
    ref_conv(layer, x, weight=weight, P=P, Q=Q, bias=bias).backward(grad_out)

    assert_close(layer.weight.grad, weight.grad)
    assert_close(layer.bias.grad, bias.grad)
    for transforms, ref in ((layer.out_transforms, P_mat), (layer.in_transforms, Q_mat)):
        if ref.requires_grad:
            assert transforms.matrix.grad is not None
            assert_close(transforms.matrix.grad, ref.grad)
        else:
            assert transforms.matrix.grad is None
    if side in ("out", "both"):
        # Columns of the other output candidates are untouched by this forward.
        g = layer.out_transforms.matrix.grad
        assert torch.count_nonzero(g[:, :2]) == 0 and torch.count_nonzero(g[:, 6:]) == 0


def test_depthwise_grads_match_einsum(backend):
    layer = conv_layer((3, 5), (3, 5), 3, groups="depthwise", padding=1, bias=True)
    layer.out_transforms.matrix.requires_grad_(True)
    x = rand(2, 5, 6, 6).requires_grad_()
    out = layer(x)
    grad_out = rand(*out.shape, seed=3)
    out.backward(grad_out)

    P_mat = layer.out_transforms.matrix.detach().clone().requires_grad_()
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    ref_conv(layer, x_ref, weight=weight, P=P_mat[:, 3:8], bias=bias).backward(grad_out)
    assert_close(layer.weight.grad, weight.grad)
    assert_close(layer.bias.grad, bias.grad)
    assert_close(layer.out_transforms.matrix.grad, P_mat.grad)
    assert_close(x.grad, x_ref.grad)


# ---------------------------------------------------------------------------------------------
# Meta widths and the initial transforms
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sharing, meta_in, meta_out", [
    ("ordinal", 7, 6),
    ("independent", 15, 12),
    ("transitional", 15, 12),
])
def test_meta_width_defaults(sharing, meta_in, meta_out):
    layer = APSConv2d((3, 5, 7), (2, 4, 6), (3, 1), sharing=sharing, dtype=F64)
    assert (layer.meta_in_width, layer.meta_out_width) == (meta_in, meta_out)
    assert layer.weight.shape == (meta_out, meta_in, 3, 1)
    assert layer.in_transforms.matrix.shape == (meta_in, 15)
    assert layer.out_transforms.matrix.shape == (meta_out, 12)
    assert [tuple(m.shape) for m in layer.Q] == [(meta_in, 3), (meta_in, 5), (meta_in, 7)]
    assert [tuple(m.shape) for m in layer.P] == [(meta_out, 2), (meta_out, 4), (meta_out, 6)]
    assert layer.weight.dtype == layer.P[0].dtype == layer.Q[0].dtype == F64


@pytest.mark.parametrize("sharing", ["ordinal", "independent", "transitional"])
def test_meta_width_overrides(backend, sharing):
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing=sharing, meta_in_width=20,
                      meta_out_width=16, padding=1, dtype=F64)
    randomise(layer)
    assert (layer.meta_in_width, layer.meta_out_width) == (20, 16)
    assert layer.weight.shape == (16, 20, 3, 3)
    assert all(m.shape[0] == 20 for m in layer.Q) and all(m.shape[0] == 16 for m in layer.P)
    x = rand(1, 5, 5, 5)
    assert_close(layer(x), ref_conv(layer, x))


def test_meta_width_overrides_at_the_minimum():
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="transitional", meta_in_width=7, meta_out_width=6)
    assert layer.weight.shape[:2] == (6, 7)
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="independent", meta_in_width=15, meta_out_width=12)
    assert layer.weight.shape[:2] == (12, 15)


@pytest.mark.parametrize("sharing, kwargs, name", [
    ("ordinal", {"meta_in_width": 6}, "meta_in_width"),
    ("ordinal", {"meta_out_width": 5}, "meta_out_width"),
    ("transitional", {"meta_in_width": 6}, "meta_in_width"),
    ("transitional", {"meta_out_width": 5}, "meta_out_width"),
    ("independent", {"meta_in_width": 14}, "meta_in_width"),
    ("independent", {"meta_out_width": 11}, "meta_out_width"),
])
def test_meta_width_too_small_raises(sharing, kwargs, name):
    with pytest.raises(ValueError, match=name):
        APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing=sharing, **kwargs)


@pytest.mark.parametrize("kwargs, name", [
    ({"meta_in_width": 0}, "meta_in_width"),
    ({"meta_out_width": -3}, "meta_out_width"),
    ({"meta_in_width": 7.5}, "meta_in_width"),
])
def test_meta_width_not_positive_int_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        APSConv2d((3, 5, 7), (2, 4, 6), 3, **kwargs)


def test_meta_width_of_a_fixed_side_must_be_its_width():
    with pytest.raises(ValueError, match="meta_in_width"):
        APSConv2d(3, (4, 8), 3, meta_in_width=5)
    with pytest.raises(ValueError, match="meta_out_width"):
        APSConv2d((3, 5), 4, 3, meta_out_width=6)
    layer = APSConv2d(3, 4, 3, meta_in_width=3, meta_out_width=4)
    assert layer.weight.shape == (4, 3, 3, 3)


def test_ordinal_transforms_are_column_selections():
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="ordinal", meta_in_width=9, dtype=F64)
    for Ms, meta in ((layer.Q, 9), (layer.P, 6)):
        eye = torch.eye(meta, dtype=F64)
        for M in Ms:
            assert torch.equal(M, eye[:, :M.shape[1]])


def test_independent_transforms_are_disjoint_selections():
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="independent", dtype=F64)
    for Ms, meta in ((layer.Q, 15), (layer.P, 12)):
        M = torch.cat(Ms, dim=1)
        assert M.shape == (meta, meta)
        # Every column is a basis vector and no two candidates share one: M is a permutation.
        assert torch.equal(M.abs().sum(dim=0), torch.ones(meta, dtype=F64))
        assert torch.equal(M @ M.t(), torch.eye(meta, dtype=F64))
        for a, b in itertools.combinations(range(len(Ms)), 2):
            assert torch.count_nonzero(Ms[a].t() @ Ms[b]) == 0


def test_transitional_starts_exact_and_first_step_perturbs():
    torch.manual_seed(0)
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="transitional", dtype=F64)
    sides = ((layer.in_transforms, 15), (layer.out_transforms, 12))
    for side, meta in sides:
        assert side.is_selection()
        for M in side.matrices():
            assert torch.equal(M, torch.eye(meta, dtype=F64)[:, :M.shape[1]])
    # Warm-up runs on the slicing path: the kernel is the meta-weight's block, copied (contiguous).
    kernel = layer.candidate_kernel(5)
    assert torch.equal(kernel, layer.weight[:6, :5]) and kernel.is_contiguous()
    layer.transition_step(1e-9)
    for side, meta in sides:
        assert not side.is_selection()
        for M in side.matrices():
            ordinal = torch.eye(meta, dtype=F64)[:, :M.shape[1]]
            assert 0 < (M - ordinal).abs().max() < 1e-2
            assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=F64))
    assert not torch.equal(layer.candidate_kernel(5), layer.weight[:6, :5])  # built from P, Q


def test_transition_noise_override():
    exact = APSConv2d((3, 5), (2, 4), 3, sharing="transitional", transition_noise=0.0, dtype=F64)
    exact.transition_step(1e-3)
    assert torch.equal(exact.Q[1], torch.eye(8, dtype=F64)[:, :5])  # stationary: never moves
    torch.manual_seed(0)
    noisy = APSConv2d((3, 5), (2, 4), 3, sharing="transitional", transition_noise=0.1, dtype=F64)
    assert noisy.begin_transition()
    assert (noisy.Q[1] - torch.eye(8, dtype=F64)[:, :5]).abs().max() > 1e-3
    assert_close(noisy.Q[1].norm(dim=0), torch.ones(5, dtype=F64))
    assert not noisy.begin_transition()  # only once: it is no longer an exact selection
    with pytest.raises(ValueError, match="transition_noise must be a finite float ≥ 0"):
        APSConv2d((3, 5), (2, 4), 3, transition_noise=-1.0)


@pytest.mark.parametrize("make", [
    lambda sharing: APSConv2d((3, 5), (2, 4), 3, bias=True, sharing=sharing, dtype=F64),
    lambda sharing: APSConv2d((3, 5), (3, 5), 3, groups="depthwise", sharing=sharing, dtype=F64),
    lambda sharing: APSLinear((3, 5), 7, sharing=sharing, dtype=F64)], ids=["conv", "depthwise", "linear"])
def test_aps_t_starts_as_aps_o(make):
    # One seed, one initial network and one random stream after it for APS-O and APS-T; the
    # rows and columns that only the transition reaches are drawn too, from a stream of their own.
    torch.manual_seed(0)
    ordinal, after_ordinal = make("ordinal"), torch.rand(4)
    torch.manual_seed(0)
    transitional, after_transitional = make("transitional"), torch.rand(4)
    rows, cols = ordinal.weight.shape[:2]
    assert transitional.weight.shape[0] > rows or transitional.weight.shape[1] > cols
    assert torch.equal(transitional.weight[:rows, :cols], ordinal.weight)
    assert torch.equal(after_transitional, after_ordinal)
    if ordinal.bias is not None:
        assert torch.equal(transitional.bias[:len(ordinal.bias)], ordinal.bias)
    rest = transitional.weight.detach().clone()
    scale = float(ordinal.weight.detach().std())
    rest[:rows, :cols] = scale
    assert torch.count_nonzero(rest) == rest.numel()
    assert float(rest.std()) == pytest.approx(scale, rel=0.3)  # the same scale
    torch.manual_seed(0)
    again, following = make("transitional"), make("transitional")
    assert torch.equal(again.weight, transitional.weight)  # the seed fixes it all
    outside = torch.ones(transitional.weight.shape, dtype=torch.bool)
    outside[:rows, :cols] = False
    assert not torch.equal(following.weight[outside], transitional.weight[outside])  # each layer its own
    # APS-I's candidates read disjoint blocks: all of its meta-weight comes from the global stream.
    torch.manual_seed(0)
    assert not torch.equal(make("independent").weight[:rows, :cols], ordinal.weight)


def test_transforms_are_views_of_one_matrix():
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, dtype=F64)
    matrix = layer.in_transforms.matrix
    assert isinstance(matrix, nn.Parameter) and not matrix.requires_grad
    for Q, start in zip(layer.Q, (0, 3, 8)):
        assert Q.data_ptr() == matrix[:, start:].data_ptr()  # a view, not a copy
        assert torch.equal(Q, matrix[:, start:start + Q.shape[1]])


# ---------------------------------------------------------------------------------------------
# Sharing level and transition
# ---------------------------------------------------------------------------------------------

def test_sharing_level_values_per_mode():
    in_widths, out_widths = (3, 5, 7), (2, 4, 6)
    phis = {}
    for sharing in ("ordinal", "transitional", "independent"):
        torch.manual_seed(0)
        phis[sharing] = APSConv2d(in_widths, out_widths, 3, sharing=sharing, dtype=F64).sharing_level()
    # Ordinal attains the maximum, independent the minimum S = Σ c_a on each side.
    assert phis["ordinal"].item() == ordinal_score(in_widths) * ordinal_score(out_widths) == 26 * 20
    assert phis["independent"].item() == sum(in_widths) * sum(out_widths) == 15 * 12
    # APS-T starts at the exact ordinal maximum.
    assert phis["transitional"] == phis["ordinal"]
    assert phis["ordinal"] - phis["transitional"] < 1e-1

    torch.manual_seed(0)
    layer = APSConv2d(in_widths, out_widths, 3, sharing="transitional", dtype=F64)
    for _ in range(30):
        layer.transition_step(1e-3, relative=False)  # eq. 5's own scale: these widths are small
    phi = layer.sharing_level()
    assert phis["independent"] <= phi < phis["ordinal"] - 10


def test_transition_step_lowers_sharing_level_in_place():
    torch.manual_seed(0)
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="transitional", dtype=F64)
    P_matrix, Q_matrix = layer.out_transforms.matrix, layer.in_transforms.matrix
    P_before, Q_before = P_matrix.detach().clone(), Q_matrix.detach().clone()
    ptr = (P_matrix.data_ptr(), Q_matrix.data_ptr())
    assert layer.begin_transition()  # leave the stationary ordinal start
    before = layer.sharing_level()
    returned = layer.transition_step(1e-4)
    after = layer.sharing_level()
    assert_close(returned, before)
    assert after < before
    # The same parameters, updated in place, still with unit columns.
    assert layer.out_transforms.matrix is P_matrix and layer.in_transforms.matrix is Q_matrix
    assert (P_matrix.data_ptr(), Q_matrix.data_ptr()) == ptr
    assert not torch.equal(P_matrix, P_before) and not torch.equal(Q_matrix, Q_before)
    for M in (P_matrix, Q_matrix):
        assert_close(M.norm(dim=0), torch.ones(M.shape[1], dtype=F64))
    # Views taken afterwards see the new values.
    assert torch.equal(layer.P[2], P_matrix[:, 6:12])


def test_transition_step_changes_the_forward(backend):
    torch.manual_seed(0)
    layer = randomise(APSConv2d((3, 5), (2, 4), 3, sharing="transitional", dtype=F64))
    x = rand(1, 5, 5, 5)
    before = layer(x).detach()
    for _ in range(5):
        layer.transition_step(1e-2)
    after = layer(x)
    assert not torch.allclose(before, after)
    assert_close(after, ref_conv(layer, x))


def test_ordinal_transition_step_is_stationary():
    layer = APSConv2d((3, 5, 7), (2, 4, 6), 3, sharing="ordinal", dtype=F64)
    P_before = layer.out_transforms.matrix.detach().clone()
    Q_before = layer.in_transforms.matrix.detach().clone()
    phi = layer.sharing_level()
    layer.transition_step(1e-4)
    assert torch.equal(layer.out_transforms.matrix, P_before)
    assert torch.equal(layer.in_transforms.matrix, Q_before)
    assert layer.sharing_level() == phi


def test_transition_step_bad_tau_raises():
    layer = APSConv2d((3, 5), (2, 4), 3)
    for tau in (0.0, -1e-3, float("nan")):
        with pytest.raises(ValueError, match="tau"):
            layer.transition_step(tau)


def test_transition_step_with_one_side_fixed():
    torch.manual_seed(0)
    layer = APSConv2d(3, (2, 4, 6), 3, sharing="transitional", dtype=F64)
    # Φ = S(P) alone: the ordinal 2·3 + 4·2 + 6 = 20, then just below once perturbed.
    assert layer.sharing_level() == 20
    layer.begin_transition()
    before = layer.sharing_level()
    assert 19.9 < before < 20
    layer.transition_step(1e-3)
    assert layer.sharing_level() < before


# ---------------------------------------------------------------------------------------------
# Depthwise
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("sharing", ["transitional", "ordinal", "independent"])
def test_depthwise_forward(backend, bias, sharing):
    layer = conv_layer((3, 5, 7), (3, 5, 7), 3, sharing, groups="depthwise", padding=1,
                       stride=(1, 2), bias=bias)
    assert layer.depthwise and layer.Q is None
    assert layer.weight.shape == (layer.meta_out_width, 1, 3, 3)
    assert layer.in_widths == layer.out_widths == (3, 5, 7)
    layer.active_out = 3  # not used by a depthwise layer: the output follows the input
    for index, c in enumerate(layer.in_widths):
        x = rand(2, c, 6, 7, seed=c)
        out = layer(x)
        assert out.shape == (2, c, 6, 4)
        P = layer.P[index]
        kernel = torch.einsum("ao,abhw->obhw", P, layer.weight)  # P[i]ᵀ W
        b = layer.bias @ P if bias else None
        assert_close(out, F.conv2d(x, kernel, b, (1, 2), 1, 1, groups=c))
        assert_close(layer.candidate_kernel(c), kernel)


def test_depthwise_single_width(backend):
    layer = conv_layer(6, 6, 3, groups="depthwise", padding=1, bias=True)
    assert layer.P is None and layer.weight.shape == (6, 1, 3, 3)
    x = rand(2, 6, 5, 5)
    assert_close(layer(x), F.conv2d(x, layer.weight, layer.bias, 1, 1, 1, groups=6))


def test_depthwise_errors():
    with pytest.raises(ValueError, match="in_widths == out_widths"):
        APSConv2d((3, 5), (3, 6), 3, groups="depthwise")
    with pytest.raises(ValueError, match="groups"):
        APSConv2d((3, 5), (3, 5), 3, groups=2)
    with pytest.raises(ValueError, match="groups"):
        APSConv2d((3, 5), (3, 5), 3, groups="grouped")
    layer = APSConv2d((3, 5), (3, 5), 3, groups="depthwise", dtype=F64)
    with pytest.raises(ValueError, match="in_widths"):
        layer(rand(1, 4, 5, 5))


# ---------------------------------------------------------------------------------------------
# to_static
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("geometry", ["pad1", "mixed", "same"])
def test_conv_to_static(backend, bias, geometry):
    stride, padding, dilation = GEOMETRIES[geometry]
    layer = conv_layer((3, 5, 7), (2, 4, 6), 3, stride=stride, padding=padding,
                       dilation=dilation, bias=bias).eval()
    for c_in, c_out in itertools.product(layer.in_widths, layer.out_widths):
        layer.active_out = c_out
        static = layer.to_static(c_in)
        assert type(static) is nn.Conv2d
        assert (static.in_channels, static.out_channels) == (c_in, c_out)
        assert static.weight.dtype == F64 and (static.bias is not None) == bias
        assert static.weight.requires_grad and static.weight.grad_fn is None
        x = rand(2, c_in, 8, 7, seed=c_in)
        with torch.no_grad():
            assert_close(static(x), layer(x))


def test_conv_to_static_fixed_sides(backend):
    layer = conv_layer(3, (4, 6), 3, padding=1, bias=True).eval()
    layer.active_out = 4
    x = rand(1, 3, 5, 5)
    with torch.no_grad():
        assert_close(layer.to_static(3)(x), layer(x))
    layer = conv_layer((3, 5), 4, 3, bias=True).eval()
    x = rand(1, 5, 5, 5)
    with torch.no_grad():
        assert_close(layer.to_static(5)(x), layer(x))


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_depthwise_to_static(backend, bias):
    layer = conv_layer((3, 5, 7), (3, 5, 7), 3, groups="depthwise", padding=1, bias=bias).eval()
    for c in layer.in_widths:
        static = layer.to_static(c)
        assert (static.in_channels, static.out_channels, static.groups) == (c, c, c)
        x = rand(2, c, 6, 6, seed=c)
        with torch.no_grad():
            assert_close(static(x), layer(x))


def test_conv_to_static_is_a_copy():
    layer = conv_layer((3, 5), (2, 4), 3, bias=True)
    static = layer.to_static(5)
    kernel = static.weight.detach().clone()
    with torch.no_grad():
        layer.weight.add_(1.0)
    assert torch.equal(static.weight, kernel)


def test_conv_to_static_bad_width_raises():
    layer = conv_layer((3, 5), (2, 4), 3)
    with pytest.raises(ValueError, match="in_widths"):
        layer.to_static(4)


# ---------------------------------------------------------------------------------------------
# APSBatchNorm2d
# ---------------------------------------------------------------------------------------------

def test_batchnorm_running_stats_per_width():
    bn = APSBatchNorm2d((4, 8, 12), dtype=F64)
    assert [b.num_features for b in bn.bns] == [4, 8, 12]
    before = [b.running_mean.clone() for b in bn.bns]
    x = rand(4, 8, 5, 5) * 2 + 3
    bn.train()
    out = bn(x)
    assert_close(out, F.batch_norm(x, None, None, training=True, eps=1e-5))
    for index, (b, old) in enumerate(zip(bn.bns, before)):
        if index == 1:
            assert not torch.equal(b.running_mean, old)
            assert_close(b.running_mean, 0.1 * x.mean(dim=(0, 2, 3)))
            assert b.num_batches_tracked.item() == 1
        else:
            assert torch.equal(b.running_mean, old)
            assert torch.equal(b.running_var, torch.ones_like(b.running_var))
            assert b.num_batches_tracked.item() == 0


def test_batchnorm_eval_uses_the_width_statistics():
    bn = APSBatchNorm2d((4, 8), dtype=F64)
    randomise(bn, seed=5)
    bn.train()
    for seed in range(3):
        bn(rand(4, 4, 3, 3, seed=seed) + 1)
        bn(rand(4, 8, 3, 3, seed=10 + seed) - 2)
    bn.eval()
    for b, c in zip(bn.bns, (4, 8)):
        x = rand(2, c, 4, 4, seed=c)
        expected = F.batch_norm(x, b.running_mean, b.running_var, b.weight, b.bias,
                                training=False, eps=b.eps)
        assert_close(bn(x), expected)
    assert not torch.allclose(bn.bns[0].running_mean, bn.bns[1].running_mean[:4])


@pytest.mark.parametrize("width", [3, 6, 16])
def test_batchnorm_wrong_width_raises(width):
    bn = APSBatchNorm2d((4, 8), dtype=F64)
    with pytest.raises(ValueError, match=r"widths \(4, 8\)"):
        bn(rand(2, width, 3, 3))
    with pytest.raises(ValueError, match=r"widths \(4, 8\)"):
        bn.to_static(width)


def test_batchnorm_bad_input_raises():
    bn = APSBatchNorm2d((4, 8), dtype=F64)
    with pytest.raises(ValueError, match="4 dims"):
        bn(rand(2, 4, 3))
    with pytest.raises(TypeError, match="floating-point"):
        bn(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="strictly ascending"):
        APSBatchNorm2d((8, 4))


def test_batchnorm_to_static():
    bn = APSBatchNorm2d((4, 8), dtype=F64)
    randomise(bn, seed=2)
    bn.train()
    bn(rand(4, 8, 3, 3) * 3)
    bn.eval()
    static = bn.to_static(8)
    assert type(static) is nn.BatchNorm2d and static.num_features == 8
    x = rand(2, 8, 4, 4, seed=9)
    assert_close(static(x), bn(x))
    # A copy: training the static module leaves the layer's statistics alone.
    mean = bn.bns[1].running_mean.clone()
    static.train()
    static(x + 5)
    assert torch.equal(bn.bns[1].running_mean, mean)


# ---------------------------------------------------------------------------------------------
# APSLinear
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("sharing", ["transitional", "ordinal", "independent"])
def test_linear_forward(backend, bias, sharing):
    torch.manual_seed(0)
    layer = randomise(APSLinear((3, 5, 7), 4, bias=bias, sharing=sharing, dtype=F64))
    meta = 7 if sharing == "ordinal" else 15
    assert layer.weight.shape == (4, meta) and layer.meta_in_width == meta and layer.P is None
    for index, c in enumerate(layer.in_widths):
        W = layer.weight @ layer.Q[index]
        for shape in ((6, c), (2, 3, c)):
            x = rand(*shape, seed=c)
            out = layer(x)
            expected = x @ W.t() + (layer.bias if bias else 0)
            assert out.shape == (*shape[:-1], 4)
            assert_close(out, expected)
        assert_close(layer.candidate_weight(c), W)


def test_linear_fixed_input(backend):
    layer = randomise(APSLinear(5, 3, dtype=F64))
    assert layer.Q is None and layer.weight.shape == (3, 5)
    x = rand(4, 5)
    assert_close(layer(x), x @ layer.weight.t() + layer.bias)
    assert_close(layer.sharing_level(), torch.ones((), dtype=F64))


def test_linear_grads(backend):
    torch.manual_seed(0)
    layer = randomise(APSLinear((3, 5), 4, dtype=F64))
    x = rand(2, 3, 5).requires_grad_()
    out = layer(x)
    grad_out = rand(*out.shape, seed=4)
    out.backward(grad_out)
    weight = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    (x_ref @ (weight @ layer.Q[1]).t() + bias).backward(grad_out)
    assert_close(layer.weight.grad, weight.grad)
    assert_close(layer.bias.grad, bias.grad)
    assert_close(x.grad, x_ref.grad)
    assert layer.in_transforms.matrix.grad is None


def test_linear_wrong_width_raises():
    layer = APSLinear((3, 5), 4, dtype=F64)
    with pytest.raises(ValueError, match=r"in_widths \(3, 5\)"):
        layer(rand(2, 4))
    with pytest.raises(ValueError, match=r"in_widths \(3, 5\)"):
        layer(rand(2, 5, 4))  # the width is the last dim
    with pytest.raises(ValueError, match="in_widths"):
        layer.to_static(7)
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 5, dtype=torch.int64))


def test_linear_dtype_mismatch_raises():
    layer = APSLinear((3, 5), 4, dtype=F64)
    with pytest.raises(TypeError, match="dtype"):
        layer(rand(2, 5, dtype=torch.float32))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"out_features": 0}, ValueError, "out_features"),
    ({"sharing": "shared"}, ValueError, "sharing"),
    ({"in_widths": (5, 3)}, ValueError, "strictly ascending"),
    ({"in_widths": (0, 3)}, ValueError, "positive"),
    ({"meta_in_width": 4}, ValueError, "meta_in_width"),
])
def test_linear_constructor_errors(kwargs, error, match):
    args = {"in_widths": (3, 5), "out_features": 4, **kwargs}
    with pytest.raises(error, match=match):
        APSLinear(**args)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_linear_to_static(backend, bias):
    torch.manual_seed(0)
    layer = randomise(APSLinear((3, 5, 7), 4, bias=bias, dtype=F64)).eval()
    for c in layer.in_widths:
        static = layer.to_static(c)
        assert type(static) is nn.Linear and (static.in_features, static.out_features) == (c, 4)
        assert (static.bias is not None) == bias
        x = rand(3, 2, c, seed=c)
        with torch.no_grad():
            assert_close(static(x), layer(x))


# ---------------------------------------------------------------------------------------------
# Errors of APSConv2d
# ---------------------------------------------------------------------------------------------

def test_conv_input_width_not_a_candidate():
    layer = APSConv2d((3, 5, 7), (2, 4), 3, dtype=F64)
    for width in (1, 4, 8):
        with pytest.raises(ValueError, match=r"in_widths \(3, 5, 7\)") as info:
            layer(rand(1, width, 5, 5))
        assert str(width) in str(info.value)
    with pytest.raises(ValueError, match="in_widths"):
        layer.candidate_kernel(6)
    fixed = APSConv2d(3, (2, 4), 3, dtype=F64)
    with pytest.raises(ValueError, match=r"in_widths \(3,\)"):
        fixed(rand(1, 4, 5, 5))


def test_conv_active_out_not_a_candidate():
    layer = APSConv2d((3, 5), (2, 4, 6), 3, dtype=F64)
    assert layer.active_out == 6
    for width in (0, 3, 8, "4"):
        with pytest.raises(ValueError, match=r"active_out must be one of out_widths \(2, 4, 6\)"):
            layer.active_out = width
    assert layer.active_out == 6
    layer.active_out = 2
    assert layer.active_out == 2


def test_conv_bad_inputs():
    layer = APSConv2d((3, 5), (2, 4), 3, dtype=F64)
    with pytest.raises(ValueError, match=r"x must have 4 dims.*got shape \(3, 5, 5\)"):
        layer(rand(3, 5, 5))
    with pytest.raises(ValueError, match="x must have 4 dims"):
        layer(rand(1, 1, 3, 5, 5))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        layer(torch.ones(1, 3, 5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="torch.float32.*torch.float64"):
        layer(rand(1, 3, 5, 5, dtype=torch.float32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([[1.0]])


@pytest.mark.parametrize("args, kwargs, error, match", [
    (((3, 5), (2, 4), 3), {"sharing": "shared"}, ValueError, "sharing.*'shared'"),
    (((3, 5), (2, 4), 3), {"sharing": "Ordinal"}, ValueError, "sharing"),
    (((5, 3), (2, 4), 3), {}, ValueError, "in_widths must be strictly ascending"),
    (((3, 5), (4, 2), 3), {}, ValueError, "out_widths must be strictly ascending"),
    (((3, 3), (2, 4), 3), {}, ValueError, "in_widths must be strictly ascending"),
    (((0, 5), (2, 4), 3), {}, ValueError, "in_widths must hold positive ints"),
    (((3, 5), 0, 3), {}, ValueError, "out_widths must hold positive ints"),
    (((3, 5), (-2, 4), 3), {}, ValueError, "out_widths must hold positive ints"),
    (((3, 5.0), (2, 4), 3), {}, ValueError, "in_widths"),
    (((), (2, 4), 3), {}, TypeError, "in_widths"),
    (("35", (2, 4), 3), {}, TypeError, "in_widths"),
])
def test_conv_constructor_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        APSConv2d(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# state_dict and torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("depthwise", [False, True], ids=["dense", "depthwise"])
def test_state_dict_round_trip(backend, depthwise):
    kwargs = {"groups": "depthwise"} if depthwise else {}
    widths = (3, 5, 7)
    source = conv_layer(widths, widths, 3, padding=1, bias=True, seed=1, **kwargs)
    for _ in range(3):
        source.transition_step(1e-3)
    state = source.state_dict()
    assert {"weight", "bias", "out_transforms.matrix"} <= set(state)
    assert ("in_transforms.matrix" in state) != depthwise
    fresh = conv_layer(widths, widths, 3, padding=1, bias=True, seed=2, **kwargs)
    fresh.load_state_dict(state)
    for c in widths:
        source.active_out = fresh.active_out = 5
        x = rand(2, c, 5, 5, seed=c)
        assert torch.equal(fresh(x), source(x))
    assert_close(fresh.sharing_level(), source.sharing_level())


def test_state_dict_round_trip_batchnorm_and_linear(backend):
    bn = APSBatchNorm2d((4, 8), dtype=F64)
    bn(rand(4, 8, 3, 3) + 2)
    fresh_bn = APSBatchNorm2d((4, 8), dtype=F64)
    fresh_bn.load_state_dict(bn.state_dict())
    bn.eval(), fresh_bn.eval()
    x = rand(2, 8, 3, 3, seed=1)
    assert torch.equal(fresh_bn(x), bn(x))

    torch.manual_seed(0)
    linear = APSLinear((3, 5), 4, dtype=F64)
    torch.manual_seed(1)
    fresh = APSLinear((3, 5), 4, dtype=F64)
    fresh.load_state_dict(linear.state_dict())
    x = rand(2, 5)
    assert torch.equal(fresh(x), linear(x))


def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    layer = conv_layer((3, 5), (2, 4), 3, padding=1, bias=True)
    layer.active_out = 2
    layer.out_transforms.matrix.requires_grad_(True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = rand(2, 5, 4, 4).requires_grad_()
    out = compiled(x)
    expected = layer(x)
    assert_close(out, expected)
    grad_out = rand(*out.shape, seed=1)
    compiled_grads = torch.autograd.grad(out, (x, layer.weight, layer.out_transforms.matrix), grad_out)
    eager_grads = torch.autograd.grad(expected, (x, layer.weight, layer.out_transforms.matrix), grad_out)
    for a, b in zip(compiled_grads, eager_grads):
        assert_close(a, b)
    torch._dynamo.reset()


def test_conv_to_static_explicit_out_width(backend):
    layer = conv_layer((3, 5), (2, 4, 6), 3, padding=1, bias=True).eval()
    x = rand(2, 5, 6, 6)
    for c_out in layer.out_widths:
        static = layer.to_static(5, c_out)
        assert static.out_channels == c_out and layer.active_out == 6  # not changed
        layer.active_out = c_out
        with torch.no_grad():
            assert_close(static(x), layer(x))
        layer.active_out = 6
    with pytest.raises(ValueError, match="out_width must be one of out_widths"):
        layer.to_static(5, 3)


def test_select_out_by_index():
    layer = conv_layer((3, 5), (2, 4, 6), 3)
    layer.select_out(1)
    assert layer.active_out == 4 and layer.active_out_index == 1
    with pytest.raises(ValueError, match=r"index must be in 0..2"):
        layer.select_out(3)
