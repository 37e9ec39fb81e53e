"""A search survives faults: killed at a random moment it resumes to the same result; a diverged
run stops with a clear message and keeps its last good checkpoint; damaged or foreign
checkpoints and bad settings are clear errors before any work."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from apsfast.search import ConfigError, Search, load_config
from apsfast.search.checkpoint import CheckpointError, load_checkpoint
from test_search import TINY, quiet

# Longer than TINY (6 epochs of 3 steps) so that a kill can land anywhere: in warm-up, in the
# search phase, between checkpoints, inside one.
LONG = [*TINY, "train.epochs=6", "train.warmup_epochs=2", "run.checkpoint_every=1"]


def cli(*args: str, out) -> list[str]:
    sets = [arg for item in LONG for arg in ("-s", item)]
    return [sys.executable, "-m", "apsfast", "search", "--preset", "demo", *sets, "--out", str(out), *args]


def run_cli(*args: str, out) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args, out=out), capture_output=True, text=True, timeout=600, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def steps_logged(out) -> int:
    path = out / "metrics.jsonl"
    return sum('"kind": "step"' in line for line in path.read_text().splitlines()) if path.exists() else 0


def final_state(out) -> tuple[dict, dict, dict]:
    result = json.loads((out / "result.json").read_text())
    model = load_checkpoint(out / "model.pt")["state_dict"]
    supernet = load_checkpoint(out / "checkpoint.pt")["supernet"]
    return result, model, supernet


# The kill points of the tests below come from this seed (printed, so a failure can be replayed).
KILL_SEED = int(os.environ.get("APSFAST_KILL_SEED", "0"))


def kill_when(command: list[str], reached, deadline_s: float = 300) -> None:
    """Start ``command`` and SIGKILL it as soon as ``reached()`` is true (or it ends)."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + deadline_s
    while not reached() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def test_killed_at_a_random_step_resumes_to_the_same_result(tmp_path):
    whole = run_cli(out=tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    total = steps_logged(tmp_path / "whole")
    kill_at = random.Random(KILL_SEED).randint(1, total - 1)
    print(f"APSFAST_KILL_SEED={KILL_SEED}: killing the search after step {kill_at} of {total}")
    cut = tmp_path / "cut"
    kill_when(cli(out=cut), lambda: steps_logged(cut) >= kill_at)
    # The way people resume: the folder alone; the run reads its own settings.
    resumed = subprocess.run([sys.executable, "-m", "apsfast", "search", "--resume", "--out", str(cut)],
                             capture_output=True, text=True, timeout=600, check=False,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, f"killed after step {kill_at}: {resumed.stderr[-3000:]}"
    expected, got = final_state(tmp_path / "whole"), final_state(cut)
    assert got[0] == expected[0], f"killed after step {kill_at}"
    for a, b in zip(expected[1:], got[1:]):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), f"killed after step {kill_at}"
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                          for line in path.read_text().splitlines()]
    assert strip(cut / "metrics.jsonl") == strip(tmp_path / "whole" / "metrics.jsonl")


def test_a_killed_retrain_resumes_to_the_same_weights(tmp_path):
    Search(load_config("demo", overrides=TINY), tmp_path / "run", log=quiet).run()
    sets = ["-s", "retrain.epochs=3", "-s", "retrain.steps_per_epoch=3", "-s", "run.checkpoint_every=1"]
    train = [sys.executable, "-m", "apsfast", "train", str(tmp_path / "run"), *sets]
    single = {**os.environ, "OMP_NUM_THREADS": "1"}  # as kill_when: the same arithmetic in every process
    whole = subprocess.run([*train, "--out", str(tmp_path / "whole")], capture_output=True, text=True, timeout=600,
                           check=False, env=single)
    assert whole.returncode == 0, whole.stderr[-3000:]
    kill_at = random.Random(KILL_SEED + 1).randint(1, 8)
    print(f"APSFAST_KILL_SEED={KILL_SEED}: killing the retrain after step {kill_at} of 9")
    cut = tmp_path / "cut"

    def reached() -> bool:
        try:
            return load_checkpoint(cut / "checkpoint.pt")["position"]["step"] >= kill_at
        except (FileNotFoundError, CheckpointError):
            return False

    kill_when([*train, "--out", str(cut)], reached)
    resumed = subprocess.run([sys.executable, "-m", "apsfast", "train", str(tmp_path / "run"), "--out", str(cut),
                              "--resume"], capture_output=True, text=True, timeout=600, check=False, env=single)
    assert resumed.returncode == 0, f"killed after step {kill_at}: {resumed.stderr[-3000:]}"
    assert "resumed retraining" in resumed.stdout
    a, b = (load_checkpoint(d / "retrained.pt")["state_dict"] for d in (tmp_path / "whole", cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"killed after step {kill_at}"
    summaries = [json.loads((d / "retrain.json").read_text()) for d in (tmp_path / "whole", cut)]
    assert summaries[0]["test_acc"] == summaries[1]["test_acc"]


def test_a_diverged_run_stops_clearly_and_its_advice_works(tmp_path):
    config = load_config("demo", overrides=[*TINY, "train.lr=1e30", "sharing.strategy=ordinal"])
    search = Search(config, tmp_path, log=quiet)
    good = load_checkpoint(tmp_path / "checkpoint.pt")  # every run starts with one
    with pytest.raises(FloatingPointError, match=r"the training loss is (nan|inf).*last good checkpoint is "
                                                 r".*checkpoint.pt.*apsfast search --resume --out"):
        search.run()
    kept = load_checkpoint(tmp_path / "checkpoint.pt")
    assert kept["position"] == good["position"]
    assert all(torch.equal(kept["supernet"][k], v) for k, v in good["supernet"].items())
    # The advice, followed as written: resume the folder with a lower learning rate.
    done = subprocess.run([sys.executable, "-m", "apsfast", "search", "--resume", "--out", str(tmp_path),
                           "-s", "train.lr=0.05"], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "train.lr 1e+30 → 0.05" in done.stdout and (tmp_path / "result.json").exists()
    failed = subprocess.run(cli(out=tmp_path / "cli")[:-2] + ["-s", "train.lr=1e30", "--out", str(tmp_path / "cli")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert failed.returncode != 0 and "the training loss is" in failed.stderr and "Traceback" not in failed.stderr


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    Search(load_config("demo", overrides=TINY), tmp_path, log=quiet).save()  # its second checkpoint
    path = tmp_path / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "garbage": os.urandom(999), "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="is not a readable apsfast checkpoint") as info:
        Search(load_config("demo", overrides=TINY), tmp_path, resume=True, log=quiet)
    assert "weights_only" not in str(info.value)  # never torch's advice to unpickle a foreign file
    assert "checkpoint.prev.pt' is intact" in str(info.value)  # the one before is kept
    done = run_cli("--resume", out=tmp_path)
    assert done.returncode != 0 and "not a readable apsfast checkpoint" in done.stderr
    assert "Traceback" not in done.stderr and "weights_only" not in done.stderr


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    Search(load_config("demo", overrides=TINY), tmp_path, log=quiet).save()
    with pytest.raises(CheckpointError, match="is for model 'resnet20_cifar', this run has 'resnet56_cifar'"):
        Search(load_config("demo", overrides=[*TINY, "model.name=resnet56_cifar"]), tmp_path, resume=True, log=quiet)
    with pytest.raises(ConfigError, match="a resume may not change sharing.tau: 0.05 → 0.01; train.momentum"):
        Search(load_config("demo", overrides=[*TINY, "sharing.tau=0.01", "train.momentum=0.5"]), tmp_path,
               resume=True, log=quiet)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    torch.save({**state, "format": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="has checkpoint format 99, expected 1"):
        Search(load_config("demo", overrides=TINY), tmp_path, resume=True, log=quiet)


@pytest.mark.parametrize("override, message", [
    ("model.options.widths=[16, 8]", "model.options: widths must be strictly ascending, got [16, 8]"),
    ("model.options.widths=[0, 4]", "model.options: widths must hold positive ints, got 0"),
    ("model.options.residual=sideways", "model.options: residual must be one of"),
    ("model.options.layer_widths={nosuch: [4]}", "model.options: "),
    ("reward.flops_target=1K", "reward.flops_target = 1000 MACs is below the smallest arch"),
    ("run.amp=fp8", "run.amp must be one of none, bf16, fp16"),
    ("run.dist_backend=mpi", "run.dist_backend must be one of auto, nccl, gloo"),
    ("data.options={num_train: 0}", "data: num_train must be a positive int, got 0"),
])
def test_bad_settings_fail_before_any_work(tmp_path, override, message):
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        Search(load_config("demo", overrides=[*TINY, override]), tmp_path / "run", log=quiet)
    assert message in str(info.value)
    assert not (tmp_path / "run").exists()  # nothing is left behind
    assert time.perf_counter() - started < 30


def test_bad_data_folders_are_named(tmp_path):
    base = [item for item in TINY if not item.startswith("data.")]
    (tmp_path / "empty").mkdir()
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    for root, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "cifar-10-batches-py"),
                          (tmp_path, "data_batch")):
        with pytest.raises(ConfigError, match=message):
            Search(load_config("demo", overrides=[*base, "data.name=cifar10", f"data.root={root}"]),
                   tmp_path / "run", log=quiet)
    for root, message in ((tmp_path / "missing", "does not exist"), (tmp_path / "empty", "train")):
        with pytest.raises(ConfigError, match=message):
            Search(load_config("demo", overrides=[*base, "data.name=imagenet", f"data.root={root}"]),
                   tmp_path / "run", log=quiet)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_and_channels_last_search(tmp_path, amp):
    config = load_config("demo", overrides=[*TINY, f"run.amp={amp}", "run.channels_last=true"])
    search = Search(config, tmp_path, log=quiet)
    result = search.run()
    assert all(p.dtype == torch.float32 for p in search.net.parameters())  # float32 master weights
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if '"kind": "epoch"' in line]
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in epochs)
    assert result["chosen"]["arch"] and (tmp_path / "model.pt").exists()
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["scaler"]["scale"] if amp == "fp16" else not state["scaler"]
