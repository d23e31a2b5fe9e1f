"""``deepfm demo``: LR, FM and DeepFM-D on the simulated app market, beside the oracle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from deepfm.data.formats import table_chunk
from deepfm.data.pipeline import Dataset, build_dataset
from deepfm.data.splits import SplitSpec
from deepfm.data.synthetic import APP_MARKET_SCHEMA, AppMarket
from deepfm.experiments.plots import learning_curves
from deepfm.models.registry import ModelConfig
from deepfm.outputs import write_json
from deepfm.train.metrics import auc_logloss
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

DEMO_MODELS = ("lr", "fm", "deepfm")
#: what the demo writes in its --out (a directory holding only these is the demo's)
DEMO_FILES = ("results.json", "learning_curves.png", "learning_curves.json")
DEFAULT_ROWS = 200_000


def market_dataset(
    rows: int, seed: int, *, split: str = "random:0.9", valid_fraction: float = 0.1
) -> tuple[Dataset, np.ndarray]:
    """Generate ``rows`` impressions, split and encode them; also return every row's ``p_true``."""
    market = AppMarket(seed)
    chunks, p_true, start = [], [], 0
    for table in market.generate(rows, seed):
        chunks.append(table_chunk(table, "<app-market>", first_line=start + 1))
        p_true.append(table.column("p_true").to_numpy())
        start += table.num_rows
    dataset = build_dataset(
        chunks,
        APP_MARKET_SCHEMA,
        split=SplitSpec.parse(split),
        valid_fraction=valid_fraction,
        seed=seed,
    )
    return dataset, np.concatenate(p_true)


def oracle_metrics(dataset: Dataset, p_true: np.ndarray) -> dict[str, float]:
    """AUC/Logloss of the true click probabilities on the test split: the best reachable."""
    assert dataset.test is not None and dataset.test.labels is not None
    return auc_logloss(dataset.test.labels, p_true[dataset.test.lines - 1])


def run_demo(
    rows: int = DEFAULT_ROWS,
    seed: int = 0,
    out: str | Path = "runs/demo",
    *,
    models: tuple[str, ...] = DEMO_MODELS,
    train_config: TrainConfig | None = None,
    model_config: ModelConfig | None = None,
) -> dict[str, Any]:
    out = Path(out)
    train_config = train_config or TrainConfig(seed=seed)
    model_config = model_config or ModelConfig()
    dataset, p_true = market_dataset(rows, seed)
    results: dict[str, Any] = {
        "oracle": oracle_metrics(dataset, p_true),
        "models": {},
        "rows": dataset.rows(),
        "seed": seed,
    }
    histories = {}
    for name in models:
        trained = fit_and_evaluate(dataset, replace(model_config, name=name), train_config)
        results["models"][name] = {
            **trained.metrics["test"],
            "best_epoch": trained.fit.best_epoch,
            "train_seconds": trained.fit.train_seconds,
        }
        histories[name] = trained.fit.history
    learning_curves(histories, out / "learning_curves.png", title="App market: validation AUC")
    write_json(out / "learning_curves.json", histories, indent=1)
    write_json(out / "results.json", results)
    return results


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of test AUC/Logloss per model and the oracle."""
    lines = ["| model | test AUC | test Logloss |", "|---|---|---|"]
    for name, metrics in results["models"].items():
        lines.append(f"| {name} | {metrics['auc']:.4f} | {metrics['logloss']:.4f} |")
    oracle = results["oracle"]
    lines.append(f"| oracle (true CTR) | {oracle['auc']:.4f} | {oracle['logloss']:.4f} |")
    return "\n".join(lines)
