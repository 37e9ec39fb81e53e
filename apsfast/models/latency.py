"""Latency of an architecture, predicted from a table of its layers' latencies measured once on
the device that will run it.

**The table.** Each distinct op that any arch of the space can contain
(:mod:`apsfast.models.layer_ops`: a conv with its batch norm and activation, a linear layer,
a lone batch norm, at its input resolution) is built as a plain module and timed at ``batch``
images on the device: the median of ``repeats`` timings after ``warmup`` calls (each timing
long enough to read: short ops are timed over several calls; CUDA through events after a
synchronize). What no entry covers (the stem's input, pooling, additions, the Python of the
module tree) is a constant, ``rest_ms``: the median over the narrowest, the standard and the
widest arch of the exported network's measured latency minus the sum of its entries. An arch's
predicted latency is ``rest_ms`` plus the sum of its layers' entries
(:meth:`LatencyTable.predict`). An op that an arch still brings (a coupling the enumeration of
:func:`~apsfast.models.layer_ops.space_ops` did not reveal) is timed when first asked for
(``LatencyTable.late`` counts them).

**The cache.** :func:`load_or_measure` keeps the table as JSON (``latency.json`` in a search's
folder) with what it was measured for (:func:`table_key`: device name, batch, threads, torch
version, the space's model, options and decisions); a table whose key differs is measured
again.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from apsfast import _checks
from apsfast.models.base import Supernet
from apsfast.models.layer_ops import Geometry, Op, input_hw, layer_ops, space_ops
from apsfast.models.static import reinitialise

FORMAT = 1  # of the JSON file; a table of another format is measured again
WARMUP, REPEATS = 3, 7
REPEAT_SECONDS = 2e-3  # a timing at least this long: short ops are timed over several calls
MAX_NUMBER = 1000  # calls per timing at most
CACHE_SIZE = 4096  # archs whose prediction a table remembers
REST = "(rest)"  # the name of the constant in :meth:`LatencyTable.layer_latency`

Progress = Callable[[int, str], Any]  # (total, description) -> a bar with update() and close()


# --- timing -------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: Union[str, torch.device], repeats: int = REPEATS,
            warmup: int = WARMUP) -> float:
    """Median milliseconds per call of ``fn`` on ``device`` over ``repeats`` timings after
    ``warmup`` calls; each timing runs enough calls to last about ``REPEAT_SECONDS``."""
    device = torch.device(device)
    for _ in range(max(warmup, 1)):
        fn()
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    number = max(1, min(MAX_NUMBER, int(REPEAT_SECONDS / max(time.perf_counter() - started, 1e-7))))
    samples = []
    for _ in range(max(repeats, 1)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / number)
        else:
            started = time.perf_counter()
            for _ in range(number):
                fn()
            samples.append((time.perf_counter() - started) * 1e3 / number)
    return statistics.median(samples)


def own_rng(device: Union[str, torch.device]):
    """A context in which random draws leave the global generators (CPU and ``device``'s) as
    they were: measuring changes nothing a seeded run draws afterwards."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def measure_op(op: Op, batch: int, device: Union[str, torch.device], repeats: int = REPEATS,
               warmup: int = WARMUP) -> float:
    """Milliseconds of ``op`` on ``batch`` images on ``device`` (see :func:`time_ms`)."""
    with own_rng(device), torch.no_grad():
        module, x = op.module(device), op.input(batch, device)
        return time_ms(lambda: module(x), device, repeats, warmup)


def measure_network(module: nn.Module, batch: int, in_channels: int, hw: Sequence[int],
                    device: Union[str, torch.device], repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Milliseconds of a static network's eval-mode forward on ``batch`` random images."""
    module = module.eval()
    with own_rng(device), torch.no_grad():
        x = torch.randn(batch, in_channels, *hw, device=device)
        return time_ms(lambda: module(x), device, repeats, warmup)


def static_network(net: Supernet, arch: Sequence[int], device: Union[str, torch.device]) -> nn.Module:
    """``net.export(arch)`` freshly initialised on ``device`` in eval mode (through the meta
    device when the supernet lives there: no weights are computed for nothing)."""
    static = net.export(arch, inherit_weights=False)
    if any(p.is_meta for p in static.parameters()):
        static = reinitialise(static.to_empty(device=device))
    return static.to(device).eval()


def device_name(device: Union[str, torch.device]) -> str:
    """The GPU's name, or the CPU's model (what a latency is measured on)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}".strip() or "cpu"


# --- the table --------------------------------------------------------------------------

def table_key(net: Supernet, batch: int, device: Union[str, torch.device]) -> dict[str, Any]:
    """What a table is valid for: the device, batch, threads, torch version and the space."""
    device = torch.device(device)
    key = {"format": FORMAT, "device": device_name(device), "device_type": device.type, "batch": batch,
           "threads": torch.get_num_threads() if device.type == "cpu" else None, "torch": torch.__version__,
           "model": net.name, "options": net.options, "input_size": net.input_size,
           "decisions": [[d.name, list(d.widths)] for d in net.decisions()]}
    return json.loads(json.dumps(key, default=str))  # as it reads back from the file


class LatencyTable:
    """Predicted latency (ms at ``batch`` images on ``device``) of any arch of ``net``: the
    measured entries of its layers' ops plus ``rest_ms`` (see the module's documentation).
    Build one with :meth:`measure` or :func:`load_or_measure`."""

    def __init__(self, net: Supernet, entries: dict[str, float], rest_ms: float, *, batch: int,
                 device: Union[str, torch.device], geometry: Geometry, key: Optional[dict[str, Any]] = None,
                 repeats: int = REPEATS, warmup: int = WARMUP) -> None:
        self.net, self.entries, self.rest_ms = net, dict(entries), float(rest_ms)
        self.batch, self.device = batch, torch.device(device)
        self.geometry = geometry
        self.key = key if key is not None else table_key(net, batch, device)
        self.repeats, self.warmup = repeats, warmup
        self.late = 0  # ops timed when first asked for, after the table was built
        self._cache: dict[tuple[int, ...], float] = {}

    # --- what an arch runs --------------------------------------------------------------

    def layer_ops(self, arch: Sequence[int]) -> dict[str, Op]:
        """``{layer: op}`` of ``export(arch)`` (:func:`~apsfast.models.layer_ops.layer_ops`)."""
        return layer_ops(self.net, self.geometry, arch)

    def layer_keys(self, arch: Sequence[int]) -> dict[str, str]:
        """``{layer: op key}`` of ``arch`` (what a layer's latency depends on), and the constant
        under :data:`REST`: the layers of :meth:`layer_latency`."""
        return {**{name: op.key() for name, op in self.layer_ops(arch).items()}, REST: REST}

    def entry(self, op: Op) -> float:
        """The measured milliseconds of ``op``, timing it now if the table lacks it."""
        key = op.key()
        if key not in self.entries:
            self.entries[key] = measure_op(op, self.batch, self.device, self.repeats, self.warmup)
            self.late += 1
        return self.entries[key]

    def layer_latency(self, arch: Sequence[int]) -> dict[str, float]:
        """``{layer: ms}`` of ``arch``, and the constant under :data:`REST`; they sum to
        :meth:`predict`."""
        out = {name: self.entry(op) for name, op in self.layer_ops(arch).items()}
        out[REST] = self.rest_ms
        return out

    def predict(self, arch: Sequence[int]) -> float:
        """Predicted milliseconds of ``export(arch)`` at ``batch`` images: ``rest_ms`` plus the
        entries of its layers' ops (remembered per arch)."""
        arch = tuple(self.net.check_arch(arch))
        if arch not in self._cache:
            if len(self._cache) >= CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[arch] = sum(self.layer_latency(arch).values())
        return self._cache[arch]

    __call__ = predict

    # --- measuring --------------------------------------------------------------------------

    @classmethod
    def measure(cls, net: Supernet, batch: int, device: Union[str, torch.device], *, repeats: int = REPEATS,
                warmup: int = WARMUP, progress: Optional[Progress] = None) -> "LatencyTable":
        """Time every op any arch of ``net`` contains at ``batch`` images on ``device``, and the
        constant (see the module's documentation). ``progress(total, description)`` makes a
        progress bar (``update(n)``, ``close()``)."""
        batch = _checks.positive_int("batch", batch)
        device = torch.device(device)
        anchors = [net.min_arch(), net.standard_arch(), net.max_arch()]
        geometry, ops = space_ops(net, anchors)
        table = cls(net, {}, 0.0, batch=batch, device=device, geometry=geometry, repeats=repeats, warmup=warmup)
        bar = progress(len(ops) + len(anchors), f"latency table ({len(ops)} ops at batch {batch} on "
                                                f"{device.type})") if progress else None
        for key, op in ops.items():
            table.entries[key] = measure_op(op, batch, device, repeats, warmup)
            if bar is not None:
                bar.update(1)
        residuals = []
        for arch in anchors:
            with own_rng(device):
                static = static_network(net, arch, device)
            measured = measure_network(static, batch, net.in_channels, input_hw(net), device, repeats, warmup)
            residuals.append(measured - sum(table.entries[op.key()] for op in table.layer_ops(arch).values()))
            del static
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        table.rest_ms = statistics.median(residuals)
        return table

    # --- the file ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "rest_ms": self.rest_ms, "repeats": self.repeats, "warmup": self.warmup,
                "entries": self.entries, "geometry": self.geometry.to_json()}

    @classmethod
    def from_json(cls, net: Supernet, obj: dict[str, Any], device: Union[str, torch.device]) -> "LatencyTable":
        geometry = Geometry.from_json(obj["geometry"])
        return cls(net, {k: float(v) for k, v in obj["entries"].items()}, obj["rest_ms"], batch=obj["key"]["batch"],
                   device=device, geometry=geometry, key=obj["key"], repeats=obj.get("repeats", REPEATS),
                   warmup=obj.get("warmup", WARMUP))

    def save(self, path: Union[str, Path]) -> None:
        """The table as JSON at ``path``, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


def load_or_measure(path: Union[str, Path], net: Supernet, batch: int, device: Union[str, torch.device], *,
                    repeats: int = REPEATS, warmup: int = WARMUP, progress: Optional[Progress] = None,
                    save: bool = True) -> tuple[LatencyTable, str]:
    """The table cached at ``path`` when it was measured for the same :func:`table_key`, else a
    new one measured and written there (with ``save``). Returns it and a line saying which."""
    path = Path(path)
    key = table_key(net, batch, device)
    why = f"no table at {path}"
    if path.is_file():
        try:
            obj = json.loads(path.read_text())
            old = obj.get("key", {}) if isinstance(obj, dict) else {}
        except (OSError, json.JSONDecodeError):
            obj, old = None, {}
        if old == key:
            try:
                table = LatencyTable.from_json(net, obj, device)
                return table, f"latency table read from {path} ({len(table.entries)} ops, {key['device']})"
            except (KeyError, TypeError, ValueError):
                why = f"{path} is damaged"
        else:
            diff = [k for k in key if old.get(k) != key[k]]
            why = f"{path} was measured for another {', '.join(diff) or 'format'}" if old else f"{path} is damaged"
    started = time.perf_counter()
    table = LatencyTable.measure(net, batch, device, repeats=repeats, warmup=warmup, progress=progress)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table, (f"latency table measured ({why}): {len(table.entries)} ops at batch {batch} on {key['device']} "
                   f"in {time.perf_counter() - started:.1f} s, written to {path}" if save else "")
