"""The simulated A/B test: arms, daily traffic, lifts, determinism, files, CLI."""

import json
from itertools import pairwise

import numpy as np
import pytest

from deepfm.cli import main
from deepfm.errors import ConfigError
from deepfm.experiments.abtest import (
    ARMS,
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


def test_arms_split_every_type_in_thirds():
    assert ARMS == ("lr_crosses", "lr", "deepfm")  # the paper's control, a reference, DeepFM-D
    types = np.repeat(np.arange(6), 7)  # type sizes not divisible by 3: 3, 2, 2
    arm = assign_arms(types, seed=3)
    for t in range(6):
        counts = np.bincount(arm[types == t], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert not np.array_equal(arm, assign_arms(types, seed=4))
    np.testing.assert_array_equal(arm, assign_arms(types, seed=3))
    halves = assign_arms(types, seed=3, arms=2)
    assert set(halves) == {0, 1}


def test_lift_is_treatment_over_control_minus_one():
    out = lifts({"ctr": 0.2, "cvr": 1.6}, {"ctr": 0.25, "cvr": 1.2})
    assert out["ctr"] == pytest.approx(0.25)  # 0.25 / 0.2 - 1
    assert out["cvr"] == pytest.approx(-0.25)  # 1.2 / 1.6 - 1


def test_daily_records_are_consistent(fast_results):
    days = fast_results["days"]
    assert [d["day"] for d in days] == [1, 2, 3]
    for d in days:
        for arm in ARMS:
            r = d[arm]
            # 300 users on day 1, 30 more each later day, dealt into the arms by type
            assert r["users"] == 100 if d["day"] == 1 else 100 < r["users"] < 100 + 30 * d["day"]
            # every visitor sees one list of L = 10 apps
            assert r["impressions"] == 10 * r["visitors"]
            assert r["ctr"] == pytest.approx(r["downloads"] / r["impressions"])
            assert r["cvr"] == pytest.approx(r["downloads"] / r["users"])
            assert r["expected_ctr"] == pytest.approx(r["expected_downloads"] / r["impressions"])
        for base in ("lr_crosses", "lr"):
            for rate in ("ctr", "cvr", "expected_ctr"):
                lift = d["deepfm"][rate] / d[base][rate] - 1
                assert d["lift"][base][rate] == pytest.approx(lift)
    # the logs grow by each day's impressions (and the store's shelf) before the next update
    for before, after in pairwise(days):
        shown = sum(before[arm]["impressions"] for arm in ARMS)
        assert after["log_rows"] == before["log_rows"] + shown + FAST.shelf_rows
    # the apps launched yesterday have their own ids today (the shelf logged them), and the
    # arms' lists show some of them
    for d in days[2:]:
        assert d["launched_yesterday_with_ids"] == FAST.new_apps
        assert sum(d[arm]["launched_yesterday_shown"] for arm in ARMS) > 0
    assert all(d[arm]["update_seconds"] > 0 for d in days for arm in ARMS)
    total = fast_results["total"]
    for arm in ARMS:
        assert total[arm]["impressions"] == sum(d[arm]["impressions"] for d in days)
    assert fast_results["setup"]["baseline"] == {
        "model": "lr_crosses",
        "crosses": ["category×hour", "history×category"],
    }


def test_deepfm_beats_plain_lr_and_the_engineered_lr_is_the_stronger_baseline(fast_results):
    """Small test (100 users per arm, about 800 impressions per arm and day, a 64-64 DeepFM-D
    trained briefly). Seeds 0-3 gave pooled CTR lifts of DeepFM-D of +36% to +48% over plain LR
    and expected-CTR lifts (mean true click probability of the shown apps, free of the download
    draws) positive on every day. The engineered LR's pooled expected CTR was 1.37-1.55x plain
    LR's; DeepFM-D's lift over it was -7% to +3% (it has exactly the planted crosses; at this
    size DeepFM-D has not learned them better): reported, not asserted. A daily CTR near 0.25
    on 800 impressions has a standard error near 0.015; margins are about half the smallest
    pooled gaps."""
    days = fast_results["days"]
    assert sum(d["deepfm"]["ctr"] > d["lr"]["ctr"] for d in days) >= 2
    assert all(d["lift"]["lr"]["expected_ctr"] > 0 for d in days)
    assert fast_results["total"]["lift"]["lr"]["ctr"] > 0.15
    total = fast_results["total"]
    assert total["lr_crosses"]["expected_ctr"] > 1.15 * total["lr"]["expected_ctr"]


def test_abtest_is_deterministic_by_seed():
    config = ABTestConfig(days=2, users_per_type=4, initial_rows=3000, daily_epochs=1, seed=5)
    tiny = ModelConfig(hidden=(16,))
    configs = fast_configs(5)
    configs["deepfm"] = TrainConfig(epochs=2, seed=5, threads=1, progress=False)
    first = run_abtest(config, train_config=configs, model_config=tiny)
    second = run_abtest(config, train_config=configs, model_config=tiny)
    assert _without_times(first) == _without_times(second)
    cold = run_abtest(
        ABTestConfig(
            days=2, users_per_type=4, initial_rows=3000, daily_epochs=1, seed=5, update="retrain"
        ),
        train_config=configs,
        model_config=tiny,
    )
    # day 1 has no yesterday: warm and cold start serve the same lists (times aside)
    strip = _without_times
    assert strip(cold["days"][0]) == strip(first["days"][0])


def _without_times(value):
    """``value`` with every ``*_seconds`` entry removed (wall times vary between runs)."""
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def test_write_abtest_files(fast_results, tmp_path):
    paths = write_abtest(fast_results, tmp_path)
    assert {p.name for p in paths} == {"abtest.json", "abtest.md", "abtest.png"}
    data = json.loads((tmp_path / "abtest.json").read_text())
    day = data["days"][0]
    assert {"day", "lr_crosses", "lr", "deepfm", "lift"} <= set(day)
    assert set(day["lift"]) == {"lr_crosses", "lr"}
    assert all({"ctr", "cvr"} <= set(day[arm]) for arm in ARMS)
    table = abtest_table(fast_results)
    assert table.count("\n") == 2 + 3  # header, rule, 3 days, total
    assert table.startswith(
        "| day | LR + crosses | LR | DeepFM-D | lift over LR + crosses | lift over LR |"
    )
    markdown = (tmp_path / "abtest.md").read_text()
    assert "with the crosses category×hour, history×category" in markdown
    assert markdown.count("| all |") == 3  # CTR, CVR and expected CTR tables
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
    assert "| day | LR + crosses | LR | DeepFM-D |" in captured.out and "| all |" in captured.out
    assert "lift over LR + crosses" in captured.out
    assert "day 2/2" in captured.err  # progress goes to stderr
    data = json.loads((out / "abtest.json").read_text())
    assert [d["day"] for d in data["days"]] == [1, 2]
    assert (out / "abtest.png").exists()


def test_cli_abtest_bad_option_is_a_clear_error(tmp_path, capsys):
    assert main(["abtest", "--days", "0", "--out", str(tmp_path)]) == 2
    assert "at least one day" in capsys.readouterr().err
    # parsed by the CLI's one --hidden type; a usage error is exit code 2, never a traceback
    assert main(["abtest", "--out", str(tmp_path), "--hidden", "a,b"]) == 2
    assert "hidden sizes" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_abtest():
    """The default test (600 users on day 1, 200 per arm, +30 users and +10 apps a day, 60k rows
    before day 1, 7 days of warm updates, 200-200-200). Seed 0 (2026-12-01) gave DeepFM-D a
    pooled CTR lift of +67% over plain LR (every day +46% to +108%) and -3.7% over the engineered
    LR (expected CTR -1.9%; days -4.6% to 0.0%): with exactly the planted crosses and converged
    FTRL, that LR's lists are as good as DeepFM-D's at its defaults.
    Asserted: DeepFM-D wins at least 6 of 7 days against plain LR and pools above +20% over it;
    against the engineered LR it stays level (within 5% of expected CTR)."""
    results = run_abtest()
    days = results["days"]
    assert len(days) == 7
    assert sum(d["deepfm"]["ctr"] > d["lr"]["ctr"] for d in days) >= 6
    assert results["total"]["lift"]["lr"]["ctr"] > 0.2
    assert results["total"]["lift"]["lr_crosses"]["expected_ctr"] > -0.05
