"""Rewrites of a traced graph into the forms the channel rules know.

Layers that subclass a torch layer but write their own ``forward`` (timm's ``BatchNormAct2d``:
``F.batch_norm``, then its activation; timm's ``Linear``: ``F.linear``) trace into a functional
call on the module's parameters and buffers. The call is put back into a plain
``nn.BatchNorm2d`` / ``nn.Linear`` that holds those same tensors under the module's own name, so
that the channel rules, the per-width statistics and the export (state-dict keys included) treat
it as any other such layer; what the subclass does after it (the activation) stays in the graph.
Tracing also froze the subclass's training flag into the call's arguments; as a module call it
follows ``train()``/``eval()`` again.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

_BATCH_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")


def functional_layers(module: fx.GraphModule) -> None:
    """Replace every ``F.batch_norm`` and ``F.linear`` whose tensors are one submodule's
    attributes by a call of an ``nn.BatchNorm2d`` / ``nn.Linear`` owning them (in place); leave
    any other call alone (its rule, or its refusal, is the channel analysis's)."""
    for node in list(module.graph.nodes):
        if node.op == "call_function" and node.target is F.batch_norm:
            _module_batch_norm(module, node)
        elif node.op == "call_function" and node.target is F.linear:
            _module_linear(module, node)
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
    if type(owner) in (nn.BatchNorm2d, nn.Linear):
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
