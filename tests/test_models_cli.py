"""The zoo from the command line: every model trains on generated Criteo rows, presets, and
``deepfm models``."""

import json
import math

import pytest

from deepfm.cli import build_parser, main, model_config_from
from deepfm.errors import ConfigError
from deepfm.models import ModelConfig, build_model, model_names, parameter_count
from deepfm.models.presets import load_preset, parse_preset, preset_names
from deepfm.nn import InputLayout
from deepfm.nn.calibration import uncalibrated
from deepfm.serve.bundle import load_bundle

ZOO = model_names()
TINY = ["--epochs", "1", "--hidden", "8", "--batch-size", "1024", "--quiet", "--threads", "1"]


@pytest.mark.parametrize("name", ZOO)
def test_every_model_trains_from_the_cli_on_criteo(name, criteo_train, tmp_path, capsys):
    out = tmp_path / name
    argv = ["train", "--data", str(criteo_train), "--model", name, "--out", str(out), *TINY]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    for split in ("valid", "test"):
        assert 0.0 <= summary[split]["auc"] <= 1.0
        assert math.isfinite(summary[split]["logloss"]) and summary[split]["logloss"] > 0
    bundle = load_bundle(out)  # weights round-trip through safetensors into the same class
    assert bundle.config.name == name
    fresh = build_model(InputLayout.of(bundle.feature_map), bundle.config)
    saved = uncalibrated(bundle.model)  # the model under its calibration (when one paid)
    assert type(saved) is type(fresh)
    assert saved.state_dict().keys() == fresh.state_dict().keys()
    metrics = json.loads((out / "metrics.json").read_text())
    if name == "fnn":  # the FM pre-training epoch counts: 2 passes over the training rows
        assert metrics["rows"]["train"] > 0
        assert metrics["train_samples_per_s"] * metrics["train_seconds"] == pytest.approx(
            2 * metrics["rows"]["train"]
        )


def args_of(*argv):
    return build_parser().parse_args(["train", "--data", "x", "--out", "y", *argv])


def test_preset_values_and_explicit_flags_win():
    config = model_config_from(args_of("--model", "ipnn", "--preset", "criteo-random"))
    assert config == ModelConfig(
        name="ipnn", hidden=(400, 400, 400), activation="tanh", dropout=0.5
    )
    deepfm = model_config_from(args_of("--model", "deepfm_ip", "--preset", "criteo-random"))
    assert deepfm.activation == "relu"  # the paper's tanh is for IPNN only
    mixed = model_config_from(
        args_of("--model", "ipnn", "--preset", "criteo-random", "--dropout", "0.2", "--hidden", "8")
    )
    assert (mixed.dropout, mixed.hidden, mixed.activation) == (0.2, (8,), "tanh")
    plain = model_config_from(args_of("--model", "dnn"))
    assert plain == ModelConfig(name="dnn")  # no preset: the ModelConfig defaults


def test_preset_keep_probability_becomes_drop_rate(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "name: mine\ndefaults:\n  keep_prob: 0.9\nmodels:\n  dnn:\n    keep_prob: 0.6\n"
    )
    preset = load_preset(path)
    assert preset.model_config("fm").dropout == 0.1  # keep 0.9 -> drop 0.1, not 0.9
    assert preset.model_config("dnn").dropout == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"defaults": {"dropout": 0.5}}, "keep_prob"),
        ({"defaults": {"keep_prob": 0}}, r"\(0, 1\]"),
        ({"models": {"deepfm2": {}}}, "unknown model 'deepfm2'"),
        ({"defaults": {"activation": "gelu"}}, "unknown activation"),
        ({"defaults": {"hidden": [0]}}, "positive"),
        ({"default": {}}, "unknown keys"),
    ],
)
def test_bad_presets_are_config_errors(content, message):
    with pytest.raises(ConfigError, match=message):
        parse_preset(content, "test.yaml")


def test_shipped_presets():
    assert {"criteo-random", "criteo-sequential"} <= set(preset_names())
    for name in preset_names():
        load_preset(name)  # every shipped preset parses and gives valid configs
    assert not load_preset("criteo-random").assumed
    assert not load_preset("criteo-sequential").assumed  # Table III (tests/test_presets.py)
    with pytest.raises(ConfigError, match="unknown preset 'criteo'"):
        load_preset("criteo")


def test_an_assumed_preset_says_so(tmp_path, capsys):
    path = tmp_path / "guess.yaml"
    path.write_text("name: guess\nstatus: assumed\ndescription: values GUESSED\n")
    assert load_preset(path).assumed
    model_config_from(args_of("--model", "fm", "--preset", str(path)))
    assert "GUESSED" in capsys.readouterr().err


def test_unknown_preset_is_a_clean_cli_error(capsys):
    assert main(["train", "--data", "x", "--out", "y", "--preset", "nope"]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err


def test_models_command_lists_all_with_counts(tmp_path, capsys, criteo_train):
    assert main(["models"]) == 0
    text = capsys.readouterr().out
    for name in ZOO:
        assert f"\n{name} " in text
    # a bundle's feature map gives parameter counts equal to the built models'
    out = tmp_path / "b"
    argv = ["train", "--data", str(criteo_train), "--model", "lr", "--out", str(out), *TINY]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["models", "--feature-map", str(out), "--hidden", "16,8", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert list(rows) == ZOO
    layout = InputLayout.of(load_bundle(out).feature_map)
    for name in ("lr", "fnn", "pnn_star", "deepfm_star"):
        model = build_model(layout, ModelConfig(name=name, hidden=(16, 8)))
        assert rows[name]["parameters"] == sum(p.numel() for p in model.parameters())
    assert rows["fnn"]["pretrain"] == "fm" and rows["lr"]["optimizer"] == "ftrl"
    assert rows["ipnn"]["embed_dim"] == 11 and rows["deepfm"]["embed_dim"] == 10


def test_parameter_count_needs_no_memory():
    # a full Criteo-size table (33.7M features) would take GBs if allocated
    layout = InputLayout(num_features=33_762_577, field_slots=(1,) * 39)
    config = ModelConfig(name="deepfm", hidden=(400, 400, 400))
    mlp = 390 * 400 + 400 + 2 * (400 * 400 + 400) + 400 + 1
    assert parameter_count(layout, config) == 33_762_577 * 11 + 1 + mlp


def test_models_command_bad_feature_map(tmp_path, capsys):
    assert main(["models", "--feature-map", str(tmp_path)]) == 2
    assert "feature_map.json" in capsys.readouterr().err
