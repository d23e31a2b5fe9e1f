"""AUC and Logloss (scikit-learn), computed once per evaluation on the whole split."""

from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

EPS = 1e-7


def auc_logloss(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """``{"auc", "logloss"}``; AUC is NaN when the labels hold a single class."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1 - EPS)
    if len(labels) == 0:
        return {"auc": math.nan, "logloss": math.nan}
    auc = roc_auc_score(labels, p) if 0 < labels.sum() < len(labels) else math.nan
    return {"auc": float(auc), "logloss": float(log_loss(labels, p, labels=[0, 1]))}
