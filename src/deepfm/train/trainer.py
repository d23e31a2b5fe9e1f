"""The trainer: fits any registered model on encoded arrays, evaluates, stops early.

The model maps a batch to logits and knows nothing else; everything about training lives here.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from deepfm.data.encoded import EncodedArrays
from deepfm.errors import ConfigError
from deepfm.models.registry import ModelEntry, build_pretrain_model
from deepfm.nn import regularization
from deepfm.train.metrics import auc_logloss
from deepfm.train.optim import FTRL

# Adam 3e-3 rather than the usual 1e-3: measured on the 10k-row Criteo sample and the app market
# (README, "How the defaults were chosen"), 1e-3 often stalls on the LR-like plateau and stops
# early on small data, while decay on plateau brings the rate down where more data allows.
DEFAULT_LR = {"adam": 3e-3, "ftrl": 0.05}


@dataclass
class TrainConfig:
    """How to train. ``lr`` None means the optimiser's default (Adam 3e-3, FTRL α = 0.05).

    Early stopping watches validation AUC: training stops after ``patience`` epochs without a
    new best, and the best epoch's weights are restored. The learning rate is multiplied by
    ``lr_decay`` after ``decay_patience`` epochs without a new best (Adam only).
    """

    epochs: int = 30
    batch_size: int = 1024
    lr: float | None = None
    patience: int = 3
    lr_decay: float = 0.5
    decay_patience: int = 1
    seed: int = 0
    threads: int | None = None
    eval_batch_size: int = 65536
    ftrl_beta: float = 1.0
    ftrl_l1: float = 1.0
    ftrl_l2: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and self.lr <= 0:
            raise ConfigError(f"the learning rate must be positive, got {self.lr}")
        if self.patience < 0 or not 0 < self.lr_decay <= 1:
            raise ConfigError("patience must be >= 0 and lr_decay in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    """What training produced besides the weights (restored to the best epoch in place)."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_valid: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    train_samples: int = 0

    @property
    def train_samples_per_s(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else math.nan


class Batches:
    """An encoded split as tensors, cut into batches by index slicing (no per-sample Python)."""

    def __init__(self, data: EncodedArrays, device: torch.device | str = "cpu") -> None:
        self.ids = torch.from_numpy(np.ascontiguousarray(data.ids)).to(device)
        self.values = None if data.values is None else torch.from_numpy(data.values).to(device)
        self.labels = None if data.labels is None else torch.from_numpy(data.labels).to(device)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def batch(self, index: torch.Tensor | slice):
        values = None if self.values is None else self.values[index]
        labels = None if self.labels is None else self.labels[index]
        return self.ids[index], values, labels


def make_optimizer(model: nn.Module, entry: ModelEntry, config: TrainConfig):
    lr = config.lr if config.lr is not None else DEFAULT_LR[entry.optimizer]
    if entry.optimizer == "ftrl":
        return FTRL(
            model.parameters(),
            alpha=lr,
            beta=config.ftrl_beta,
            l1=config.ftrl_l1,
            l2=config.ftrl_l2,
        )
    return torch.optim.Adam(model.parameters(), lr=lr)


@torch.inference_mode()
def predict_logits(model: nn.Module, data: Batches, batch_size: int = 65536) -> np.ndarray:
    """Logits of every row, in order, evaluated in large batches."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(data), batch_size):
        ids, values, _ = data.batch(slice(start, start + batch_size))
        out.append(model(ids, values).float())
    model.train(was_training)
    if not out:
        return np.zeros(0, dtype=np.float32)
    return torch.cat(out).cpu().numpy()


def predict_proba(model: nn.Module, data: Batches, batch_size: int = 65536) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-predict_logits(model, data, batch_size).astype(np.float64)))


def evaluate(model: nn.Module, data: Batches, batch_size: int = 65536) -> dict[str, float]:
    if data.labels is None:
        raise ConfigError("evaluation needs labeled data")
    return auc_logloss(data.labels.cpu().numpy(), predict_proba(model, data, batch_size))


class Trainer:
    """``Trainer(config).fit(model, entry, train, valid)`` trains ``model`` in place."""

    def __init__(self, config: TrainConfig | None = None) -> None:
        self.config = config or TrainConfig()

    def fit(
        self,
        model: nn.Module,
        entry: ModelEntry,
        train: EncodedArrays,
        valid: EncodedArrays | None = None,
        *,
        on_epoch: Callable[[dict[str, float]], None] | None = None,
    ) -> FitResult:
        config = self.config
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        if train.labels is None or len(train) == 0:
            raise ConfigError("training needs labeled rows")
        train_data = Batches(train)
        valid_data = Batches(valid) if valid is not None and len(valid) else None
        result = FitResult()
        if entry.pretrain is not None:
            # FNN: fit the model the entry names (an FM) first and initialise from it; the
            # pre-training counts in this model's training time and samples
            teacher, teacher_entry = build_pretrain_model(model, entry)
            pre = Trainer(config).fit(teacher, teacher_entry, train, valid)
            started = time.perf_counter()
            model.init_from_pretrained(teacher)
            result.train_seconds += pre.train_seconds + time.perf_counter() - started
            result.train_samples += pre.train_samples
            torch.manual_seed(config.seed)

        optimizer = make_optimizer(model, entry, config)
        sums_loss = getattr(optimizer, "sums_loss", False)
        scheduler = None
        if entry.optimizer == "adam" and config.lr_decay < 1 and valid_data is not None:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=config.lr_decay, patience=config.decay_patience
            )
        generator = torch.Generator().manual_seed(config.seed)
        best_auc, best_state, stale = -math.inf, None, 0
        steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
        for epoch in range(1, config.epochs + 1):
            model.train()
            started = time.perf_counter()
            order = torch.randperm(len(train_data), generator=generator)
            loss_sum = torch.zeros(())
            bar = tqdm(
                range(steps_per_epoch),
                desc=f"epoch {epoch}/{config.epochs}",
                disable=not config.progress,
                leave=False,
                mininterval=0.5,
            )
            for step in bar:
                ids, values, labels = train_data.batch(
                    order[step * config.batch_size : (step + 1) * config.batch_size]
                )
                logits = model(ids, values)
                loss = F.binary_cross_entropy_with_logits(logits, labels)
                objective = loss * len(labels) if sums_loss else loss
                objective = objective + regularization(model)
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                loss_sum += loss.detach() * len(labels)
                if config.progress and step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            bar.close()
            seconds = time.perf_counter() - started
            result.train_seconds += seconds
            result.train_samples += len(train_data)
            record: dict[str, float] = {
                "epoch": epoch,
                "train_loss": float(loss_sum) / len(train_data),
                "lr": optimizer.param_groups[0].get("lr", optimizer.param_groups[0].get("alpha")),
                "seconds": seconds,
            }
            if valid_data is not None:
                metrics = evaluate(model, valid_data, config.eval_batch_size)
                record.update({f"valid_{k}": v for k, v in metrics.items()})
                auc = metrics["auc"] if not math.isnan(metrics["auc"]) else -metrics["logloss"]
                if auc > best_auc:
                    best_auc, stale = auc, 0
                    best_state = copy.deepcopy(model.state_dict())
                    result.best_epoch, result.best_valid = epoch, metrics
                else:
                    stale += 1
                if scheduler is not None:
                    scheduler.step(auc)
            result.history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if config.progress:
                shown = {k: round(v, 5) for k, v in record.items() if k != "epoch"}
                tqdm.write(f"[{entry.name}] epoch {epoch}: {shown}")
            if not math.isfinite(record["train_loss"]):
                raise ConfigError(
                    f"training diverged at epoch {epoch} (loss {record['train_loss']}); "
                    "lower the learning rate"
                )
            if valid_data is not None and stale >= config.patience:
                break
        if best_state is not None:
            model.load_state_dict(best_state)
        else:
            result.best_epoch = len(result.history)
        return result
