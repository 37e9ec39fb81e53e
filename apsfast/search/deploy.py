"""Deploying a searched network: ONNX and ``torch.export`` (``.pt2``) files of a run's
network, its retrained one or a module (the program inside ``model.pt`` that loads with torch
alone: :mod:`apsfast.search.portable`)."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from apsfast.models.registry import CONVERTED
from apsfast.models.runtime import INSTALL_ONNX, OPSET, onnx_program
from apsfast.search.checkpoint import load_checkpoint
from apsfast.search.portable import BATCH, check_shape, for_tracing, input_shape_of, trace_program
from apsfast.search.result import MODEL, RESULT, load_exported

#: Where ``apsfast train RUN`` puts the retrained chosen arch, inside the search's folder.
RETRAINED = Path("retrain") / "retrained.pt"
ONNX_PACKAGES = ("onnx", "onnxscript")  # what writing a file needs (onnxruntime runs it)
Source = Union[str, os.PathLike, nn.Module]


def find_model(source: Union[str, os.PathLike], searched: bool = False) -> tuple[Path, str]:
    """The exported model file ``source`` names, and which one it is in words.

    ``source`` is a search's folder (its retrained model, ``retrain/retrained.pt``, where
    ``apsfast train`` has finished one and ``searched`` is false; else its ``model.pt``: the
    chosen arch with the supernet's weights), a retrain's folder (``retrained.pt``), or an
    exported ``.pt`` file (a search's ``model.pt`` or a retrain's ``retrained.pt``)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if searched:
            raise ValueError(f"searched (--searched) goes with a search's folder, got the file {str(path)!r}")
        return path, str(path)
    if not path.is_dir():
        raise FileNotFoundError(f"no run or model at {str(path)!r}: expected a search's folder, a retrain's folder or "
                                f"an exported model.pt / retrained.pt")
    retrained = path / RETRAINED.name
    if retrained.is_file():  # a retrain's folder
        if searched:
            raise ValueError(f"{str(path)!r} is a retrain's folder; searched (--searched) goes with a search's "
                             f"folder")
        return retrained, f"the retrained model {retrained}"
    if (path / RESULT).is_file() or (path / MODEL).is_file():
        if not searched and (path / RETRAINED).is_file():
            return path / RETRAINED, f"the retrained model {path / RETRAINED}"
        if (path / MODEL).is_file():
            what = "the searched model" + ("" if searched else " (no finished retrain in retrain/)")
            return path / MODEL, f"{what} {path / MODEL}"
        raise FileNotFoundError(f"{str(path)!r} holds no {MODEL}: the search has not finished (resume it with "
                                f"apsfast search --resume --out {path})")
    raise FileNotFoundError(f"{str(path)!r} is not a run: it holds no {RESULT}, {MODEL} or {RETRAINED.name}")


@dataclass
class Deployable:
    """A network to deploy (the exports trace a copy of it on the CPU in eval mode), the shape
    of one input image, and what it is in words."""

    module: nn.Module
    input_shape: list[int]
    source: str


def load_model(source: Source, *, searched: bool = False,
               input_shape: Optional[Sequence[int]] = None) -> Deployable:
    """The network to deploy from ``source``: a run folder or an exported file (see
    :func:`find_model`; rebuilt by :func:`~apsfast.search.result.load_exported`, tensors only),
    or an ``nn.Module`` with ``input_shape`` ``[C, H, W]``."""
    if isinstance(source, nn.Module):
        if input_shape is None:
            raise ValueError("input_shape [C, H, W] is required with a module (a run's model.pt records its own)")
        return Deployable(source, check_shape(input_shape), type(source).__name__)
    path, what = find_model(source, searched)
    state = load_checkpoint(path, expect={"kind": "exported"})
    if str(state["model"]).startswith(CONVERTED):
        raise ValueError(f"{str(path)!r} holds {state['model']}, a supernet made by apsfast.convert in Python, which "
                         f"apsfast cannot rebuild: load it with torch alone (docs/deploy.md) and pass the module "
                         f"to apsfast.search.export_onnx(module, path, input_shape={state.get('input_shape')})")
    module = load_exported(path).eval()
    shape = state.get("input_shape")
    if shape is None:  # written before model.pt recorded it
        from apsfast import models
        shape = input_shape_of(models.build(state["model"], device="meta", **state["options"]))
    return Deployable(module, check_shape(input_shape if input_shape is not None else shape), what)


def output_path(path: Union[str, os.PathLike]) -> Path:
    """``path`` checked as a file to write: not a folder, in a folder that exists."""
    out = Path(os.path.expanduser(str(path)))
    if out.is_dir():
        raise IsADirectoryError(f"{str(out)!r} is a folder: pass the file to write, e.g. {out / 'model.onnx'}")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"no folder {str(out.parent)!r} to write {out.name!r} in")
    return out


def _written(out: Path, write) -> Path:
    """``write(tmp)`` then ``tmp`` renamed to ``out``: a reader never sees a partial file."""
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")  # torch.export.save wants its .pt2 suffix
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def check_onnx_export(opset: int = OPSET) -> None:
    """Raise unless ONNX export can run: its packages installed, ``opset`` an int ≥ :data:`OPSET`."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < OPSET:
        raise ValueError(f"opset must be an int >= {OPSET} (the oldest the torch.export-based exporter writes), "
                         f"got {opset!r}")
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"ONNX export needs the package(s) {', '.join(missing)}: {INSTALL_ONNX}")


def write_onnx(model: Deployable, path: Union[str, os.PathLike], opset: int = OPSET) -> Path:
    """:func:`export_onnx` of a loaded network."""
    check_onnx_export(opset)
    out = output_path(path)
    static, example = for_tracing(model.module, model.input_shape)
    program = onnx_program(static, example, opset, dynamic_shapes=BATCH, input_names=["input"],
                           output_names=["logits"])
    return _written(out, lambda tmp: program.save(str(tmp), external_data=False))


def write_pt2(model: Deployable, path: Union[str, os.PathLike]) -> Path:
    """:func:`export_pt2` of a loaded network."""
    out = output_path(path)
    program = trace_program(model.module, model.input_shape)
    return _written(out, lambda tmp: torch.export.save(program, tmp))


def onnx_difference(model: Deployable, path: Union[str, os.PathLike], batch: int = 3, seed: int = 0) -> float:
    """The largest absolute difference between the ONNX file at ``path`` run by onnxruntime and
    ``model`` on a random batch (needs ``onnxruntime``)."""
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"checking an ONNX file needs onnxruntime: {INSTALL_ONNX}") from None
    static, _ = for_tracing(model.module, model.input_shape)
    x = torch.randn(batch, *model.input_shape, generator=torch.Generator().manual_seed(seed))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = static(x)
    return float((torch.from_numpy(got) - want).abs().max())


def export_onnx(source: Source, path: Union[str, os.PathLike], *, searched: bool = False,
                input_shape: Optional[Sequence[int]] = None, opset: int = OPSET) -> Path:
    """Write the network of ``source`` (a run folder, an exported file or a module: see
    :func:`load_model`) to ``path`` as one ONNX file: input ``"input"`` of shape
    ``[batch, C, H, W]`` (``batch`` dynamic), output ``"logits"``, eval mode, float32, opset
    ``opset``. Needs the ``onnx`` and ``onnxscript`` packages (:data:`INSTALL_ONNX`).
    Returns the path written."""
    check_onnx_export(opset)
    output_path(path)
    return write_onnx(load_model(source, searched=searched, input_shape=input_shape), path, opset)


def export_pt2(source: Source, path: Union[str, os.PathLike], *, searched: bool = False,
               input_shape: Optional[Sequence[int]] = None) -> Path:
    """Write the network of ``source`` (see :func:`load_model`) to ``path`` as a ``torch.export``
    program with its weights (``torch.export.load(path).module()``; for ExecuTorch or
    AOTInductor), eval mode, float32, the batch dimension dynamic. Returns the path written."""
    output_path(path)
    return write_pt2(load_model(source, searched=searched, input_shape=input_shape), path)
