"""Tracing a plain model with ``torch.fx`` and recording the shape of every value.

The tracer treats excluded submodules as leaves (their inside is never traced, so whatever
they do to their channels is opaque and their widths stay fixed) and records, on every
node, the submodule whose ``forward`` created it, so that a refusal can name it. A submodule
that branches on its input's *shape* (timm's VGG head pools a map smaller than 7×7 up to it)
is traced as a leaf too: shapes are the example input's everywhere in convert, so it computes
and costs what it did on it. A branch on the values of a tensor is refused. Shapes come
from one run of the traced graph on the example input (``ShapeProp``) in eval mode, which
leaves the model's running statistics alone.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import fx, nn

from apsfast.models.converter.rewrite import functional_layers
from apsfast.models.cost import LayerShape

SCOPE = "apsfast_scope"  # node.meta key: qualified name of the submodule that made the node
SHAPE = "apsfast_shape"  # node.meta key: the shape of the node's value, if it is one tensor


class _Tracer(fx.Tracer):
    """``fx.Tracer`` with excluded submodules as leaves and the creating submodule recorded."""

    def __init__(self, exclude: Sequence[str] = ()) -> None:  # fx re-creates it to unpickle
        super().__init__()
        self.exclude = frozenset(exclude)
        self.failed_in: Optional[str] = None
        self.branch_on_shape = False  # the trace failed on a branch that reads only sizes

    def to_bool(self, obj: fx.Proxy) -> bool:
        self.branch_on_shape = _reads_only_sizes(obj.node)
        return super().to_bool(obj)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self.exclude or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module on the way out is where the trace broke: remember it.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise

    def create_proxy(self, *args, **kwargs):
        proxy = super().create_proxy(*args, **kwargs)
        proxy.node.meta[SCOPE] = self.scope.module_path
        return proxy


def _reads_only_sizes(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on tensors through their sizes alone (``x.shape``,
    ``x.size()``, ``x.dim()``), not their values."""
    pending, seen = [node], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        if (node.op == "call_function" and node.target is getattr and node.args[1:2] in (("shape",), ("ndim",))) \
                or (node.op == "call_method" and node.target in ("size", "dim")):
            continue
        if node.op in ("placeholder", "get_attr", "call_module"):
            return False
        pending += node.all_input_nodes
    return True


@dataclass
class Traced:
    """A traced model: its graph module (sharing the model's submodules), the shapes of the
    conv, batch-norm and linear layers inside the opaque leaves at the example input, and the
    submodules traced as leaves because they branch on a shape (with why)."""

    module: fx.GraphModule
    leaf_shapes: dict[str, list[LayerShape]] = field(default_factory=dict)
    shape_leaves: dict[str, str] = field(default_factory=dict)


def trace(model: nn.Module, example_input: torch.Tensor, exclude: Sequence[str]) -> Traced:
    """Trace ``model`` (leaves: ``exclude`` and torch's own layers), put functional layers back
    into modules (:mod:`apsfast.models.converter.rewrite`) and annotate every node with its
    shape (``meta[SHAPE]``) from one eval-mode run on ``example_input``.

    Raises ``ValueError`` naming the submodule where tracing failed (data-dependent control
    flow and the like) and how to proceed.
    """
    shape_leaves: dict[str, str] = {}
    while True:
        tracer = _Tracer((*exclude, *shape_leaves))
        try:
            graph = tracer.trace(model)
            break
        except Exception as error:  # TraceError (control flow on values), or any op fx cannot proxy
            where = tracer.failed_in
            if tracer.branch_on_shape and where and where not in shape_leaves:
                shape_leaves[where] = str(error).split("\n")[0]
                continue
            hint = (f"pass exclude=[{where!r}] to keep that submodule fixed and opaque (its widths are "
                    f"not searched)" if where else "rewrite the model's own forward without it")
            raise ValueError(f"convert: torch.fx cannot trace {type(model).__name__} in module "
                             f"{where or '(top level)'!r}: {error}; {hint}") from error
    module = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ValueError(f"convert: model must take exactly one tensor input, but its forward has "
                         f"{len(placeholders)} arguments {[n.target for n in placeholders]}")
    functional_layers(module)
    leaves = [n.target for n in graph.nodes if n.op == "call_module"]
    traced = Traced(module, shape_leaves=shape_leaves)
    _propagate(traced, leaves, example_input)
    return traced


def _propagate(traced: Traced, leaves: list[str], example_input: torch.Tensor) -> None:
    """Run the graph once in eval mode, recording shapes, and the layers inside opaque leaves."""
    module = traced.module
    # A batch of one would make the batch dim indistinguishable from singleton dims
    # (``squeeze()``, ``view(N, C)`` …), so shapes are taken on at least two samples.
    x = example_input if example_input.shape[0] > 1 else torch.cat([example_input] * 2)
    handles = []
    for leaf in leaves:
        # Every leaf is recorded; only the opaque ones' records are used (the searched layers
        # are costed from the graph), but which leaves are opaque is known only later.
        for sub, inner in module.get_submodule(leaf).named_modules():
            if isinstance(inner, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                name = f"{leaf}.{sub}" if sub else leaf
                handles.append(inner.register_forward_hook(_recorder(traced, leaf, name)))
    was_training = module.training
    recorder = _ShapeRecorder(module)
    try:
        module.eval()
        with torch.no_grad():
            recorder.run(x)
    except Exception as error:
        node = recorder.current
        where = f" at node {node.name!r} in module {node.meta.get(SCOPE) or '(top level)'!r}" if node else ""
        first_line = str(error).split("\n")[0]  # fx appends the graph node and a hint for tlparse
        raise ValueError(f"convert: the model fails on example_input of shape {tuple(example_input.shape)}"
                         f"{where}: {type(error).__name__}: {first_line}") from error
    finally:
        module.train(was_training)
        for handle in handles:
            handle.remove()


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records the shape of every single-tensor value."""

    current: Optional[fx.Node] = None  # the node being run, to name it if it fails

    def run_node(self, n: fx.Node):
        self.current = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta[SHAPE] = result.shape
        return result


def _recorder(traced: Traced, leaf: str, name: str):
    def record(layer: nn.Module, inputs, output) -> None:
        traced.leaf_shapes.setdefault(leaf, []).append(layer_shape(name, layer, output.shape[1:]))
    return record


def layer_shape(name: str, layer: nn.Module, out_shape: Sequence[int]) -> LayerShape:
    """The :class:`LayerShape` of a plain layer whose one-sample output has ``out_shape``."""
    if isinstance(layer, nn.BatchNorm2d):
        return LayerShape(name, "bn", layer.num_features, layer.num_features, bias=layer.affine)
    if isinstance(layer, nn.Linear):
        # A linear layer over tokens costs once per token: count them as output "pixels".
        tokens = int(torch.Size(out_shape[:-1]).numel())
        return LayerShape(name, "linear", layer.in_features, layer.out_features, out_hw=(tokens, 1),
                          bias=layer.bias is not None)
    return LayerShape(name, "conv", layer.in_channels, layer.out_channels, layer.kernel_size,
                      layer.stride, layer.groups, tuple(out_shape[1:]), layer.bias is not None)


def shape_of(node: object) -> Optional[torch.Size]:
    """The shape of a traced value, or ``None`` if it is not a single tensor."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get(SHAPE)
