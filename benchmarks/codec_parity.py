"""Scores of bundles trained before and after a change of the data path, same data and seeds.

``python benchmarks/codec_parity.py --before 88fb52b [--rows 200000] [--min-count 10]``

Generates Criteo-format training and test files (``make_criteo.py``), then with the code of git
revision ``--before`` (exported with ``git archive``) and with this checkout, each in its own
process: ``deepfm prepare`` → ``deepfm train --store`` and ``deepfm train --data`` (DeepFM-D,
fixed seed, one thread; the torch generator is seeded before the command runs, as code before
this change built the model before seeding it) → ``deepfm predict`` on the test file. Reports
whether both versions wrote the same encoded store (every id of every split) and the largest
difference between their predictions, for both training paths. Issue 12's bar: scores
unchanged within float tolerance.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SEEDED = "import sys, torch; torch.manual_seed(0); from deepfm.cli import main; sys.exit(main())"


def run(command: list[str], pythonpath: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}")


def source_of(ref: str, work: Path) -> Path:
    target = work / f"src-{ref}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "archive", ref, "src"], cwd=HERE.parent, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def ids_of(store: Path) -> dict[str, np.ndarray]:
    """Every split's ids, read from the manifest's file list (either store version)."""
    manifest = json.loads((store / "manifest.json").read_text())
    out = {}
    for split, arrays in manifest["arrays"].items():
        meta = arrays["ids"]
        files = meta.get("files") or [meta["file"]]
        parts = [np.fromfile(store / f, dtype=meta["dtype"]) for f in files]
        out[split] = np.concatenate(parts).reshape(meta["shape"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="git revision of the old code")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--test-rows", type=int, default=50_000)
    parser.add_argument("--min-count", type=int, default=10)
    parser.add_argument("--long-tail", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/deepfm-parity")
    parser.add_argument("--json", default="benchmarks/results/codec_parity.json")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    shutil.rmtree(work / "runs", ignore_errors=True)
    (work / "runs").mkdir(parents=True)
    tail = ["--long-tail"] if args.long_tail else []
    train, test = work / "train.txt", work / "test.txt"
    for path, rows, seed in ((train, args.rows, args.seed), (test, args.test_rows, args.seed + 1)):
        command = [sys.executable, str(HERE / "make_criteo.py"), str(path), "--rows", str(rows)]
        subprocess.run(
            [*command, "--seed", str(seed), *tail], check=True, stdout=subprocess.DEVNULL
        )
    versions = {"before": source_of(args.before, work), "after": HERE.parent / "src"}
    fit = ["--model", "deepfm", "--epochs", "2", "--hidden", "64,64", "--batch-size", "1024"]
    fit += ["--threads", "1", "--seed", "0", "--quiet"]
    predictions: dict[str, dict[str, np.ndarray]] = {}
    stores = {}
    for name, src in versions.items():
        out = work / "runs" / name
        deepfm = [sys.executable, "-c", SEEDED]
        count = ["--min-count", str(args.min_count)]
        run([*deepfm, "prepare", "--input", str(train), "--out", str(out / "store"), *count,
             "--quiet"], src)  # fmt: skip
        stores[name] = ids_of(out / "store")
        run([*deepfm, "train", "--store", str(out / "store"), "--out", str(out / "b_store"),
             *fit], src)  # fmt: skip
        run([*deepfm, "train", "--data", str(train), *count, "--out", str(out / "b_data"), *fit],
            src)  # fmt: skip
        predictions[name] = {}
        for path in ("store", "data"):
            target = out / f"p_{path}.txt"
            run([*deepfm, "predict", "--model", str(out / f"b_{path}"), "--data", str(test),
                 "--out", str(target)], src)  # fmt: skip
            predictions[name][path] = np.loadtxt(target)
    same_ids = all(
        np.array_equal(stores["before"][s], stores["after"][s]) for s in stores["before"]
    )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": "python " + " ".join([str(Path(sys.argv[0])), *sys.argv[1:]]),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "rows": args.rows,
        "test_rows": args.test_rows,
        "min_count": args.min_count,
        "long_tail": args.long_tail,
        "same_store_ids": bool(same_ids),
        "max_abs_score_difference": {
            path: float(np.abs(predictions["before"][path] - predictions["after"][path]).max())
            for path in ("store", "data")
        },
        "mean_score": float(predictions["after"]["store"].mean()),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same_ids else 1


if __name__ == "__main__":
    sys.exit(main())
