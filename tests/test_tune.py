"""``deepfm tune``: search spaces, Optuna TPE with pruning, best.yaml as a --config, resuming."""

from __future__ import annotations

import optuna
import pytest
import yaml

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.runs import fit_run, load_study_config
from deepfm.experiments.tune import apply_params, parse_space, run_tune
from deepfm.models import ModelConfig
from study_helpers import TINY, assert_plot_with_data, market_store, read_json

SPACE = {"lr": {"low": 1e-3, "high": 1e-2, "log": True}, "keep_prob": {"choices": [0.5, 1.0]}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return market_store(tmp_path_factory.mktemp("tune"))


def test_search_space_parsing():
    space = parse_space(
        {
            "lr": {"low": "1e-4", "high": "1e-2", "log": True},  # YAML reads 1e-4 as a string
            "hidden": {"choices": [[200, 200], [400, 400, 400]]},
            "embed_dim": {"low": 4, "high": 16},
        }
    )
    assert space["lr"] == {"low": 1e-4, "high": 1e-2, "log": True}
    assert space["hidden"]["choices"] == [[200, 200], [400, 400, 400]]
    for bad, message in (
        ({"momentum": {"low": 0, "high": 1}}, "unknown parameters"),
        ({"lr": {"low": 0.1, "high": 0.01}}, "low must be below high"),
        ({"lr": {"low": 0, "high": 0.01, "log": True}}, "log range needs low > 0"),
        ({"embed_dim": {"low": 2.5, "high": 8}}, "expected an integer"),
        ({"keep_prob": {"low": 0.5, "high": 1.5}}, "keep_prob must be in"),
        ({"hidden": {"choices": [[8]]}, "layers": {"low": 1, "high": 3}}, "either hidden"),
        ({"activation": {"low": 1, "high": 2}}, "list of choices"),
        ({}, "maps parameters to ranges"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_space(bad)


def test_parameters_map_to_configs():
    base = ModelConfig("deepfm", hidden=(400, 400, 400))
    model, train = apply_params(base, {"keep_prob": 0.9, "layers": 2, "lr": 0.01})
    assert model.dropout == 0.1 and model.hidden == (400, 400)
    assert train == {"lr": 0.01}
    model, _ = apply_params(base, {"neurons": 64})
    assert model.hidden == (64, 64, 64)


def test_tune_from_the_cli_writes_a_config_the_other_commands_take(store, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    out = tmp_path / "tune"
    argv = ["tune", "--store", str(store), "--model", "deepfm", "--space", str(space)]
    assert main([*argv, "--trials", "3", *TINY, "--out", str(out)]) == 0
    result = read_json(out / "tune.json")
    assert len(result["trials"]) == 3
    for trial in result["trials"]:
        assert trial["state"] in ("COMPLETE", "PRUNED")
        assert trial["epochs_reported"] >= 1  # validation AUC reported every epoch (pruning)
        assert 1e-3 <= trial["params"]["lr"] <= 1e-2 and trial["params"]["keep_prob"] in (0.5, 1.0)
    best = result["best"]
    assert best["valid_auc"] == max(
        t["valid_auc"] for t in result["trials"] if t["state"] == "COMPLETE"
    )
    config = load_study_config(out / "best.yaml")
    assert config.train["lr"] == pytest.approx(best["params"]["lr"])
    assert config.model_config("deepfm").dropout == pytest.approx(1 - best["params"]["keep_prob"])
    assert_plot_with_data(out / "tune_history.png")
    assert "tune_history.png" in (out / "report.md").read_text()
    compare = ["compare", "--store", str(store), "--models", "deepfm", "--seeds", "1"]
    assert (
        main([*compare, "--config", str(out / "best.yaml"), *TINY, "--out", str(tmp_path / "c")])
        == 0
    )
    spec = read_json(tmp_path / "c" / "compare.json")["configs"]["deepfm"]
    assert spec["train"]["lr"] == pytest.approx(best["params"]["lr"])


def test_pruning_stops_trials_early(store, tmp_path):
    from deepfm.experiments.runs import StudyConfig

    config = StudyConfig()
    # a threshold no model reaches: every trial is pruned at its first report
    with pytest.raises(ConfigError, match="no trial of 2 completed"):
        run_tune(
            store, tmp_path, model="fm", space=parse_space(SPACE), trials=2, config=config,
            train_overrides={"epochs": 3}, pruner=optuna.pruners.ThresholdPruner(lower=1.01),
            progress=False,
        )  # fmt: skip
    trials = read_json(tmp_path / "tune.json")["trials"]
    assert [t["state"] for t in trials] == ["PRUNED", "PRUNED"]
    assert [t["epochs_reported"] for t in trials] == [1, 1]


def test_tune_resumes_its_study(store, tmp_path):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return fit_run(*args, **kwargs)

    options = dict(
        model="fm", space=parse_space(SPACE), train_overrides={"epochs": 1}, progress=False,
        fit=counting,
    )  # fmt: skip
    run_tune(store, tmp_path, trials=2, **options)
    assert len(calls) == 2
    summary = run_tune(store, tmp_path, trials=3, **options)
    assert len(calls) == 3 and summary["trials_reused"] == 2 and len(summary["trials"]) == 3


class Interrupted(Exception):
    """Stands in for KeyboardInterrupt, which pytest would take as the user stopping it."""


def test_an_interrupted_tune_continues_where_it_stopped(store, tmp_path):
    calls, resumed = [], []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not resumed:
            raise Interrupted  # what a Ctrl-C does to the trial (Optuna marks it failed)
        return fit_run(*args, **kwargs)

    options = dict(model="fm", space=parse_space(SPACE), train_overrides={"epochs": 1})
    with pytest.raises(Interrupted):
        run_tune(store, tmp_path, trials=3, progress=False, fit=interrupted, **options)
    calls.clear()
    resumed.append(True)
    summary = run_tune(store, tmp_path, trials=3, progress=False, fit=interrupted, **options)
    # 1 trial finished before the interruption; 2 more now (the interrupted one failed)
    assert summary["trials_reused"] == 1 and len(calls) == 2
    states = [t["state"] for t in summary["trials"]]
    assert states.count("FAIL") == 1 and states.count("COMPLETE") == 3
