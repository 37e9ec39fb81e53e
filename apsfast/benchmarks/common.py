"""What every benchmark shares: interleaved median timing, peak memory, dispatched op counts, the
forced backend, the record of machine, date, commit and command, and writing the results."""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.benchmark import Timer

import apsfast
from apsfast import _backends


def median_times(fns: dict[str, Callable[[], object]], rounds: int, min_time: float,
                 long_rounds: Optional[int] = 3) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so drift hits all alike.
    Where a call takes over a second, ``long_rounds`` rounds at most (``None``: ``rounds``)."""
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}) for name, fn in fns.items()}
    numbers, once = {}, {}
    for name, timer in timers.items():  # warm up, and size each round to about min_time
        once[name] = max(timer.timeit(1).mean, 1e-7)
        numbers[name] = max(1, int(min_time / once[name]))
    if long_rounds is not None and max(once.values()) > 1.0:
        rounds = min(rounds, long_rounds)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.timeit(numbers[name]).mean)
    return {name: statistics.median(values) for name, values in samples.items()}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes ``fn`` allocates at its peak above what was allocated when it started: from the
    CUDA allocator's statistics on a GPU, from the profiler's allocation events on a CPU
    (torch has no CPU allocator statistics)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Each op's own allocations (its children's excluded) and the frees between ops, in time order.
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    level = peak = 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    return peak


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched in its block: those with a tensor on ``device``'s kind
    among their arguments or results (every op, when that is the host's CPU), and the others."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device_type = device.type
        self.on_device = self.elsewhere = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.device_type == "cpu" or any(isinstance(t, torch.Tensor) and t.device.type == self.device_type
                                            for t in pytree.tree_leaves((args, kwargs, out))):
            self.on_device += 1
        else:
            self.elsewhere += 1
        return out


def count_ops(fn: Callable[[], object], device: torch.device) -> tuple[int, int]:
    """The ATen ops one call of ``fn`` dispatches (its backward's included) on ``device`` and
    elsewhere (on a GPU run: the host's): a machine-independent proxy of the kernel launches
    and the host work per op of a step. An op a compiled op runs inside itself is not counted,
    the compiled op is."""
    with _OpCounter(device) as counter:
        fn()
    return counter.on_device, counter.elsewhere


def fused_backend(device: str) -> str:
    """The compiled backend a device's fused kernels come from (``reference`` when none is built)."""
    for name in (("cpu",) if device == "cpu" else ("cuda", "triton")):
        if name in apsfast.backends():
            return name
    return "reference"


@contextlib.contextmanager
def forced_backend(name: Optional[str]) -> Iterator[None]:
    """Force ``name`` through APSFAST_BACKEND for the duration of the block; ``None``: no
    backend forced (the dispatch's choice per op), whatever the variable was."""
    before = os.environ.pop(_backends.ENV_VAR, None)
    if name is not None:
        os.environ[_backends.ENV_VAR] = name
    try:
        yield
    finally:
        os.environ.pop(_backends.ENV_VAR, None)
        if before is not None:
            os.environ[_backends.ENV_VAR] = before


def environment(command: str) -> dict:
    """Machine, date, commit and command: recorded with every result. ``APSFAST_COMMIT``
    names the commit where the tree was copied without its history."""
    commit = os.environ.get("APSFAST_COMMIT")
    try:
        commit = commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True, check=False, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "cpu_threads": torch.get_num_threads(), "gpu": device, "torch": torch.__version__,
            "apsfast": apsfast.__version__, "backends": list(apsfast.backends()), "commit": commit,
            "command": command}


def write_results(out: Path, header: str, table: str, rows: list[dict], env: dict) -> None:
    """``<out>.md`` (header and tables) and ``<out>.jsonl`` (one row per line, with ``env``)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(header + "\n" + table + "\n")
    with out.with_suffix(".jsonl").open("w") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")


def report(title: str, env: dict, rows: list[dict], table: str, out: Optional[Path]) -> None:
    """Print ``# title``, the environment and ``table``; with ``out``, also write them
    (:func:`write_results`)."""
    header = f"# {title}\n\n" + "\n".join(f"- {k}: {v}" for k, v in env.items()) + "\n"
    print("\n" + header + "\n" + table)
    if out:
        write_results(out, header, table, rows, env)
        print(f"\nwrote {out.with_suffix('.md')} and .jsonl")
