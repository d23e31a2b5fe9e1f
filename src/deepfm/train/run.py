"""The one fit path: build the model (or grow its parent's, a warm start), fit it, evaluate
every split.

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

from deepfm.data.featuremap import FeatureMap
from deepfm.data.pipeline import Dataset
from deepfm.models.registry import ModelConfig, ModelEntry, build_model, get_entry
from deepfm.nn import InputLayout
from deepfm.nn.calibration import calibrated, calibration_of, uncalibrated
from deepfm.nn.growth import grow_state, grow_tensor, grown_rows
from deepfm.train.distributed import Distributed
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


@dataclass
class Parent:
    """The model a warm start continues: its weights, config and feature map, and the saved
    optimiser state (:meth:`~deepfm.train.trainer.Optimizers.named_state`; None: start fresh)."""

    model: nn.Module
    config: ModelConfig
    feature_map: FeatureMap
    optimizer_state: dict[str, torch.Tensor] | None = None


def grow_parent(
    parent: Parent, feature_map: FeatureMap, seed: int
) -> tuple[nn.Module, dict[str, torch.Tensor] | None]:
    """The parent's model on the grown ``feature_map`` and its optimiser state remapped.

    The model is built as a fresh one would be (seeded by ``seed``), then every old row of the
    parent's model under its calibration is copied to its new place
    (:func:`~deepfm.nn.growth.grow_state`): new ids keep the fresh initialisation, old ids
    score exactly as before (uncalibrated: the calibration is fitted again on the new
    validation rows). Optimiser state follows the same rows,
    new rows starting from zero (Adam's moments, FTRL's ``z`` and ``n``)."""
    old, new = InputLayout.of(parent.feature_map), InputLayout.of(feature_map)
    model = new_model(new, parent.config, seed)
    model.load_state_dict(grow_state(model, uncalibrated(parent.model).state_dict(), old, new))
    if not parent.optimizer_state:
        return model, None
    rows, params = grown_rows(model, old, new), dict(model.named_parameters())
    state = {}
    for key, before in parent.optimizer_state.items():
        name = key.rsplit("/", 1)[0]
        if name in rows and before.dim() > 0:
            fresh = torch.zeros(params[name].shape, dtype=before.dtype)
            state[key] = grow_tensor(before, rows[name], fresh)
        else:
            state[key] = before
    return model, state


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
    parent: Parent | None = None,
    dist: Distributed | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_step: Callable[[int], None] | None = None,
) -> TrainedModel:
    """Train on ``dataset.train`` (early stopping on ``valid``), then evaluate ``valid`` and
    ``test`` with the weights of the best epoch.

    The returned model is the trained one under the calibration fitted on ``valid``
    (``train_config.calibration``, :mod:`deepfm.nn.calibration`): what every split is scored
    with here, and what the bundle, the predictor, the server and ONNX export score with.

    ``model``: train this one (its uncalibrated weights) further instead of a new model seeded
    by ``train_config.seed``. ``parent``: a warm start (``dataset`` was built on the parent's
    map grown with the new data, :func:`~deepfm.data.pipeline.build_dataset`'s ``base``): the
    parent's uncalibrated model and optimiser state are grown (:func:`grow_parent`), training
    continues from them and the calibration is fitted again on the new validation rows; no
    training rows leave the parent (its calibration too) and so its scores unchanged.
    ``on_epoch`` / ``on_step``: the trainer's callbacks.
    ``metrics`` holds the model name and seed, ``valid`` and ``test`` AUC/Logloss, the row
    counts, the best epoch, training time, ``train_samples_per_s`` (over the training steps
    only, evaluation excluded), the trainer's ``setup``, the ``calibration`` and the per-epoch
    ``history``.
    """
    entry = get_entry(model_config.name)
    optimizer_state = None
    if parent is not None:
        model, optimizer_state = grow_parent(parent, dataset.feature_map, train_config.seed)
    elif model is not None:
        model = uncalibrated(model)
    else:
        model = new_model(InputLayout.of(dataset.feature_map), model_config, train_config.seed)
    trainer = Trainer(train_config, dist)
    if len(dataset.train):
        fit = trainer.fit(
            model,
            entry,
            dataset.train,
            dataset.valid,
            optimizer_state=optimizer_state,
            pretrain=parent is None,
            on_epoch=on_epoch,
            on_step=on_step,
            identity=run_identity(dataset, model_config),
        )
    else:  # a warm start on no new rows: the parent as it was
        assert parent is not None, "build_dataset refuses no rows without a parent"
        fit = FitResult(
            optimizer_state=optimizer_state or {}, calibration=calibration_of(parent.model)
        )
    model = calibrated(model, fit.calibration).eval()  # what every split is scored with
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
        prior_from=fit.prior_from,
        train_seconds=fit.train_seconds,
        train_samples=fit.train_samples,
        train_samples_per_s=fit.train_samples_per_s if fit.train_samples else 0.0,
        setup=fit.setup,
        calibration=fit.calibration,
        history=fit.history,
    )
    if dataset.growth is not None:
        metrics["growth"] = {"added": dataset.growth.added, "rows": dataset.growth.rows}
    return TrainedModel(model, entry, model_config, fit, metrics)
