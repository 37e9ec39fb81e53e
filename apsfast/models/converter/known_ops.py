"""What convert knows of each op: the tables the channel rules dispatch on.

An op in none of these tables has no channel rule and is pinned
(:mod:`apsfast.models.converter.channels`).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from apsfast.models.converter.rewrite import StandardisedConv2d


#: The tuple an op without a channel rule returns (``torch.split`` …): each item keeps its width.
PINNED = "pinned"
#: Ops that scale or drop whole samples: a per-sample op keeps the channel layout.
PER_SAMPLE_NAMES = {"stochastic_depth", "drop_path"}

#: A tensor attribute of the model (``get_attr``), or what unary ops and reshapes make of it:
#: its values are tied to the original channels, so whatever it meets element-wise across the
#: channel dim keeps its width.
CONSTANT = "constant"

UNARY_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh,
    F.silu, F.gelu, F.mish, F.hardswish, F.hardsigmoid, F.softplus, torch.sigmoid, F.sigmoid,
    torch.tanh, F.tanh, torch.neg, operator.neg, operator.pos, torch.abs, torch.exp, torch.clamp,
    torch.clip, F.dropout, F.dropout2d, F.alpha_dropout, F.max_pool2d, F.avg_pool2d,
    F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.interpolate, F.softmax, F.log_softmax,
    torch.softmax, torch.log_softmax,
}
UNARY_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "neg",
    "abs", "exp", "contiguous", "clone", "detach", "float", "double", "half", "to", "type_as",
    "softmax", "log_softmax",
}
ELEMENTWISE_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
ELEMENTWISE_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum",
                       "minimum", "expand_as"}
CAT_FUNCTIONS = {torch.cat, torch.concat}
# Reshapes given explicit sizes may carry the channel count as a constant: rewritten.
SIZED_RESHAPES = {"view", "reshape", torch.reshape}
RESHAPES = SIZED_RESHAPES | {"flatten", "squeeze", "unsqueeze", torch.flatten, torch.squeeze,
                             torch.unsqueeze}
REDUCTIONS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
PERMUTES = {"permute", torch.permute}
#: The conv modules with a rule (a standardised one only dense: its APS form is one layer).
CONVS = (nn.Conv2d, StandardisedConv2d)
#: A permute to channels-last, and back: (N, C, H, W) -> (N, H, W, C) -> (N, C, H, W).
TO_LAST, FROM_LAST = (0, 2, 3, 1), (0, 3, 1, 2)
SIZE_QUERIES = {"size", "dim", getattr}
WIDTH_PRESERVING_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
    nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.Softmax,
    nn.LogSoftmax,
)
