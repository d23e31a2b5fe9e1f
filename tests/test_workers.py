"""``deepfm workers``: learning curves of 1 worker, 2 processes (DDP, gloo) at the same lr and at
√2 × lr, from the command line on a tiny store."""

from __future__ import annotations

import math

import pytest

from deepfm.cli import main
from deepfm.experiments.workers import settings
from study_helpers import TINY, assert_plot_with_data, market_store, read_json


def test_settings_are_one_worker_n_workers_and_sqrt_scaling():
    assert settings(4) == [
        ("1 worker", 1, "none"),
        ("4 workers, lr", 4, "none"),
        ("4 workers, √4×lr", 4, "sqrt"),
    ]


def test_workers_from_the_cli(tmp_path, capsys):
    store = market_store(tmp_path, rows=2000)
    out = tmp_path / "out"
    argv = ["workers", "--store", str(store), "--model", "deepfm", *TINY, "--lr", "0.004"]
    assert main([*argv, "--eval-every", "2", "--out", str(out)]) == 0
    assert "final test AUC" in capsys.readouterr().out
    result = read_json(out / "workers.json")
    runs = result["runs"]
    assert list(runs) == ["1 worker", "2 workers, lr", "2 workers, √2×lr"]
    train_rows = result["rows"]["train"]
    one, same, scaled = runs.values()
    # 2 epochs of 256-row batches; 2 processes each read half the rows: half the steps
    assert one["steps"] == 2 * math.ceil(train_rows / 256)
    assert same["steps"] == scaled["steps"] == 2 * math.ceil((train_rows // 2) / 256)
    assert one["world"] == 1 and same["world"] == 2 and scaled["world"] == 2
    assert one["lr"] == pytest.approx(0.004) and same["lr"] == pytest.approx(0.004)
    assert scaled["lr"] == pytest.approx(0.004 * math.sqrt(2))
    for run in runs.values():
        curve = run["curve"]
        assert curve["step"] == list(range(2, run["steps"] + 1, 2))
        assert len(curve["auc"]) == len(curve["logloss"]) == len(curve["step"])
        assert all(0.0 <= a <= 1.0 for a in curve["auc"])
        # samples seen: steps × batch × processes
        assert curve["samples"][-1] == curve["step"][-1] * 256 * run["world"]
    data = assert_plot_with_data(out / "workers_curves.png")
    assert data["curves"]["1 worker"]["auc"] == one["curve"]["auc"]
    assert "workers_curves.png" in (out / "report.md").read_text()
    # started again: the three finished runs are reused (no process is spawned)
    assert main([*argv, "--eval-every", "2", "--out", str(out)]) == 0
    assert read_json(out / "workers.json")["runs"] == runs
