"""The studies' figures (matplotlib, headless). Each function writes ``NAME.png`` and the numbers it
plots as ``NAME.json`` beside it, so that every figure can be redrawn or checked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from deepfm.experiments.runs import write_json
from deepfm.outputs import save_figure

DEEPFM_COLOR = "tab:red"
BASELINE_COLOR = "tab:blue"


def _save(fig, path: Path, data: dict[str, Any]) -> Path:
    save_figure(fig, path)
    write_json(path.with_suffix(".json"), data)
    return path


def metric_bars(
    models: Sequence[str],
    auc: tuple[Sequence[float], Sequence[float]],
    logloss: tuple[Sequence[float], Sequence[float]],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """Test AUC and Logloss (mean ± std over seeds) per model, DeepFM models highlighted."""
    colors = [DEEPFM_COLOR if m.lower().startswith("deepfm") else BASELINE_COLOR for m in models]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(models) + 1.8))
    y = list(range(len(models)))
    for ax, (means, stds), label in zip(
        axes, (auc, logloss), ("test AUC", "test Logloss"), strict=True
    ):
        errors = [0.0 if s is None or s != s else s for s in stds]
        ax.barh(y, means, xerr=errors, color=colors, capsize=3)
        finite = [m for m in means if m is not None and m == m]
        if finite:  # zoom on the differences, as the paper's tables do
            low, high = min(finite), max(finite)
            pad = max(high - low, 1e-3) * 0.6
            ax.set_xlim(low - pad, high + pad)
        ax.set_yticks(y, models)
        ax.invert_yaxis()
        ax.set(xlabel=label)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_title(title)
    data = {
        "models": list(models),
        "auc_mean": list(auc[0]),
        "auc_std": list(auc[1]),
        "logloss_mean": list(logloss[0]),
        "logloss_std": list(logloss[1]),
    }
    return _save(fig, Path(path), data)


def relative_bars(
    models: Sequence[str], relative: Sequence[float], path: str | Path, *, title: str
) -> Path:
    """Training time per epoch relative to LR (Fig. 9)."""
    colors = [DEEPFM_COLOR if m.lower().startswith("deepfm") else BASELINE_COLOR for m in models]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(models) + 2), 4))
    bars = ax.bar(models, relative, color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set(ylabel="training time per epoch / LR's", title=title)
    ax.tick_params(axis="x", rotation=45)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path), {"models": list(models), "relative_to_lr": list(relative)})


def sweep_lines(
    param: str,
    values: Sequence[Any],
    series: dict[str, dict[str, Sequence[float]]],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """Test AUC and Logloss against one hyper-parameter, one line per model (Fig. 10-14)."""
    labels = [str(v) for v in values]
    x = list(range(len(values)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, lines in series.items():
        style = {"marker": "o", "linestyle": "-" if name.lower().startswith("deepfm") else "--"}
        axes[0].plot(x, lines["auc"], label=name, **style)
        axes[1].plot(x, lines["logloss"], label=name, **style)
    for ax, label in zip(axes, ("test AUC", "test Logloss"), strict=True):
        ax.set_xticks(x, labels)
        ax.set(xlabel=param, ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[1].legend(fontsize=8)
    data = {"param": param, "values": labels, "models": series}
    return _save(fig, Path(path), data)


def step_curves(curves: dict[str, dict[str, Sequence[float]]], path: str | Path, *, title: str):
    """Test AUC and Logloss against training steps, one line per setting (Fig. 6)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, curve in curves.items():
        axes[0].plot(curve["step"], curve["auc"], marker=".", label=name)
        axes[1].plot(curve["step"], curve["logloss"], marker=".", label=name)
    for ax, label in zip(axes, ("test AUC", "test Logloss"), strict=True):
        ax.set(xlabel="training steps", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[0].legend(fontsize=8)
    return _save(fig, Path(path), {"curves": curves})


def trial_history(
    numbers: Sequence[int],
    values: Sequence[float | None],
    states: Sequence[str],
    path: str | Path,
    *,
    title: str,
) -> Path:
    """Validation AUC per tuning trial (pruned trials at their last reported value), best so far."""
    fig, ax = plt.subplots(figsize=(8, 4))
    best, running = [], None
    for value, state in zip(values, states, strict=True):
        if state == "COMPLETE" and value is not None:
            running = value if running is None else max(running, value)
        best.append(running)
    for state, marker, color in (("COMPLETE", "o", "tab:blue"), ("PRUNED", "x", "tab:gray")):
        points = [
            (n, v)
            for n, v, s in zip(numbers, values, states, strict=True)
            if s == state and v is not None
        ]
        if points:
            ax.scatter(
                [p[0] for p in points],
                [p[1] for p in points],
                marker=marker,
                color=color,
                label=state.lower(),
            )
    ax.step(numbers, [b if b is not None else float("nan") for b in best], where="post",
            color="tab:red", label="best so far")  # fmt: skip
    ax.set(xlabel="trial", ylabel="validation AUC", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    data = {"trial": list(numbers), "valid_auc": list(values), "state": list(states), "best": best}
    return _save(fig, Path(path), data)
