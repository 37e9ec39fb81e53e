"""Drop-in APS layers."""
from apsfast.nn.base import SHARING, TRANSITION_NOISE, APSLayer, CandidateTransforms, default_meta_width
from apsfast.nn.conv import APSConv2d
from apsfast.nn.linear import APSLinear
from apsfast.nn.network import (aps_layers, network_sharing_floor, network_sharing_level, network_transition_step,
                                prebuild_kernels)
from apsfast.nn.norm import APSBatchNorm2d, sync_batch_norm

__all__ = ["APSConv2d", "APSBatchNorm2d", "APSLinear", "APSLayer", "CandidateTransforms",
           "SHARING", "TRANSITION_NOISE", "default_meta_width", "aps_layers", "network_sharing_floor",
           "network_sharing_level", "network_transition_step", "prebuild_kernels", "sync_batch_norm"]
