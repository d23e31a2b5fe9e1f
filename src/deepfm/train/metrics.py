"""AUC and Logloss (scikit-learn), computed once per evaluation on the whole split."""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from deepfm.errors import ConfigError, DeepFMWarning

EPS = 1e-7


def auc_logloss(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """``{"auc", "logloss"}``; AUC is NaN when the labels hold a single class."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if not np.isfinite(p).all():
        raise ConfigError(
            "the model predicts NaN: its weights diverged (lower the learning rate or the L2)"
        )
    p = np.clip(p, EPS, 1 - EPS)
    if len(labels) == 0:
        return {"auc": math.nan, "logloss": math.nan}
    if 0 < labels.sum() < len(labels):
        auc = roc_auc_score(labels, p)
    else:
        auc = math.nan
        warnings.warn(
            f"AUC is undefined on {len(labels):,} rows that all have label {int(labels[0])} "
            "(it ranks clicks above non-clicks): reported as null",
            DeepFMWarning,
            stacklevel=2,
        )
    return {"auc": float(auc), "logloss": float(log_loss(labels, p, labels=[0, 1]))}
