"""ResNet search spaces: CIFAR ResNet-20/56 and ImageNet ResNet-18.

Searchable: the output width of the stem, of the first conv of every block, and of the
residual stream. ``residual`` says how the residual stream is searched:

* ``"block"``: every block's output width is its own decision (the authors' CIFAR space:
  1 + 2 per block, 19 decisions for ResNet-20). A block whose input and output widths may
  differ keeps a projection shortcut (1×1 conv + BN), used only when the sampled widths or
  the stride differ; otherwise the shortcut is the identity.
* ``"stage"``: one residual width per stage, shared by every block's output in it (the
  authors' ImageNet space: 13 decisions for ResNet-18). Shortcuts inside a stage are always
  identities; only the first block of a stage keeps a projection.

In both the shortcut is the identity exactly where the standard ResNet's is, so the
standard network is an architecture of the space and exports with its own shortcuts.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

import torch.nn.functional as F
from torch import Tensor, nn

from apsfast import _checks
from apsfast.models.base import DecisionSpace, Supernet, scaled
from apsfast.models.cost import LayerShape
from apsfast.models.meta_width import check_meta_width, conv_meta_widths, meta_width_of
from apsfast.models.registry import register
from apsfast.models.static import HW, Part, Resolve, chain_shapes, export_chain, export_part, part_shapes
from apsfast.nn import APSBatchNorm2d, APSConv2d, APSLinear

#: Candidate widths of every CIFAR layer (paper §5.1): for the analysis and 100% FLOPs search,
#: and for compact models.
CIFAR_WIDTHS = {"paper": (16, 32, 64, 96), "compact": (4, 8, 16, 32, 64)}
#: ImageNet ResNet-18: the first stage's candidates, scaled by each stage's expansion.
RESNET18_WIDTHS = (32, 48, 64, 80)
RESIDUAL = ("block", "stage")


class BasicBlock(Part):
    """Two 3×3 conv + BN layers and a residual; the same class serves the supernet (APS
    layers) and the exported network (plain layers).

    The shortcut projects through ``downsample`` when the block changes resolution or width
    and is the identity otherwise, decided per forward from the actual widths.
    """

    def __init__(self, conv1: nn.Module, bn1: nn.Module, conv2: nn.Module, bn2: nn.Module,
                 downsample: Optional[nn.Module], stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = conv1, bn1, conv2, bn2
        self.downsample = downsample
        self.stride = stride

    def _projects(self, in_width: int, out_width: int) -> bool:
        return self.stride != 1 or in_width != out_width

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        if self._projects(x.shape[1], out.shape[1]):
            if self.downsample is None:
                raise RuntimeError(f"BasicBlock maps {x.shape[1]} to {out.shape[1]} channels with "
                                   f"stride {self.stride} but has no downsample projection")
            x = self.downsample(x)
        return F.relu(out + x, inplace=True)

    def _main(self) -> list[tuple[str, nn.Module]]:
        return [("conv1", self.conv1), ("bn1", self.bn1), ("conv2", self.conv2), ("bn2", self.bn2)]

    def export(self, path: str, in_width: int, resolve: Resolve) -> tuple[nn.Module, int]:
        main, out_width = export_chain(self._main(), path, in_width, resolve)
        downsample = None
        if self._projects(in_width, out_width):
            downsample, _ = export_part(self.downsample, f"{path}.downsample", in_width, resolve)
        return BasicBlock(*main.values(), downsample, self.stride), out_width

    def shapes(self, path: str, in_width: int, hw: HW, resolve: Resolve) -> tuple[list[LayerShape], int, HW]:
        shapes, out_width, out_hw = chain_shapes(self._main(), path, in_width, hw, resolve)
        if self._projects(in_width, out_width):
            shapes += part_shapes(self.downsample, f"{path}.downsample", in_width, hw, resolve)[0]
        return shapes, out_width, out_hw


def _resnet(name: str, *, depths: Sequence[int], stage_widths: Sequence[tuple[int, ...]],
            standard: Sequence[int], stem_widths: tuple[int, ...], stem_standard: int,
            imagenet_stem: bool, residual: str, sharing: str, num_classes: int, input_size: int,
            transition_noise: float, layer_widths: Optional[Mapping[str, Sequence[int]]],
            meta_width: Union[str, float], device, dtype) -> Supernet:
    residual = _checks.choice("residual", residual, RESIDUAL)
    num_classes = _checks.positive_int("num_classes", num_classes)
    meta_width = check_meta_width(meta_width)
    aps = dict(sharing=sharing, transition_noise=transition_noise, device=device, dtype=dtype)
    bn = dict(device=device, dtype=dtype)
    space = DecisionSpace(layer_widths)

    def conv(in_widths, out_widths, *args) -> APSConv2d:
        return APSConv2d(in_widths, out_widths, *args, **conv_meta_widths(in_widths, out_widths, sharing, meta_width),
                         **aps)

    widths = space.add("stem", stem_widths, stem_standard)
    if imagenet_stem:
        stem = nn.Sequential(conv(3, widths, 7, 2, 3), APSBatchNorm2d(widths, **bn),
                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
    else:
        stem = nn.Sequential(conv(3, widths, 3, 1, 1), APSBatchNorm2d(widths, **bn),
                             nn.ReLU(inplace=True))
    space.drive("stem", "stem.0")
    parts = OrderedDict(stem=stem)

    source = "stem"  # the decision that sets the width of the residual stream so far
    for s, (depth, candidates, std) in enumerate(zip(depths, stage_widths, standard), start=1):
        blocks = []
        for b in range(depth):
            path, stride = f"layer{s}.{b}", 2 if s > 1 and b == 0 else 1
            mid = space.add(f"{path}.conv1", candidates, std)
            target = f"layer{s}" if residual == "stage" else f"{path}.conv2"
            if b == 0 or residual == "block":  # else the stage's width, declared by block 0
                out = space.add(target, candidates, std)
            # A projection only where the block can change width or resolution.
            downsample = None
            if stride != 1 or target != source:
                downsample = nn.Sequential(conv(widths, out, 1, stride), APSBatchNorm2d(out, **bn))
                space.drive(target, f"{path}.downsample.0")
            blocks.append(BasicBlock(conv(widths, mid, 3, stride, 1), APSBatchNorm2d(mid, **bn),
                                     conv(mid, out, 3, 1, 1), APSBatchNorm2d(out, **bn),
                                     downsample, stride))
            space.drive(f"{path}.conv1", f"{path}.conv1")
            space.drive(target, f"{path}.conv2")
            source, widths = target, out
        parts[f"layer{s}"] = nn.Sequential(*blocks)
    classifier = APSLinear(widths, num_classes, meta_in_width=meta_width_of(widths, sharing, meta_width), **aps)
    parts["head"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier)
    return Supernet(name, parts, space, input_size)


def _cifar_widths(widths: Union[str, Sequence[int]]) -> tuple[int, ...]:
    if isinstance(widths, str):
        if widths not in CIFAR_WIDTHS:
            raise ValueError(f"widths must be one of {sorted(CIFAR_WIDTHS)} or a sequence of ints, got {widths!r}")
        return CIFAR_WIDTHS[widths]
    return _checks.widths("widths", widths)


def _cifar_resnet(name: str, depth: int, widths, residual, sharing, num_classes, input_size,
                  transition_noise, layer_widths, meta_width, device, dtype) -> Supernet:
    candidates = _cifar_widths(widths)
    # Every layer shares the candidate set: no per-stage expertise (paper §5.1).
    return _resnet(name, depths=(depth,) * 3, stage_widths=(candidates,) * 3, standard=(16, 32, 64),
                   stem_widths=candidates, stem_standard=16, imagenet_stem=False, residual=residual,
                   sharing=sharing, num_classes=num_classes, input_size=input_size,
                   transition_noise=transition_noise, layer_widths=layer_widths, meta_width=meta_width,
                   device=device, dtype=dtype)


@register("resnet20_cifar")
def resnet20_cifar(widths: Union[str, Sequence[int]] = "paper", residual: str = "block",
                   sharing: str = "transitional", num_classes: int = 10, input_size: int = 32,
                   transition_noise: float = 1e-3,
                   layer_widths: Optional[Mapping[str, Sequence[int]]] = None,
                   meta_width: Union[str, float] = "sum", device=None, dtype=None) -> Supernet:
    """CIFAR ResNet-20 (3 stages of 3 basic blocks, standard widths 16/32/64).

    Args:
        widths: candidate widths of every searchable layer: ``"paper"`` = (16, 32, 64, 96),
            ``"compact"`` = (4, 8, 16, 32, 64), or a sequence.
        residual: ``"block"`` (a width per block output; 19 decisions) or ``"stage"`` (one per
            stage; 13 decisions); see :mod:`apsfast.models.resnet`.
        sharing: APS strategy of every layer (``"ordinal"``, ``"independent"``, ``"transitional"``).
        num_classes, input_size: classifier outputs; resolution FLOPs are counted at.
        transition_noise: APS-T's perturbation of the ordinal start (the authors' CIFAR value).
        layer_widths: ``{decision name: widths}`` replacing the candidates of those decisions.
        meta_width: the meta width of every searched side of an APS layer (rows of its
            meta-weight and transforms) under transitional and independent sharing: ``"sum"``
            of the side's candidates (full independence reachable), ``"widest"`` candidate, or
            a number ``k ≥ 1``: ``k`` times the widest, rounded, at most the sum. Narrower
            meta-weights cost less memory and a cheaper transition, but the candidates can no
            longer be made fully independent (Φ's reachable minimum rises). Independent
            sharing needs ``"sum"`` (disjoint candidates); ordinal sharing ignores it (always
            the widest, the only rows it reads).
    """
    return _cifar_resnet("resnet20_cifar", 3, widths, residual, sharing, num_classes, input_size,
                         transition_noise, layer_widths, meta_width, device, dtype)


@register("resnet56_cifar")
def resnet56_cifar(widths: Union[str, Sequence[int]] = "paper", residual: str = "block",
                   sharing: str = "transitional", num_classes: int = 10, input_size: int = 32,
                   transition_noise: float = 1e-3,
                   layer_widths: Optional[Mapping[str, Sequence[int]]] = None,
                   meta_width: Union[str, float] = "sum", device=None, dtype=None) -> Supernet:
    """CIFAR ResNet-56 (3 stages of 9 basic blocks); options as :func:`resnet20_cifar`
    (55 decisions with ``residual="block"``, 31 with ``"stage"``)."""
    return _cifar_resnet("resnet56_cifar", 9, widths, residual, sharing, num_classes, input_size,
                         transition_noise, layer_widths, meta_width, device, dtype)


@register("resnet18_imagenet")
def resnet18_imagenet(widths: Sequence[int] = RESNET18_WIDTHS, residual: str = "stage",
                      sharing: str = "transitional", num_classes: int = 1000, input_size: int = 224,
                      transition_noise: float = 1e-2,
                      layer_widths: Optional[Mapping[str, Sequence[int]]] = None,
                      meta_width: Union[str, float] = "sum", device=None, dtype=None) -> Supernet:
    """ImageNet ResNet-18 (4 stages of 2 basic blocks, standard widths 64/128/256/512).

    Args:
        widths: the candidates of the stem and the first stage (standard width 64); each later
            stage's are these times its expansion (×2, ×4, ×8).
        residual: ``"stage"`` (one residual width per stage, 13 decisions, as the authors) or
            ``"block"`` (17 decisions).
        transition_noise: the authors' ImageNet value.
        Others as :func:`resnet20_cifar`.
    """
    base = _checks.widths("widths", widths)
    standard = (64, 128, 256, 512)
    return _resnet("resnet18_imagenet", depths=(2, 2, 2, 2),
                   stage_widths=[scaled(base, s, 64) for s in standard], standard=standard,
                   stem_widths=base, stem_standard=64, imagenet_stem=True, residual=residual,
                   sharing=sharing, num_classes=num_classes, input_size=input_size,
                   transition_noise=transition_noise, layer_widths=layer_widths, meta_width=meta_width,
                   device=device, dtype=dtype)
