"""Rewrites of a traced graph into the forms the channel rules know.

Layers that subclass a torch layer but write their own ``forward`` (timm's ``BatchNormAct2d``:
``F.batch_norm``, then its activation; timm's ``Linear``: ``F.linear``) trace into a functional
call on the module's parameters and buffers. The call is put back into a plain
``nn.BatchNorm2d`` / ``nn.Linear`` that holds those same tensors under the module's own name, so
that the channel rules, the per-width statistics and the export (state-dict keys included) treat
it as any other such layer; what the subclass does after it (the activation) stays in the graph.
Tracing also froze the subclass's training flag into the call's arguments; as a module call it
follows ``train()``/``eval()`` again.

A functional ``conv2d`` on a module's weight becomes an ``nn.Conv2d`` the same way (timm's
``Conv2dSame`` pads, then calls it), and one on a weight *standardised* per output filter
(timm's ``StdConv2d`` and ``ScaledStdConv2d`` of its normaliser-free networks:
``F.batch_norm`` over each filter, times ``gain · scale``) a :class:`StandardisedConv2d`,
which keeps doing that to its weight.
"""
from __future__ import annotations

import numbers
import operator
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")
_CONV_FUNCTIONS = (torch.conv2d, F.conv2d)


def standardise(weight: torch.Tensor, gain: Optional[torch.Tensor], scale: float, eps: float) -> torch.Tensor:
    """``weight`` ``[C_out, C_in, kh, kw]`` standardised per output filter (zero mean, unit
    variance over ``C_in·kh·kw``), times ``gain · scale`` per filter (``gain`` of ``C_out``
    elements, or ``None``): timm's ``ScaledStdConv2d``, op for op."""
    g = None if gain is None else (gain * scale).view(-1)
    return F.batch_norm(weight.reshape(1, weight.shape[0], -1), None, None, weight=g, bias=None, training=True,
                        momentum=0.0, eps=eps).reshape_as(weight)


class StandardisedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is :func:`standardise`-d before every use (weight
    standardisation, as in timm's normaliser-free networks); ``gain``: ``[C_out, 1, 1, 1]`` or
    ``None``."""

    def __init__(self, *args, eps: float = 1e-5, scale: float = 1.0, gain: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eps, self.scale = float(eps), float(scale)
        self.gain = nn.Parameter(torch.ones(self.out_channels, 1, 1, 1, device=self.weight.device,
                                            dtype=self.weight.dtype)) if gain else None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if getattr(self, "gain", None) is not None:
            nn.init.ones_(self.gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardise(self.weight, self.gain, self.scale, self.eps), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, eps={self.eps}, scale={self.scale}, gain={self.gain is not None}"


def functional_layers(module: fx.GraphModule) -> None:
    """Replace every ``F.batch_norm``, ``F.linear`` and ``conv2d`` whose tensors are one
    submodule's attributes by a call of an ``nn.BatchNorm2d`` / ``nn.Linear`` / ``nn.Conv2d``
    (:class:`StandardisedConv2d` for a standardised weight) owning them (in place); leave any
    other call alone (its rule, or its refusal, is the channel analysis's)."""
    for node in list(module.graph.nodes):
        if node.op == "call_function" and node.target is F.batch_norm:
            _module_batch_norm(module, node)
        elif node.op == "call_function" and node.target is F.linear:
            _module_linear(module, node)
        elif node.op == "call_function" and node.target in _CONV_FUNCTIONS:
            _module_conv(module, node)
    module.graph.lint()
    module.recompile()


def _owned(module: fx.GraphModule, tensors: dict[str, Optional[fx.Node]]) -> Optional[tuple[str, nn.Module]]:
    """The path and container of the one submodule whose attributes all ``tensors`` are."""
    sources = [t for t in tensors.values() if t is not None]
    if not all(isinstance(t, fx.Node) and t.op == "get_attr" for t in sources):
        return None  # computed in the graph: no module to put them in
    owners = {t.target.rpartition(".")[0] for t in sources}
    if len(owners) != 1:
        return None
    path = owners.pop()
    owner = module.get_submodule(path) if path else module
    if type(owner) in (nn.BatchNorm2d, nn.Linear, nn.Conv2d, StandardisedConv2d):
        return None  # a second call on tensors already put back into a module: left to the analysis
    return path, owner


def _module_linear(module: fx.GraphModule, node: fx.Node) -> None:
    tensors = {"weight": _argument(node, 1, "weight"), "bias": _argument(node, 2, "bias")}
    found = _owned(module, tensors)
    if found is None or tensors["weight"] is None:
        return
    owner_path, owner = found
    weight = getattr(owner, tensors["weight"].target.rpartition(".")[2])
    bias = None if tensors["bias"] is None else getattr(owner, tensors["bias"].target.rpartition(".")[2])
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight, linear.bias = weight, bias
    _replace(module, node, owner_path, owner, "linear", linear, tensors)


def _scaled(node: object) -> Optional[tuple[fx.Node, float]]:
    """``(attribute, scale)`` where ``node`` computes ``attribute · scale`` (flattened)."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":
        return node, 1.0
    if node.op == "call_method" and node.target in ("view", "reshape", "flatten") and \
            node.args[1:] in ((), (-1,), ((-1,),)):
        return _scaled(node.args[0])
    if node.op == "call_function" and node.target in (operator.mul, torch.mul) and len(node.args) == 2:
        a, b = node.args
        a, b = (a, b) if isinstance(b, numbers.Real) else (b, a)
        inner = _scaled(a) if isinstance(b, numbers.Real) and not isinstance(b, bool) else None
        return None if inner is None else (inner[0], inner[1] * float(b))
    return None


def _standardised(weight: fx.Node) -> Optional[tuple[fx.Node, Optional[tuple[fx.Node, float]], float]]:
    """``(weight attribute, (gain attribute, scale) or None, eps)`` where ``weight`` computes
    :func:`standardise` of a module's weight: ``F.batch_norm(W.reshape(1, C, -1), None, None,
    weight=(gain·scale).view(-1), training=True).reshape_as(W)``."""
    if not (weight.op == "call_method" and weight.target == "reshape_as" and len(weight.args) == 2):
        return None
    norm, attr = weight.args
    if not (isinstance(norm, fx.Node) and norm.op == "call_function" and norm.target is F.batch_norm
            and isinstance(attr, fx.Node) and attr.op == "get_attr"):
        return None
    source = norm.args[0]
    statistics = [_argument(norm, 1, "running_mean"), _argument(norm, 2, "running_var"), _argument(norm, 4, "bias")]
    if not (isinstance(source, fx.Node) and source.op == "call_method" and source.target == "reshape"
            and source.args[0] is attr and len(source.args) == 4 and source.args[1] == 1 and source.args[3] == -1
            and all(s is None for s in statistics) and _argument(norm, 5, "training", False) is True):
        return None
    gain = _argument(norm, 3, "weight")
    scaled = None if gain is None else _scaled(gain)
    if gain is not None and scaled is None:
        return None
    return attr, scaled, float(_argument(norm, 7, "eps", 1e-5))


def _module_conv(module: fx.GraphModule, node: fx.Node) -> None:
    weight = _argument(node, 1, "weight")
    if not isinstance(weight, fx.Node):
        return
    standardised = None if weight.op == "get_attr" else _standardised(weight)
    if weight.op != "get_attr" and standardised is None:
        return  # a weight computed some other way: left to the analysis (pinned)
    attr = weight if standardised is None else standardised[0]
    gain = None if standardised is None or standardised[1] is None else standardised[1][0]
    tensors = {"weight": attr, "bias": _argument(node, 2, "bias"), "gain": gain}
    found = _owned(module, tensors)
    if found is None:
        return
    owner_path, owner = found
    held = {name: getattr(owner, t.target.rpartition(".")[2]) for name, t in tensors.items() if t is not None}
    w = held["weight"]
    if w.dim() != 4 or not all(isinstance(t, nn.Parameter) for t in held.values()):
        return  # a fixed filter held in a buffer (an anti-aliasing blur): left to the analysis
    settings = dict(stride=_argument(node, 3, "stride", 1), padding=_argument(node, 4, "padding", 0),
                    dilation=_argument(node, 5, "dilation", 1), groups=_argument(node, 6, "groups", 1),
                    bias="bias" in held, device="meta")
    shape = (w.shape[1] * settings["groups"], w.shape[0], tuple(w.shape[2:]))
    if standardised is None:
        conv = nn.Conv2d(*shape, **settings)
    else:
        scale = 1.0 if standardised[1] is None else standardised[1][1]
        conv = StandardisedConv2d(*shape, eps=standardised[2], scale=scale, gain=gain is not None, **settings)
    for name, tensor in held.items():
        setattr(conv, name, tensor)
    _replace(module, node, owner_path, owner, "conv", conv, tensors)
    if standardised is not None:
        _erase_unused(module.graph, weight)


def _erase_unused(graph: fx.Graph, node: fx.Node) -> None:
    """Erase ``node`` and what only it read, once nothing reads it (a replaced weight's chain)."""
    pending, erased = [node], set()
    while pending:
        node = pending.pop()
        if node in erased or node.users or node.op in ("placeholder", "output"):
            continue
        pending += node.all_input_nodes
        graph.erase_node(node)
        erased.add(node)


def _argument(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _module_batch_norm(module: fx.GraphModule, node: fx.Node) -> None:
    tensors = {name: _argument(node, i + 1, name) for i, name in enumerate(_BATCH_NORM_TENSORS)}
    found = _owned(module, tensors)
    if found is None or tensors["running_mean"] is None:
        return
    owner_path, owner = found
    stats = {name: getattr(owner, t.target.rpartition(".")[2]) for name, t in tensors.items() if t is not None}
    # A momentum of None (a cumulative average) traces as a factor of 0.0, which as a module's
    # momentum would freeze the statistics: read back as None.
    momentum = _argument(node, 6, "momentum", 0.1)
    bn = nn.BatchNorm2d(stats["running_mean"].numel(), eps=_argument(node, 7, "eps", 1e-5),
                        momentum=momentum or None, affine="weight" in stats, device="meta")
    for name, tensor in stats.items():
        if name in ("weight", "bias"):
            setattr(bn, name, tensor)
        else:
            bn.register_buffer(name, tensor)
    counted: Optional[object] = getattr(owner, "num_batches_tracked", None)
    bn.register_buffer("num_batches_tracked", counted if counted is not None else
                       torch.zeros((), dtype=torch.long, device=stats["running_mean"].device))
    _replace(module, node, owner_path, owner, "batch_norm", bn, tensors)


def _replace(module: fx.GraphModule, node: fx.Node, owner_path: str, owner: nn.Module, name: str,
             layer: nn.Module, tensors: dict[str, Optional[fx.Node]]) -> None:
    """Call ``layer`` in place of ``node`` on its first argument, under the owner's own name, so
    that the export's state dict keeps the model's keys. What else the graph reads of the owner
    (timm's activation, ``bn1.act``) moves into ``layer``; the tensors it took over are held once."""
    taken = {t.target.rpartition(".")[2] for t in tensors.values() if t is not None}
    if owner_path:
        for child_name, child in owner.named_children():
            layer.add_module(child_name, child)
        for attr, value in owner._parameters.items():
            if attr not in taken and not hasattr(layer, attr):
                layer.register_parameter(attr, value)
        for attr, value in owner._buffers.items():
            if attr not in taken and not hasattr(layer, attr):
                layer.register_buffer(attr, value)
        parent, _, leaf = owner_path.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, leaf, layer)
        target = owner_path
    else:  # the root's own tensors: a child of its own
        target = _free_name(owner, name)
        owner.add_module(target, layer)
    with module.graph.inserting_before(node):
        call = module.graph.call_module(target, (node.args[0],))
    call.meta.update(node.meta)  # the creating submodule, for messages
    node.replace_all_uses_with(call)
    module.graph.erase_node(node)
    for source in (t for t in tensors.values() if t is not None):
        if not source.users:
            module.graph.erase_node(source)


def _free_name(owner: nn.Module, name: str) -> str:
    while hasattr(owner, name):
        name = f"{name}_"
    return name
