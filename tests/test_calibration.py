"""Calibration of the logits (beta calibration fitted on the validation rows) and ``train --auto``.

Every test uses generated data (benchmarks/make_criteo.py's planted logistic model), so the suite
runs without ../shared.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from deepfm.cli import main
from deepfm.nn.calibration import BetaCalibration, calibrated, uncalibrated
from deepfm.serve.bundle import MODEL, load_bundle, save_bundle
from deepfm.serve.predictor import Predictor
from deepfm.train.calibration import fit_calibration
from deepfm.train.metrics import auc_logloss


def _generated(path: Path, rows: int, seed: int = 0) -> Path:
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from make_criteo import write_criteo
    finally:
        sys.path.pop(0)
    write_criteo(path, rows, seed=seed, vocab_cap=300)
    return path


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


# -- fitting -------------------------------------------------------------------------------------


def _softplus(z: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, z)


def _beta(logits: np.ndarray, c: dict) -> np.ndarray:
    return c["b"] * _softplus(logits) - c["a"] * _softplus(-logits) + c["c"]


def _truth(rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    draw = np.random.default_rng(seed)
    z = draw.normal(0.0, 1.5, rows)
    return z, (draw.random(rows) < _sigmoid(z)).astype(np.float64)


@pytest.mark.parametrize(
    "distortion",
    [
        lambda z: 3.0 * z + 1.0,  # overconfident and biased: Platt's case (a = b)
        lambda z: np.where(z > 0, 3.0 * z, z),  # overconfident on the positive side only
    ],
    ids=["platt-like", "one-sided"],
)
def test_calibration_undoes_a_planted_miscalibration_and_keeps_the_ranking(distortion):
    # true logits z, labels drawn from sigmoid(z); the "model" says a monotone distortion of
    # z: the same ranking, miscalibrated. The fitted map must leave AUC exactly as it was and
    # bring the logloss back to the truth's (within 5e-3: 20k rows; the map is 3 numbers, the
    # one-sided kink is matched by softplus's smooth one), on the rows it was fitted on and
    # on other rows of the same law.
    z, labels = _truth(40_000, 0)
    model_logits = distortion(z)
    fit, held = slice(0, 20_000), slice(20_000, None)
    calibration = fit_calibration(model_logits[fit], labels[fit])
    assert calibration["method"] == "beta"
    for rows in (fit, held):
        raw = auc_logloss(labels[rows], _sigmoid(model_logits[rows]))
        fixed = auc_logloss(labels[rows], _sigmoid(_beta(model_logits[rows], calibration)))
        truth = auc_logloss(labels[rows], _sigmoid(z[rows]))
        assert fixed["auc"] == raw["auc"]
        assert fixed["logloss"] < raw["logloss"] - 0.01  # measured: 0.72 / 0.53 -> 0.50
        assert fixed["logloss"] == pytest.approx(truth["logloss"], abs=5e-3)


def test_the_planted_platt_case_is_found_exactly():
    # 3z + 1 is undone by a = b = 1/3, c = -1/3 (a = b: Platt scaling), within the sampling
    # error of 20k rows
    z, labels = _truth(20_000, 0)
    calibration = fit_calibration(3.0 * z + 1.0, labels)
    assert calibration["a"] == pytest.approx(1 / 3, abs=0.03)
    assert calibration["b"] == pytest.approx(1 / 3, abs=0.03)
    assert calibration["c"] == pytest.approx(-1 / 3, abs=0.06)


def test_the_identity_is_kept_when_nothing_can_be_learned():
    identity = {"method": "beta", "a": 1.0, "b": 1.0, "c": 0.0}
    logits = np.random.default_rng(1).normal(size=1000)
    assert fit_calibration(logits, np.ones(1000)) == identity
    # logits that are already the truth: the 5-fold check finds no gain out of fold and the
    # identity is kept (three numbers fitted to noise lose out of fold in expectation; this
    # seeded draw is one where they do)
    z, truth = _truth(2000, 0)
    assert fit_calibration(z, truth) == identity


def test_the_calibrated_module_computes_the_beta_map_of_the_logits():
    class Sum(torch.nn.Module):
        def forward(self, ids, values=None):
            return ids.float().sum(dim=1)

    inner = Sum()
    planted = {"method": "beta", "a": 0.5, "b": 0.25, "c": -2.0}
    model = calibrated(inner, planted)
    assert isinstance(model, BetaCalibration) and uncalibrated(model) is inner
    assert model.to_dict() == planted
    ids = torch.tensor([[1, 2], [-3, -4], [0, 0]])
    expected = _beta(np.array([3.0, -7.0, 0.0]), planted)
    np.testing.assert_allclose(model(ids, None).numpy(), expected, rtol=1e-6)
    # a = b is Platt scaling: a · s + c
    platt = calibrated(inner, {"method": "beta", "a": 0.5, "b": 0.5, "c": -2.0})
    np.testing.assert_allclose(platt(ids, None).numpy(), [-0.5, -5.5, -2.0], atol=1e-6)
    assert calibrated(inner, None) is inner
    with pytest.raises(ValueError, match="positive"):
        calibrated(inner, {"method": "beta", "a": -1.0, "b": 1.0, "c": 0.0})
    with pytest.raises(ValueError, match="finite"):
        calibrated(inner, {"method": "beta", "a": 1.0, "b": float("inf"), "c": 0.0})


# -- training and every scoring path ---------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory) -> tuple[Path, Path]:
    """A small DeepFM-D trained by ``deepfm train`` on generated rows (calibrated by default),
    and the file it was trained on."""
    work = tmp_path_factory.mktemp("calibration")
    data = _generated(work / "train.txt", 6000)
    out = work / "bundle"
    rc = main(
        ["train", "--data", str(data), "--model", "deepfm", "--hidden", "16,16", "--epochs", "3",
         "--threads", "1", "--quiet", "--min-count", "2", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    return out, data


def test_train_saves_a_calibration_that_keeps_valid_auc_and_lowers_valid_logloss(trained_bundle):
    bundle_dir, _ = trained_bundle
    meta = json.loads((bundle_dir / MODEL).read_text())
    assert meta["train"]["monitor"] == "auc" and meta["train"]["calibration"] == "beta"
    calibration = meta["calibration"]
    assert calibration["method"] == "beta" and calibration["a"] > 0 and calibration["b"] > 0
    metrics = json.loads((bundle_dir / "metrics.json").read_text())
    assert metrics["calibration"] == calibration
    bundle = load_bundle(bundle_dir)
    assert isinstance(bundle.model, BetaCalibration)
    # the validation rows the calibration was fitted on: raw vs calibrated scores
    from deepfm.data.formats import get_format
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.splits import SplitSpec

    _, data = trained_bundle
    dataset = load_dataset(
        get_format("criteo"), [data], split=SplitSpec.parse("random:0.9"), seed=0, min_count=2
    )
    from deepfm.train.trainer import Batches, evaluate

    raw = evaluate(uncalibrated(bundle.model), Batches(dataset.valid))
    fixed = evaluate(bundle.model, Batches(dataset.valid))
    # a, b > 0 keep the order; float32 rounding may merge two nearly equal scores
    assert fixed["auc"] == pytest.approx(raw["auc"], abs=1e-6)
    assert fixed["logloss"] <= raw["logloss"] + 1e-9  # the fit minimised exactly this
    assert fixed == pytest.approx(metrics["valid"], abs=1e-9)


def test_every_scoring_path_gives_the_calibrated_probabilities(trained_bundle, tmp_path):
    from serve_helpers import ServerProcess, criteo_records

    source, data = trained_bundle
    bundle = load_bundle(source)
    # a planted calibration far from the identity, so no path can pass by ignoring it
    planted = {"method": "beta", "a": 0.5, "b": 0.25, "c": -0.75}  # exact in float32
    model = calibrated(uncalibrated(bundle.model), planted)
    target = save_bundle(
        tmp_path / "planted", model, bundle.config, bundle.feature_map, data_format="criteo"
    )
    assert json.loads((target / MODEL).read_text())["calibration"] == planted
    records = criteo_records(data, 50)
    torch_predictor = Predictor.load(target)
    encoded = torch_predictor.encode(records)
    with torch.inference_mode():
        raw = uncalibrated(torch_predictor.model)(
            torch.from_numpy(encoded.ids),
            None if encoded.values is None else torch.from_numpy(encoded.values),
        )
    expected = _sigmoid(_beta(raw.double().numpy(), planted))
    assert not np.allclose(expected, _sigmoid(raw.double().numpy()), atol=1e-2)

    np.testing.assert_allclose(torch_predictor.predict_proba(records), expected, atol=1e-6)
    onnx = Predictor.load(target, runtime="onnx")
    np.testing.assert_allclose(onnx.predict_proba(records), expected, atol=1e-5)  # float32 graph
    server = ServerProcess(target)
    try:
        answer = server.client.post("/predict", json={"records": records})
    finally:
        server.stop()
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["ctr"], expected, atol=1e-6)
    rows = tmp_path / "rows.txt"
    rows.write_text("".join(data.read_text().splitlines(keepends=True)[:50]))
    assert main(["predict", "--model", str(target), "--data", str(rows), "--out",
                 str(tmp_path / "p.txt")]) == 0  # fmt: skip
    np.testing.assert_allclose(np.loadtxt(tmp_path / "p.txt"), expected, atol=1e-6)  # %.7f


def test_calibration_none_writes_a_raw_model(trained_bundle, tmp_path):
    _, data = trained_bundle
    out = tmp_path / "raw"
    rc = main(
        ["train", "--data", str(data), "--model", "lr", "--epochs", "1", "--threads", "1",
         "--quiet", "--calibration", "none", "--out", str(out)]
    )  # fmt: skip
    assert rc == 0
    assert "calibration" not in json.loads((out / MODEL).read_text())
    assert not isinstance(load_bundle(out).model, BetaCalibration)


# -- train --auto ----------------------------------------------------------------------------------


def test_auto_respects_its_time_box_and_writes_the_chosen_settings(tmp_path, capsys):
    # 20k rows, up to 30 epochs of DeepFM-D 400-400-400 per trial: a search that ignored the
    # box would run for minutes; the box is 6 s. Slack: the clock is read every 8 steps (8k
    # rows, well under a second), then the stopped epoch is evaluated, calibrated and the
    # chosen model scored on the test rows: 8 s on a loaded 2-core machine.
    data = _generated(tmp_path / "train.txt", 20_000, seed=1)
    box_minutes = 0.1
    started = time.perf_counter()
    rc = main(
        ["train", "--data", str(data), "--threads", "1", "--quiet", "--min-count", "2",
         "--auto", str(box_minutes), "--out", str(tmp_path / "auto")]
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    assert rc == 0
    err = capsys.readouterr().err
    assert "auto: trial 0" in err  # progress, one line per trial
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    search = metrics["auto"]
    assert search["trials"]
    assert search["seconds"] < 60 * box_minutes + 8, (search["seconds"], err)
    # the whole command adds reading and encoding the 20k rows and writing the bundle
    assert elapsed < search["seconds"] + 60, elapsed
    chosen = next(t for t in search["trials"] if t["number"] == search["chosen"])
    assert chosen["valid"]["auc"] == max(t["valid"]["auc"] for t in search["trials"])
    meta = json.loads((tmp_path / "auto" / MODEL).read_text())
    assert meta["train"]["lr"] == pytest.approx(chosen["params"]["lr"])
    assert meta["train"]["time_limit"] is None
    assert meta["model"]["hidden"] == list(chosen["params"]["hidden"])
    assert 1.0 - meta["model"]["dropout"] == pytest.approx(chosen["params"]["keep_prob"])
    assert "test" in metrics  # the chosen model scored on the held-out rows, once
