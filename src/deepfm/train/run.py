"""One training run on a prepared dataset: build the model, fit, evaluate every split."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
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


def fit_and_evaluate(
    dataset: Dataset, model_config: ModelConfig, train_config: TrainConfig
) -> TrainedModel:
    """Train ``model_config`` on ``dataset.train`` (early stopping on ``valid``), evaluate all.

    ``metrics`` holds ``valid`` and ``test`` AUC/Logloss, the row counts, training time and
    ``train_samples_per_s`` (over the training steps only, evaluation excluded).
    """
    entry = get_entry(model_config.name)
    torch.manual_seed(train_config.seed)  # the initial weights too follow the seed
    model = build_model(InputLayout.of(dataset.feature_map), model_config)
    metrics: dict[str, Any] = {"model": model_config.name}
    trainer = Trainer(train_config)
    fit = trainer.fit(model, entry, dataset.train, dataset.valid)
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
