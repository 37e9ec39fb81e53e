"""The runtimes a latency table (:mod:`apsfast.models.latency`) times a network on, and the
callables that run a module on one of them.

* ``torch``: eager PyTorch on the device, ``torch.no_grad``;
* ``torch.compile``: the module compiled by ``torch.compile`` (default settings) on the device;
* ``onnxruntime``: onnxruntime's CPU execution provider (the onnx extra: :data:`INSTALL_ONNX`), on the
  ONNX graph of the module: a network as ``apsfast export --onnx`` writes it
  (:func:`onnx_program`, the exporter torch.onnx runs on torch.export), a single op of a table
  written directly as its ONNX nodes (:func:`op_onnx`: Conv, BatchNormalization, Relu, Gemm,
  what the exporter writes for them; it costs milliseconds where the exporter costs seconds).

Threads are pinned for the timing: torch's intra-op threads (restored afterwards), or the
session's intra-op threads with one inter-op thread and sequential execution.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from typing import Any, Callable, Iterator, Optional, Union

import torch
from torch import nn

RUNTIMES = ("torch", "torch.compile", "onnxruntime")
#: ONNX opset of the exported graphs (``apsfast export --onnx`` too): the oldest the
#: torch.export-based exporter writes natively, read by every current runtime (onnxruntime
#: ≥ 1.14, TensorRT ≥ 8.6, OpenVINO).
OPSET = 18
INSTALL_ONNX = ("pip install onnx onnxscript onnxruntime (apsfast's onnx extra: pip install --no-build-isolation "
                "'.[onnx]' in its source folder)")
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # what the onnxruntime runtime needs


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of :data:`RUNTIMES` and can run here (onnxruntime installed)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "onnxruntime":
        missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
        if missing:
            raise ImportError(f"the onnxruntime runtime needs the package(s) {', '.join(missing)}: {INSTALL_ONNX}")
    return runtime


def runtime_device(runtime: str, device: Union[str, torch.device]) -> torch.device:
    """Where ``runtime`` runs for a run on ``device``: onnxruntime on the CPU, torch on ``device``."""
    return torch.device("cpu") if runtime == "onnxruntime" else torch.device(device)


def runtime_version(runtime: str) -> str:
    """The version of what runs the network (onnxruntime's, or torch's)."""
    if runtime == "onnxruntime":
        import onnxruntime
        return f"onnxruntime {onnxruntime.__version__}"
    return f"torch {torch.__version__}"


@contextlib.contextmanager
def pinned_threads(threads: Optional[int]) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (``None``: left as they are), restored after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def onnx_program(module: nn.Module, example: tuple[torch.Tensor, ...], opset: int = OPSET,
                 dynamic_shapes: Any = None, **names: Any) -> "torch.onnx.ONNXProgram":
    """``module`` (on the CPU, in eval mode) exported by torch.onnx's torch.export-based exporter
    at ``opset``, quietly: the exporter logs a line for each torchvision op it skips when
    torchvision is absent, and warns of torch's own deprecations. ``names``: the exporter's
    ``input_names``/``output_names``."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
            return torch.onnx.export(module, example, opset_version=opset, dynamo=True, dynamic_shapes=dynamic_shapes,
                                     verbose=False, **names)
    finally:
        registration.setLevel(level)


def op_onnx(module: nn.Sequential, input_shape: tuple[int, ...]) -> bytes:
    """The serialized ONNX model of a latency table's op (``Op.module``: a conv, its optional
    batch norm and a ReLU; a lone batch norm; a linear layer) with its weights, for inputs of
    ``input_shape``: the nodes the exporter writes for those layers, written directly."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, weights = [], []
    last = "input"

    def weight(name: str, tensor: torch.Tensor) -> str:
        weights.append(numpy_helper.from_array(tensor.detach().cpu().float().numpy(), name))
        return name

    for i, layer in enumerate(module):
        out = f"y{i}"
        if isinstance(layer, nn.Conv2d):
            inputs = [last, weight(f"w{i}", layer.weight)] + ([weight(f"b{i}", layer.bias)] if layer.bias is not None
                                                               else [])
            pads = list(layer.padding) * 2  # [top, left, bottom, right]
            nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(layer.kernel_size),
                                          strides=list(layer.stride), pads=pads, dilations=list(layer.dilation),
                                          group=layer.groups))
        elif isinstance(layer, nn.BatchNorm2d):
            inputs = [last] + [weight(f"{k}{i}", t) for k, t in (("scale", layer.weight), ("shift", layer.bias),
                                                                   ("mean", layer.running_mean),
                                                                   ("var", layer.running_var))]
            nodes.append(helper.make_node("BatchNormalization", inputs, [out], epsilon=layer.eps))
        elif isinstance(layer, nn.ReLU):
            nodes.append(helper.make_node("Relu", [last], [out]))
        elif isinstance(layer, nn.Linear):
            inputs = [last, weight(f"w{i}", layer.weight)] + ([weight(f"b{i}", layer.bias)] if layer.bias is not None
                                                               else [])
            nodes.append(helper.make_node("Gemm", inputs, [out], transB=1))
        else:
            raise TypeError(f"module holds a {type(layer).__name__}: an op of a latency table is Conv2d, "
                            f"BatchNorm2d, ReLU and Linear layers")
        last = out
    with torch.no_grad():
        output_shape = list(module(torch.zeros(input_shape)).shape)
    graph = helper.make_graph(nodes, "op", [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, output_shape)], weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def ort_session(model: bytes, threads: Optional[int]):
    """An onnxruntime CPU session of the serialized ``model``, its graph optimised fully, on
    ``threads`` intra-op threads (``None``: onnxruntime's default), one inter-op thread."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def runner(module: nn.Module, x: torch.Tensor, runtime: str, threads: Optional[int] = None, *,
           op: bool = False) -> Callable[[], Any]:
    """A call that runs ``module`` (eval mode, on ``x``'s device) on ``x`` on ``runtime``, ready
    to time (compiled or exported and run once). ``op``: ``module`` is a latency table's op,
    written to ONNX directly (:func:`op_onnx`) rather than exported. For the torch runtimes the
    caller pins the threads (:func:`pinned_threads`) around the timing; an onnxruntime session
    pins its own."""
    check_runtime(runtime)
    module = module.eval()
    if runtime == "onnxruntime":
        cpu = module.to("cpu")
        if op:
            model = op_onnx(cpu, tuple(x.shape))
        else:
            model = onnx_program(cpu, (x.cpu(),)).model_proto.SerializeToString()
        session = ort_session(model, threads)
        feed = {session.get_inputs()[0].name: x.detach().cpu().numpy()}
        call: Callable[[], Any] = lambda: session.run(None, feed)  # noqa: E731
    else:
        run = torch.compile(module) if runtime == "torch.compile" else module

        def call() -> Any:
            with torch.no_grad():
                return run(x)
    with pinned_threads(threads if runtime != "onnxruntime" else None):
        call()  # compiles (torch.compile), allocates (onnxruntime)
    return call
