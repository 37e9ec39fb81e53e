"""MobileNet-v2 search space (ImageNet).

Searchable (24 decisions, as the authors): the stem, the output width of each of the 7
stages (shared by every block of the stage, so the residual additions inside a stage always
match), and the expanded (hidden) width of each of the 16 blocks with an expansion conv.
The depthwise conv follows its input width and uses ``P`` only. The 1280-wide head conv and
the classifier are fixed: the head's width sets the classifier's input, and it costs 7% of
the standard network's MACs.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Optional, Sequence, Union

from torch import Tensor, nn

from apsfast import _checks
from apsfast.models.base import DecisionSpace, Supernet, scaled
from apsfast.models.cost import LayerShape
from apsfast.models.meta_width import check_meta_width, conv_meta_widths
from apsfast.models.registry import register
from apsfast.models.static import HW, Part, Resolve, export_part, part_shapes
from apsfast.nn import APSBatchNorm2d, APSConv2d

#: The candidates of the first stage (standard width 16); every other layer's are these
#: scaled by its standard width over 16.
MOBILENETV2_WIDTHS = (8, 12, 16, 20)
#: (expansion t, output width c, blocks n, first stride s) per stage (Sandler et al., Table 2).
STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
          (6, 160, 3, 2), (6, 320, 1, 1))
STEM_WIDTH, HEAD_WIDTH = 32, 1280


class InvertedResidual(Part):
    """``layers`` (expand 1×1, depthwise 3×3, project 1×1, each with BN), plus the input when
    ``residual``; the same class serves the supernet and the exported network."""

    def __init__(self, layers: nn.Sequential, residual: bool) -> None:
        super().__init__()
        self.layers = layers
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out

    def export(self, path: str, in_width: int, resolve: Resolve) -> tuple[nn.Module, int]:
        layers, out_width = export_part(self.layers, f"{path}.layers", in_width, resolve)
        return InvertedResidual(layers, self.residual), out_width

    def shapes(self, path: str, in_width: int, hw: HW, resolve: Resolve) -> tuple[list[LayerShape], int, HW]:
        return part_shapes(self.layers, f"{path}.layers", in_width, hw, resolve)

    def extra_repr(self) -> str:
        return f"residual={self.residual}"


@register("mobilenetv2_imagenet")
def mobilenetv2_imagenet(widths: Sequence[int] = MOBILENETV2_WIDTHS, sharing: str = "transitional",
                         num_classes: int = 1000, input_size: int = 224, dropout: float = 0.2,
                         transition_noise: float = 1e-2,
                         layer_widths: Optional[Mapping[str, Sequence[int]]] = None,
                         meta_width: Union[str, float] = "sum", device=None, dtype=None) -> Supernet:
    """ImageNet MobileNet-v2 (width multiplier 1.0) with stage-wise searched widths.

    Args:
        widths: the candidates of the first stage (standard width 16); every searchable
            layer's are these times its standard width / 16 (stem ×2, stage 2 ×1.5, …, a
            block's hidden width ×6 its input's).
        dropout: before the classifier, as in the reference network.
        transition_noise: the authors' ImageNet value.
        meta_width: ``"sum"``, ``"widest"`` or ``k ≥ 1`` times the widest candidate, per side
            (a depthwise conv's one side included); ignored by ordinal sharing.
        Others as :func:`apsfast.models.resnet.resnet20_cifar`.
    """
    base = _checks.widths("widths", widths)
    num_classes = _checks.positive_int("num_classes", num_classes)
    dropout = _checks.finite_float("dropout", dropout, positive=False)
    meta_width = check_meta_width(meta_width)
    aps = dict(sharing=sharing, transition_noise=transition_noise, device=device, dtype=dtype)
    bn = dict(device=device, dtype=dtype)
    space = DecisionSpace(layer_widths)

    def conv(in_widths, out_widths, *args, depthwise: bool = False) -> APSConv2d:
        return APSConv2d(in_widths, out_widths, *args, groups="depthwise" if depthwise else 1,
                         **conv_meta_widths(in_widths, out_widths, sharing, meta_width, depthwise), **aps)

    in_widths = space.add("stem", scaled(base, STEM_WIDTH, 16), STEM_WIDTH)
    space.drive("stem", "stem.0")
    parts = OrderedDict(stem=nn.Sequential(conv(3, in_widths, 3, 2, 1),
                                           APSBatchNorm2d(in_widths, **bn), nn.ReLU6(inplace=True)))
    in_standard = STEM_WIDTH
    for s, (t, c, n, first_stride) in enumerate(STAGES, start=1):
        stage = f"stage{s}"
        blocks = []
        for b in range(n):
            path = f"{stage}.{b}"
            layers: list[nn.Module] = []
            hidden = in_widths
            if t != 1:
                hidden = space.add(f"{path}.expand", scaled(base, t * in_standard, 16), t * in_standard)
                layers += [conv(in_widths, hidden, 1), APSBatchNorm2d(hidden, **bn),
                           nn.ReLU6(inplace=True)]
                space.drive(f"{path}.expand", f"{path}.layers.0")
            out_widths = space.add(stage, scaled(base, c, 16), c) if b == 0 else in_widths
            space.drive(stage, f"{path}.layers.{len(layers) + 3}")
            layers += [conv(hidden, hidden, 3, first_stride if b == 0 else 1, 1, depthwise=True),
                       APSBatchNorm2d(hidden, **bn), nn.ReLU6(inplace=True),
                       conv(hidden, out_widths, 1), APSBatchNorm2d(out_widths, **bn)]
            # As in the reference network: a residual on every block but a stage's first.
            blocks.append(InvertedResidual(nn.Sequential(*layers), residual=b > 0))
            in_widths, in_standard = out_widths, c
        parts[stage] = nn.Sequential(*blocks)
    parts["head"] = nn.Sequential(conv(in_widths, HEAD_WIDTH, 1), APSBatchNorm2d(HEAD_WIDTH, **bn),
                                  nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    parts["classifier"] = nn.Sequential(nn.Dropout(dropout),
                                        nn.Linear(HEAD_WIDTH, num_classes, device=device, dtype=dtype))
    return Supernet("mobilenetv2_imagenet", parts, space, input_size)
