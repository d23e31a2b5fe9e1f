"""``deepfm sweep``: the shape generator, keep probability → drop rate, the command end to end."""

from __future__ import annotations

import pytest

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.sweep import (
    SHAPES,
    parse_values,
    point_overrides,
    shape_sizes,
    shape_weights,
)
from study_helpers import TINY, assert_plot_with_data, market_store, read_json


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return market_store(tmp_path_factory.mktemp("sweep"))


def test_the_papers_shapes():
    assert shape_sizes("constant", 600, 3) == (200, 200, 200)
    assert shape_sizes("increasing", 600, 3) == (100, 200, 300)
    assert shape_sizes("decreasing", 600, 3) == (300, 200, 100)
    assert shape_sizes("diamond", 600, 3) == (150, 300, 150)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layers", [1, 2, 3, 4, 5, 7])
@pytest.mark.parametrize("total", [97, 600, 601, 1000, 1234])
def test_shape_sizes_sum_exactly_to_the_total(shape, layers, total):
    sizes = shape_sizes(shape, total, layers)
    assert len(sizes) == layers and sum(sizes) == total and min(sizes) >= 1
    if shape == "increasing":
        assert list(sizes) == sorted(sizes)
    if shape == "decreasing":
        assert list(sizes) == sorted(sizes, reverse=True)
    if shape == "diamond":
        middle = max(sizes)
        assert middle in sizes[(layers - 1) // 2 : layers // 2 + 1]
    # rounding moves each layer by less than one neuron from its exact share of the total
    weights = shape_weights(shape, layers)
    for size, weight in zip(sizes, weights, strict=True):
        assert abs(size - total * weight / sum(weights)) < 1


def test_too_few_neurons_for_a_shape():
    with pytest.raises(ConfigError, match="too few"):
        shape_sizes("increasing", 10, 7)  # weights 1..7 sum to 28: the first layer gets 0
    with pytest.raises(ConfigError, match="too few"):
        shape_sizes("constant", 2, 3)
    with pytest.raises(ConfigError, match="unknown network shape"):
        shape_sizes("pyramid", 600, 3)


def test_keep_probability_becomes_the_drop_rate():
    assert parse_values("dropout", None) == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    assert point_overrides("dropout", 0.9, width=1, depth=1, total=1) == {"dropout": 0.1}
    assert point_overrides("dropout", 1.0, width=1, depth=1, total=1) == {"dropout": 0.0}
    assert point_overrides("neurons", 100, width=1, depth=3, total=1) == {"hidden": (100,) * 3}
    assert point_overrides("layers", 5, width=64, depth=3, total=1) == {"hidden": (64,) * 5}
    with pytest.raises(ConfigError, match="keep probabilities"):
        parse_values("dropout", "0.5,1.5")
    with pytest.raises(ConfigError, match="integers"):
        parse_values("layers", "1,two")


def test_sweep_from_the_cli_accumulates_parameters(store, tmp_path, capsys):
    out = tmp_path / "out"
    base = ["sweep", "--store", str(store), "--models", "dnn,deepfm", "--out", str(out)]
    base += TINY[2:]  # not --hidden: the shape sweep varies it
    assert main([*base, "--param", "dropout", "--values", "1.0,0.5", "--hidden", "8,8,8"]) == 0
    assert main([*base, "--param", "shape", "--total", "24", "--depth", "3"]) == 0
    assert "diamond (6-12-6)" in capsys.readouterr().out
    params = read_json(out / "sweep.json")["params"]
    assert set(params) == {"dropout", "shape"}
    dropout = params["dropout"]["models"]["deepfm"]
    assert dropout["1.0"]["dropout"] == 0.0 and dropout["0.5"]["dropout"] == 0.5
    shapes = params["shape"]["models"]["dnn"]
    assert [p["hidden"] for p in shapes.values()] == [
        [8, 8, 8], [4, 8, 12], [12, 8, 4], [6, 12, 6]
    ]  # fmt: skip
    for param in ("dropout", "shape"):
        data = assert_plot_with_data(out / f"sweep_{param}.png")
        assert set(data["models"]) == {"DNN", "DeepFM-D"}
        assert data["models"]["DNN"]["auc"] == [
            p["auc_mean"] for p in params[param]["models"]["dnn"].values()
        ]
    rows = (out / "sweep.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 2 + 2 * 4
    assert "sweep_shape.png" in (out / "report.md").read_text()


def test_the_swept_setting_cannot_also_be_fixed(store, tmp_path, capsys):
    argv = ["sweep", "--store", str(store), "--param", "layers", "--hidden", "8,8"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert "--hidden is what --param layers varies" in capsys.readouterr().err
