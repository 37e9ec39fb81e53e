"""Search spaces: APS supernets of standard networks, their architecture encoding, their cost
(MACs and parameters of any architecture) and their export to a static network.

>>> net = apsfast.models.build("resnet20_cifar")
>>> arch = net.sample_uniform(torch.Generator().manual_seed(0))
>>> net.set_arch(arch); net.flops(arch); static = net.export(arch)
"""
from apsfast.models import mobilenetv2, resnet  # noqa: F401  (registers the models)
from apsfast.models.base import Arch, Decision, Supernet
from apsfast.models.converter import convert
from apsfast.models.cost import LayerShape, count_macs
from apsfast.models.mobilenetv2 import InvertedResidual
from apsfast.models.registry import available, build, options_of
from apsfast.models.resnet import BasicBlock

__all__ = ["Arch", "BasicBlock", "Decision", "InvertedResidual", "LayerShape", "Supernet",
           "available", "build", "convert", "count_macs", "options_of"]
