"""``deepfm efficiency``: time per epoch relative to LR (Fig. 9); FNN's includes pre-training."""

from __future__ import annotations

import pytest

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.efficiency import seconds_per_epoch, summarize_efficiency
from deepfm.experiments.runs import StudyConfig, fit_run, open_study_store
from study_helpers import TINY, assert_plot_with_data, market_store, read_json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return market_store(tmp_path_factory.mktemp("efficiency"))


def _run(seconds, epochs, samples=1000):
    return {"train_seconds": seconds, "epochs_run": epochs, "train_samples": samples,
            "setup": {"device": "cpu", "embedding_updates": "dense"}}  # fmt: skip


def test_relative_to_lr_by_hand():
    summary = summarize_efficiency(
        {
            "lr": [_run(2.0, 2), _run(3.0, 2), _run(2.2, 2)],  # median 1.1 s per epoch
            "deepfm": [_run(6.6, 2)],  # 3.3 s per epoch
            "fnn": [_run(5.5, 1)],
        }
    )
    models = summary["models"]
    assert models["lr"]["seconds_per_epoch"] == pytest.approx(1.1)
    assert models["lr"]["relative_to_lr"] == 1.0
    assert models["deepfm"]["relative_to_lr"] == pytest.approx(3.0)
    assert models["fnn"]["relative_to_lr"] == pytest.approx(5.0)
    with pytest.raises(ConfigError, match="relative to LR"):
        summarize_efficiency({"fm": [_run(1.0, 1)]})


def test_fnn_time_includes_its_pretraining(store):
    data = open_study_store(store)
    config = StudyConfig().train_config(0, epochs=2, patience=2)
    result = fit_run(data.dataset, StudyConfig().model_config("fnn", hidden=(8,)), config)
    own_epochs = sum(h["seconds"] for h in result["history"])
    # the FM pre-training (2 epochs) is in the time and in the samples, not in FNN's history
    assert seconds_per_epoch(result) * result["epochs_run"] > own_epochs
    assert result["train_samples"] == 2 * 2 * data.dataset.rows()["train"]


def test_efficiency_from_the_cli(store, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["efficiency", "--store", str(store), "--models", "poly2,fm,fnn,deepfm", *TINY]
    assert main([*argv, "--epochs", "1", "--out", str(out)]) == 0
    assert "relative to LR" in capsys.readouterr().out
    result = read_json(out / "efficiency.json")
    # LR added: the denominator
    assert list(result["models"]) == ["lr", "poly2", "fm", "fnn", "deepfm"]
    assert result["models"]["lr"]["relative_to_lr"] == 1.0
    for name, record in result["models"].items():
        assert record["epochs"] == 1, name  # early stopping off: every model trains the epochs
        assert record["relative_to_lr"] == pytest.approx(
            record["seconds_per_epoch"] / result["models"]["lr"]["seconds_per_epoch"]
        )
    assert result["device"] == "cpu" and result["threads"] == 1
    data = assert_plot_with_data(out / "efficiency_relative.png")
    assert data["relative_to_lr"] == [r["relative_to_lr"] for r in result["models"].values()]
    assert (out / "efficiency.csv").read_text().startswith("model,seconds_per_epoch")
    assert "efficiency_relative.png" in (out / "report.md").read_text()
