"""Test AUC / Logloss of every registered model on the app market and on the Criteo sample.

    .venv/bin/python benchmarks/zoo_table.py --out runs/zoo_table.json

Data: ``market_dataset(200_000, 0)`` (the demo's data, random 9:1 split, 10% of training rows
for validation) and ``../shared/data/criteo/criteo_train_sample.txt`` split ``random:0.9`` with
seed 0. Models: the paper's Criteo-Random settings (``--preset criteo-random``: 400-400-400,
keep 0.5, relu, IPNN tanh; k = 10 or k + 1; Adam, FTRL for LR) and the trainer's defaults
(early stopping on validation AUC). Prints a Markdown table and writes every run's metrics.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from deepfm.data.formats import get_format
from deepfm.data.pipeline import load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.experiments.demo import market_dataset, oracle_metrics
from deepfm.models import model_names
from deepfm.models.presets import load_preset
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CRITEO = REPO.parent / "shared" / "data" / "criteo" / "criteo_train_sample.txt"


def datasets(args) -> dict:
    out = {}
    if "market" in args.datasets:
        market, p_true = market_dataset(args.rows, args.seed)
        out["market"] = (market, oracle_metrics(market, p_true))
    if "criteo" in args.datasets:
        criteo = load_dataset(
            get_format("criteo"),
            [args.criteo],
            split=SplitSpec.parse("random:0.9"),
            valid_fraction=0.1,
            seed=args.seed,
        )
        out["criteo"] = (criteo, None)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--criteo", default=str(CRITEO))
    parser.add_argument("--datasets", nargs="+", default=["market", "criteo"])
    parser.add_argument("--models", nargs="+", default=model_names())
    parser.add_argument("--preset", default="criteo-random")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/zoo_table.json")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    preset = load_preset(args.preset)
    results: dict = {
        "command": "benchmarks/zoo_table.py "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "torch": torch.__version__,
        "runs": {},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for data_name, (dataset, oracle) in datasets(args).items():
        results["runs"][data_name] = runs = {"rows": dataset.rows(), "oracle": oracle, "models": {}}
        for name in args.models:
            train = TrainConfig(
                epochs=args.epochs, seed=args.seed, threads=args.threads, progress=False
            )
            trained = fit_and_evaluate(dataset, preset.model_config(name), train)
            m = trained.metrics
            runs["models"][name] = {
                "test": m["test"],
                "valid": m["valid"],
                "best_epoch": m["best_epoch"],
                "epochs_run": m["epochs_run"],
                "train_seconds": m["train_seconds"],
            }
            print(
                f"{data_name:>6} {name:<12} AUC {m['test']['auc']:.4f}  "
                f"Logloss {m['test']['logloss']:.4f}  best epoch {m['best_epoch']}/"
                f"{m['epochs_run']}  {m['train_seconds']:.0f}s",
                flush=True,
            )
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(out)  # partial results survive an interrupted run
    print()
    print(markdown(results))


def markdown(results: dict) -> str:
    names = list(dict.fromkeys(n for r in results["runs"].values() for n in r["models"]))
    data = list(results["runs"])
    head = "| model | " + " | ".join(f"{d} AUC | {d} Logloss" for d in data) + " |"
    lines = [head, "|---" * (1 + 2 * len(data)) + "|"]
    for name in names:
        cells = []
        for d in data:
            t = results["runs"][d]["models"].get(name, {}).get("test")
            cells += [f"{t['auc']:.4f}", f"{t['logloss']:.4f}"] if t else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    oracle = [results["runs"][d]["oracle"] for d in data]
    if any(oracle):
        cells = []
        for o in oracle:
            cells += [f"{o['auc']:.4f}", f"{o['logloss']:.4f}"] if o else ["", ""]
        lines.append("| oracle (true CTR) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
