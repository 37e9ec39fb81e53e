"""Network-wide helpers: Φ, the batched transition of a model, and prebuilt grouped kernels."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import apsfast
from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear
from conftest import assert_close

F64 = torch.float64


def model(sharing="transitional"):
    torch.manual_seed(0)
    return nn.Sequential(
        APSConv2d(3, (4, 8), 3, padding=1, sharing=sharing, dtype=F64), APSBatchNorm2d((4, 8), dtype=F64),
        APSConv2d((4, 8), (4, 8), 3, padding=1, groups="depthwise", sharing=sharing, dtype=F64),
        APSConv2d((4, 8), (6, 10), 1, sharing=sharing, dtype=F64), nn.Flatten(2), nn.AdaptiveAvgPool1d(1),
        nn.Flatten(1), APSLinear((6, 10), 5, sharing=sharing, dtype=F64))


def set_arch(net, widths):
    net[0].active_out, net[3].active_out = widths


def test_network_transition_step_matches_per_layer(backend):
    net, twin = model(), model()
    torch.manual_seed(5)
    phi = apsfast.nn.network_transition_step(net, 1e-3)
    torch.manual_seed(5)
    # begin_transition perturbs in layer order, then each layer steps: the same draws.
    for layer in apsfast.nn.aps_layers(twin):
        layer.begin_transition()
    expected = sum(layer.transition_step(1e-3) for layer in apsfast.nn.aps_layers(twin))
    assert_close(phi, expected)
    for a, b in zip(net.parameters(), twin.parameters()):
        assert_close(a, b)
    assert_close(apsfast.nn.network_sharing_level(net),
                 sum(layer.sharing_level() for layer in apsfast.nn.aps_layers(twin)))


def test_network_transition_lowers_phi():
    net = model()
    start = apsfast.nn.network_sharing_level(net)
    for _ in range(10):
        apsfast.nn.network_transition_step(net, 1e-3, relative=False)  # eq. 5's scale: small widths
    assert apsfast.nn.network_sharing_level(net) < start


@pytest.mark.parametrize("sharing", ["transitional", "independent"])
def test_prebuilt_kernels_give_the_same_forward_and_grads(backend, sharing):
    net = model(sharing)
    if sharing == "transitional":
        apsfast.nn.network_transition_step(net, 1e-3)  # dense transforms: kernels are built
    twin = copy.deepcopy(net)
    x = torch.randn(2, 3, 5, 5, dtype=F64)
    for net_ in (net, twin):
        set_arch(net_, (4, 10))
    apsfast.nn.prebuild_kernels([(net[0], 3), (net[2], 4), (net[3], 4), (net[7], 10)])
    prebuilt = [layer._prebuilt for layer in apsfast.nn.aps_layers(net)]
    assert all(p is not None for p in prebuilt) == (sharing == "transitional")
    out = net(x)
    assert all(layer._prebuilt is None for layer in apsfast.nn.aps_layers(net))  # used once
    expected = twin(x)
    assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    for a, b in zip(net.parameters(), twin.parameters()):
        if b.grad is not None:
            assert_close(a.grad, b.grad)


def test_prebuilt_kernel_for_another_arch_is_not_used():
    net = model()
    apsfast.nn.network_transition_step(net, 1e-3)
    set_arch(net, (8, 10))
    apsfast.nn.prebuild_kernels([(net[3], 8)])
    net[3].active_out = 6  # the arch changed after prebuilding
    x = torch.randn(1, 8, 3, 3, dtype=F64)
    assert_close(net[3](x), nn.functional.conv2d(x, apsfast.construct(net[3].weight, net[3].P[0], net[3].Q[1])))
    assert net[3]._prebuilt is None  # discarded, not kept for a later forward
    # A prebuilt weight is not used after the meta-weight changed.
    net[3].active_out = 10
    apsfast.nn.prebuild_kernels([(net[3], 8)])
    with torch.no_grad():
        net[3].weight.add_(1.0)
    assert_close(net[3](x), nn.functional.conv2d(x, apsfast.construct(net[3].weight, net[3].P[1], net[3].Q[1])))


def test_network_transition_step_moves_the_version_counters_and_notices_new_layers():
    # The batched step writes the sides without ATen's in-place ops: their version counters
    # still move, so autograd refuses a graph that saved a transform before the step.
    net = model()
    side = net[0].out_transforms
    apsfast.nn.network_transition_step(net, 1e-3)
    P = side.matrix.detach().requires_grad_()
    kernel = apsfast.construct(net[0].weight.detach(), P[:, :4], None)
    version = side.matrix._version
    apsfast.nn.network_transition_step(net, 1e-3)
    assert side.matrix._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        kernel.sum().backward()
    # A plain module is walked at every step: a layer added since is stepped too.
    net.append(APSConv2d(5, (2, 3), 1, dtype=F64))
    before = net[-1].out_transforms.matrix.detach().clone()
    apsfast.nn.network_transition_step(net, 1e-3)
    assert not torch.equal(net[-1].out_transforms.matrix, before)


def test_a_supernet_lists_its_aps_layers_once():
    net = apsfast.models.build("resnet20_cifar", widths=[2, 3], input_size=8, num_classes=4)
    layers = apsfast.nn.aps_layers(net)
    assert layers is net.aps_layers() is apsfast.nn.aps_layers(net)
    assert layers == [m for m in net.modules() if isinstance(m, apsfast.nn.APSLayer)]


def test_a_supernet_plans_its_kernels_only_when_some_are_built(monkeypatch):
    # At the exact ordinal start (warm-up) every kernel is a free slice: the forward skips the
    # plan (a walk of the arch's layer shapes) and computes what the per-layer path computes.
    net = apsfast.models.build("resnet20_cifar", widths=[2, 3], input_size=8, num_classes=4)
    x = torch.randn(2, 3, 8, 8)
    planned = []
    original = type(net).kernel_plan
    monkeypatch.setattr(type(net), "kernel_plan", lambda self, *a: planned.append(1) or original(self, *a))
    out = net(x)
    net.grouped_kernels = False
    assert planned == [] and torch.equal(out, net(x))
    net.grouped_kernels = True
    apsfast.nn.network_transition_step(net, 1e-3)  # dense transforms: kernels are built
    out = net(x)
    net.grouped_kernels = False
    assert planned == [1]
    assert_close(out, net(x))


def test_errors():
    with pytest.raises(ValueError, match="Sequential has no APS layer"):
        apsfast.nn.network_sharing_level(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match="no APS layer with candidate transforms"):
        apsfast.nn.network_transition_step(nn.Sequential(APSConv2d(3, 4, 3)), 1e-3)


def test_a_search_step_in_transition_reads_nothing_back_to_the_host(monkeypatch):
    # Once the transition has started, the forward, backward and transition of every step run
    # without a host read (on a GPU each would be a sync): the sides know they are dense.
    net = apsfast.models.build("resnet20_cifar", widths=[4, 8], input_size=8, num_classes=10)
    archs = [net.sample_uniform(torch.Generator().manual_seed(k)) for k in range(3)]
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    side = apsfast.nn.aps_layers(net)[1].out_transforms
    ordinal = side.matrix.detach().clone()
    apsfast.nn.network_transition_step(net, 1e-3)  # the start: perturbed, then stepped
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    for arch in archs:
        net.set_arch(arch)
        nn.functional.cross_entropy(net(x), y).backward()
        apsfast.nn.network_transition_step(net, 1e-3)
    monkeypatch.undo()
    assert reads == []
    assert side.selection_start(0) is None
    with torch.no_grad():  # any other change of the matrix is checked again, as before
        side.matrix.copy_(ordinal)
    assert side.selection_start(0) == 0 and side.is_selection()


@pytest.mark.parametrize("name, widths", [("resnet20_cifar", [2, 3, 5]), ("mobilenetv2_imagenet", [2, 3])])
def test_a_supernet_builds_its_kernels_grouped_with_the_same_values_and_grads(backend, name, widths):
    # The whole network, in its transitional state, in float64: the grouped build of every
    # kernel of the arch (the forward's default) against each layer building its own.
    torch.manual_seed(0)
    net = apsfast.models.build(name, widths=widths, input_size=16, num_classes=4).double()
    apsfast.nn.network_transition_step(net, 1e-2)
    twin = copy.deepcopy(net)
    twin.grouped_kernels = False
    x, y = torch.randn(3, 3, 16, 16, dtype=F64), torch.tensor([0, 3, 1])
    for seed in range(2):
        arch = net.sample_uniform(torch.Generator().manual_seed(seed))
        losses = []
        for supernet in (net, twin):
            supernet.zero_grad(set_to_none=True)
            supernet.set_arch(arch)
            torch.manual_seed(seed)  # the same dropout mask
            losses.append(nn.functional.cross_entropy(supernet(x), y))
            losses[-1].backward()
        assert_close(losses[0], losses[1])
        for (path, a), b in zip(net.named_parameters(), twin.parameters()):
            assert (a.grad is None) == (b.grad is None), path
            if a.grad is not None:
                assert_close(a.grad, b.grad)


def autograd_nodes(root: torch.Tensor, name: str) -> int:
    """How many nodes called ``name`` the graph of ``root`` holds."""
    seen, stack, count = set(), [root.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == name
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def test_under_autocast_a_channels_last_supernet_gets_its_kernels_in_the_autocast_dtype_and_format():
    # bfloat16 autocast on the CPU, channels_last as a GPU run has it: the grouped build emits
    # every kernel in bfloat16 and channels_last (no cast node per layer, no layout copy),
    # with the losses and gradients of layers that build their own kernels and let each
    # convolution cast it.
    torch.manual_seed(0)
    net = apsfast.models.build("resnet20_cifar", widths=[2, 3, 5], input_size=16, num_classes=4)
    apsfast.nn.network_transition_step(net, 1e-2)
    net.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(net)
    twin.grouped_kernels = False
    x = torch.randn(3, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0, 3, 1])
    arch = net.sample_uniform(torch.Generator().manual_seed(1))
    net.set_arch(arch)
    built = [layer for layer, width in net.kernel_plan() if layer.prebuild_operands(width) is not None]
    assert len(built) >= 10
    kernels, losses, casts = [], [], []
    for supernet in (net, twin):
        supernet.set_arch(arch)
        seen = []
        hooks = [layer.register_forward_pre_hook(lambda m, args: seen.append(m._prebuilt)) for layer in built]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            losses.append(nn.functional.cross_entropy(supernet(x), y))
        for hook in hooks:
            hook.remove()
        kernels.append(seen)
        casts.append(autograd_nodes(losses[-1], "ToCopyBackward0"))
        losses[-1].backward()
    for prebuilt in kernels[0]:
        kernel = prebuilt[1]
        assert kernel.dtype == torch.bfloat16
        assert kernel.dim() == 2 or kernel.shape[-2:] == (1, 1) or kernel.is_contiguous(memory_format=torch.channels_last)
    assert all(prebuilt is None for prebuilt in kernels[1])
    assert casts[1] - casts[0] == len(built)  # one cast per layer less
    assert_close(losses[0], losses[1], torch.bfloat16)
    for (path, a), b in zip(net.named_parameters(), twin.parameters()):
        assert (a.grad is None) == (b.grad is None), path
        if a.grad is not None:
            if a.dim() == 4:  # the gradient in its parameter's layout: no copy by the optimizer
                assert a.grad.is_contiguous(memory_format=torch.channels_last), path
            assert_close(a.grad, b.grad, torch.bfloat16)
