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


def standard_errors(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """How much ``auc_logloss(labels, probabilities)`` would vary between splits of this size
    (one standard error each): ``auc`` by Hanley & McNeil (Radiology 1982, Eq. 2), NaN with a
    single class; ``logloss`` as the standard error of a mean of the per-row losses.

    Two scores on the same split that differ by less are not told apart by it: on the Criteo
    sample's 948 validation rows (AUC 0.71, 216 clicks) the AUC's is 0.021.
    """
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), EPS, 1 - EPS)
    losses = -(labels * np.log(p) + (1 - labels) * np.log1p(-p))
    logloss = float(losses.std(ddof=1) / math.sqrt(len(losses))) if len(losses) > 1 else math.nan
    clicks = int(labels.sum())
    others = len(labels) - clicks
    if clicks < 1 or others < 1:
        return {"auc": math.nan, "logloss": logloss}
    auc = float(roc_auc_score(labels, p))
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (auc * (1 - auc) + (clicks - 1) * (q1 - auc**2) + (others - 1) * (q2 - auc**2)) / (
        clicks * others
    )
    return {"auc": math.sqrt(max(variance, 0.0)), "logloss": logloss}
