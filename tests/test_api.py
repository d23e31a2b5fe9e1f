"""The estimator (``deepfm.CTRClassifier``): the same result as ``deepfm train`` on the same
rows, an ordinary bundle, scikit-learn's clone / cross-validation / grid search, field kinds
from column types, and precise errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.base import clone
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GridSearchCV, cross_val_score

import deepfm
from deepfm.api import infer_schema, to_arrow
from deepfm.cli import main
from deepfm.common import sigmoid
from deepfm.data.schema import FieldSpec, Schema
from deepfm.errors import ConfigError, DataError
from deepfm.nn.calibration import calibration_of, uncalibrated
from deepfm.serve.predictor import Predictor
from deepfm.train.trainer import predict_proba

CRITEO_COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
#: small and quick: the tests check plumbing and equality, not accuracy
SMALL = {"hidden": (16, 16), "epochs": 2, "batch_size": 512, "threads": 2, "seed": 0}


def read_criteo(path) -> tuple[pd.DataFrame, pd.Series]:
    """A Criteo TSV as a notebook reads it: pandas, missing cells NaN."""
    frame = pd.read_csv(path, sep="\t", header=None, names=CRITEO_COLUMNS)
    return frame.drop(columns="label"), frame["label"]


@pytest.fixture(scope="module")
def criteo_frames(generated_criteo):
    return read_criteo(generated_criteo.train), read_criteo(generated_criteo.test)


@pytest.fixture(scope="module")
def fitted(criteo_frames):
    (x, y), _ = criteo_frames
    return deepfm.CTRClassifier(min_count=10, **SMALL).fit(x, y)


def test_the_estimator_reaches_the_auc_of_deepfm_train_on_held_out_rows(
    generated_criteo, criteo_frames, fitted, tmp_path, capsys
):
    """The same rows, settings and seed through ``deepfm train`` and through pandas + fit:
    one data path (codecs fitted on the same training rows, the same seeded validation
    carve-out) and one fit path, so the held-out AUC agrees; 0.002 is the issue's bar."""
    flags = ["--hidden", "16,16", "--epochs", "2", "--batch-size", "512", "--threads", "2"]
    argv = ["train", "--data", str(generated_criteo.train), "--test", str(generated_criteo.test)]
    assert main([*argv, *flags, "--seed", "0", "--quiet", "--out", str(tmp_path / "b")]) == 0
    cli_auc = json.loads(capsys.readouterr().out)["test"]["auc"]
    _, (test_x, test_y) = criteo_frames
    estimator_auc = roc_auc_score(test_y, fitted.predict_proba(test_x)[:, 1])
    assert abs(estimator_auc - cli_auc) <= 0.002, (estimator_auc, cli_auc)
    assert estimator_auc > 0.55  # and a model that learned something, not two constant ones


def test_save_is_a_bundle_the_predictor_and_load_score_alike(fitted, criteo_frames, tmp_path):
    _, (test_x, _) = criteo_frames
    expected = fitted.predict_proba(test_x)[:, 1]
    out = fitted.save(tmp_path / "bundle")
    # two float32 forward passes of one model over the same ids: equal up to rounding
    served = Predictor.load(out).predict_proba(to_arrow(test_x))
    np.testing.assert_allclose(served, expected, rtol=0, atol=1e-6)
    loaded = deepfm.CTRClassifier.load(out)
    np.testing.assert_allclose(loaded.predict_proba(test_x)[:, 1], expected, rtol=0, atol=1e-6)
    assert loaded.get_params()["hidden"] == (16, 16) and loaded.get_params()["epochs"] == 2
    assert fitted.predict(test_x).tolist() == (expected >= 0.5).astype(int).tolist()


def test_predict_proba_applies_the_calibration_fitted_on_the_validation_rows(fitted, criteo_frames):
    """The estimator scores with the calibrated model, as ``deepfm train``'s bundle does:
    beta calibration (b·softplus(s) − a·softplus(−s) + c) of the raw model's logits ``s``."""
    _, (test_x, _) = criteo_frames
    calibration = fitted.metrics_["calibration"]
    assert calibration_of(fitted.model_) == calibration is not None
    raw = predict_proba(uncalibrated(fitted.model_), fitted.encode(test_x)).astype(np.float64)
    s = np.log(raw) - np.log1p(-raw)
    a, b, c = calibration["a"], calibration["b"], calibration["c"]
    expected = sigmoid(b * np.logaddexp(0, s) - a * np.logaddexp(0, -s) + c)
    # float32 scoring against float64 arithmetic on probabilities rounded to float32
    np.testing.assert_allclose(fitted.predict_proba(test_x)[:, 1], expected, rtol=0, atol=1e-5)


def test_clone_cross_val_score_and_grid_search(criteo_frames):
    (x, y), _ = criteo_frames
    x, y = x.iloc[:3000], y.iloc[:3000]
    estimator = deepfm.CTRClassifier("fm", epochs=1, batch_size=512, threads=2)
    copy = clone(estimator)
    assert copy.get_params() == estimator.get_params() and not hasattr(copy, "model_")
    scores = cross_val_score(estimator, x, y, cv=3, scoring="roc_auc")
    assert scores.shape == (3,) and np.all((scores > 0) & (scores < 1))
    search = GridSearchCV(estimator, {"embed_dim": [2, 4]}, cv=2, scoring="roc_auc")
    search.fit(x, y)
    assert search.best_params_["embed_dim"] in (2, 4)
    assert search.best_estimator_.model_config_.embed_dim == search.best_params_["embed_dim"]
    assert estimator.set_params(lr=0.01).train_config().lr == 0.01


def test_eval_set_is_the_validation_split(criteo_frames):
    (x, y), (test_x, test_y) = criteo_frames
    estimator = deepfm.CTRClassifier("lr", epochs=1, threads=2)
    estimator.fit(x.iloc[:2000], y.iloc[:2000], eval_set=[(test_x, test_y)])
    assert estimator.metrics_["rows"]["train"] == 2000  # no carve-out: eval_set validates
    assert estimator.metrics_["rows"]["valid"] == len(test_x)
    expected = roc_auc_score(test_y, estimator.predict_proba(test_x)[:, 1])
    assert estimator.metrics_["valid"]["auc"] == pytest.approx(expected, abs=1e-9)


def test_kinds_come_from_column_types_and_schema_overrides_them():
    table = pa.table(
        {
            "user": pa.array(["a", "b"]),
            "age": pa.array([31, 40]),
            "price": pa.array([0.5, 2.0]),
            "premium": pa.array([True, False]),
            "city": pa.array(["x", "y"]).dictionary_encode(),
            "apps": pa.array([["1", "2"], []]),
        }
    )
    kinds = {f.name: f.kind for f in infer_schema(table).fields}
    assert kinds == {
        "user": "categorical",
        "age": "numeric",
        "price": "numeric",
        "premium": "categorical",
        "city": "categorical",
        "apps": "multi",
    }
    schema = infer_schema(table, {"age": "categorical", "price": {"numeric": "value"}})
    assert schema.fields[1].kind == "categorical" and schema.fields[2].is_value
    full = Schema((FieldSpec("user"), FieldSpec("apps", "multi")))
    assert infer_schema(table, full).names == ["user", "apps"]
    with pytest.raises(ConfigError, match="columns X does not have: nope"):
        infer_schema(table, {"nope": "categorical"})
    with pytest.raises(ConfigError, match="column 'when' has type timestamp"):
        infer_schema(pa.table({"when": pa.array([0], pa.timestamp("s"))}))


def test_pandas_polars_and_arrow_give_the_same_model():
    polars = pytest.importorskip("polars")
    rng = np.random.default_rng(0)
    rows = 600
    frame = pd.DataFrame(
        {
            "user": rng.choice(["u1", "u2", "u3", "u4"], rows),
            "hour": rng.integers(0, 24, rows),
            "genre": pd.Categorical(rng.choice(["pop", "rock"], rows)),
            "apps": [list(rng.choice(["a", "b", "c"], rng.integers(0, 3))) for _ in range(rows)],
        }
    )
    y = (frame["user"].isin(["u1", "u2"]) ^ (rng.random(rows) < 0.1)).astype(int)
    settings = {"epochs": 3, "hidden": (8,), "batch_size": 128, "threads": 2, "seed": 1}
    scores = [
        deepfm.CTRClassifier(**settings).fit(data, y).predict_proba(data)[:, 1]
        for data in (frame, pa.Table.from_pandas(frame), polars.from_pandas(frame))
    ]
    np.testing.assert_array_equal(scores[0], scores[1])
    np.testing.assert_array_equal(scores[0], scores[2])
    assert roc_auc_score(y, scores[0]) > 0.8  # the planted user effect is learned


def test_a_prepared_store_trains_and_its_splits_score(tmp_path, generated_criteo):
    store = tmp_path / "store"
    argv = ["prepare", "--input", str(generated_criteo.train), "--out", str(store), "--quiet"]
    assert main(argv) == 0
    estimator = deepfm.CTRClassifier("lr", epochs=1, threads=2).fit(str(store))
    from deepfm.data.store import Store

    test = Store.open(store).split("test")
    p = estimator.predict_proba(test)[:, 1]
    assert p.shape == (len(test),) and roc_auc_score(test.labels, p) > 0.5
    with pytest.raises(ConfigError, match="give X alone"):
        estimator.fit(str(store), [0, 1])


def test_bad_inputs_are_refused_with_what_to_do(criteo_frames, fitted):
    (x, y), _ = criteo_frames
    estimator = deepfm.CTRClassifier("lr", epochs=1)
    with pytest.raises(DataError, match="X has 10 rows but y has 9 labels"):
        estimator.fit(x.iloc[:10], y.iloc[:9])
    with pytest.raises(DataError, match=r"y\[1\] is 2.0: labels are 0 \(no click\) or 1"):
        estimator.fit(x.iloc[:3], [0, 2, 1])
    with pytest.raises(ConfigError, match="pandas or polars DataFrame"):
        estimator.fit(np.zeros((3, 2)), [0, 1, 0])
    with pytest.raises(DataError, match="lacks the column"):
        fitted.predict_proba(x.drop(columns=["C3"]))
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        estimator.predict_proba(x)
