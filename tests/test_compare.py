"""`apsfast compare`: one run's record, the table over seeds, and a cut comparison going on."""
from __future__ import annotations

import json

import pytest
import torch

from apsfast import models
from apsfast.search import compare
from apsfast.search.settings import load_config

from test_search import TINY


def job(tmp_path, kind: str = "reinforce", seed: int = 0, target: str = "none") -> dict:
    overrides = [*TINY, f"controller.kind={kind}", f"run.seed={seed}", "reward.flops_target=null"]
    return {"kind": kind, "strategy": "transitional", "target": target, "seed": seed, "preset": "demo",
            "out": str(tmp_path / f"{kind}-{seed}"), "overrides": overrides}


def test_one_run_is_searched_retrained_and_resumed(tmp_path):
    first, = compare.run_one(job(tmp_path))
    assert first["chosen_flops"] > 0 and 0 <= first["test_acc"] <= 1 and first["chosen_rank"] >= 0
    assert first["seconds_per_search_epoch"] > 0 and first["peak_memory_mib"] > 0
    assert first["overrides"] == job(tmp_path)["overrides"]
    assert first["digest"] == load_config("demo", overrides=job(tmp_path)["overrides"]).digest()
    again, = compare.run_one(job(tmp_path))  # the folder holds a finished run: it is resumed, not refused
    assert again["chosen_flops"] == first["chosen_flops"] and again["chosen_widths"] == first["chosen_widths"]


def test_the_half_target_is_half_the_standard_arch_at_the_data_size():
    # The space is built at the data's image side (TINY: 8), not the model's default (32).
    net = models.build("resnet20_cifar", device="meta", widths=[2, 4], residual="stage", input_size=8)
    assert compare.half_standard_macs("demo", TINY) == net.flops(net.standard_arch()) / 2


def record(kind: str, seed: int, flops: float, acc: float, digest: str = "a") -> dict:
    return {"kind": kind, "strategy": "transitional", "target": "none", "seed": seed, "flops_target": None,
            "chosen_flops": flops, "test_acc": acc, "seconds_per_search_epoch": 2.0, "peak_memory_mib": 100.0,
            "digest": digest}


def test_the_table_holds_means_and_deviations_over_seeds():
    rows = compare.summarise([record("tas", 0, 2e6, 0.5), record("reinforce", 0, 4e6, 0.6),
                              record("tas", 1, 4e6, 0.7)])
    assert [r["kind"] for r in rows] == ["tas", "reinforce"]  # the order the runs name them
    assert rows[0]["chosen_flops"] == 3e6 and rows[0]["test_acc"] == pytest.approx(0.6)
    assert rows[0]["chosen_flops_std"] == pytest.approx(2 ** 0.5 * 1e6) and rows[1]["test_acc_std"] == 0.0
    table = compare.markdown(rows, ["# title"])
    assert "| none | transitional | tas | - | 3.00M ± 1.41 | 60.00% ± 14.14% | 2.0 ± 0.0 | 100 |" in table


def test_runs_at_a_time_share_the_threads(monkeypatch):
    # Oversubscribed cores make waiting OpenMP threads spin: each run gets its share.
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert [compare.threads_per_run(w) for w in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_a_cut_comparison_keeps_the_runs_it_finished(tmp_path):
    lines = tmp_path / "compare.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in (record("tas", 0, 1e6, 0.5, digest="x"),
                                                         record("tas", 0, 1e6, 0.5, digest="y"))) + "\n")
    jobs = [{"kind": "tas", "strategy": "transitional", "target": "none", "seed": 0, "digest": "x"}]
    kept = compare.finished(lines, jobs)
    assert len(kept) == 1 and kept[0]["digest"] == "x"  # a run with other settings is not reused
    assert compare.finished(tmp_path / "nothing.jsonl", jobs) == []


def test_each_rule_chooses_from_the_same_beam():
    beam = [{"flops": 90, "loglik": -0.1}, {"flops": 50, "loglik": -3.0}, {"flops": 80, "loglik": -5.0}]
    result = {"candidates": beam, "flops_target": 85, "chosen": {"rank": 2}, "config": {"result": {"select": "closest"}}}
    assert compare.choices(result, ["likely", "closest"], "select") == {"likely": 1, "closest": 2}
    assert compare.choices(result, [], "select") == {"closest": 2}  # the result's own choice
    assert compare.choices(result, ["likely", "closest"], "argmax") == {"argmax": 0}
