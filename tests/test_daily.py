"""Daily updates (issue 16) on the generated app market (no shared data needed): vocabularies
grow with old ids kept, a warm start on no new rows changes no score, the bundle records its
lineage and optimiser state, ``--split time:`` orders rows by their time, the day-by-day loop
reports warm, retrained and frozen models, and a served model is replaced by the next day's
under load without a failed request."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pytest
import torch

from deepfm.cli import main
from deepfm.common import file_sha256
from deepfm.data.codecs import FIRST_VALUE, OOV
from deepfm.data.featuremap import FeatureMapBuilder
from deepfm.data.formats import get_format
from deepfm.data.growth import grow_feature_map
from deepfm.data.pipeline import build_dataset, load_dataset
from deepfm.data.reader import BadRows
from deepfm.data.splits import TEST, SplitSpec, time_codes
from deepfm.data.synthetic import APP_MARKET_SCHEMA, market_days, write_tables
from deepfm.experiments.daily import run_daily, split_days
from deepfm.models.registry import ModelConfig
from deepfm.nn import InputLayout
from deepfm.nn.calibration import BetaCalibration, calibration_of, uncalibrated
from deepfm.serve.bundle import (
    MANIFEST,
    OPTIMIZER,
    lineage_of,
    load_bundle,
    load_optimizer_state,
    save_bundle,
)
from deepfm.serve.predictor import Predictor
from deepfm.train.run import Parent, fit_and_evaluate, grow_parent
from deepfm.train.trainer import TrainConfig, predict_proba
from serve_helpers import ServerProcess

JSON = {"Content-Type": "application/json"}

#: a market small enough to train in seconds: 150 apps and 600 users on day 1, 12 new apps and
#: 40 new users on each later day, 4000 impressions a day
DAYS, ROWS, NEW_APPS, NEW_USERS = 3, 4000, 12, 40
TINY = ("--hidden", "16,16", "--embed-dim", "4", "--epochs", "2", "--threads", "1", "--quiet")
#: two float32 forward passes of one model through different thread counts differ by a few ulps
FLOAT_GAP = 1e-6


@pytest.fixture(scope="module")
def week(tmp_path_factory) -> dict:
    """One CSV per day and one with every day, of a growing market."""
    from deepfm.data.synthetic import MarketConfig

    folder = tmp_path_factory.mktemp("market")
    market, tables = market_days(
        DAYS,
        ROWS,
        apps_per_day=NEW_APPS,
        users_per_day=NEW_USERS,
        seed=3,
        config=MarketConfig(n_apps=150, n_users=600),
    )
    paths = [write_tables(folder / f"day{d}.csv", [t]) for d, t in enumerate(tables, 1)]
    everything = write_tables(folder / "week.csv", tables)
    return {"market": market, "days": paths, "all": everything, "folder": folder}


def _train(*args: str) -> None:
    assert main(["train", "--format", "appmarket", *TINY, *args]) == 0


@pytest.fixture(scope="module")
def day1_bundle(week, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "day1"
    _train("--data", str(week["days"][0]), "--split", "random:0.9", "--out", str(out))
    return out


def _read(path: Path):
    return list(get_format("appmarket").read([path], BadRows()))


# -- growth ------------------------------------------------------------------------------------


def test_growth_keeps_old_ids_and_gives_new_values_their_own(week):
    builder = FeatureMapBuilder(APP_MARKET_SCHEMA)
    for chunk in _read(week["days"][0]):
        builder.update(chunk)
    before = builder.build()
    counted = FeatureMapBuilder(APP_MARKET_SCHEMA)
    for chunk in _read(week["days"][1]):
        counted.update(chunk)
    grown = grow_feature_map(before, counted).feature_map

    app_before, app_after = before.field("app_id"), grown.field("app_id")
    assert app_after.size == app_before.size + NEW_APPS  # every new app is shown on its day
    # every day-1 value with an id keeps its local id (its global id moves with the field's
    # offset); a day-1 value that was OOV (user_id's min count is 20) stays OOV or gets a new id
    day1 = pa.concat_tables([c.table for c in _read(week["days"][0])])
    for name in ("user_id", "app_id", "history", "category"):
        old_ids, _ = before.field(name).encode(day1.column(name))
        new_ids, _ = grown.field(name).encode(day1.column(name))
        old_local = old_ids - before.field(name).offset
        new_local = new_ids - grown.field(name).offset
        known = old_local >= FIRST_VALUE
        assert name == "user_id" or known.mean() > 0.5, name  # ~7 rows a user: all OOV
        np.testing.assert_array_equal(old_local[known], new_local[known])
        joined = new_local[~known & (old_local == OOV)]
        assert ((joined == OOV) | (joined >= before.field(name).size)).all(), name
    # the new apps, OOV before, have their own ids after, above every old one
    market = week["market"]
    new_apps = pa.array([f"a{i}" for i in np.flatnonzero(market.app_day == 2)])
    before_ids, _ = app_before.encode(new_apps)
    after_ids, _ = app_after.encode(new_apps)
    assert (before_ids - app_before.offset == 0).all()  # OOV
    local = after_ids[:, 0] - app_after.offset
    assert (local >= app_before.size).all() and len(set(local.tolist())) == NEW_APPS


def test_grown_model_scores_old_rows_as_before(week, day1_bundle):
    """Growth alone (no training) changes no score of a row whose values all kept their ids;
    rows with a value that was OOV and now has an id (the parent's map was fitted on 90% of
    day 1) may change."""
    parent = load_bundle(day1_bundle)
    counted = FeatureMapBuilder(parent.feature_map.schema)
    for chunk in _read(week["days"][1]):
        counted.update(chunk)
    grown_map = grow_feature_map(parent.feature_map, counted).feature_map
    assert grown_map.num_features > parent.feature_map.num_features
    model, _ = grow_parent(Parent(parent.model, parent.config, parent.feature_map), grown_map, 0)
    rows = _read(week["days"][0])[0]
    old_ids = parent.feature_map.encode(rows).ids
    new_ids = grown_map.encode(rows).ids
    moved = InputLayout.of(parent.feature_map).feature_rows(InputLayout.of(grown_map))
    kept = (moved.numpy()[old_ids] == new_ids).all(axis=1)
    assert 0.9 < kept.mean() < 1.0  # a few rows hold values the parent never trained on
    # what grows is the model under the parent's calibration (fitted again after training)
    before = predict_proba(uncalibrated(parent.model), parent.feature_map.encode(rows))
    after = predict_proba(model.eval(), grown_map.encode(rows))
    np.testing.assert_allclose(after[kept], before[kept], atol=FLOAT_GAP, rtol=0)


# -- warm starts through the CLI -----------------------------------------------------------


def _warm_start_on_nothing(parent_dir: Path, out: Path) -> Path:
    """A warm start on no new rows, through the library's path (the CLI refuses an empty file,
    as it does for every command): build_dataset with the parent's map as base, then
    fit_and_evaluate with the parent."""
    parent = load_bundle(parent_dir)
    dataset = build_dataset(
        [], parent.feature_map.schema, split=SplitSpec.parse("none"), base=parent.feature_map
    )
    trained = fit_and_evaluate(
        dataset,
        parent.config,
        TrainConfig(threads=1, progress=False),
        parent=Parent(
            parent.model, parent.config, parent.feature_map, load_optimizer_state(parent)
        ),
    )
    return save_bundle(
        out, trained.model, trained.config, dataset.feature_map, data_format="appmarket",
        metrics=trained.metrics, lineage=lineage_of({"rows": dataset.rows()}, parent),
        optimizer_state=trained.fit.optimizer_state,
    )  # fmt: skip


def test_warm_start_on_no_rows_changes_no_score(week, day1_bundle, tmp_path):
    out = _warm_start_on_nothing(day1_bundle, tmp_path / "same")
    parent, child = load_bundle(day1_bundle), load_bundle(out)
    assert child.feature_map.num_features == parent.feature_map.num_features
    assert child.feature_map.digest() == parent.feature_map.digest()
    for key, tensor in parent.model.state_dict().items():
        assert torch.equal(child.model.state_dict()[key], tensor), key
    rows = _read(week["days"][1])[0]
    np.testing.assert_array_equal(
        predict_proba(child.model, child.feature_map.encode(rows)),
        predict_proba(parent.model, parent.feature_map.encode(rows)),
    )
    saved, kept = load_optimizer_state(parent), load_optimizer_state(child)
    assert saved is not None and kept is not None and saved.keys() == kept.keys()
    assert all(torch.equal(saved[k], kept[k]) for k in saved)


def test_warm_start_records_lineage_and_continues_the_optimiser(week, day1_bundle, tmp_path):
    day2 = tmp_path / "day2"
    assert main(["train", "--warm-start", str(day1_bundle), "--data", str(week["days"][1]),
                 "--split", "random:0.9", "--epochs", "1", "--threads", "1", "--quiet",
                 "--out", str(day2)]) == 0  # fmt: skip
    parent, child = load_bundle(day1_bundle), load_bundle(day2)
    lineage = child.lineage
    assert lineage["parent"]["sha256"] == file_sha256(day1_bundle / MANIFEST) == parent.sha256
    assert lineage["generation"] == 2 and lineage["optimizer_state"] == "continued"
    assert lineage["data"]["paths"] == [str(Path(week["days"][1]).resolve())]
    assert sum(lineage["data"]["rows"][k] for k in ("train", "valid", "test")) == ROWS
    assert lineage["history"] == [{k: v for k, v in parent.lineage.items() if k != "history"}]
    assert parent.lineage["parent"] is None and parent.lineage["generation"] == 1
    assert lineage["added"]["app_id"] == NEW_APPS
    assert child.feature_map.field("app_id").size == parent.feature_map.field("app_id").size + 12
    assert (day2 / OPTIMIZER).exists()
    assert Predictor.load(day2).info["lineage"]["parent"]["sha256"] == parent.sha256
    # the grown model is the parent's uncalibrated one, calibrated again on day 2's validation
    # rows (one calibration layer, not the parent's under a new one)
    assert not isinstance(uncalibrated(child.model), BetaCalibration)
    assert calibration_of(child.model) == child.metrics["calibration"] is not None

    # a third generation from a bundle without optimiser state starts a fresh optimiser
    day2_light = tmp_path / "day2-light"
    shutil.copytree(day2, day2_light)
    bare = tmp_path / "bare"
    assert main(["train", "--warm-start", str(day2), "--data", str(week["days"][2]),
                 "--epochs", "1", "--threads", "1", "--quiet", "--no-optimizer-state",
                 "--out", str(bare)]) == 0  # fmt: skip
    assert not (bare / OPTIMIZER).exists()
    third = load_bundle(bare).lineage
    assert third["generation"] == 3 and len(third["history"]) == 2
    fresh = tmp_path / "fresh"
    assert main(["train", "--warm-start", str(bare), "--data", str(week["days"][2]), "--epochs",
                 "1", "--threads", "1", "--quiet", "--out", str(fresh)]) == 0  # fmt: skip
    assert load_bundle(fresh).lineage["optimizer_state"] == "fresh"


def test_warm_start_refuses_model_options(day1_bundle, week, tmp_path, capsys):
    code = main(["train", "--warm-start", str(day1_bundle), "--data", str(week["days"][1]),
                 "--hidden", "8", "--out", str(tmp_path / "x")])  # fmt: skip
    assert code != 0
    assert "--hidden cannot be combined with --warm-start" in capsys.readouterr().err


# -- time splits -------------------------------------------------------------------------------


def test_time_codes_order_numbers_as_numbers_and_stamps_as_text():
    codes, order = time_codes(np.array(["10", "9", "2", "10", "9"], dtype=object), 0.0)
    assert order.tolist() == [2, 1, 4, 0, 3]  # 2 < 9 < 10, ties in input order
    assert (codes == TEST).tolist() == [True, False, False, True, False]
    stamps = np.array(["14102100", "14102023", "14102101"], dtype=object)
    codes, order = time_codes(stamps, 0.0)
    assert order.tolist() == [1, 0, 2] and codes.tolist().index(TEST) == 2


def test_split_time_tests_on_the_last_day_and_validates_before_it(week, tmp_path):
    # the days written out of order: 2, 3, 1
    shuffled = write_tables(
        tmp_path / "shuffled.csv",
        [pa_csv.read_csv(week["days"][i]) for i in (1, 2, 0)],
    )
    data = load_dataset(
        get_format("appmarket"),
        [shuffled],
        split=SplitSpec.parse("time:day"),
        valid_fraction=0.25,
    )
    day_of_line = np.r_[0, 0, np.repeat([2, 3, 1], ROWS)]  # lines from 1; 1 is the header
    assert set(day_of_line[data.test.lines]) == {3} and len(data.test) == ROWS
    train_days, valid_days = day_of_line[data.train.lines], day_of_line[data.valid.lines]
    assert train_days.max() <= valid_days.min()  # validation rows come after training rows
    assert len(data.valid) == round(0.25 * 2 * ROWS)
    assert np.all(np.diff(train_days) >= 0)  # training rows in time order
    assert data.time_range == ("1", "3")


# -- the day-by-day loop -------------------------------------------------------------------


def test_daily_loop_reports_warm_retrain_and_frozen(week):
    fmt = get_format("appmarket").keep_columns(["day"])
    days = split_days(list(fmt.read([week["all"]], BadRows())), "day")
    assert [d.time for d in days] == ["1", "2", "3"]
    results = run_daily(
        days,
        APP_MARKET_SCHEMA,
        ModelConfig(hidden=(16, 16), embed_dim=4),
        TrainConfig(epochs=2, threads=1, progress=False, seed=0),
        daily_epochs=1,
        track="app_id",
    )
    first, second = results["days"]
    # day 1: one model for all three; afterwards the frozen model keeps its vocabulary
    assert first["warm"]["auc"] == first["retrain"]["auc"] == first["frozen"]["auc"]
    assert second["frozen"]["features"] == first["frozen"]["features"]
    assert second["warm"]["features"] > first["warm"]["features"]
    assert second["warm"]["added"]["app_id"] == NEW_APPS
    # the apps launched on day 2 have their own ids in the warm model, not in the frozen one
    new = second["new_values"]
    assert new["new"] == NEW_APPS and new["with_ids"] == NEW_APPS and new["frozen_with_ids"] == 0
    assert new["shown_next_day"] > 0 and 0 <= new["mean_rank_next_day"] <= 1
    for name in ("warm", "retrain", "frozen"):
        assert 0.4 < results["mean"][name]["auc"] < 1.0
    assert results["mean"]["time_ratio"] > 0


# -- serving continuity ----------------------------------------------------------------------


def _install(source: Path, target: Path) -> None:
    """Replace the bundle directory ``target`` by a copy of ``source`` (renames, as
    ``save_bundle`` does)."""
    staging = target.with_name(f".{target.name}.staging")
    shutil.copytree(source, staging)
    old = target.with_name(f".{target.name}.old")
    target.rename(old)
    staging.rename(target)
    shutil.rmtree(old)


def test_next_days_bundle_is_hot_reloaded_under_load(week, day1_bundle, tmp_path):
    """Requests keep flowing while tomorrow's bundle replaces today's: none fails, every answer
    is one model's or the other's, and after the reload the served scores are the new bundle's
    own (old ids' scores change only by what training changed: a warm start on no rows serves
    the very same scores)."""
    same = _warm_start_on_nothing(day1_bundle, tmp_path / "same")
    day2 = tmp_path / "day2"
    common = ["--threads", "1", "--quiet", "--warm-start", str(day1_bundle)]
    assert main(["train", *common, "--data", str(week["days"][1]), "--epochs", "1",
                 "--out", str(day2)]) == 0  # fmt: skip

    table = pa_csv.read_csv(week["days"][0]).slice(0, 50)  # old users and apps
    records = [
        {k: (str(v) if k not in ("downloads",) else v) for k, v in row.items()
         if k in APP_MARKET_SCHEMA.names}
        for row in table.to_pylist()
    ]  # fmt: skip
    body = json.dumps({"records": records}).encode()
    offline = {
        name: np.asarray(Predictor.load(path).predict_proba(records))
        for name, path in (("day1", day1_bundle), ("day2", day2))
    }
    assert np.abs(offline["day1"] - offline["day2"]).max() > 1e-4  # training changed scores

    served = tmp_path / "served"
    shutil.copytree(day1_bundle, served)
    process = ServerProcess(served)
    results: list[tuple[int, list[float] | str]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=process.url, timeout=30) as own:
            while not stop.is_set():
                try:
                    response = own.post("/predict", content=body, headers=JSON)
                except httpx.HTTPError as exc:
                    results.append((-1, repr(exc)))
                    continue
                ok = response.status_code == 200
                results.append((response.status_code, response.json()["ctr"] if ok else ""))

    def served_now() -> np.ndarray:
        return np.asarray(process.client.post("/predict", content=body, headers=JSON).json()["ctr"])

    threads = [threading.Thread(target=hammer) for _ in range(3)]
    try:
        client = process.client
        np.testing.assert_allclose(served_now(), offline["day1"], atol=FLOAT_GAP, rtol=0)
        for thread in threads:
            thread.start()
        _wait(lambda: len(results) >= 10)
        _install(same, served)  # yesterday's model grown on no rows: the same scores
        reloaded = client.post("/reload")
        assert reloaded.status_code == 200, (reloaded.text, "".join(process.log[-30:]))
        np.testing.assert_allclose(served_now(), offline["day1"], atol=FLOAT_GAP, rtol=0)
        done = len(results)
        _wait(lambda: len(results) >= done + 10)
        _install(day2, served)  # today's update: the new bundle's own scores
        reloaded = client.post("/reload")
        assert reloaded.status_code == 200, (reloaded.text, "".join(process.log[-30:]))
        np.testing.assert_allclose(served_now(), offline["day2"], atol=FLOAT_GAP, rtol=0)
        info = client.get("/model").json()
        assert info["lineage"]["parent"]["sha256"] == load_bundle(day1_bundle).sha256
        assert info["reloads"] == 2
        done = len(results)
        _wait(lambda: len(results) >= done + 10)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        process.stop()
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]
    for _, answer in results:  # every answer is one of the two models' scores
        gaps = [np.abs(np.asarray(answer) - offline[n]).max() for n in offline]
        assert min(gaps) <= FLOAT_GAP


def _wait(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_cli_market_csv_and_daily(tmp_path, capsys):
    week = tmp_path / "week.csv"
    assert main(["market-csv", "--out", str(week), "--days", "2", "--rows-per-day", "1500",
                 "--apps", "60", "--users", "200", "--new-apps", "5"]) == 0  # fmt: skip
    out = tmp_path / "daily"
    assert main(["daily", "--data", str(week), "--format", "appmarket", "--track", "app_id",
                 *TINY, "--daily-epochs", "1", "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| train ≤ day | test day |" in printed and "Warm − retrain mean next-day AUC" in printed
    # a results directory, marked as such (README, "Safety")
    expected = {"daily.json", "daily.md", "daily.png", ".deepfm-results"}
    assert {p.name for p in out.iterdir()} == expected
    assert [d["test_day"] for d in json.loads((out / "daily.json").read_text())["days"]] == ["2"]
    assert main(["daily", "--data", str(week), "--split", "random:0.9", "--out", str(out)]) == 2
    assert "--split time:COLUMN" in capsys.readouterr().err
    assert main(["train", "--data", str(week), "--format", "appmarket", "--decay", "0.5",
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    assert "add --warm-start" in capsys.readouterr().err
