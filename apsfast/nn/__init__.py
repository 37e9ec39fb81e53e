"""Drop-in APS layers."""
from apsfast.nn.base import SHARING, APSLayer, CandidateTransforms, default_meta_width
from apsfast.nn.conv import APSConv2d
from apsfast.nn.linear import APSLinear
from apsfast.nn.norm import APSBatchNorm2d

__all__ = ["APSConv2d", "APSBatchNorm2d", "APSLinear", "APSLayer", "CandidateTransforms",
           "SHARING", "default_meta_width"]
