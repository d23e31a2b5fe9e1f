"""``deepfm efficiency``: training time per epoch of each model relative to LR's (Fig. 9).

Every model trains for the same fixed number of epochs (early stopping off) on the same store
and device; its time per epoch is its training time (the trainer's clock: batches and optimiser
steps, evaluation excluded) divided by its epochs, the median over ``repeats`` runs. FNN's time
includes its FM pre-training, which runs as many epochs as FNN itself. LR (FTRL) is always timed,
being the denominator.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deepfm.errors import ConfigError
from deepfm.experiments.compare import display
from deepfm.experiments.runs import (
    RunSpec,
    StudyConfig,
    fmt,
    markdown_table,
    open_study_store,
    run_specs,
    write_csv,
    write_json,
)
from deepfm.experiments.study_plots import relative_bars
from deepfm.outputs import write_text

COMMAND = "efficiency"
DEFAULT_EPOCHS = 2
DEFAULT_REPEATS = 1
REFERENCE = "lr"


def seconds_per_epoch(result: dict[str, Any]) -> float:
    """Training seconds (FNN: pre-training included) per epoch of the model itself."""
    return float(result["train_seconds"]) / max(int(result["epochs_run"]), 1)


def summarize_efficiency(per_model: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Median seconds per epoch per model and its ratio to LR's."""
    if REFERENCE not in per_model:
        raise ConfigError("efficiency is relative to LR: its runs are missing")
    models: dict[str, dict[str, Any]] = {}
    for name, runs in per_model.items():
        timings = [seconds_per_epoch(r) for r in runs]
        samples = [r["train_samples"] / r["train_seconds"] for r in runs if r["train_seconds"] > 0]
        models[name] = {
            "seconds_per_epoch": statistics.median(timings),
            "seconds_per_epoch_runs": timings,
            "samples_per_s": statistics.median(samples) if samples else None,
            "epochs": runs[0]["epochs_run"],
            "device": runs[0]["setup"].get("device"),
            "embedding_updates": runs[0]["setup"].get("embedding_updates"),
        }
    reference = models[REFERENCE]["seconds_per_epoch"]
    for record in models.values():
        record["relative_to_lr"] = record["seconds_per_epoch"] / reference
    return {"reference": REFERENCE, "models": models}


def efficiency_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["model", "seconds / epoch", "relative to LR", "samples / s", "embedding updates"]
    rows = [
        [
            display(name),
            fmt(r["seconds_per_epoch"], 3),
            fmt(r["relative_to_lr"], 2),
            f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] else "–",
            r["embedding_updates"],
        ]
        for name, r in summary["models"].items()
    ]
    return header, rows


def write_efficiency(summary: dict[str, Any], out: str | Path) -> list[Path]:
    out = Path(out)
    paths = [write_json(out / f"{COMMAND}.json", summary)]
    title = f"Training time per epoch relative to LR ({summary['device']})"
    md = [f"# {title}", "", summary["about"], "", markdown_table(*efficiency_table(summary)), ""]
    write_text(out / f"{COMMAND}.md", "\n".join(md))
    paths.append(out / f"{COMMAND}.md")
    header = ["model", "seconds_per_epoch", "relative_to_lr", "samples_per_s", "device"]
    rows = [
        [n, r["seconds_per_epoch"], r["relative_to_lr"], r["samples_per_s"], r["device"]]
        for n, r in summary["models"].items()
    ]
    paths.append(write_csv(out / f"{COMMAND}.csv", header, rows))
    names = list(summary["models"])
    relative = [summary["models"][n]["relative_to_lr"] for n in names]
    paths.append(
        relative_bars(
            [display(n) for n in names], relative, out / f"{COMMAND}_relative.png", title=title
        )
    )
    return paths


def run_efficiency(
    store: str | Path,
    out: str | Path,
    *,
    models: Sequence[str],
    config: StudyConfig | None = None,
    epochs: int = DEFAULT_EPOCHS,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Time every model (and LR) on ``store``; write ``efficiency.*`` to ``out``."""
    if epochs < 1 or repeats < 1:
        raise ConfigError("--epochs and --repeats must be at least 1")
    config = config or StudyConfig()
    models = list(dict.fromkeys([REFERENCE, *models]))  # LR first: the denominator
    data = open_study_store(store, need_test=False)
    # a fixed number of epochs for every model: early stopping off (patience = epochs)
    overrides = {**(train_overrides or {}), "epochs": epochs, "patience": epochs}
    specs = []
    for name in models:
        model_config = config.model_config(name, **(model_overrides or {}))
        train_config = config.train_config(seed, **overrides)
        for repeat in range(repeats):
            extra = {"repeat": repeat}
            specs.append(RunSpec(COMMAND, data.fingerprint, model_config, train_config, extra))
    per_model = run_specs(data, specs, out, desc=COMMAND, progress=progress)
    summary = summarize_efficiency({name: per_model.get(name, []) for name in models})
    device = summary["models"][REFERENCE]["device"]
    threads = specs[0].train.threads
    summary.update(
        device=device,
        threads=threads,
        epochs=epochs,
        repeats=repeats,
        store=str(data.path),
        rows=data.dataset.rows(),
        machine=f"{platform.node()} {platform.processor() or platform.machine()}",
        torch=torch.__version__,
        about=(
            f"Store `{data.path}` ({data.dataset.rows()['train']:,} training rows); device "
            f"{device}, {threads or 'default'} CPU thread(s); {epochs} epoch(s) per run, median "
            f"of {repeats} run(s); FNN includes its FM pre-training; preset {config.preset.name}."
        ),
    )
    write_efficiency(summary, out)
    return summary
