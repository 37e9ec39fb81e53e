"""Runs a user can steer: resuming from the folder alone, what a resume may change, honest
per-epoch metrics on any data, settings checked before anything is written, and the retrain on
the same machinery as the search."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from apsfast import data as datasets
from apsfast.search import ConfigError, Controller, Search, load_config, retrain
from apsfast.search.runs import changes, saved_config, where
from test_search import TINY, quiet, tiny


def test_resume_where_there_is_no_run_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint .the folder does not exist.; check --out"):
        Search(tiny(), tmp_path / "typo", resume=True, log=quiet)
    with pytest.raises(FileNotFoundError, match="does not exist; check --out"):
        saved_config(tmp_path / "typo")
    # A run stopped before its first checkpoint (only its settings were written) starts afresh.
    (tmp_path / "early").mkdir()
    (tmp_path / "early" / "config.yaml").write_text("train: {epochs: 3}\n")
    lines = []
    Search(tiny(), tmp_path / "early", resume=True, log=lines.append)
    assert any("stopped before its first checkpoint: starting it afresh" in line for line in lines)


def test_resume_reads_the_runs_own_settings_and_allows_what_is_safe(tmp_path):
    first = Search(tiny("train.epochs=2"), tmp_path, log=quiet)
    first.run()
    config = saved_config(tmp_path, ["train.epochs=3", "run.log_every=2"])
    assert config.to_dict() == tiny("run.log_every=2").to_dict()
    lines = []
    result = Search(config, tmp_path, resume=True, log=lines.append).run()
    # done: the finished run is reported complete, more epochs are not run
    assert any("complete" in line for line in lines) and result["chosen"]["arch"]


def test_more_epochs_on_resume_continue_the_run(tmp_path):
    search = Search(tiny(), tmp_path, log=quiet)
    calls = {"n": 0}
    original = search.train_step

    def stop(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args)

    search.train_step = stop
    with pytest.raises(KeyboardInterrupt):
        search.run()
    lines = []
    resumed = Search(saved_config(tmp_path, ["train.epochs=4"]), tmp_path, resume=True, log=lines.append)
    assert "train.epochs 3 → 4" in lines[-1]
    resumed.run()
    epochs = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"epoch"' in r
              and '"kind": "epoch"' in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3]


def test_changes_name_each_field():
    a, b = tiny().to_dict(), tiny("train.momentum=0.5", "model.options.widths=[2, 8]").to_dict()
    assert [c[0] for c in changes(a, b)] == ["model.options", "train.momentum"]


def test_paths_expand_home_and_variables(tmp_path, scoped):
    scoped.setenv("APSFAST_TEST_DATA", str(tmp_path))
    assert load_config("demo", overrides=["data.root=~/x"]).data.root == os.path.expanduser("~/x")
    assert load_config("demo", overrides=["data.root=$APSFAST_TEST_DATA/y"]).data.root == f"{tmp_path}/y"


def test_balanced_subset_covers_every_class_of_a_sorted_set():
    labels = torch.arange(10).repeat_interleave(30)  # sorted by class, as a folder set is
    data = datasets.TensorImageSet(torch.zeros(300, 3, 4, 4, dtype=torch.uint8), labels)
    subset = datasets.balanced_subset(data, 50, seed=3)
    assert subset.targets().bincount().tolist() == [5] * 10
    # Read in order, every 10 consecutive samples hold every class: the per-epoch accuracy's
    # batches are scored with their own batch-norm statistics, which one class distorts.
    assert all(sorted(row) == list(range(10)) for row in subset.targets().view(5, 10).tolist())
    assert torch.equal(datasets.balanced_subset(data, 50, seed=3).targets(), subset.targets())  # fixed
    assert len(datasets.balanced_subset(data, 1000)) == 300


def image_tree(root: Path, classes: int = 3, per_class: int = 12, size: int = 12) -> Path:
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_a_folder_set_reads_its_image_size_and_is_called_folder(tmp_path):
    root = image_tree(tmp_path / "images")
    train, _ = datasets.load("imagenet", root, num_workers=0)  # the alias
    assert train.image_size == 12 and train.num_classes == 3
    # small images: CIFAR's augmentation and the set's own statistics (uniform noise: mean ≈ 0.5)
    assert train.augment == "crop-flip" and train.mean != datasets.IMAGENET_MEAN
    assert all(abs(m - 0.5) < 0.05 for m in train.mean) and all(abs(v - 0.29) < 0.03 for v in train.std)
    x, _ = next(train.batches(4, seed=0, epoch=0, augment=True))
    assert x.shape == (4, 3, 12, 12)
    big, _ = datasets.load("folder", root, image_size=96, num_workers=0, augment="auto")
    assert big.augment == "resized-crop" and big.mean == datasets.IMAGENET_MEAN
    assert datasets.load("folder", root, num_workers=0, augment="none", normalize="imagenet")[0].augment == "none"
    config = load_config("demo", overrides=[*[o for o in TINY if not o.startswith("data.")], "data.name=imagenet",
                                            f"data.root={root}", "data.workers=0", "train.batch_size=6",
                                            "run.eval_batches=1"])
    assert config.data.name == "folder"
    search = Search(config, tmp_path / "run", log=quiet)
    assert search.image_size == 12 and search.eval_set.targets().bincount().tolist() == [2, 2, 2]
    Image.fromarray(torch.zeros(20, 16, 3, dtype=torch.uint8).numpy()).save(root / "train" / "class0" / "odd.png")
    with pytest.raises(ValueError, match="different sizes .* set data.image_size"):
        datasets.load("folder", root, num_workers=0)


def test_a_near_uniform_policy_is_reported(tmp_path):
    lines = []
    result = Search(tiny(), tmp_path, log=lines.append).run()
    policy = result["policy"]
    assert 0.9 < policy["entropy_fraction"] <= 1 and policy["max_entropy"] == pytest.approx(13 * torch.log(
        torch.tensor(2.0)).item())
    assert "near uniform" in policy["warning"] and any(line.startswith("warning: ") for line in lines)


def test_controller_takes_the_decisions_pairs():
    assert Controller([("stem", (4, 8, 16)), ("layer1", [2, 4])]).num_choices == (3, 2)


def test_retrain_runs_on_the_search_machinery(tmp_path):
    Search(tiny(), tmp_path, log=quiet).run()
    summary = retrain(tmp_path, tmp_path / "amp", ["run.amp=bf16", "run.channels_last=true", "retrain.epochs=1",
                                                    "retrain.label_smoothing=0.1", "retrain.grad_clip=1.0"],
                      log=quiet)
    assert 0 <= summary["test_acc"] <= 1
    with pytest.raises(FloatingPointError, match=r"retraining loss is (nan|inf).*apsfast train .* --resume -s "
                                                 r"retrain.lr="):
        retrain(tmp_path, tmp_path / "nan", ["retrain.lr=1e30", "retrain.epochs=2"], log=quiet)
    with pytest.raises(ConfigError, match="a resume may not change retrain.weight_decay"):
        retrain(tmp_path, tmp_path / "nan", ["retrain.weight_decay=0.1"], resume=True, log=quiet)
    assert retrain(tmp_path, tmp_path / "nan", ["retrain.lr=0.01"], resume=True, log=quiet)["epochs"] == 2


def test_retrain_with_distillation_from_the_widest_arch(tmp_path):
    Search(tiny(), tmp_path, log=quiet).run()
    summary = retrain(tmp_path, tmp_path / "kd", ["retrain.distill=widest", "retrain.epochs=1"], log=quiet)
    assert 0 <= summary["test_acc"] <= 1
    teacher = tmp_path / "model.pt"  # an exported model as the teacher
    assert retrain(tmp_path, tmp_path / "kd2", [f"retrain.distill={teacher}", "retrain.epochs=1"],
                   log=quiet)["epochs"] == 1
    with pytest.raises(ConfigError, match="retrain.distill must be widest or the path"):
        retrain(tmp_path, tmp_path / "kd3", ["retrain.distill=nowhere.pt"], log=quiet)


def test_a_resume_says_where_the_run_stands_as_the_console_counts_epochs():
    assert where(0, 10) == "at epoch 1/10" and where(9, 10) == "at epoch 10/10"
    assert where(10, 10) == "after its last epoch (10/10)"  # a finished run: not "at epoch 11"
