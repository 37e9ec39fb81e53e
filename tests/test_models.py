"""Search spaces: the encoding, the cost model against published counts and hooks, export."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import apsfast
from apsfast import models
from apsfast.models import BasicBlock, InvertedResidual
from apsfast.nn import (APSBatchNorm2d, APSConv2d, APSLayer, network_sharing_floor, network_sharing_level,
                        network_transition_step)
from conftest import assert_close

F64 = torch.float64

# (name, options, decisions): every space, each residual mode. ImageNet models are tested at
# a small resolution (they are fully convolutional) and with ordinal sharing, whose meta
# widths are the widest candidates: the defaults' Σ-wide meta-weights are big for CI.
SPACES = {
    "r20-block": ("resnet20_cifar", {}, 19),
    "r20-stage": ("resnet20_cifar", {"residual": "stage"}, 13),
    "r20-compact": ("resnet20_cifar", {"widths": "compact"}, 19),
    "r56-block": ("resnet56_cifar", {}, 55),
    "r56-stage": ("resnet56_cifar", {"residual": "stage"}, 31),
    "r18-stage": ("resnet18_imagenet", {"sharing": "ordinal", "input_size": 64}, 13),
    "r18-block": ("resnet18_imagenet", {"sharing": "ordinal", "input_size": 64, "residual": "block"}, 17),
    "mbv2": ("mobilenetv2_imagenet", {"sharing": "ordinal", "input_size": 64}, 24),
}

# Published MACs of the standard networks (the paper's Tables 1-2 and the original papers)
# and their parameter counts (He et al. 2016 Table 6; torchvision's ResNet-18 and
# MobileNet-v2, whose layers these match exactly).
PUBLISHED = {
    "resnet20_cifar": (40.8e6, 0.27e6),
    "resnet56_cifar": (126.0e6, 0.85e6),
    "resnet18_imagenet": (1.82e9, 11_689_512),
    "mobilenetv2_imagenet": ((300e6, 314e6), 3_504_872),
}


def build(key: str, **extra) -> models.Supernet:
    name, options, _ = SPACES[key]
    return models.build(name, **{**options, **extra})


@pytest.fixture(scope="module")
def meta_nets() -> dict[str, models.Supernet]:
    """Every default space on the meta device: encodings and analytic costs, no memory."""
    return {name: models.build(name, device="meta") for name in models.available()}


def random_archs(net: models.Supernet, count: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [net.sample_uniform(generator) for _ in range(count)]


# ---------------------------------------------------------------------------------------------
# registry and encoding
# ---------------------------------------------------------------------------------------------

def test_available():
    assert models.available() == ["mobilenetv2_imagenet", "resnet18_imagenet", "resnet20_cifar", "resnet56_cifar"]
    assert apsfast.models is models


@pytest.mark.parametrize("key", SPACES)
def test_decision_counts(key):
    net = build(key, device="meta")
    decisions = net.decisions()
    assert len(decisions) == SPACES[key][2]
    assert len({d.name for d in decisions}) == len(decisions)
    assert all(isinstance(d, models.Decision) and list(d.widths) == sorted(set(d.widths)) for d in decisions)


def test_cifar_candidates(meta_nets):
    assert {d.widths for d in meta_nets["resnet20_cifar"].decisions()} == {(16, 32, 64, 96)}
    compact = models.build("resnet20_cifar", widths="compact", device="meta")
    assert {d.widths for d in compact.decisions()} == {(4, 8, 16, 32, 64)}
    assert compact.options["widths"] == "compact"


def test_imagenet_candidates_scale_with_stage(meta_nets):
    r18 = meta_nets["resnet18_imagenet"].widths(meta_nets["resnet18_imagenet"].max_arch())
    assert [r18[k] for k in ("stem", "layer1", "layer2", "layer3", "layer4")] == [80, 80, 160, 320, 640]
    mbv2 = {d.name: d.widths for d in meta_nets["mobilenetv2_imagenet"].decisions()}
    assert mbv2["stem"] == (16, 24, 32, 40)
    assert mbv2["stage1"] == (8, 12, 16, 20)
    assert mbv2["stage2.0.expand"] == (48, 72, 96, 120)  # 6 × 16
    assert mbv2["stage7"] == (160, 240, 320, 400)


def test_decisions_follow_the_forward_order(meta_nets):
    names = [d.name for d in meta_nets["resnet20_cifar"].decisions()]
    assert names[:4] == ["stem", "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"]
    stage = models.build("resnet18_imagenet", device="meta").decisions()
    assert [d.name for d in stage][:4] == ["stem", "layer1.0.conv1", "layer1", "layer1.1.conv1"]
    names = [d.name for d in meta_nets["mobilenetv2_imagenet"].decisions()]
    assert names[:4] == ["stem", "stage1", "stage2.0.expand", "stage2"]


@pytest.mark.parametrize("name", ["resnet20_cifar", "resnet56_cifar", "resnet18_imagenet", "mobilenetv2_imagenet"])
def test_standard_arch_is_the_standard_network(meta_nets, name):
    net = meta_nets[name]
    widths = net.widths(net.standard_arch())
    if name.endswith("cifar"):
        expected = {"stem": 16} | {k: 16 * 2 ** (int(k[5]) - 1) for k in widths if k != "stem"}
    elif name == "resnet18_imagenet":
        expected = {"stem": 64} | {k: 64 * 2 ** (int(k[5]) - 1) for k in widths if k != "stem"}
    else:
        expected = {"stem": 32, "stage1": 16, "stage2": 24, "stage3": 32, "stage4": 64, "stage5": 96,
                    "stage6": 160, "stage7": 320}
        inputs = [16, 24, 24, 32, 32, 32, 64, 64, 64, 64, 96, 96, 96, 160, 160, 160]
        expected |= {k: 6 * c for k, c in zip([k for k in widths if k.endswith("expand")], inputs)}
    assert widths == expected


def test_standard_arch_takes_the_nearest_candidate():
    net = models.build("resnet20_cifar", widths=(8, 24, 48, 128), device="meta")
    assert net.standard_widths()["layer3.0.conv1"] == 64
    widths = net.widths(net.standard_arch())
    assert (widths["stem"], widths["layer2.0.conv1"], widths["layer3.0.conv1"]) == (8, 24, 48)  # 16: tie → narrower


def test_arch_sampling(meta_nets):
    net = meta_nets["resnet20_cifar"]
    before = net.arch
    archs = random_archs(net, 200, seed=3)
    assert archs == random_archs(net, 200, seed=3)
    assert net.arch == before  # sampling does not set
    seen = {a for arch in archs for a in arch}
    assert seen == {0, 1, 2, 3}
    assert net.min_arch() == [0] * 19 and net.max_arch() == [3] * 19
    assert net.arch == net.max_arch()  # the initial architecture


@pytest.mark.parametrize("name", ["resnet20_cifar", "mobilenetv2_imagenet"])
def test_set_arch_sets_every_layer(name):
    net = models.build(name, device="meta")
    for arch in random_archs(net, 3, seed=1):
        net.set_arch(arch)
        assert net.arch == arch
        for decision, index, paths in zip(net.decisions(), arch, net._layer_paths):
            assert all(net.get_submodule(p).active_out == decision.widths[index] for p in paths)


def test_set_arch_errors(meta_nets):
    net = meta_nets["resnet20_cifar"]
    with pytest.raises(ValueError, match="19 entries"):
        net.set_arch([0] * 18)
    with pytest.raises(ValueError, match=r"arch\[2\] \(decision 'layer1.0.conv2'.*0..3, got 4"):
        net.set_arch([0, 0, 4] + [0] * 16)
    with pytest.raises(ValueError, match=r"arch\[0\].*got -1"):
        net.set_arch([-1] + [0] * 18)
    with pytest.raises(ValueError, match=r"arch\[1\].*got 1.0"):
        net.set_arch([0, 1.0] + [0] * 17)
    with pytest.raises(TypeError, match="sequence of 19 candidate indices"):
        net.set_arch("0" * 19)
    net.set_arch(torch.zeros(19, dtype=torch.long))  # tensors are accepted
    assert net.arch == net.min_arch()


def test_arch_json_round_trip(meta_nets):
    for net in meta_nets.values():
        for arch in random_archs(net, 3, seed=2) + [net.min_arch(), net.max_arch()]:
            text = net.arch_to_json(arch)
            record = json.loads(text)
            assert record["model"] == net.name and record["arch"] == arch
            assert record["flops"] == net.flops(arch) and record["params"] == net.params(arch)
            assert net.arch_from_json(text) == arch
            assert net.arch_from_json(json.dumps(arch)) == arch  # a bare list


def test_arch_json_errors(meta_nets):
    net = meta_nets["resnet20_cifar"]
    record = json.loads(net.arch_to_json(net.max_arch()))
    with pytest.raises(ValueError, match="for model 'resnet56_cifar'"):
        net.arch_from_json({**record, "model": "resnet56_cifar"})
    with pytest.raises(ValueError, match=r"widths\['stem'\] = 17 is not a candidate"):
        net.arch_from_json({**record, "widths": {**record["widths"], "stem": 17}})
    with pytest.raises(ValueError, match="must name exactly the decisions"):
        net.arch_from_json({**record, "widths": {"stem": 16}})
    with pytest.raises(ValueError, match="disagrees with 'widths'"):
        net.arch_from_json({**record, "arch": net.min_arch()})
    with pytest.raises(ValueError, match="needs 'arch' or 'widths'"):
        net.arch_from_json({"model": "resnet20_cifar"})
    # The widths, not the indices, are what an arch means: another candidate order still loads.
    wider = models.build("resnet20_cifar", widths=(8, 16, 32, 64, 96), device="meta")
    assert wider.arch_from_json({"widths": record["widths"]}) == [4] * 19


def test_build_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet21'.*resnet20_cifar"):
        models.build("resnet21")
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['depth'\].*'residual'"):
        models.build("resnet20_cifar", depth=20)
    with pytest.raises(ValueError, match="residual must be one of 'block', 'stage'"):
        models.build("resnet20_cifar", residual="none", device="meta")
    with pytest.raises(ValueError, match="widths must be one of"):
        models.build("resnet20_cifar", widths="tiny", device="meta")
    with pytest.raises(ValueError, match="strictly ascending"):
        models.build("resnet18_imagenet", widths=(64, 32), device="meta")
    with pytest.raises(ValueError, match=r"layer_widths names unknown decisions \['layer9'\]"):
        models.build("resnet20_cifar", layer_widths={"layer9": (8, 16)}, device="meta")
    with pytest.raises(ValueError, match="sharing must be one of"):
        models.build("mobilenetv2_imagenet", sharing="shared", device="meta")


def test_layer_widths_override():
    net = models.build("resnet20_cifar", residual="stage", layer_widths={"layer3": (32, 64, 128)}, device="meta")
    decisions = {d.name: d.widths for d in net.decisions()}
    assert decisions["layer3"] == (32, 64, 128) and decisions["layer2"] == (16, 32, 64, 96)
    assert net.options["layer_widths"] == {"layer3": [32, 64, 128]}
    assert net.get_submodule("head.2").in_widths == (32, 64, 128)
    json.dumps(net.options)


def test_pinning_a_decision_to_one_width():
    # The authors' CIFAR space forces the last block's output to the widest candidate.
    torch.manual_seed(0)
    net = models.build("resnet20_cifar", layer_widths={"layer3.2.conv2": [96]})
    assert net.decisions()[-1] == ("layer3.2.conv2", (96,))
    assert net.get_submodule("layer3.2.conv2").P is None  # a fixed side: no transform
    arch = net.sample_uniform(torch.Generator().manual_seed(0))
    assert arch[-1] == 0
    net.set_arch(arch)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert net.layer_shapes(arch)[-1].in_channels == 96


# ---------------------------------------------------------------------------------------------
# cost
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(PUBLISHED))
def test_standard_network_matches_published_counts(meta_nets, name):
    net = meta_nets[name]
    (flops, params), arch = PUBLISHED[name], net.standard_arch()
    low, high = (flops, flops) if isinstance(flops, float) else flops
    assert 0.97 * low <= net.flops(arch) <= 1.03 * high
    assert abs(net.params(arch) - params) <= 0.03 * params
    if isinstance(params, int):  # torchvision's network: the very same layers
        assert net.params(arch) == params


def test_cost_grows_with_width(meta_nets):
    for net in meta_nets.values():
        low, std, high = (net.flops(a) for a in (net.min_arch(), net.standard_arch(), net.max_arch()))
        assert low < std < high
        assert net.params(net.min_arch()) < net.params(net.max_arch())


def test_flops_counts_shortcuts_and_classifier(meta_nets):
    net = meta_nets["resnet20_cifar"]
    shapes = {s.name: s for s in net.layer_shapes(net.standard_arch())}
    # The standard ResNet-20 projects only where a stage starts; its classifier is 64 → 10.
    assert sorted(k for k in shapes if "downsample.0" in k) == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert shapes["layer2.0.downsample.0"].macs == 16 * 16 * 32 * 16
    assert shapes["head.2"].macs == 64 * 10 and shapes["head.2"].params == 650
    assert net.flops(net.standard_arch()) == sum(s.macs for s in shapes.values())
    # Unequal widths inside a stage bring the projection in.
    arch = net.standard_arch()
    arch[2] = 1  # layer1.0.conv2 → 32 while the stem stays 16
    assert "layer1.0.downsample.0" in {s.name for s in net.layer_shapes(arch)}


def test_cost_cache_is_bounded_and_follows_the_resolution(monkeypatch):
    monkeypatch.setattr(models.base, "COST_CACHE_SIZE", 3)
    net = models.build("resnet20_cifar", device="meta")
    archs = random_archs(net, 5, seed=8)
    for arch in archs:
        assert net.flops(arch) == sum(s.macs for s in net.layer_shapes(arch))
    assert len(net._costs) == 3
    small = net.flops(archs[0])
    classifier = net.layer_shapes(archs[0])[-1].macs
    net.input_size = 64
    assert net.flops(archs[0]) == 4 * (small - classifier) + classifier  # convs see 4× the pixels


def test_flops_defaults_to_the_current_arch():
    net = models.build("resnet20_cifar", device="meta")
    arch = net.standard_arch()
    net.set_arch(arch)
    assert net.flops() == net.flops(arch) and net.params() == net.params(arch)
    assert net.layer_shapes() == net.layer_shapes(arch)


@pytest.mark.parametrize("key", SPACES)
def test_analytic_cost_matches_hooks_on_the_export(key):
    net = build(key)
    for arch in [net.min_arch(), net.max_arch()] + random_archs(net, 2, seed=7):
        static = net.export(arch)
        counted = models.count_macs(static, net.input_size)
        analytic = {s.name: s.macs for s in net.layer_shapes(arch) if s.kind != "bn"}
        assert counted == analytic
        assert net.params(arch) == sum(p.numel() for p in static.parameters())


def test_count_macs_of_a_module_without_parameters():
    assert models.count_macs(nn.Sequential(nn.ReLU()), 8) == {}


def test_count_macs_errors():
    with pytest.raises(ValueError, match="input_size"):
        models.count_macs(nn.Conv2d(3, 4, 3), (8, 8, 8))
    with pytest.raises(ValueError, match="input_size must be a positive int"):
        models.count_macs(nn.Conv2d(3, 4, 3), 0)


# ---------------------------------------------------------------------------------------------
# forward, backward, export
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", SPACES)
def test_forward_backward_random_archs(key):
    torch.manual_seed(0)
    net = build(key).train()
    x = torch.randn(2, 3, net.input_size, net.input_size)
    for arch in random_archs(net, 2, seed=5):
        net.set_arch(arch)
        net.zero_grad()
        out = net(x)
        assert out.shape == (2, net.options["num_classes"]) and torch.isfinite(out).all()
        out.square().mean().backward()
        used = {s.name for s in net.layer_shapes(arch) if s.kind == "conv"}
        for path, layer in net.named_modules():
            if isinstance(layer, APSConv2d):
                # Exactly the layers of this arch get gradients (an unused projection none).
                assert (layer.weight.grad is not None) == (path in used), path
                assert layer.weight.grad is None or torch.isfinite(layer.weight.grad).all()


def test_batch_norm_statistics_are_per_width():
    net = build("r20-block").train()
    arch = net.min_arch()
    net.set_arch(arch)
    net(torch.randn(4, 3, 32, 32))
    bn = net.get_submodule("stem.1")
    assert bn.bns[0].num_batches_tracked == 1 and bn.bns[-1].num_batches_tracked == 0


def _exported_equals_supernet(net: models.Supernet, arch: list[int], x: torch.Tensor) -> nn.Module:
    net.set_arch(arch)
    net.eval()
    static = net.export(arch)
    assert not static.training
    for module in static.modules():
        assert not isinstance(module, (APSConv2d, APSBatchNorm2d)), type(module)
    with torch.no_grad():
        assert_close(static(x), net(x))
    return static


def _train_statistics(net: models.Supernet, archs, x) -> None:
    """Give every BN of these archs non-trivial running statistics."""
    net.train()
    with torch.no_grad():
        for arch in archs:
            net.set_arch(arch)
            net(x)


@pytest.mark.parametrize("key", SPACES)
def test_export_equals_supernet(key):
    torch.manual_seed(1)
    net = build(key, dtype=F64)
    x = torch.randn(2, 3, net.input_size, net.input_size, dtype=F64)
    archs = [net.standard_arch(), net.min_arch()] + random_archs(net, 2, seed=11)
    _train_statistics(net, archs, x)
    for arch in archs:
        _exported_equals_supernet(net, arch, x)


def test_export_after_the_transition_equals_supernet():
    # Dense transforms: the exported kernels are constructed, not sliced.
    torch.manual_seed(2)
    net = models.build("resnet20_cifar", widths=(4, 8, 12), dtype=F64)
    network_transition_step(net, 1e-3)
    assert not net.get_submodule("layer1.0.conv1").in_transforms.is_selection()
    x = torch.randn(2, 3, 32, 32, dtype=F64)
    archs = random_archs(net, 3, seed=4)
    _train_statistics(net, archs, x)
    for arch in archs:
        _exported_equals_supernet(net, arch, x)


def test_export_standard_shortcuts():
    net = models.build("resnet20_cifar", device="meta")
    static = net.export(net.standard_arch())
    blocks = [m for m in static.modules() if isinstance(m, BasicBlock)]
    assert [b.downsample is not None for b in blocks] == [False] * 3 + [True, False, False] * 2
    assert static.get_submodule("layer2.0.downsample.0").weight.shape == (32, 16, 1, 1)
    mbv2 = models.build("mobilenetv2_imagenet", device="meta")
    residuals = [b.residual for b in mbv2.export(mbv2.min_arch()).modules() if isinstance(b, InvertedResidual)]
    assert residuals == [False, False, True, False, True, True, False, True, True, True,
                         False, True, True, False, True, True, False]


def test_export_without_weights_is_freshly_initialised():
    torch.manual_seed(3)
    net = models.build("resnet20_cifar")
    _train_statistics(net, [net.max_arch()], torch.randn(4, 3, 32, 32))
    arch = net.max_arch()
    inherited, fresh = net.export(arch), net.export(arch, inherit_weights=False)
    assert [p.shape for p in inherited.parameters()] == [p.shape for p in fresh.parameters()]
    conv = fresh.get_submodule("layer1.0.conv1")
    assert not torch.equal(conv.weight, inherited.get_submodule("layer1.0.conv1").weight)
    assert conv.weight.std().item() == pytest.approx((2 / (96 * 9)) ** 0.5, rel=0.1)  # He, fan-out
    bn = fresh.get_submodule("layer1.0.bn1")
    assert torch.equal(bn.running_mean, torch.zeros(96)) and torch.equal(bn.weight, torch.ones(96))
    # Training the export leaves the supernet alone.
    before = net.get_submodule("layer1.0.conv1").weight.clone()
    inherited.get_submodule("layer1.0.conv1").weight.data.add_(1)
    assert torch.equal(net.get_submodule("layer1.0.conv1").weight, before)


def test_export_keeps_the_mode_and_placement():
    net = models.build("resnet20_cifar", dtype=F64).train()
    static = net.export()
    assert static.training and next(static.parameters()).dtype == F64
    assert static.get_submodule("layer3.2.conv2").out_channels == 96  # the current arch: the widest


def test_supernet_holds_shared_parameters_only():
    # One meta-weight per APS layer (plus its transforms), one BN per candidate width: no
    # per-candidate copies of any kernel.
    net = models.build("resnet20_cifar", residual="stage", device="meta")
    convs = [m for m in net.modules() if isinstance(m, APSConv2d)]
    weights = [name for name, _ in net.named_parameters() if name.endswith(".weight") and "bns" not in name]
    assert len(weights) == len(convs) + 1  # + the classifier
    assert net.get_submodule("layer1.1.conv1").weight.shape == (208, 208, 3, 3)  # Σ widths, APS-T
    ordinal = models.build("resnet20_cifar", sharing="ordinal", device="meta")
    assert ordinal.get_submodule("layer1.1.conv1").weight.shape == (96, 96, 3, 3)


def test_repr_names_the_space():
    assert "name='resnet20_cifar', decisions=19, input_size=32" in repr(models.build("resnet20_cifar", device="meta"))


# ---------------------------------------------------------------------------------------------
# meta width
# ---------------------------------------------------------------------------------------------

def _sides(net: nn.Module):
    """``(path, side name, candidate widths, meta width, transforms)`` of every searched side."""
    for path, layer in net.named_modules():
        if isinstance(layer, APSLayer):
            for side, widths, meta in (("out", layer.out_widths, layer.meta_out_width),
                                       ("in", layer.in_widths, layer.meta_in_width)):
                transforms = layer.out_transforms if side == "out" else layer.in_transforms
                if transforms is not None:
                    yield path, side, widths, meta, transforms


def _expected_meta(widths, meta_width, sharing):
    if sharing == "ordinal" or meta_width == "widest":
        return max(widths)
    if meta_width == "sum":
        return sum(widths)
    return min(sum(widths), round(meta_width * max(widths)))


@pytest.mark.parametrize("name,options", [("resnet20_cifar", {}), ("resnet18_imagenet", {"residual": "block"}),
                                          ("mobilenetv2_imagenet", {})], ids=["r20", "r18", "mbv2"])
@pytest.mark.parametrize("meta_width", ["sum", "widest", 1.6, 2])
@pytest.mark.parametrize("sharing", ["transitional", "ordinal"])
def test_meta_width_sets_every_searched_side(name, options, meta_width, sharing):
    net = models.build(name, sharing=sharing, meta_width=meta_width, device="meta", **options)
    assert net.options["meta_width"] == meta_width
    sides = list(_sides(net))
    assert sides
    for path, side, widths, meta, transforms in sides:
        assert meta == _expected_meta(widths, meta_width, sharing), (path, side)
        assert transforms.matrix.shape == (meta, sum(widths)), (path, side)
        assert net.get_submodule(path).weight.shape[0 if side == "out" else 1] == meta, (path, side)
    # The recorded options build the same supernet again.
    again = models.build(net.name, device="meta", **net.options)
    assert [p.shape for p in again.parameters()] == [p.shape for p in net.parameters()]


def test_meta_width_examples():
    net = models.build("resnet18_imagenet", meta_width=1.6, device="meta")
    conv = net.get_submodule("layer4.0.conv1")  # reads 128…320 (widest × 1.6: 512), writes 256…640
    assert conv.weight.shape == (1024, 512, 3, 3) and conv.P[0].shape == (1024, 256) and conv.Q[3].shape == (512, 320)
    net = models.build("mobilenetv2_imagenet", meta_width="widest", device="meta")
    depthwise = net.get_submodule("stage7.0.layers.3")  # one side: the hidden widths
    assert depthwise.weight.shape == (1200, 1, 3, 3) and depthwise.Q is None
    assert net.get_submodule("head.0").weight.shape == (1280, 400, 1, 1)  # input: stage 7, widest 400
    net = models.build("resnet20_cifar", meta_width=100, device="meta")  # capped at the sum
    assert net.get_submodule("layer1.0.conv1").weight.shape == (208, 208, 3, 3)


def test_meta_width_errors():
    for bad in ("wide", 0.5, 0, True, float("nan"), None):
        with pytest.raises(ValueError, match=r"meta_width must be 'sum', 'widest' or a number k ≥ 1"):
            models.build("resnet20_cifar", meta_width=bad, device="meta")
    with pytest.raises(ValueError, match=r"meta_width must be"):
        models.build("mobilenetv2_imagenet", sharing="ordinal", meta_width="narrow", device="meta")  # checked anyway
    for narrow in ("widest", 1.5):
        with pytest.raises(ValueError, match=rf"^meta_width={narrow!r} is too narrow for sharing='independent': APS-I "
                                             r"gives each candidate its own channels, so a side needs the sum of its "
                                             r"widths \(208 for \[16, 32, 64, 96\], not \d+\); use meta_width='sum'$"):
            models.build("resnet20_cifar", sharing="independent", meta_width=narrow, device="meta")
    # Wide enough for every side: the sum.
    net = models.build("resnet20_cifar", sharing="independent", meta_width=208 / 96, device="meta")
    assert all(meta == sum(widths) for _, _, widths, meta, _ in _sides(net))


@pytest.mark.usefixtures("one_thread")
def test_narrow_meta_width_raises_the_floor_of_phi_and_still_exports():
    floors, starts = {}, {}
    for meta_width in ("sum", 1.5, "widest"):
        torch.manual_seed(5)
        net = models.build("resnet20_cifar", widths=(4, 8, 12), meta_width=meta_width, dtype=F64)
        floors[meta_width], starts[meta_width] = network_sharing_floor(net), float(network_sharing_level(net))
        phis = [float(network_transition_step(net, 1e-2)) for _ in range(200)]
        assert min(phis) >= floors[meta_width] * (1 - 1e-9)  # the floor is a theorem
        assert phis[-1] < 1.1 * floors[meta_width]  # and the transition nearly reaches it
        if meta_width != "sum":  # dense transforms on narrow meta-weights construct and export
            x = torch.randn(2, 3, 32, 32, dtype=F64)
            archs = random_archs(net, 2, seed=6)
            _train_statistics(net, archs, x)
            for arch in archs:
                _exported_equals_supernet(net, arch, x)
    # The ordinal start is the same; the floor rises as the meta width narrows.
    assert starts["sum"] == starts[1.5] == starts["widest"]
    assert floors["sum"] < floors[1.5] < floors["widest"] < starts["sum"]


def test_convert_takes_the_meta_width():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x = torch.randn(2, 3, 8, 8)
    for meta_width in ("sum", "widest", 1.25):
        net = apsfast.convert(model, x, widths=(0.5, 1.0), round_to=4, meta_width=meta_width).eval()
        assert net.options.get("meta_width", "sum") == meta_width  # the default goes unrecorded
        for path, side, widths, meta, _ in _sides(net):
            assert meta == _expected_meta(widths, meta_width, "transitional"), (path, side)
        net.set_arch(net.standard_arch())
        with torch.no_grad():
            assert_close(net(x), model(x))  # the original weights sit in the widest candidate's block
    with pytest.raises(ValueError, match=r"meta_width='widest' is too narrow for sharing='independent'"):
        apsfast.convert(model, x, round_to=4, sharing="independent", meta_width="widest")
