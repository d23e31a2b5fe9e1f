"""Notebook-style: DeepFM on the Criteo sample with pandas, then the same run through the CLI.

``python examples/criteo_notebook.py [--data ../shared/data/criteo/criteo_train_sample.txt]``

Each cell is what a data scientist types in a notebook: read the Kaggle TSV with pandas, hold
out 10% of the rows, ``fit``, score the held-out rows, save a bundle and serve it with the
Predictor. The last cell trains ``deepfm train`` on the same rows with the same settings and
seed and prints both held-out AUCs: they agree (one data path, one fit path).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from sklearn.metrics import log_loss, roc_auc_score

import deepfm
from deepfm.cli import main as deepfm_cli
from deepfm.serve.predictor import Predictor

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "criteo" / "criteo_train_sample.txt"
COLUMNS = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]


def run(data: Path, epochs: int, hidden: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    # %% read the Kaggle TSV: 13 integer columns (NaN when missing), 26 hashed categories
    frame = pd.read_csv(data, sep="\t", header=None, names=COLUMNS)
    held_out = np.random.default_rng(seed).random(len(frame)) < 0.1
    train, test = frame[~held_out], frame[held_out]
    x_train, y_train = train.drop(columns="label"), train["label"]
    x_test, y_test = test.drop(columns="label"), test["label"]

    # %% fit: numbers become bucketised numeric fields, strings categorical ones; Criteo's
    # min count 10 sends rare values to OOV, as `deepfm train --format criteo` does
    settings = {"epochs": epochs, "hidden": hidden, "seed": seed, "threads": 2}
    clf = deepfm.CTRClassifier("deepfm", min_count=10, **settings)
    clf.fit(x_train, y_train)
    ctr = clf.predict_proba(x_test)[:, 1]
    scores = {"auc": roc_auc_score(y_test, ctr), "logloss": log_loss(y_test, ctr)}
    print(f"CTRClassifier: held-out AUC {scores['auc']:.4f}, Logloss {scores['logloss']:.4f}")

    with tempfile.TemporaryDirectory() as tmp:
        # %% the saved directory is an ordinary bundle: the Predictor (and `deepfm serve`) read it
        bundle = clf.save(Path(tmp) / "bundle")
        rows = pa.Table.from_pandas(x_test, preserve_index=False)  # NaN cells become missing
        served = Predictor.load(bundle).predict_proba(rows)
        print(f"Predictor on the saved bundle: max difference {np.abs(served - ctr).max():.2e}")

        # %% the same rows, settings and seed through the command line
        train_file, test_file = Path(tmp) / "train.txt", Path(tmp) / "test.txt"
        lines = data.read_text().splitlines(keepends=True)
        train_file.write_text("".join(np.asarray(lines, dtype=object)[~held_out]))
        test_file.write_text("".join(np.asarray(lines, dtype=object)[held_out]))
        argv = ["train", "--data", str(train_file), "--test", str(test_file), "--quiet"]
        argv += ["--epochs", str(epochs), "--hidden", ",".join(map(str, hidden))]
        argv += ["--seed", str(seed), "--threads", "2", "--out", str(Path(tmp) / "cli")]
        if deepfm_cli(argv) != 0:
            raise SystemExit("deepfm train failed")
        cli = json.loads((Path(tmp) / "cli" / "metrics.json").read_text())["test"]
    print(f"deepfm train:  held-out AUC {cli['auc']:.4f}, Logloss {cli['logloss']:.4f}")
    gap = float(np.abs(served - ctr).max())
    return {"estimator_auc": scores["auc"], "cli_auc": cli["auc"], "served_gap": gap}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--epochs", type=int, default=30, help="at most (early stopping)")
    parser.add_argument("--hidden", default="400,400,400")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    result = run(args.data, args.epochs, hidden)
    sys.exit(0 if abs(result["estimator_auc"] - result["cli_auc"]) <= 0.002 else 1)
