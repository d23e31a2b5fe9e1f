"""The one fit path: build the model, fit it, evaluate every split.

``deepfm train``, :class:`deepfm.CTRClassifier`, every study (``compare``, ``efficiency``,
``sweep``, ``tune``), ``workers``, ``simulate``, ``abtest`` and the demo train through
:func:`fit_and_evaluate`, so they seed, fit and evaluate alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepfm.data.pipeline import Dataset
from deepfm.models.registry import ModelConfig, ModelEntry, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.train.distributed import Distributed
from deepfm.train.trainer import FitResult, TrainConfig, Trainer


@dataclass
class TrainedModel:
    model: nn.Module
    entry: ModelEntry
    config: ModelConfig
    fit: FitResult
    metrics: dict[str, Any]


def new_model(layout: InputLayout, config: ModelConfig, seed: int) -> nn.Module:
    """The model ``config`` names, its initial weights drawn from ``seed`` (the same on every
    rank: DDP starts from rank 0's)."""
    torch.manual_seed(seed)
    return build_model(layout, config)


def fit_and_evaluate(
    dataset: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    model: nn.Module | None = None,
    dist: Distributed | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainedModel:
    """Train on ``dataset.train`` (early stopping on ``valid``), then evaluate ``valid`` and
    ``test`` with the weights of the best epoch.

    ``model``: train this one further (a warm start) instead of a new model seeded by
    ``train_config.seed``. ``on_epoch`` / ``on_step``: the trainer's callbacks.
    ``metrics`` holds the model name and seed, ``valid`` and ``test`` AUC/Logloss, the row
    counts, the best epoch, training time, ``train_samples_per_s`` (over the training steps
    only, evaluation excluded), the trainer's ``setup`` and the per-epoch ``history``.
    """
    entry = get_entry(model_config.name)
    if model is None:
        model = new_model(InputLayout.of(dataset.feature_map), model_config, train_config.seed)
    trainer = Trainer(train_config, dist)
    fit = trainer.fit(
        model, entry, dataset.train, dataset.valid, on_epoch=on_epoch, on_step=on_step
    )
    metrics: dict[str, Any] = {"model": model_config.name, "seed": train_config.seed}
    # with the training's thread count; under DDP each rank scores its shard of each split
    for split, data in (("valid", dataset.valid), ("test", dataset.test)):
        if data is not None and len(data):
            metrics[split] = trainer.evaluate(model, data)
    metrics.update(
        rows=dataset.rows(),
        bad_rows=dataset.bad_rows.to_dict(),
        best_epoch=fit.best_epoch,
        epochs_run=len(fit.history),
        train_seconds=fit.train_seconds,
        train_samples=fit.train_samples,
        train_samples_per_s=fit.train_samples_per_s,
        setup=fit.setup,
        history=fit.history,
    )
    return TrainedModel(model, entry, model_config, fit, metrics)
