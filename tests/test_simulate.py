"""The online simulation: batched scoring, list metrics of LR vs DeepFM-D, files, CLI."""

import json

import numpy as np
import pytest
import torch

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.simulate import (
    SimulationConfig,
    app_popularity,
    log_dataset,
    pair_table,
    run_simulation,
    score_matrix,
    simulation_market,
    true_ctr_matrix,
    write_simulation,
)
from deepfm.models.registry import ModelConfig, build_model
from deepfm.nn import InputLayout
from deepfm.train.trainer import TrainConfig
from online_helpers import FAST_MODEL, fast_configs

METRIC_KEYS = {"personalization", "coverage", "popularity_mean", "popularity_var"}


FAST = SimulationConfig(users_per_type=20, rows=30_000)


@pytest.fixture(scope="module")
def fast_result():
    result = run_simulation(FAST, train_config=fast_configs(0), model_config=FAST_MODEL)
    return result


def test_pair_scoring_is_batched_consistently():
    market = simulation_market(2, 5, seed=4)
    dataset = log_dataset(list(market.generate(3000, 4)), split="none", seed=4)
    torch.manual_seed(0)
    model = build_model(InputLayout.of(dataset.feature_map), ModelConfig(hidden=(8,)))
    users = np.array([0, 3, 7, 9, 2])
    hours, weekdays = np.array([1, 5, 12, 20, 23]), np.array([0, 1, 2, 3, 6])
    whole = score_matrix(model, dataset.feature_map, market, users, hours, weekdays)
    blocks = score_matrix(model, dataset.feature_map, market, users, hours, weekdays, block_users=2)
    assert whole.shape == (5, market.n_apps)
    # same rows, same model: block boundaries must not change a score (up to float32 noise of
    # a different batch size in the matrix multiplies)
    np.testing.assert_allclose(whole, blocks, rtol=1e-5, atol=1e-7)
    # the true CTR matrix is the generator's p_true of the same pairs, users major
    truth = true_ctr_matrix(market, users, hours, weekdays)
    p_true = pair_table(market, users, hours, weekdays).column("p_true").to_numpy()
    np.testing.assert_array_equal(truth.ravel(), p_true)


def test_app_popularity_is_the_download_percentile():
    market = simulation_market(1, 2, seed=0)
    pop = app_popularity(market)
    assert pop.max() == 1.0 and pop.min() > 0
    top = np.argmax(market.app_downloads)
    assert pop[top] == 1.0
    order = np.argsort(market.app_downloads)
    assert np.all(np.diff(pop[order]) >= 0)


def test_result_has_the_promised_shape(fast_result):
    metrics = fast_result.metrics
    for name in ("lr_crosses", "lr", "deepfm", "oracle"):
        assert list(metrics[name]) == ["5", "10", "20"]
        for size, m in metrics[name].items():
            assert set(m) >= METRIC_KEYS
            lists = fast_result.lists[name][int(size)]
            assert lists.shape == (120, int(size))
    assert set(metrics["setup"]["test"]) == {"oracle", "lr_crosses", "lr", "deepfm"}
    # the baseline states its crosses: the market's planted order-2 effects
    assert metrics["setup"]["baseline"] == {
        "model": "lr_crosses",
        "crosses": ["category×hour", "history×category"],
    }


def test_deepfm_lists_are_personal_cover_more_and_are_less_popular(fast_result):
    """DeepFM-D against plain LR on the small market (6 types x 20 users, 30k logged rows), seeds
    0-3: DeepFM-D personalization 0.65-0.72 vs LR 0; coverage 4.6-8.8x LR's; true CTR of the
    lists 0.08-0.16 higher; popularity@L 0.04-0.31 lower at L = 10 and 20 (at L = 5 one seed's
    LR list was the less popular one, 0.878 vs 0.896). The margins below are about half the
    smallest gaps. LR scores a user's apps as (user part) + (app part): every user gets the
    same ranking, so its personalization is 0 (up to float ties) and its coverage exactly
    L / 400."""
    m = fast_result.metrics
    for size in ("5", "10", "20"):
        lr, dfm = m["lr"][size], m["deepfm"][size]
        assert lr["personalization"] < 0.02
        assert lr["coverage"] == pytest.approx(int(size) / 400)
        assert dfm["personalization"] > 0.4
        assert dfm["coverage"] > 3 * lr["coverage"]
        assert dfm["true_ctr"] > lr["true_ctr"] + 0.04
        # nobody beats the lists ranked by the true CTR
        assert m["oracle"][size]["true_ctr"] >= dfm["true_ctr"]
    for size in ("10", "20"):
        assert m["deepfm"][size]["popularity_mean"] < m["lr"][size]["popularity_mean"] - 0.02
    assert m["setup"]["test"]["deepfm"]["auc"] > m["setup"]["test"]["lr"]["auc"] + 0.03


def test_the_engineered_lr_personalises(fast_result):
    """The paper's baseline, LR with the planted crosses (category × hour, history × category),
    on the small market, seeds 0-3: personalization 0.64-0.75 at every L where plain LR has 0;
    coverage 7-8.8x plain LR's; test AUC 0.058-0.098 above plain LR's. Margins: about half the
    smallest gaps. Against DeepFM-D nothing is asserted here: with exactly the planted crosses
    and tuned FTRL it matched or beat this small, briefly trained DeepFM-D (test AUC +0.003 to
    +0.026 over it); the full-size run is in the README."""
    m = fast_result.metrics
    for size in ("5", "10", "20"):
        crossed, lr = m["lr_crosses"][size], m["lr"][size]
        # history × category scores a user's apps by the user's own downloads: personal lists
        assert crossed["personalization"] > 0.3
        assert crossed["coverage"] > 3 * lr["coverage"]
    test = m["setup"]["test"]
    assert test["lr_crosses"]["auc"] > test["lr"]["auc"] + 0.03


def test_simulation_is_deterministic_by_seed():
    config = SimulationConfig(users_per_type=4, rows=4000, list_sizes=(5,), seed=7)
    tiny = ModelConfig(hidden=(16,))
    configs = fast_configs(7)
    configs["deepfm"] = TrainConfig(epochs=2, seed=7, threads=1, progress=False)
    first = run_simulation(config, train_config=configs, model_config=tiny)
    second = run_simulation(config, train_config=configs, model_config=tiny)
    assert first.metrics == second.metrics
    for name in first.lists:
        np.testing.assert_array_equal(first.lists[name][5], second.lists[name][5])
    other = run_simulation(
        SimulationConfig(users_per_type=4, rows=4000, list_sizes=(5,), seed=8),
        train_config=configs,
        model_config=tiny,
    )
    assert other.metrics["setup"]["test"] != first.metrics["setup"]["test"]


def test_write_simulation_files(fast_result, tmp_path):
    paths = write_simulation(fast_result, tmp_path)
    names = {p.name for p in paths}
    assert names == {
        "simulate.json",
        "simulate.md",
        "personalization.png",
        "coverage.png",
        "popularity.png",
    }
    data = json.loads((tmp_path / "simulate.json").read_text())
    assert set(data["deepfm"]["10"]) >= METRIC_KEYS
    assert data["lr"]["5"] == pytest.approx(fast_result.metrics["lr"]["5"])
    table = (tmp_path / "simulate.md").read_text()
    assert "| DeepFM-D | 10 |" in table and "| LR | 20 |" in table
    assert "| LR + crosses | 5 |" in table
    assert "with the crosses category×hour, history×category" in table
    assert all((tmp_path / n).stat().st_size > 10_000 for n in names if n.endswith(".png"))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_types": 7}, "user types"),
        ({"users_per_type": 1}, "2 users"),
        ({"list_sizes": (0, 5)}, "positive"),
        ({"hour": 24}, "hour"),
        ({"rows": 10}, "1000 rows"),
    ],
)
def test_bad_settings_raise_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        SimulationConfig(**changes)


def test_too_long_lists_raise_a_config_error():
    with pytest.raises(ConfigError, match="longer than"):
        run_simulation(SimulationConfig(users_per_type=2, rows=1000, list_sizes=(401,)))


def test_cli_simulate_writes_its_files(tmp_path, capsys):
    out = tmp_path / "sim"
    argv = ["simulate", "--out", str(out), "--users-per-type", "3", "--rows", "3000"]
    argv += ["--epochs", "1", "--hidden", "16", "--lists", "5,10", "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| LR | 5 |" in printed and "personalization@L" in printed
    assert "LR + crosses: the paper's well-engineered LR baseline" in printed
    data = json.loads((out / "simulate.json").read_text())
    assert list(data["lr"]) == ["5", "10"] and list(data["deepfm"]) == ["5", "10"]
    assert (out / "coverage.png").exists()
    # another expert's crosses, stated in the output
    argv = [*argv[:2], str(tmp_path / "sim2"), *argv[3:], "--crosses", "app_id×hour"]
    assert main(argv) == 0
    assert "with the crosses app_id×hour" in capsys.readouterr().out
    data = json.loads((tmp_path / "sim2" / "simulate.json").read_text())
    assert data["setup"]["baseline"]["crosses"] == ["app_id×hour"]


def test_cli_simulate_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path), "--lists", "5,ten"]) == 2
    assert "list sizes like 5,10,20" in capsys.readouterr().err
    assert main(["simulate", "--out", str(tmp_path), "--types", "9"]) == 2
    assert "user types" in capsys.readouterr().err
    argv = ["simulate", "--out", str(tmp_path), "--rows", "1000", "--users-per-type", "2"]
    assert main([*argv, "--crosses", "category×weather", "--quiet"]) == 2
    assert "cross 'category×weather'" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_simulation_claims():
    """The default run (6 x 100 users, 150k logged rows, 200-200-200): seed 0 gave DeepFM-D
    personalization 0.75 vs plain LR 0, coverage 0.21/0.33/0.56 vs 0.0125/0.025/0.05,
    popularity@L 0.90/0.84/0.76 vs 0.98/0.89/0.82 and true CTR 0.44/0.39/0.34 vs 0.31/0.25/0.20.
    The engineered LR (the planted crosses): personalization 0.74-0.75, test AUC 0.802 against
    plain LR's 0.734 and DeepFM-D's 0.812; its lists' true CTR equals DeepFM-D's (0.434/0.387/
    0.340 vs 0.442/0.388/0.337). The margins are about half the gaps; DeepFM-D only has to stay
    ahead of the engineered LR in AUC (the run is deterministic at one thread)."""
    m = run_simulation().metrics
    for size in ("5", "10", "20"):
        lr, dfm = m["lr"][size], m["deepfm"][size]
        assert lr["personalization"] < 0.02
        assert m["lr_crosses"][size]["personalization"] > 0.35
        assert dfm["personalization"] > 0.4
        assert dfm["coverage"] > 2.5 * lr["coverage"]
        assert dfm["popularity_mean"] < lr["popularity_mean"] - 0.02
        assert dfm["true_ctr"] > lr["true_ctr"] + 0.04
    test = m["setup"]["test"]
    assert test["lr_crosses"]["auc"] > test["lr"]["auc"] + 0.03
    assert test["deepfm"]["auc"] > test["lr_crosses"]["auc"]
