"""A search step reads nothing back from the device except at its log points.

On a CPU every tensor is on the host, so the test follows what a GPU run would hold on the
device instead: the supernet's parameters and buffers, the batches, and everything computed
from them (a dispatch mode marks every op's outputs and mutated inputs when an input is
marked). Reading a marked value (``item``, ``tolist``, ``float``, ``bool``, ``int``,
``numpy``, or an op whose result depends on values, like ``nonzero``) is what waits for a GPU.
The one legitimate way out is :func:`apsfast.search.readback.to_host`, an asynchronous copy
whose result the test leaves unmarked; the GPU test checks that it is asynchronous indeed.
"""
from __future__ import annotations

import sys
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from apsfast.search import Search, load_config, readback, steps
from apsfast.search.session import Session

READS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy", "cpu")
DATA_DEPENDENT = {"_local_scalar_dense", "nonzero", "equal", "is_nonzero", "masked_select", "unique",
                  "_unique2", "allclose"}
# Where a search may read values back: its log points, epoch ends, checkpoints and the end.
ALLOWED = {"_log_step", "_end_epoch", "save", "finish", "_state"}


class DeviceValues(TorchDispatchMode):
    """Marks what a GPU run would hold on the device, and records every host read of it."""

    def __init__(self) -> None:
        super().__init__()
        # id → weak reference: a tensor's identity, never its (elementwise) equality.
        self.marked: dict[int, weakref.ref] = {}
        self.reads: list[tuple[str, list[str]]] = []
        self.exempt = False  # inside readback.to_host: its copy does not wait

    def mark(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self.marked[id(t)] = weakref.ref(t)

    def is_marked(self, t: object) -> bool:
        ref = self.marked.get(id(t))
        return ref is not None and ref() is t

    def read(self, what: str) -> None:
        frames, frame = [], sys._getframe(2)
        while frame is not None:
            frames.append(frame.f_code.co_name)
            frame = frame.f_back
        self.reads.append((what, frames))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        marked = any(self.is_marked(t) for t in inputs)
        if marked and func._overloadpacket.__name__ in DATA_DEPENDENT:
            self.read(f"aten.{func._overloadpacket.__name__}")
        out = func(*args, **kwargs)
        if marked:
            self.mark(*torch.utils._pytree.tree_leaves(out))
            for k, arg in enumerate(func._schema.arguments):  # in-place and out= results
                if arg.alias_info is not None and arg.alias_info.is_write:
                    value = args[k] if k < len(args) else kwargs.get(arg.name)
                    self.mark(*torch.utils._pytree.tree_leaves(value))
        return out


@pytest.fixture
def tracked(monkeypatch):
    mode = DeviceValues()

    def watch(name):
        original = getattr(torch.Tensor, name)

        def method(self, *args, **kwargs):
            if mode.is_marked(self):
                mode.read(name)
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, method)
    for name in READS:
        watch(name)
    to = torch.Tensor.to

    def to_device(self, *args, **kwargs):  # .to("cpu"): a copy the host waits for
        target = [a for a in (*args, kwargs.get("device")) if isinstance(a, (str, torch.device))]
        if mode.is_marked(self) and not mode.exempt and any(torch.device(t).type == "cpu" for t in target):
            mode.read("to(cpu)")
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", to_device)

    local = Session.local

    def local_marked(self, x, y):  # the batches a GPU run moves to the device
        x, y = local(self, x, y)
        mode.mark(x, y)
        return x, y
    monkeypatch.setattr(Session, "local", local_marked)

    to_host = readback.to_host

    def copied(values):  # the asynchronous copy: what it returns is on the host
        mode.exempt = True
        try:
            with _disable_current_modes():
                host, event = to_host(values)
                return host.clone(), event
        finally:
            mode.exempt = False
    monkeypatch.setattr(readback, "to_host", copied)
    return mode


def tiny_search(tmp_path, **extra):
    overrides = ["model.options.widths=[2,4]", "model.options.input_size=8", "data.image_size=8",
                 "data.options={num_train: 96, num_test: 8, num_classes: 4}", "model.options.num_classes=4",
                 "train.batch_size=8", "train.epochs=2", "train.warmup_epochs=1", "controller.samples=2",
                 "run.progress=false", "run.checkpoint_every=1000", *[f"{k}={v}" for k, v in extra.items()]]
    return Search(load_config("demo", overrides=overrides), tmp_path / "run", log=lambda text: None)


@pytest.mark.parametrize("kind", ["reinforce", "tas", "ista"])
def test_search_steps_read_nothing_back(kind, tmp_path, tracked, one_thread):
    search = tiny_search(tmp_path, **{"run.log_every": 1000, "controller.kind": kind})
    search.epoch = 1  # the search phase: REINFORCE, APS-T's transition, the steered rate
    batches = search.w_train.batches(8, seed=0, epoch=0, shuffle=True, augment=True, drop_last=True)
    with tracked:
        tracked.mark(*search.net.parameters(), *search.net.buffers())
        for step, (x, y) in zip(range(5), batches):
            search.train_step(x, y, "search")
            search.search_step()
            search.step += 1
    assert tracked.reads == [], f"read back inside a step: {tracked.reads[0][0]} in {tracked.reads[0][1][:8]}"
    assert search.rate._pending is not None and search.searcher._pending is not None


def test_the_tracker_sees_reads_of_device_values(tmp_path, tracked, one_thread):
    search = tiny_search(tmp_path)
    x, y = next(search.w_train.batches(8, seed=0, epoch=0, drop_last=True))
    with tracked:
        tracked.mark(*search.net.parameters(), *search.net.buffers())
        stats, _ = search.train_step(x, y, "warmup")
        float(stats.loss_sum)
        archs = [search.net.max_arch(), search.net.min_arch()]
        steps.count_correct(search.net, archs, *search.session.local(x, y), search.session.precision).tolist()
        bool(next(search.net.parameters()).isfinite().all())
        stats.correct.cpu(), stats.loss_sum.to("cpu")
    assert [what for what, _ in tracked.reads][:2] == ["__float__", "aten._local_scalar_dense"]
    assert {"tolist", "__bool__", "cpu", "to(cpu)"} <= {what for what, _ in tracked.reads}


@pytest.mark.parametrize("kind", ["reinforce", "tas", "ista"])
def test_a_search_reads_back_only_at_log_points(kind, tmp_path, tracked, one_thread):
    search = tiny_search(tmp_path, **{"run.log_every": 3, "controller.kind": kind})
    with tracked:
        tracked.mark(*search.net.parameters(), *search.net.buffers())
        search.run()
    assert tracked.reads, "the log points read the loss back"
    for what, frames in tracked.reads:
        assert ALLOWED & set(frames), f"{what} read back outside a log point: {frames[:8]}"
    assert search.done


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["reinforce", "tas", "ista"])
def test_search_steps_do_not_synchronise_the_gpu(kind, tmp_path):
    search = tiny_search(tmp_path, **{"run.log_every": 1000, "run.device": "cuda", "controller.kind": kind})
    search.epoch = 1
    batches = search.w_train.batches(8, seed=0, epoch=0, shuffle=True, augment=True, drop_last=True)
    x0, y0 = next(batches)
    search.train_step(x0, y0, "search")  # the first step of the phase starts the transition
    search.search_step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step, (x, y) in zip(range(4), batches):
            search.train_step(x, y, "search")
            search.search_step()
            search.step += 1
    finally:
        torch.cuda.set_sync_debug_mode("default")
