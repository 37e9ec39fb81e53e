"""Data parallelism on CPU with gloo: synchronised batch norm against one process's batch norm,
and a 2-process search against a 1-process search with the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from apsfast.nn import APSBatchNorm2d, sync_batch_norm
from apsfast.search import Search, load_config
from apsfast.search.checkpoint import load_checkpoint
from apsfast.search.distributed import Processes
from test_search import TINY, quiet

WIDTHS = (3, 5)


def batch_norm_case(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, 4, 3, generator=g, dtype=dtype) * 3 + 1
    dy = torch.randn(6, 5, 4, 3, generator=g, dtype=dtype)
    bn = APSBatchNorm2d(WIDTHS, dtype=dtype)
    with torch.no_grad():
        for m in bn.bns:
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.uniform_(-1, 1, generator=g)
    return bn, x, dy


def run_batch_norm(bn, x, dy):
    x = x.clone().requires_grad_()
    y = bn(x)
    y.backward(dy)
    layer = bn.candidate(x.shape[1])
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var


def _sync_worker(rank: int, world: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        bn, x, dy = batch_norm_case()
        sync_batch_norm(bn)
        rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        # Each process's loss is its own slice's: scale dy as a mean over the slice would.
        out = run_batch_norm(bn, x[rows], dy[rows] * world)
        results[rank] = [t.clone() for t in out]
    finally:
        dist.destroy_process_group()


def test_synchronised_batch_norm_equals_one_process_on_the_whole_batch(tmp_path):
    bn, x, dy = batch_norm_case()
    y, dx, dw, db, mean, var = run_batch_norm(bn, x, dy)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_sync_worker, args=(2, str(tmp_path / "store"), results), nprocs=2)
        parts = [results[r] for r in range(2)]
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]) / 2, dx)  # dy was scaled by 2
    for part in parts:
        # the local parameter gradients average (as data parallelism does) to the whole batch's
        torch.testing.assert_close((parts[0][2] + parts[1][2]) / 2, dw)
        torch.testing.assert_close((parts[0][3] + parts[1][3]) / 2, db)
        torch.testing.assert_close(part[4], mean)
        torch.testing.assert_close(part[5], var)


def _same_worker(rank: int, world: int, store: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        # The group NCCL runs would use for host values (here over gloo as well).
        processes = Processes(rank=rank, world=world, host_group=dist.new_group(backend="gloo"))
        results[rank] = processes.same([rank + 1, 7 * rank, 3])
    finally:
        dist.destroy_process_group()


def test_every_process_takes_process_0s_arch_over_the_host_group(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_same_worker, args=(2, str(tmp_path / "store"), results), nprocs=2)
        assert [results[r] for r in range(2)] == [[1, 0, 3], [1, 0, 3]]


def test_without_a_process_group_batch_norm_is_unchanged():
    bn, x, dy = batch_norm_case()
    assert sync_batch_norm(bn) is bn and bn.process_group is None
    expected = run_batch_norm(*batch_norm_case())
    for a, b in zip(run_batch_norm(bn, x, dy), expected):
        assert torch.equal(a, b)


def search_cli(out, *extra: str, launcher=()) -> subprocess.CompletedProcess:
    sets = [arg for item in TINY for arg in ("-s", item)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *launcher, "-m", "apsfast", "search", "--preset", "demo", *sets, *extra,
                           "--out", str(out)], capture_output=True, text=True, timeout=600, check=False, env=env)


# TAS with seed 0, its temperature annealed down to 0.1 over these few steps, takes a path on
# which the rounding of one process against two grows from 1e-6 to 1e-4 in the weights within
# two steps (one process with one thread against two threads differs as much: the path, not
# the processes); seed 2's path keeps them within 1e-6. ISTA's mixture, likewise: with seed 0
# its code b ends 1.1e-5 apart, as between one and two threads in one process; seeds 1-3
# within 2e-7.
@pytest.mark.parametrize("kind, seed", [("reinforce", 0), ("tas", 2), ("ista", 1)])
def test_two_processes_equal_one_with_the_same_global_batch(kind, seed, tmp_path, one_thread):
    settings = ("-s", f"controller.kind={kind}", "-s", f"run.seed={seed}")
    # The one process is this one, on one thread as each of the two (a process less to start).
    Search(load_config("demo", overrides=[*TINY, *settings[1::2]]), tmp_path / "one", log=quiet).run()
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    double = search_cli(tmp_path / "two", *settings, launcher=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    assert "2 processes on cpu" in double.stdout
    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    assert [c["arch"] for c in one["candidates"]] == [c["arch"] for c in two["candidates"]]
    assert [c["loglik"] for c in two["candidates"]] == pytest.approx([c["loglik"] for c in one["candidates"]],
                                                                      rel=1e-4)
    assert two["phi"] == pytest.approx(one["phi"], rel=1e-5)
    states = [load_checkpoint(tmp_path / d / "checkpoint.pt") for d in ("one", "two")]
    for part in ("supernet", "searcher"):
        flat = [{k: v for k, v in _flatten(s[part]).items() if torch.is_tensor(v) and v.is_floating_point()}
                for s in states]
        assert flat[0].keys() == flat[1].keys()
        for key in flat[0]:
            torch.testing.assert_close(flat[1][key], flat[0][key], rtol=1e-4, atol=1e-5, msg=f"{part}: {key}")
    # the metrics of both runs tell the same story
    epochs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()
               if '"epoch"' in line and '"kind": "epoch"' in line] for d in ("one", "two")]
    assert [r["arch"] for r in epochs[0]] == [r["arch"] for r in epochs[1]]
    assert [r["train_loss"] for r in epochs[1]] == pytest.approx([r["train_loss"] for r in epochs[0]], rel=1e-4)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, value in enumerate(tree):
            out.update(_flatten(value, f"{prefix}{i}."))
        return out
    return {prefix: tree}


def test_batch_size_must_split_evenly_over_the_processes(tmp_path):
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    done = search_cli(tmp_path / "odd", "-s", "train.batch_size=33", launcher=torchrun)
    assert done.returncode != 0
    assert "train.batch_size = 33 must be divisible by the number of processes (2)" in done.stderr


def test_retrain_runs_under_torchrun(tmp_path):
    # The retrain stands on the search's session: two processes split every batch.
    from apsfast.search import Search, load_config
    Search(load_config("demo", overrides=TINY), tmp_path / "run", log=lambda text: None).run()
    torchrun = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    done = subprocess.run([sys.executable, *torchrun, "-m", "apsfast", "train", str(tmp_path / "run"), "-s",
                           "retrain.epochs=1"], capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes on cpu" in done.stdout
    summary = json.loads((tmp_path / "run" / "retrain" / "retrain.json").read_text())
    assert summary["epochs"] == 1 and 0 <= summary["test_acc"] <= 1
