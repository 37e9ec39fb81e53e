"""Latency of an architecture, predicted from a table of its layers' latencies measured once on
the runtime and device that will run it.

**The table.** Each distinct op that any arch of the space can contain
(:mod:`apsfast.models.layer_ops`: a conv with its batch norm and activation, a linear layer,
a lone batch norm, at its input resolution) is built as a plain module and timed at ``batch``
images on a runtime (:mod:`apsfast.models.runtime`: eager ``torch``, ``torch.compile``,
``onnxruntime``) with its threads pinned. Every op is first run ``warmup`` times, then timed
in ``repeats`` rounds that each time every op once (a timing runs enough calls to last
``REPEAT_SECONDS``; CUDA through events): a busy moment of the machine falls on one round of
every op rather than on all rounds of a few. An entry is the median of its rounds, with its
spread (the interquartile range over the median). What no entry covers (the stem's input,
pooling, additions, the Python of the module tree) is a constant, ``rest_ms``: the median over
the narrowest, the standard and the widest arch of the exported network's measured latency on
the same runtime minus the sum of its entries. An arch's predicted latency is ``rest_ms`` plus
the sum of its layers' entries (:meth:`LatencyTable.predict`). An op that an arch still brings
(a coupling the enumeration of :func:`~apsfast.models.layer_ops.space_ops` did not reveal) is
timed when first asked for (``LatencyTable.late`` counts them).

**The file.** A table is JSON with what it was measured for (:func:`table_key`: runtime and its
version, device name, batch, threads, the space's model, options and decisions).
:func:`load_or_measure` keeps it as a cache (``latency.json`` in a search's folder), measured
again when the key differs; :func:`read_table` reads a table measured elsewhere (on the
machine that will run the network) for any run of the same space, batch and runtime.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import nn

from apsfast import _checks
from apsfast.models.base import Supernet
from apsfast.models.layer_ops import Geometry, Op, input_hw, layer_ops, space_ops
from apsfast.models.runtime import check_runtime, pinned_threads, runner, runtime_device, runtime_version
from apsfast.models.static import reinitialise

FORMAT = 2  # of the JSON file; a table of another format is measured again
WARMUP, REPEATS = 5, 15
THREADS = 1  # intra-op threads a table is measured on by default
REPEAT_SECONDS = 2e-3  # a timing at least this long: short ops are timed over several calls
MAX_NUMBER = 1000  # calls per timing at most
CACHE_SIZE = 4096  # archs whose prediction a table remembers
REST = "(rest)"  # the name of the constant in :meth:`LatencyTable.layer_latency`
SPACE = ("model", "options", "input_size", "decisions")  # the key's fields that name the space

Progress = Callable[[int, str], Any]  # (total, description) -> a bar with update() and close()


# --- timing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the median over the rounds, and the spread (interquartile range
    over the median)."""

    ms: float
    spread: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample(fn: Callable[[], object], device: torch.device, number: int,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """Milliseconds per call of ``number`` calls of ``fn`` (on the CPU by ``clock``)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(number):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / number
    started = clock()
    for _ in range(number):
        fn()
    return (clock() - started) * 1e3 / number


def time_calls(calls: dict[str, Callable[[], object]], device: Union[str, torch.device], repeats: int = REPEATS,
               warmup: int = WARMUP, threads: Optional[int] = None) -> dict[str, Timing]:
    """:class:`Timing` of each of ``calls`` on ``device``: ``warmup`` calls each, then
    ``repeats`` rounds in which each is timed once over enough calls to last about
    ``REPEAT_SECONDS``; torch's intra-op threads pinned to ``threads`` (``None``: as they are).
    On the CPU with one thread a timing reads this thread's CPU time (``time.thread_time``): the
    work runs on it, and time it spends waiting for a core that other processes hold (on a
    shared machine, most of a timing) does not count."""
    device = torch.device(device)
    clock = time.thread_time if device.type == "cpu" and threads == 1 else time.perf_counter
    numbers = {}
    with pinned_threads(threads):
        for key, fn in calls.items():
            for _ in range(max(warmup, 1)):
                fn()
            _sync(device)
            once = _sample(fn, device, 1, clock) / 1e3
            numbers[key] = max(1, min(MAX_NUMBER, int(REPEAT_SECONDS / max(once, 1e-7))))
        samples: dict[str, list[float]] = {key: [] for key in calls}
        for _ in range(max(repeats, 1)):
            for key, fn in calls.items():
                samples[key].append(_sample(fn, device, numbers[key], clock))
    out = {}
    for key, values in samples.items():
        median = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (median, median, median)
        out[key] = Timing(median, (q3 - q1) / median if median > 0 else 0.0)
    return out


def own_rng(device: Union[str, torch.device]):
    """A context in which random draws leave the global generators (CPU and ``device``'s) as
    they were: measuring changes nothing a seeded run draws afterwards."""
    device = torch.device(device)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def measure_ops(ops: dict[str, Op], batch: int, device: Union[str, torch.device], runtime: str = "torch",
                threads: Optional[int] = THREADS, repeats: int = REPEATS, warmup: int = WARMUP,
                progress: Optional[Callable[[int], Any]] = None) -> dict[str, Timing]:
    """:class:`Timing` of each of ``ops`` (``{key: op}``) on ``batch`` images on ``runtime`` on
    ``device``, timed together (:func:`time_calls`); ``progress(1)`` after each op is made ready."""
    device = runtime_device(runtime, device)
    calls = {}
    with own_rng(device), pinned_threads(threads):
        for key, op in ops.items():
            calls[key] = runner(op.module(device), op.input(batch, device), runtime, threads, op=True)
            if progress is not None:
                progress(1)
        return time_calls(calls, device, repeats, warmup, threads)


def measure_network(module: nn.Module, batch: int, in_channels: int, hw: Sequence[int],
                    device: Union[str, torch.device], runtime: str = "torch", threads: Optional[int] = THREADS,
                    repeats: int = REPEATS, warmup: int = WARMUP) -> float:
    """Milliseconds of a static network's eval-mode forward on ``batch`` random images on
    ``runtime`` (exported to ONNX for onnxruntime, as ``apsfast export --onnx`` does)."""
    device = runtime_device(runtime, device)
    with own_rng(device), pinned_threads(threads):
        x = torch.randn(batch, in_channels, *hw, device=device)
        call = runner(module.to(device), x, runtime, threads)
        return time_calls({"": call}, device, repeats, warmup, threads)[""].ms


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

def table_key(net: Supernet, batch: int, device: Union[str, torch.device], runtime: str = "torch",
              threads: Optional[int] = THREADS) -> dict[str, Any]:
    """What a table is valid for: the runtime and its version, the device, batch, threads and
    the space (:data:`SPACE`)."""
    device = runtime_device(check_runtime(runtime), device)
    key = {"format": FORMAT, "runtime": runtime, "runtime_version": runtime_version(runtime),
           "device": device_name(device), "device_type": device.type, "batch": batch,
           "threads": (threads if threads is not None else torch.get_num_threads()) if device.type == "cpu" else None,
           "model": net.name, "options": net.options, "input_size": net.input_size,
           "decisions": [[d.name, list(d.widths)] for d in net.decisions()]}
    return json.loads(json.dumps(key, default=str))  # as it reads back from the file


class LatencyTable:
    """Predicted latency (ms at ``batch`` images on ``runtime`` on ``device``) of any arch of
    ``net``: the measured entries of its layers' ops plus ``rest_ms`` (see the module's
    documentation); ``spread`` holds each entry's interquartile range over its median. Build
    one with :meth:`measure`, :func:`load_or_measure` or :func:`read_table`."""

    def __init__(self, net: Supernet, entries: dict[str, float], rest_ms: float, *, batch: int,
                 device: Union[str, torch.device], geometry: Geometry, key: Optional[dict[str, Any]] = None,
                 runtime: str = "torch", threads: Optional[int] = THREADS, repeats: int = REPEATS,
                 warmup: int = WARMUP, spread: Optional[dict[str, float]] = None) -> None:
        self.net, self.entries, self.rest_ms = net, dict(entries), float(rest_ms)
        self.batch, self.device, self.runtime, self.threads = batch, torch.device(device), runtime, threads
        self.geometry = geometry
        self.key = key if key is not None else table_key(net, batch, device, runtime, threads)
        self.repeats, self.warmup = repeats, warmup
        self.spread = dict(spread or {})
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

    def _measure(self, ops: dict[str, Op], progress: Optional[Callable[[int], Any]] = None) -> None:
        """Time ``ops`` together on the table's runtime into its entries and spreads."""
        for key, timing in measure_ops(ops, self.batch, self.device, self.runtime, self.threads, self.repeats,
                                       self.warmup, progress).items():
            self.entries[key], self.spread[key] = timing.ms, timing.spread

    def entry(self, op: Op) -> float:
        """The measured milliseconds of ``op``, timing it now if the table lacks it."""
        key = op.key()
        if key not in self.entries:
            self._measure({key: op})
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
    def measure(cls, net: Supernet, batch: int, device: Union[str, torch.device], *, runtime: str = "torch",
                threads: Optional[int] = THREADS, repeats: int = REPEATS, warmup: int = WARMUP,
                progress: Optional[Progress] = None) -> "LatencyTable":
        """Time every op any arch of ``net`` contains at ``batch`` images on ``runtime`` on
        ``device`` with ``threads`` intra-op threads, and the constant (see the module's
        documentation). ``progress(total, description)`` makes a progress bar (``update(n)``,
        ``close()``)."""
        batch = _checks.positive_int("batch", batch)
        device = runtime_device(check_runtime(runtime), device)
        anchors = [net.min_arch(), net.standard_arch(), net.max_arch()]
        geometry, ops = space_ops(net, anchors)
        table = cls(net, {}, 0.0, batch=batch, device=device, geometry=geometry, runtime=runtime, threads=threads,
                    repeats=repeats, warmup=warmup)
        bar = progress(len(ops) + len(anchors), f"latency table ({len(ops)} ops at batch {batch} on {runtime}, "
                                                f"{device.type})") if progress else None
        table._measure(ops, bar.update if bar is not None else None)
        residuals = []
        for arch in anchors:
            with own_rng(device):
                static = static_network(net, arch, device)
            measured = measure_network(static, batch, net.in_channels, input_hw(net), device, runtime, threads,
                                       repeats, warmup)
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
                "entries": self.entries, "spread": self.spread, "geometry": self.geometry.to_json()}

    @classmethod
    def from_json(cls, net: Supernet, obj: dict[str, Any], device: Union[str, torch.device]) -> "LatencyTable":
        key = obj["key"]
        return cls(net, {k: float(v) for k, v in obj["entries"].items()}, obj["rest_ms"], batch=key["batch"],
                   device=runtime_device(key["runtime"], device), geometry=Geometry.from_json(obj["geometry"]),
                   key=key, runtime=key["runtime"], threads=key["threads"], repeats=obj.get("repeats", REPEATS),
                   warmup=obj.get("warmup", WARMUP), spread=obj.get("spread"))

    def save(self, path: Union[str, Path]) -> None:
        """The table as JSON at ``path``, atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


def _read(path: Path) -> Optional[dict[str, Any]]:
    """The JSON object at ``path``, or ``None`` where it is not one."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("key"), dict) else None


def load_or_measure(path: Union[str, Path], net: Supernet, batch: int, device: Union[str, torch.device], *,
                    runtime: str = "torch", threads: Optional[int] = THREADS, repeats: int = REPEATS,
                    warmup: int = WARMUP, progress: Optional[Progress] = None,
                    save: bool = True) -> tuple[LatencyTable, str]:
    """The table cached at ``path`` when it was measured for the same :func:`table_key`, else a
    new one measured and written there (with ``save``). Returns it and a line saying which."""
    path = Path(path)
    key = table_key(net, batch, device, runtime, threads)
    why = f"no table at {path}"
    if path.is_file():
        obj = _read(path)
        old = obj["key"] if obj is not None else {}
        if old == key:
            try:
                table = LatencyTable.from_json(net, obj, device)
                return table, f"latency table read from {path} ({len(table.entries)} ops, {runtime}, {key['device']})"
            except (KeyError, TypeError, ValueError):
                why = f"{path} is damaged"
        else:
            diff = [k for k in key if old.get(k) != key[k]]
            why = f"{path} was measured for another {', '.join(diff) or 'format'}" if old else f"{path} is damaged"
    started = time.perf_counter()
    table = LatencyTable.measure(net, batch, device, runtime=runtime, threads=threads, repeats=repeats, warmup=warmup,
                                 progress=progress)
    if save:
        path.parent.mkdir(parents=True, exist_ok=True)
        table.save(path)
    return table, (f"latency table measured ({why}): {len(table.entries)} ops at batch {batch} on {runtime}, "
                   f"{key['device']}, {key['threads']} thread(s) in {time.perf_counter() - started:.1f} s"
                   + (f", written to {path}" if save else ""))


def read_table(path: Union[str, Path], net: Supernet, batch: int, runtime: str,
               device: Union[str, torch.device] = "cpu") -> tuple[LatencyTable, str]:
    """A table measured elsewhere (e.g. by ``apsfast bench latency --table`` on the machine
    that will run the network) for a run of ``net`` at ``batch`` images on ``runtime``. Its
    space, batch and runtime must be the run's; its device and threads are its own (they are
    what it was measured for). Returns it and a line saying what it was measured on."""
    path = Path(os.path.expanduser(str(path)))
    obj = _read(path) if path.is_file() else None
    if obj is None:
        raise ValueError(f"{str(path)!r} is not a latency table (a JSON file apsfast wrote: a run's latency.json or "
                         f"apsfast bench latency --table PATH)")
    key, want = obj["key"], table_key(net, batch, device, runtime)
    bad = [k for k in ("format", *SPACE, "batch", "runtime") if key.get(k) != want[k]]
    if bad:
        listed = "; ".join(f"{k}: {key.get(k)!r} (the run's: {want[k]!r})" for k in bad)
        raise ValueError(f"{str(path)!r} was measured for another {', '.join(bad)}: {listed}")
    table = LatencyTable.from_json(net, obj, device)
    return table, (f"latency table read from {path} ({len(table.entries)} ops, measured on {key['runtime']}, "
                   f"{key['device']}, {key['threads']} thread(s))")
