"""The simulated A/B test: arms, daily traffic, lifts, determinism, files, CLI."""

import json
from itertools import pairwise

import numpy as np
import pytest

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.abtest import (
    ABTestConfig,
    abtest_table,
    assign_arms,
    lifts,
    run_abtest,
    write_abtest,
)
from deepfm.models.registry import ModelConfig
from deepfm.train.trainer import TrainConfig
from online_helpers import FAST_MODEL, fast_configs

FAST = ABTestConfig(days=3, users_per_type=50, initial_rows=30_000, daily_epochs=2)


@pytest.fixture(scope="module")
def fast_results():
    results = run_abtest(FAST, train_config=fast_configs(0), model_config=FAST_MODEL)
    return results


def test_arms_split_every_type_in_half():
    types = np.repeat(np.arange(6), 7)  # odd type sizes: halves differ by one at most
    arm = assign_arms(types, seed=3)
    for t in range(6):
        assert abs(int(np.sum(arm[types == t] == 0)) - int(np.sum(arm[types == t] == 1))) <= 1
    assert not np.array_equal(arm, assign_arms(types, seed=4))
    np.testing.assert_array_equal(arm, assign_arms(types, seed=3))


def test_lift_is_treatment_over_control_minus_one():
    out = lifts({"ctr": 0.2, "cvr": 1.6}, {"ctr": 0.25, "cvr": 1.2})
    assert out["ctr_lift"] == pytest.approx(0.25)  # 0.25 / 0.2 - 1
    assert out["cvr_lift"] == pytest.approx(-0.25)  # 1.2 / 1.6 - 1


def test_daily_records_are_consistent(fast_results):
    days = fast_results["days"]
    assert [d["day"] for d in days] == [1, 2, 3]
    for d in days:
        for arm in ("lr", "deepfm"):
            r = d[arm]
            assert r["users"] == 150
            # every visitor sees one list of L = 10 apps
            assert r["impressions"] == 10 * r["visitors"]
            assert r["ctr"] == pytest.approx(r["downloads"] / r["impressions"])
            assert r["cvr"] == pytest.approx(r["downloads"] / r["users"])
        assert d["ctr_lift"] == pytest.approx(d["deepfm"]["ctr"] / d["lr"]["ctr"] - 1)
    # the logs grow by each day's impressions before the next retraining
    for before, after in pairwise(days):
        shown = before["lr"]["impressions"] + before["deepfm"]["impressions"]
        assert after["log_rows"] == before["log_rows"] + shown
    total = fast_results["total"]
    assert total["lr"]["impressions"] == sum(d["lr"]["impressions"] for d in days)


def test_deepfm_beats_lr_on_most_days(fast_results):
    """Small test (150 users per arm, about 1,200 impressions per arm and day). Seeds 0-3 gave
    daily CTR lifts of +19% to +63% (seed 0: about +40% every day); a daily CTR near 0.25 on
    1,200 impressions has a standard error near 0.0125, so a gap of ~0.09 is seven of them.
    The expected CTR of the shown lists (mean true click probability, free of the download
    draw) must favour DeepFM-D every day."""
    days = fast_results["days"]
    wins = sum(d["deepfm"]["ctr"] > d["lr"]["ctr"] for d in days)
    assert wins >= 2
    assert all(d["deepfm"]["expected_ctr"] > d["lr"]["expected_ctr"] for d in days)
    assert fast_results["total"]["ctr_lift"] > 0.15


def test_abtest_is_deterministic_by_seed():
    config = ABTestConfig(days=2, users_per_type=4, initial_rows=3000, daily_epochs=1, seed=5)
    tiny = ModelConfig(hidden=(16,))
    configs = fast_configs(5)
    configs["deepfm"] = TrainConfig(epochs=2, seed=5, threads=1, progress=False)
    first = run_abtest(config, train_config=configs, model_config=tiny)
    second = run_abtest(config, train_config=configs, model_config=tiny)
    assert first == second
    cold = run_abtest(
        ABTestConfig(
            days=2, users_per_type=4, initial_rows=3000, daily_epochs=1, seed=5, warm_start=False
        ),
        train_config=configs,
        model_config=tiny,
    )
    # day 1 has no yesterday: warm and cold start serve the same lists
    assert cold["days"][0] == first["days"][0]


def test_write_abtest_files(fast_results, tmp_path):
    paths = write_abtest(fast_results, tmp_path)
    assert {p.name for p in paths} == {"abtest.json", "abtest.md", "abtest.png"}
    data = json.loads((tmp_path / "abtest.json").read_text())
    day = data["days"][0]
    assert {"day", "lr", "deepfm", "ctr_lift", "cvr_lift"} <= set(day)
    assert {"ctr", "cvr"} <= set(day["lr"]) and {"ctr", "cvr"} <= set(day["deepfm"])
    table = abtest_table(fast_results)
    assert table.count("\n") == 2 + 3  # header, rule, 3 days, total
    assert (tmp_path / "abtest.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"days": 0}, "one day"),
        ({"visit_rate": 0.0}, "visit_rate"),
        ({"list_size": 0}, "list size"),
        ({"initial_rows": 5}, "1000 rows"),
        ({"daily_epochs": 0}, "daily_epochs"),
        ({"n_types": 0}, "user types"),
    ],
)
def test_bad_settings_raise_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        ABTestConfig(**changes)


def test_cli_abtest_writes_its_files(tmp_path, capsys):
    out = tmp_path / "ab"
    argv = ["abtest", "--days", "2", "--out", str(out), "--users-per-type", "3"]
    argv += ["--initial-rows", "2000", "--epochs", "1", "--daily-epochs", "1", "--hidden", "16"]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "| day | LR CTR |" in captured.out and "| all |" in captured.out
    assert "day 2/2" in captured.err  # progress goes to stderr
    data = json.loads((out / "abtest.json").read_text())
    assert [d["day"] for d in data["days"]] == [1, 2]
    assert (out / "abtest.png").exists()


def test_cli_abtest_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["abtest", "--days", "0", "--out", str(tmp_path)]) == 2
    assert "at least one day" in capsys.readouterr().err
    assert main(["abtest", "--out", str(tmp_path), "--hidden", "a,b"]) == 2
    assert "hidden sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_abtest():
    """The default test (600 users, 60k rows before day 1, 7 days, 200-200-200). Seed 0 gave
    daily CTR lifts of +34% to +56% (pooled +43%); DeepFM-D must win at least 6 of 7 days and
    pool a lift above +20%."""
    results = run_abtest()
    days = results["days"]
    assert len(days) == 7
    assert sum(d["deepfm"]["ctr"] > d["lr"]["ctr"] for d in days) >= 6
    assert results["total"]["ctr_lift"] > 0.2
