"""Calibration of a model's logits (beta calibration), part of the scoring graph.

A model chosen by its ranking (validation AUC) is often overconfident, and not by one factor:
the confident wrong answers sit on one side of the scale more than on the other. Beta
calibration (Kull, Silva Filho and Flach, AISTATS 2017) maps a probability ``p`` to
``sigmoid(a · ln p − b · ln(1 − p) + c)``, with ``a, b > 0``: a slope for each side. In terms
of the logit ``s`` (``ln p = −softplus(−s)``, ``ln(1 − p) = −softplus(s)``)::

    s' = b · softplus(s) − a · softplus(−s) + c        ds'/ds = a · σ(−s) + b · σ(s) > 0

so the order of the scores (AUC) is kept; ``a = b`` is Platt scaling (``a · s + c``), and
``a = b = 1, c = 0`` the identity. The three numbers are fitted on the validation rows
(:func:`deepfm.train.calibration.fit_calibration`). The calibrated model is a module like any
other, so every path that scores with it (evaluate, predict, the Python predictor, the HTTP
server, the exported ONNX graph) applies the same rule.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BETA = "beta"


class BetaCalibration(nn.Module):
    """``forward(ids, values) -> b · softplus(s) − a · softplus(−s) + c`` with
    ``s = model(ids, values)``: calibrated logits ``[B]``.

    ``a``, ``b``, ``c`` are buffers (not trained, not in the weights file: the bundle's
    ``model.json`` records them, :meth:`to_dict`).
    """

    def __init__(self, model: nn.Module, a: float, b: float, c: float) -> None:
        super().__init__()
        if not (a > 0 and b > 0):
            raise ValueError(f"calibration slopes must be positive, got a={a}, b={b}")
        if not all(math.isfinite(v) for v in (a, b, c)):  # a damaged model.json, never a fit
            raise ValueError(f"calibration numbers must be finite, got a={a}, b={b}, c={c}")
        self.model = model
        for name, value in (("a", a), ("b", b), ("c", c)):
            self.register_buffer(name, torch.tensor(float(value)), persistent=False)

    def forward(self, ids: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        s = self.model(ids, values)
        return self.b * F.softplus(s) - self.a * F.softplus(-s) + self.c

    def to_dict(self) -> dict[str, Any]:
        return {"method": BETA, "a": float(self.a), "b": float(self.b), "c": float(self.c)}


def calibrated(model: nn.Module, calibration: dict[str, Any] | None) -> nn.Module:
    """``model`` with ``calibration`` (``{"method": "beta", "a", "b", "c"}``) applied to its
    logits; ``model`` itself for None. Raises ``ValueError`` for an unknown method."""
    if calibration is None:
        return model
    if calibration.get("method") != BETA:
        raise ValueError(f"unknown calibration {calibration.get('method')!r}")
    return BetaCalibration(model, calibration["a"], calibration["b"], calibration["c"])


def calibration_of(model: nn.Module) -> dict[str, Any] | None:
    return model.to_dict() if isinstance(model, BetaCalibration) else None


def uncalibrated(model: nn.Module) -> nn.Module:
    """The model under its calibration (the module whose weights a bundle stores)."""
    return model.model if isinstance(model, BetaCalibration) else model
