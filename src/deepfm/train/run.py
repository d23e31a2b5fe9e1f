"""One training run on a prepared dataset: build the model, fit, evaluate every split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from deepfm.data.pipeline import Dataset
from deepfm.models.registry import ModelConfig, ModelEntry, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train.trainer import FitResult, TrainConfig, Trainer


@dataclass
class TrainedModel:
    model: nn.Module
    entry: ModelEntry
    config: ModelConfig
    fit: FitResult
    metrics: dict[str, Any]


def run_identity(dataset: Dataset, model_config: ModelConfig) -> dict[str, Any]:
    """What a checkpoint of this run records beyond the trainer's own fingerprint."""
    return {"model_config": model_config.to_dict(), "feature_map": dataset.feature_map.digest()}


def fit_and_evaluate(
    dataset: Dataset, model_config: ModelConfig, train_config: TrainConfig
) -> TrainedModel:
    """Train ``model_config`` on ``dataset.train`` (early stopping on ``valid``), evaluate all.
    The initial weights come from ``train_config.seed``: the same seed (and thread count) gives
    the same metrics.

    ``metrics`` holds ``valid`` and ``test`` AUC/Logloss, the row counts, training time and
    ``train_samples_per_s`` (over the training steps only, evaluation excluded).
    """
    entry = get_entry(model_config.name)
    # the initial weights follow the seed (the same on every rank: DDP starts from rank 0's)
    model = build_model(InputLayout.of(dataset.feature_map), model_config, seed=train_config.seed)
    metrics: dict[str, Any] = {"model": model_config.name}
    trainer = Trainer(train_config)
    identity = run_identity(dataset, model_config)
    fit = trainer.fit(model, entry, dataset.train, dataset.valid, identity=identity)
    # with the training's thread count; under DDP each rank scores its shard of each split
    if len(dataset.valid):
        metrics["valid"] = trainer.evaluate(model, dataset.valid)
    if dataset.test is not None and len(dataset.test):
        metrics["test"] = trainer.evaluate(model, dataset.test)
    metrics.update(
        rows=dataset.rows(),
        bad_rows=dataset.bad_rows.to_dict(),
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.history),
        train_seconds=fit.train_seconds,
        train_samples_per_s=fit.train_samples_per_s,
        training=fit.setup,
        history=fit.history,
    )
    return TrainedModel(model, entry, model_config, fit, metrics)
