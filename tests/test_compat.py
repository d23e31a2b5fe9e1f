"""Bundles and stores written before field codecs still load and score the same; anything else
fails with a message that says to prepare or train again (fixtures: tests/fixtures/v1)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from deepfm.cli import main
from deepfm.data.formats import get_format
from deepfm.data.pipeline import encode_files
from deepfm.data.reader import BadRows
from deepfm.data.store import SPLITS, Store
from deepfm.errors import BundleError, DataError
from deepfm.serve.bundle import load_bundle
from deepfm.serve.predictor import Predictor

V1 = Path(__file__).parent / "fixtures" / "v1"


def test_a_bundle_of_format_1_loads_and_scores_as_it_did(tmp_path):
    bundle = load_bundle(V1 / "bundle")
    assert json.loads((V1 / "bundle" / "feature_map.json").read_text())["format_version"] == 1
    encoded = encode_files(bundle.feature_map, get_format("criteo"), [V1 / "rows.txt"], BadRows())
    scores = Predictor(bundle).predict_encoded(encoded)
    # predictions.txt was written by the old code with 7 decimals
    np.testing.assert_allclose(scores, np.loadtxt(V1 / "predictions.txt"), atol=1e-6)
    out = tmp_path / "p.txt"
    assert main(["predict", "--model", str(V1 / "bundle"), "--data", str(V1 / "rows.txt"),
                 "--out", str(out)]) == 0  # fmt: skip
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(V1 / "predictions.txt"), atol=1e-6)


def test_a_store_of_version_1_opens_and_trains(tmp_path, capsys):
    store = Store.open(V1 / "store")
    rows = sum(store.rows(s) for s in SPLITS)
    assert rows == 400 and store.feature_map.num_features == store.manifest["num_features"]
    ids = np.concatenate([store.split(s).ids for s in SPLITS])
    assert ids.max() < store.feature_map.num_features
    fast = ["--epochs", "1", "--hidden", "4", "--quiet", "--batch-size", "64", "--threads", "1"]
    assert main(["train", "--store", str(V1 / "store"), "--out", str(tmp_path / "b"), *fast]) == 0
    assert (tmp_path / "b" / "vocab").is_dir()  # the new bundle has binary vocabularies


def test_unknown_versions_fail_with_a_message_saying_to_start_again(tmp_path):
    store = tmp_path / "store"
    shutil.copytree(V1 / "store", store)
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(DataError, match="prepare it again"):
        Store.open(store)
    bundle = tmp_path / "bundle"
    shutil.copytree(V1 / "bundle", bundle)
    feature_map = json.loads((bundle / "feature_map.json").read_text())
    feature_map["format_version"] = 99
    (bundle / "feature_map.json").write_text(json.dumps(feature_map))
    # refuse the tampered file first (its hash), then, with the hash updated, the version
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(bundle)
    from deepfm.common import file_sha256
    from deepfm.serve.bundle import MANIFEST

    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["feature_map.json"] = file_sha256(bundle / "feature_map.json")
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="train the model again"):
        load_bundle(bundle)
