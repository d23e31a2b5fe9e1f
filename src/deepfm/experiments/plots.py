"""Plots (matplotlib, headless). The numbers behind each plot are saved beside it by the caller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

from deepfm.outputs import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def learning_curves(
    histories: dict[str, list[dict[str, Any]]], path: str | Path, *, title: str
) -> Path:
    """Validation AUC and training loss per epoch, one line per model."""
    fig, (ax_auc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for name, history in histories.items():
        epochs = [h["epoch"] for h in history]
        if history and "valid_auc" in history[0]:
            ax_auc.plot(epochs, [h["valid_auc"] for h in history], marker="o", label=name)
        ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label=name)
    ax_auc.set(xlabel="epoch", ylabel="validation AUC", title=title)
    ax_loss.set(xlabel="epoch", ylabel="training logloss", title="Training loss")
    return save_panels(fig, (ax_auc, ax_loss), path)


def save_panels(fig: Any, axes: Any, path: str | Path) -> Path:
    """``fig`` saved (:func:`save_figure`) once each of its panels ``axes`` has a light grid
    and its legend."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)
