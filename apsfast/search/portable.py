"""The program inside an exported ``model.pt`` that loads with torch alone, and the tracing the
deploy formats share (:mod:`apsfast.search.deploy`).

An exported ``model.pt`` (``kind: "exported"``, written by a search and by a retrain) holds
the static network's ``state_dict`` with what rebuilds it through apsfast (``model``,
``options``, ``arch``: :func:`~apsfast.search.result.load_exported`, which reads tensors and
plain containers only). It also holds, for use without apsfast:

* ``input_shape``: ``[C, H, W]`` of one image;
* ``program``: the bytes of ``torch.export.save`` of the network in eval mode on the CPU, the
  batch dimension dynamic, with its weights left out (meta tensors: ``state_dict`` holds them
  once), and ``program_torch``, the torch version that wrote it. Rebuilt with torch alone::

      state = torch.load("model.pt", weights_only=True)
      model = torch.export.load(io.BytesIO(state["program"])).module()
      model.load_state_dict(state["state_dict"], assign=True)

A program covers every network apsfast exports, a converted user model's graph included,
without the code that defined it. ``torch.export.load`` unpickles parts of a program, so
apsfast never calls it on a file it is handed: :func:`~apsfast.search.deploy.load_model`
rebuilds through ``load_exported``. A network ``torch.export`` cannot trace is saved without a program, with a
warning.
"""
from __future__ import annotations

import copy
import io
import warnings
from typing import Sequence

import torch
from torch import nn

#: The dynamic-shape specification of a network's one input: its batch dimension.
BATCH = ({0: torch.export.Dim("batch")},)


def input_shape_of(net) -> list[int]:
    """``[C, H, W]`` of one input image of a supernet's networks (``input_size`` an int or ``(H, W)``)."""
    size = net.input_size
    hw = list(size) if isinstance(size, (tuple, list)) else [size, size]
    return [int(net.in_channels), *map(int, hw)]


def check_shape(input_shape: Sequence[int]) -> list[int]:
    """``input_shape`` as a list, checked: ``[C, H, W]`` of one image, three ints > 0."""
    shape = list(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                                   for s in shape):
        raise ValueError(f"input_shape must be [C, H, W], three ints > 0 (one image), got {input_shape!r}")
    return shape


def for_tracing(model: nn.Module, input_shape: Sequence[int]) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """A copy of ``model`` on the CPU in eval mode and float32, and an example input: a batch
    of 2 (torch.export takes a size-1 dimension for a constant)."""
    with warnings.catch_warnings():  # torch's own deprecation, met copying a torch.export.load module
        warnings.filterwarnings("ignore", message=".*LeafSpec", category=FutureWarning)
        static = copy.deepcopy(model).to("cpu", torch.float32, memory_format=torch.contiguous_format)
    try:
        static.eval()
    except NotImplementedError:  # torch.export.load's module refuses: it is an inference graph already
        pass
    return static, (torch.zeros(2, *check_shape(input_shape)),)


def trace_program(model: nn.Module, input_shape: Sequence[int]) -> torch.export.ExportedProgram:
    """``model`` as a ``torch.export`` program on the CPU in eval mode and float32, for inputs
    ``[N, *input_shape]`` with the batch size ``N`` dynamic (``model`` itself is left as it is)."""
    static, example = for_tracing(model, input_shape)
    return torch.export.export(static, example, dynamic_shapes=BATCH, strict=False)


def _weight_free(program: torch.export.ExportedProgram) -> bytes:
    """``torch.export.save`` of ``program`` with every state-dict tensor replaced by a meta
    tensor of its shape (the weights, kept in ``model.pt``'s ``state_dict``, are not stored
    twice) and without its example input (a batch of images)."""
    program.example_inputs = None
    for name, tensor in list(program.state_dict.items()):
        empty = torch.empty_like(tensor, device="meta")
        program.state_dict[name] = nn.Parameter(empty, tensor.requires_grad) if isinstance(tensor, nn.Parameter) \
            else empty
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def program_entries(static: nn.Module, input_shape: Sequence[int]) -> dict:
    """What ``model.pt`` carries besides the weights so that torch alone loads it:
    ``input_shape`` and, where ``torch.export`` traces ``static``, the weight-free ``program``
    with ``program_torch``. A network it cannot trace gets a warning and no program."""
    entries: dict = {"input_shape": list(input_shape)}
    try:
        program = trace_program(static, input_shape)
        names = {k: tuple(v.shape) for k, v in static.state_dict().items()}
        traced = {k: tuple(v.shape) for k, v in program.state_dict.items()}
        if traced != names:  # the recipe loads state_dict into the program's module: the names must agree
            raise RuntimeError(f"the program's tensors differ from the state dict's: "
                               f"{sorted(set(traced) ^ set(names))[:4]}")
        entries.update(program=_weight_free(program), program_torch=str(torch.__version__))
    except Exception as error:  # torch.export raises many kinds; the weights are saved regardless
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        warnings.warn(f"model.pt is saved without a torch.export program ({type(error).__name__}: {first[:300]}): "
                      f"it loads with apsfast (load_exported) but not with torch alone", RuntimeWarning,
                      stacklevel=2)
    return entries
