"""CLI round trip on generated Criteo-format files: train → evaluate → predict."""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import CRITEO_CSV_ROWS, CRITEO_ROWS, CRITEO_TEST_ROWS
from deepfm.cli import main
from deepfm.data.formats import get_format
from deepfm.data.pipeline import encode_files
from deepfm.data.reader import BadRows
from deepfm.serve.bundle import load_bundle
from deepfm.train.trainer import Batches, predict_proba

FAST = ["--epochs", "2", "--hidden", "32,32", "--quiet", "--batch-size", "512"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, generated_criteo):
    data = generated_criteo.train
    out = tmp_path_factory.mktemp("cli") / "bundle"
    assert main(["train", "--data", str(data), "--model", "deepfm", "--out", str(out), *FAST]) == 0
    return out, data


def test_train_writes_bundle_and_metrics(bundle_dir):
    out, _ = bundle_dir
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert set(metrics[split]) == {"auc", "logloss"}
    assert sum(metrics["rows"][split] for split in ("train", "valid", "test")) == CRITEO_ROWS
    assert metrics["train_samples_per_s"] > 0 and metrics["train_seconds"] > 0
    for name in ("model.safetensors", "feature_map.json", "model.json", "bundle.json"):
        assert (out / name).exists()


def test_evaluate_json_matches_in_process(bundle_dir, capsys, criteo_csv):
    out, data = bundle_dir
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--data", str(data), "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    assert set(reported) == {"auc", "logloss", "rows", "bad_rows"}
    bundle = load_bundle(out)
    encoded = encode_files(bundle.feature_map, get_format("criteo"), [data], BadRows())
    p = predict_proba(bundle.model, Batches(encoded))
    from deepfm.train.metrics import auc_logloss

    expected = auc_logloss(encoded.labels, p)
    assert reported["rows"] == CRITEO_ROWS and reported["bad_rows"] == 0
    assert reported["auc"] == pytest.approx(expected["auc"], abs=1e-12)
    # the same rows as headered CSV (criteo-csv) encode with the same feature map
    assert (
        main(
            [
                "evaluate",
                "--model",
                str(out),
                "--data",
                str(criteo_csv),
                "--format",
                "criteo-csv",
                "--json",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["rows"] == CRITEO_CSV_ROWS


def test_predict_equals_in_process_predictions(bundle_dir, tmp_path, criteo_test_unlabeled):
    out, _ = bundle_dir
    target = tmp_path / "p.txt"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--data",
                str(criteo_test_unlabeled),
                "--out",
                str(target),
            ]
        )
        == 0
    )
    written = np.loadtxt(target)
    assert written.shape == (CRITEO_TEST_ROWS,)
    bundle = load_bundle(out)
    encoded = encode_files(
        bundle.feature_map, get_format("criteo"), [criteo_test_unlabeled], BadRows()
    )
    expected = predict_proba(bundle.model, Batches(encoded))
    np.testing.assert_allclose(written, expected, atol=1e-7)


def test_predict_keeps_rows_aligned_when_skipping_bad_rows(bundle_dir, tmp_path):
    from conftest import criteo_line

    out, _ = bundle_dir
    data = tmp_path / "mixed.txt"
    data.write_text(criteo_line(None) + "bad line\n" + criteo_line(None))
    target = tmp_path / "p.txt"
    assert (
        main(
            [
                "predict",
                "--model",
                str(out),
                "--data",
                str(data),
                "--out",
                str(target),
                "--bad-rows",
                "skip",
            ]
        )
        == 0
    )
    written = np.loadtxt(target)
    assert written.shape == (3,) and np.isnan(written[1]) and written[0] == written[2]


def test_bad_input_gives_a_located_message_not_a_traceback(bundle_dir, tmp_path):
    out, _ = bundle_dir
    data = tmp_path / "bad.txt"
    data.write_text("1\t2\n")
    result = subprocess.run(
        [sys.executable, "-m", "deepfm", "evaluate", "--model", str(out), "--data", str(data)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert f"{data}:1" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "deepfm", "evaluate", "--model", str(tmp_path), "--data", str(data)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "bundle" in result.stderr
    assert "Traceback" not in result.stderr


def test_tampered_bundle_is_refused(bundle_dir, tmp_path):
    import shutil

    from deepfm.errors import BundleError

    out, _ = bundle_dir
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\0\0\0\0")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(copy)
