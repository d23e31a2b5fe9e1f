"""Fitting the calibration of a trained model's logits on validation rows (beta calibration,
:mod:`deepfm.nn.calibration`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from deepfm.nn.calibration import BETA

IDENTITY_PARAMS = (1.0, 1.0, 0.0)  # a, b, c
#: folds of the check that a calibration helps on rows it was not fitted on
CHECK_FOLDS = 5
#: the smallest slope fitted: the map stays strictly increasing, in float32 too
MIN_SLOPE = 1e-2


def identity() -> dict[str, Any]:
    a, b, c = IDENTITY_PARAMS
    return {"method": BETA, "a": a, "b": b, "c": c}


def beta_logloss(params: np.ndarray, logits: np.ndarray, labels: np.ndarray):
    """Mean logloss of ``sigmoid(b · softplus(s) − a · softplus(−s) + c)`` and its gradient
    in ``(a, b, c)``."""
    a, b, c = params
    up, down = np.logaddexp(0.0, logits), np.logaddexp(0.0, -logits)  # softplus(±s)
    z = b * up - a * down + c
    # log(1 + e^z) − y·z, written with logaddexp so no logit overflows
    loss = np.mean(np.logaddexp(0.0, z) - labels * z)
    residual = expit(z) - labels  # d loss / dz per row
    return loss, np.array([-np.mean(residual * down), np.mean(residual * up), np.mean(residual)])


def _fit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(a, b, c)`` minimising :func:`beta_logloss` (L-BFGS-B from the identity, slopes at
    least ``MIN_SLOPE``), rounded to float32 like the module that applies them."""
    found = minimize(
        beta_logloss,
        IDENTITY_PARAMS,
        args=(logits, labels),
        jac=True,
        method="L-BFGS-B",
        bounds=[(MIN_SLOPE, None), (MIN_SLOPE, None), (None, None)],
    )
    return found.x.astype(np.float32).astype(np.float64)


def _helps_out_of_fold(logits: np.ndarray, labels: np.ndarray, folds: int) -> bool:
    """Whether the calibration fitted on ``folds − 1`` folds lowers the Logloss of the fold left
    out, summed over the folds (rows dealt to folds in turn)."""
    fold = np.arange(len(labels)) % folds
    gain = 0.0
    for k in range(folds):
        held = fold == k
        rest = ~held
        if labels[rest].min() == labels[rest].max() or not held.any():
            return False  # too few rows of a class to tell
        params = _fit(logits[rest], labels[rest])
        before = beta_logloss(np.array(IDENTITY_PARAMS), logits[held], labels[held])[0]
        gain += held.sum() * (before - beta_logloss(params, logits[held], labels[held])[0])
    return gain > 0


def fit_calibration(
    logits: np.ndarray, labels: np.ndarray, *, folds: int = CHECK_FOLDS
) -> dict[str, Any]:
    """``{"method": "beta", "a", "b", "c"}`` minimising the logloss of the calibrated
    probabilities on the rows given (float64 arithmetic).

    The identity is kept when the three numbers would not pay on rows they were not fitted on
    (a ``folds``-fold check: an already calibrated model, such as LR trained on its Logloss,
    gains nothing and would only take on the noise of the validation rows), or when the labels
    hold one class. The numbers are rounded to float32, the precision the scoring module
    applies them in, so that what a bundle records is exactly what it computes."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if len(labels) < 2 * folds or labels.min() == labels.max():
        return identity()
    if not _helps_out_of_fold(logits, labels, folds):
        return identity()
    a, b, c = (float(v) for v in _fit(logits, labels))
    return {"method": BETA, "a": a, "b": b, "c": c}
