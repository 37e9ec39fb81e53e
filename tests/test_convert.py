"""apsfast.convert: plain PyTorch models to supernets, grouped by reading the traced graph."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import apsfast
from apsfast.models import count_macs
from apsfast.models.converter import supernet as convert_supernet
from apsfast.models.converter.layers import FlattenedAPSLinear
from apsfast.nn import APSConv2d, APSLayer, aps_layers, network_sharing_level, network_transition_step

F64 = torch.float64
SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


# --- the models (plain PyTorch, written for these tests) -------------------------------------

class Basic(nn.Module):
    """A ResNet basic block; the shortcut projects when the width or resolution changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(Basic(16, 16, 1), Basic(16, 16, 1))
        self.layer2 = nn.Sequential(Basic(16, 32, 2), Basic(32, 32, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(F.adaptive_avg_pool2d(x, 1)))))
        return x * gate


class Inverted(nn.Module):
    """MobileNet-v2 block: expand 1×1, depthwise 3×3, squeeze-excitation, project 1×1."""

    def __init__(self, c_in: int, c_out: int, stride: int, se: bool) -> None:
        super().__init__()
        hidden = 4 * c_in
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.ReLU6())
        self.se = SqueezeExcite(hidden, 8) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.residual else out


class TinyMobileNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(Inverted(16, 16, 1, True), Inverted(16, 24, 2, True),
                                    Inverted(24, 24, 1, False))
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6())
        self.head_width = 64
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(64, 10))

    def forward(self, x):
        x = self.head(self.blocks(self.stem(x)))
        # The width as a constant: convert must read the live channel count instead.
        return self.classifier(x.mean((2, 3)).view(-1, self.head_width))


class TwoBranch(nn.Module):
    """Concatenated branches, then grouped convs (groups=2): one on a single-producer input,
    one on the concatenation of two equal branches."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 24, 1), nn.BatchNorm2d(24), nn.ReLU())
        self.fuse = nn.Sequential(nn.Conv2d(40, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=2), nn.BatchNorm2d(32), nn.ReLU())
        self.p = nn.Conv2d(32, 16, 1)
        self.q = nn.Conv2d(32, 16, 3, 1, 1)
        self.mix = nn.Conv2d(32, 24, 3, 2, 1, groups=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.stem(x)
        x = self.grouped(self.fuse(torch.cat([self.a(x), self.b(x)], dim=1)))
        x = self.mix(torch.cat((self.p(x), self.q(x)), 1))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class FlattenHead(nn.Module):
    """VGG-like: the classifier reads the flattened 4×4 feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2))
        self.hidden = nn.Linear(24 * 4 * 4, 32)
        self.out = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.flatten(self.features(x), 1)
        return self.out(F.relu(self.hidden(x)))


class BatchNormAct(nn.BatchNorm2d):
    """timm's pattern: a BatchNorm2d subclass whose forward calls F.batch_norm, then its activation."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                         self.momentum, self.eps)
        return self.act(x)


class FunctionalLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: whole samples dropped (timm's drop_path, torchvision's stochastic_depth)."""
    if p == 0.0 or not training:
        return x
    return x * x.new_empty(x.shape[0], 1, 1, 1).bernoulli_(1 - p) / (1 - p)


torch.fx.wrap("drop_path")  # traced as one call, as torchvision's stochastic_depth is


class BNActNet(nn.Module):
    """Functional batch norm and linear inside subclassed layers, a per-sample op, and a
    channel slice of a concatenation (GhostNet's), which keeps its widths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False), BatchNormAct(16)
        self.conv, self.bn2 = nn.Conv2d(16, 24, 3, 1, 1, bias=False), BatchNormAct(24)
        self.ghost = nn.Conv2d(24, 16, 1)
        self.fc = FunctionalLinear(24, 5)

    def forward(self, x):
        x = self.bn1(self.stem(x))
        x = drop_path(self.bn2(self.conv(x)), 0.2, self.training)
        x = self.ghost(x)
        x = torch.cat([x, x], 1)[:, :24]
        return self.fc(x.mean((2, 3)))


class LayerNorm2d(nn.LayerNorm):
    """torchvision's and timm's: a layer norm over the channels, through channels-last."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block: depthwise conv, channels-last layer norm and MLP, a learned scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 3, 1, 1, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.act, self.fc2 = nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)
        self.scale = nn.Parameter(torch.rand(c, 1, 1))

    def forward(self, x):
        y = torch.permute(self.dw(x), (0, 2, 3, 1))
        y = self.fc2(self.act(self.fc1(self.norm(y))))
        return x + self.scale * y.permute(0, 3, 1, 2)


class TinyConvNeXt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 2, 2), LayerNorm2d(16))
        self.block1 = ConvNeXtBlock(16)
        self.down = nn.Sequential(LayerNorm2d(16), nn.Conv2d(16, 24, 2, 2))
        self.block2 = ConvNeXtBlock(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        return self.fc(self.block2(self.down(self.block1(self.stem(x)))).mean((2, 3)))


class ScaledStdConv2d(nn.Conv2d):
    """timm's weight-standardised conv (normaliser-free networks): the weight standardised per
    filter and scaled by gain · scale in every forward."""

    def __init__(self, c_in: int, c_out: int, k: int) -> None:
        super().__init__(c_in, c_out, k, padding=k // 2)
        self.gain = nn.Parameter(torch.rand(c_out, 1, 1, 1) + 0.5)
        self.scale = (c_in * k * k) ** -0.5

    def forward(self, x):
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=1e-6)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding)


class NormFree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv1, self.conv2 = ScaledStdConv2d(3, 16, 3), ScaledStdConv2d(16, 24, 1), \
            ScaledStdConv2d(24, 16, 3)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + 0.2 * self.conv2(F.relu(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


MODELS = {"resnet": TinyResNet, "mobilenet": TinyMobileNet, "branches": TwoBranch, "flatten": FlattenHead,
          "bnact": BNActNet, "convnext": TinyConvNeXt, "normfree": NormFree}
# Per model: options, and the decisions (names and candidate widths) the graph must give.
EXPECTED = {
    "resnet": ({}, {"stem.0": (8, 16), "layer1.0.conv1": (8, 16), "layer1.1.conv1": (8, 16),
                    "layer2.0.conv1": (16, 24, 32), "layer2.0.conv2": (16, 24, 32),
                    "layer2.1.conv1": (16, 24, 32)}),
    "mobilenet": ({}, {"stem.0": (8, 16), "blocks.0.expand.0": (32, 48, 64), "blocks.1.expand.0": (32, 48, 64),
                       "blocks.1.project.0": (16, 24), "blocks.2.expand.0": (48, 72, 96),
                       "head.0": (32, 48, 64)}),
    "branches": ({"round_to": 3}, {"stem.0": (9, 12, 16), "a.0": (9, 12, 16), "b.0": (12, 18, 24),
                                   "fuse.0": (18, 24, 32), "grouped.0": (18, 24, 32), "p": (9, 12, 16),
                                   "mix": (12, 18, 24)}),
    "flatten": ({}, {"features.0": (8, 16), "features.4": (16, 24)}),
    "bnact": ({}, {"stem": (8, 16), "conv": (16, 24)}),
    # The residual streams keep their widths (layer norms over them, the learned scale);
    # each block's MLP is searched.
    "convnext": ({}, {"block1.fc1": (32, 48, 64), "block2.fc1": (48, 72, 96)}),
    "normfree": ({}, {"stem": (8, 16), "conv1": (16, 24)}),
}


def randomised(model: nn.Module) -> nn.Module:
    """Non-trivial batch-norm statistics and affine parameters, so that a mis-selected channel
    shows up in the outputs."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model


def make(name: str, dtype=F64, **options):
    torch.manual_seed(0)
    model = randomised(MODELS[name]().to(dtype)).eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=dtype)
    net = apsfast.convert(model, x, **{**EXPECTED[name][0], **options})
    return model, net, x


@pytest.fixture(scope="module", params=sorted(MODELS))
def converted(request):
    return (request.param, *make(request.param))


# --- every model ---------------------------------------------------------------------------

def test_decisions_group_coupled_channels(converted):
    name, _, net, _ = converted
    assert {d.name: d.widths for d in net.decisions()} == EXPECTED[name][1]
    assert net.name == f"converted:{type(MODELS[name]()).__name__}"
    assert net.input_size == SIZE and net.in_channels == 3
    assert net.max_arch() == net.standard_arch()


def test_standard_arch_is_the_original(converted):
    _, model, net, x = converted
    net.eval()
    net.set_arch(net.standard_arch())
    with torch.no_grad():
        assert torch.equal(net(x), model(x))  # float64: exactly
    static = net.export(net.standard_arch())
    assert sum(p.numel() for p in static.parameters()) == sum(p.numel() for p in model.parameters())
    assert count_macs(static, SIZE) == count_macs(model, SIZE)
    assert net.flops(net.standard_arch()) == sum(count_macs(model, SIZE).values())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_standard_arch_float32(name):
    model, net, x = make(name, dtype=torch.float32)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))
    # The export keeps the original names: the original model loads its state.
    model.load_state_dict(net.export(net.standard_arch()).state_dict())


def test_random_archs_export_equal_and_costed(converted):
    _, _, net, x = converted
    net.eval()
    gen = torch.Generator().manual_seed(3)
    for arch in [net.min_arch()] + [net.sample_uniform(gen) for _ in range(3)]:
        net.set_arch(arch)
        static = net.export(arch)
        assert not any(isinstance(m, APSLayer) for m in static.modules())
        with torch.no_grad():
            torch.testing.assert_close(static(x), net(x), rtol=1e-12, atol=1e-12)
        assert net.flops(arch) == sum(count_macs(static, SIZE).values())
        assert net.params(arch) == sum(p.numel() for p in static.parameters())
        assert sum(s.macs for s in net.layer_shapes(arch)) == net.flops(arch)


def test_arch_json_round_trip(converted):
    _, _, net, _ = converted
    arch = net.sample_uniform(torch.Generator().manual_seed(4))
    text = net.arch_to_json(arch)
    assert net.arch_from_json(text) == arch
    assert json.loads(text)["options"]["sharing"] == "transitional"


def test_training_step_reaches_meta_weights(converted):
    name, _, _, x = converted
    _, net, x = make(name)  # a fresh one: this test trains it
    net.train()
    net.set_arch(net.sample_uniform(torch.Generator().manual_seed(5)))
    net(x).square().mean().backward()
    for layer in aps_layers(net):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_transition_lowers_phi(converted):
    name = converted[0]
    _, net, x = make(name)
    # Φ before each step: the first step starts the transition (perturbing the exact ordinal
    # start, which can raise Φ a little on wide layers); from there every step lowers it.
    phis = [float(network_transition_step(net, 1e-3, relative=True)) for _ in range(4)]
    assert all(b < a for a, b in zip(phis, phis[1:]))
    assert network_sharing_level(net) < phis[-1]
    net.eval()
    arch = net.sample_uniform(torch.Generator().manual_seed(6))
    net.set_arch(arch)
    with torch.no_grad():  # dense transforms now: the export still matches
        torch.testing.assert_close(net.export(arch)(x), net(x), rtol=1e-10, atol=1e-10)


# --- layout specifics ----------------------------------------------------------------------

def test_residual_stream_is_one_decision():
    _, net, _ = make("resnet")
    names = [d.name for d in net.decisions()]
    arch = net.max_arch()
    arch[names.index("stem.0")] = 0  # the first stage's stream: stem, both blocks' conv2
    arch[names.index("layer2.0.conv2")] = 1  # the second's: its conv2s and the projection
    static = net.export(arch)
    assert {static.get_submodule(p).out_channels for p in ("stem.0", "layer1.0.conv2", "layer1.1.conv2")} == {8}
    assert static.get_submodule("layer2.0.downsample.0").in_channels == 8
    assert {static.get_submodule(p).out_channels
            for p in ("layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2")} == {24}
    assert static.get_submodule("fc").in_features == 24


def test_grouped_conv_widths_stay_divisible():
    _, net, _ = make("branches")
    widths = {d.name: d.widths for d in net.decisions()}
    for name in ("fuse.0", "grouped.0", "mix"):  # one segment read or written by a groups=2 conv
        assert all(w % 6 == 0 or w == max(widths[name]) for w in widths[name]), name  # lcm(3, 2)
    # p and q each fill one group of 'mix': coupled (equal widths), each any multiple of 3.
    assert "q" not in widths and widths["p"] == (9, 12, 16)


def test_original_model_is_untouched_and_weights_embedded():
    model, net, _ = make("resnet")
    assert not any(isinstance(m, APSLayer) for m in model.modules())
    layer = net.get_submodule("net.layer1.0.conv1")
    assert isinstance(layer, APSConv2d) and layer.weight.shape[0] == 8 + 16  # Σ candidates
    assert torch.equal(layer.weight[:16, :16], model.layer1[0].conv1.weight)


@pytest.mark.parametrize("sharing", ["ordinal", "independent"])
def test_other_sharing_modes_keep_the_original(sharing):
    model, net, x = make("mobilenet", sharing=sharing)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))


# --- refusals ------------------------------------------------------------------------------

class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Shuffle(nn.Module):
    def forward(self, x):
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


class Chunked(nn.Module):
    def forward(self, x):
        a, b = torch.chunk(x, 2, dim=1)
        return torch.cat([b, a], 1)


class SpaceToDepth(nn.Module):
    """TResNet's: 2×2 blocks of each channel's map moved into the channels, then back."""

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).reshape(n, 4 * c, h // 2, w // 2)
        return F.pixel_shuffle(x, 2)


class PoolsSmallMaps(nn.Module):
    """timm's VGG head: a branch on the input's shape (a map smaller than 8×8 is pooled up)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, 1, 1)

    def forward(self, x):
        if x.shape[-1] < 8:
            x = F.adaptive_avg_pool2d(x, 8)
        return self.conv(x)


class Ghost(nn.Module):
    """GhostNet's: a concatenation sliced to its own width (x[:, :C] of C channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.conv(x)
        return torch.cat([y, F.relu(y)], 1)[:, :16]


class Host(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.inner = inner
        self.conv = nn.Conv2d(16, 32, 3, 1, 1)
        self.fc = nn.Linear(32, 4)

    def forward(self, x):
        x = self.conv(self.inner(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def test_refused_then_accepted_with_exclude(monkeypatch):
    model = randomised(Host(Gated()).double()).eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=F64)

    def never(*args, **kwargs):
        raise AssertionError("a refused model must not reach the build")

    with monkeypatch.context() as patch:
        patch.setattr(convert_supernet, "build_supernet", never)
        with pytest.raises(ValueError, match=r"torch.fx cannot trace .* module 'inner'.*control flow") as error:
            apsfast.convert(model, x)
    assert "exclude=['inner']" in str(error.value)
    assert_fixed_inner_is_exact(apsfast.convert(model, x, exclude=["inner"]), model, x)


def assert_fixed_inner_is_exact(net, model, x) -> None:
    assert [d.name for d in net.decisions()] == ["conv"]  # the stem's output meets 'inner': fixed
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), model(x))
    arch = net.min_arch()
    static = net.export(arch)
    assert net.flops(arch) == sum(count_macs(static, SIZE).values())
    assert net.params(arch) == sum(p.numel() for p in static.parameters())


@pytest.mark.parametrize("inner, op", [
    (Shuffle(), "call_method view (node 'view' in module 'inner')"),
    (Chunked(), "call_function chunk (node 'chunk' in module 'inner')"),
    (SpaceToDepth(), "call_method view (node 'view' in module 'inner'): it reshapes the spatial dims"),
    (PoolsSmallMaps(), "module 'inner' branches on a shape"),
], ids=["shuffle", "chunk", "space_to_depth", "branch_on_shape"])
def test_an_op_without_a_rule_is_pinned(inner, op):
    # A channel shuffle mixes channel groups, a chunk cuts one, a space-to-depth moves pixels
    # into channels: the channels they read and write keep their widths, the rest is searched,
    # and the warning names the op. A submodule branching on its input's shape is a leaf.
    model = randomised(Host(inner).double()).eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=F64)
    with pytest.warns(UserWarning, match="have no channel rule") as warned:
        net = apsfast.convert(model, x)
    assert op in str(warned[0].message)
    assert_fixed_inner_is_exact(net, model, x)


def test_a_slice_of_every_channel_passes_them_on():
    model = randomised(Host(Ghost()).double()).eval()
    x = torch.randn(2, 3, SIZE, SIZE, dtype=F64)
    net = apsfast.convert(model, x, round_to=4)
    assert [d.name for d in net.decisions()] == ["stem.0", "inner.conv", "conv"]
    arch = net.min_arch()
    net.eval().set_arch(arch)
    with torch.no_grad():
        torch.testing.assert_close(net.export(arch)(x), net(x))


@pytest.mark.parametrize("kwargs, error, match", [
    ({"widths": (0.5, 1.5)}, ValueError, "widths must be a non-empty sequence of ratios in \\(0, 1\\]"),
    ({"widths": ()}, ValueError, "widths must"),
    ({"widths": "0.5"}, TypeError, "widths must"),
    ({"round_to": 0}, ValueError, "round_to must be a positive int"),
    ({"sharing": "shared"}, ValueError, "sharing must be one of"),
    ({"exclude": ["layer9"]}, ValueError, "exclude names 'layer9', which is not a submodule"),
    ({"exclude": [3]}, TypeError, "exclude must be a sequence of submodule names"),
    ({"example_input": torch.zeros(2, 3, SIZE)}, ValueError, "example_input must be a non-empty 4-D"),
    ({"example_input": torch.zeros(2, 3, SIZE, SIZE, dtype=torch.int64)}, TypeError,
     "example_input must be a floating"),
    ({"example_input": [1.0]}, TypeError, "example_input must be a floating"),
    ({"model": "resnet"}, TypeError, "model must be a torch.nn.Module"),
], ids=lambda v: next(iter(v)) if isinstance(v, dict) else None)
def test_bad_arguments(kwargs, error, match):
    args = {"model": TinyResNet(), "example_input": torch.zeros(1, 3, SIZE, SIZE), **kwargs}
    with pytest.raises(error, match=match):
        apsfast.convert(args.pop("model"), args.pop("example_input"), **args)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_convert(name):
    # torchvision's compiled part loads only against a matching torch build (the GPU machines'),
    # hence a gpu test; the model itself is converted and checked on the GPU.
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = randomised(getattr(torchvision.models, name)(num_classes=10)).cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    net = apsfast.convert(model, x).cuda().eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x), rtol=1e-4, atol=1e-4)
        arch = net.sample_uniform(torch.Generator().manual_seed(0))
        net.set_arch(arch)
        static = net.export(arch)
        torch.testing.assert_close(static(x), net(x), rtol=1e-4, atol=1e-4)
    assert net.flops(net.standard_arch()) == sum(count_macs(model, 64).values())
    assert net.params(arch) == sum(p.numel() for p in static.parameters())


def test_a_flattened_map_into_a_linear_layer_is_searched_by_its_channels():
    # VGG's pattern: the transform acts on the 24 channels, each of the 4×4 positions sharing
    # it, never on the 384 flattened features (a 384×384 transform per candidate, and far worse
    # at real sizes: 25,088² for VGG at 224×224).
    _, net, _ = make("flatten")
    hidden = net.get_submodule("net.hidden")
    assert isinstance(hidden, FlattenedAPSLinear) and hidden.in_widths == (16, 24)
    assert tuple(hidden.weight.shape) == (32, 16 + 24, 4, 4)
    assert all(Q.shape == (16 + 24, w) for Q, w in zip(hidden.Q, hidden.in_widths))


def test_a_supernet_that_would_not_fit_is_refused_before_it_is_built(monkeypatch):
    from apsfast.models.converter import memory

    model = MODELS["branches"]().eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    estimates = []
    check = memory.check_fits
    monkeypatch.setattr(convert_supernet, "check_fits", lambda *a: estimates.append(check(*a)) or estimates[-1])
    net = apsfast.convert(model, x)
    # The estimate is what the APS layers then hold (their parameters, transforms and statistics),
    # their gradients in a training step, the model with its traced copy, and the gradients of
    # the layers kept plain.
    layers = [*aps_layers(net), *(m for m in net.modules() if isinstance(m, apsfast.nn.APSBatchNorm2d))]
    tensors = {id(t): t for m in layers for t in [*m.parameters(), *m.buffers()]}.values()
    held = sum(t.numel() * t.element_size() * (2 if t.requires_grad else 1) for t in tensors)
    searched = [path for path, m in net.get_submodule("net").named_modules() if m in layers]
    kept = [p for name, p in model.named_parameters() if not any(name.startswith(f"{path}.") for path in searched)]
    held += 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # the model and its copy
    held += sum(p.numel() * p.element_size() for p in kept)  # the gradients of the layers kept plain
    assert 0.9 * held <= estimates[0] <= 1.1 * held, (estimates[0], held)
    monkeypatch.setattr(memory, "available_bytes", lambda: (estimates[0], "a stated limit leaves"))
    monkeypatch.setattr(convert_supernet, "aps_conv", lambda *a, **k: pytest.fail("built past the check"))
    with pytest.raises(ValueError, match=r"would take .* GiB at the peak of a training step.*a stated limit leaves"
                                         r".*meta_width='widest' would take .*or pass exclude=\[") as error:
        apsfast.convert(model, x)
    assert "'fuse.0'" in str(error.value) or "'grouped.0'" in str(error.value)


def test_the_memory_budget_is_the_stated_limit_where_one_is_set(monkeypatch):
    # Under ulimit -v the budget is the limit less what the process maps, whatever else the
    # machine holds; without one, what the machine has available.
    from apsfast.models.converter import memory

    monkeypatch.setattr(memory, "_address_space_limit", lambda: 2**50)
    free, source = memory.available_bytes()
    assert source == "the 1048576.0 GiB address-space limit (ulimit -v) leaves" and 2**49 < free < 2**50
    monkeypatch.setattr(memory, "_address_space_limit", lambda: -1)
    free, source = memory.available_bytes()
    assert source == "this machine has available" and 0 < free < 2**50


def test_a_functional_batch_norm_keeps_its_momentum():
    # BatchNormAct2d with momentum=None (a cumulative average) traces a factor of 0.0; the
    # module it becomes must average again, not freeze its statistics.
    model = BNActNet().eval()
    model.bn1.momentum, model.bn2.momentum = None, 0.3
    net = apsfast.convert(model, torch.randn(2, 3, SIZE, SIZE))
    bns = {path: m for path, m in net.named_modules() if isinstance(m, apsfast.nn.APSBatchNorm2d)}
    assert {p: {bn.momentum for bn in m.bns} for p, m in bns.items()} == {"net.bn1": {None}, "net.bn2": {0.3}}
