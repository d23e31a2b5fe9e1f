"""``deepfm daily``: time-ordered evaluation of daily model updates (train on days <= t, test on
day t + 1), as the paper's deployment updates its models every day.

For each day ``t`` of the data (the values of a time column, e.g. the app market's ``day``;
see ``--split time:COLUMN``) three models are scored on day ``t + 1``:

* **warm**: yesterday's model continued on day ``t`` only: its feature map grows with the day's
  values (:mod:`deepfm.data.growth`), old ids keep their rows, the optimiser continues
  (:func:`~deepfm.train.run.fit_and_evaluate` with a ``parent``; what ``deepfm train
  --warm-start`` does);
* **retrain**: a model fitted from scratch (feature map and weights) on every day so far;
* **frozen**: the day-1 model, never updated (values first seen later are OOV).

Day 1 trains one model from scratch: it is all three. Each update's wall time counts building
its dataset (counting, growing or fitting the map, encoding) and training. With ``track`` (a
field, e.g. ``app_id``) each day also reports the values of that field first seen that day:
how many got their own id in the warm map, and where the warm model ranks them on the next day
(their mean predicted CTR among all values of the field shown that day; rank percentile, 0 = top).

``daily.json`` holds ``{"days": [...], "mean": {...}, "setup": {...}}``; ``daily.md`` the table;
``daily.png`` next-day AUC per model and the update times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa

from deepfm.data.codecs import FIRST_VALUE
from deepfm.data.featuremap import FeatureMap
from deepfm.data.growth import DEFAULT_DECAY
from deepfm.data.pipeline import build_dataset
from deepfm.data.reader import RawChunk
from deepfm.data.schema import Schema
from deepfm.data.splits import SplitSpec, time_order
from deepfm.errors import ConfigError
from deepfm.experiments.plots import save_panels
from deepfm.models.registry import ModelConfig
from deepfm.outputs import write_json, write_text
from deepfm.train.run import Parent, TrainedModel, fit_and_evaluate
from deepfm.train.trainer import TrainConfig, evaluate, predict_proba

MODELS = ("warm", "retrain", "frozen")
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Day:
    """The rows of one time value."""

    time: str
    chunk: RawChunk


def split_days(chunks: Sequence[RawChunk], column: str) -> list[Day]:
    """The rows of ``chunks`` grouped by their value of ``column``, in time order
    (:func:`~deepfm.data.splits.time_order`; rows of one time keep their input order)."""
    chunks = [c for c in chunks if len(c)]
    if not chunks:
        raise ConfigError("the input holds no usable rows")
    missing = [c.path for c in chunks if column not in c.table.column_names]
    if missing:
        raise ConfigError(f"{missing[0]} has no time column {column!r}")
    table = pa.concat_tables([c.table for c in chunks], promote_options="permissive")
    lines = np.concatenate([c.lines for c in chunks])
    paths = np.concatenate([np.full(len(c), i) for i, c in enumerate(chunks)])
    times = table.column(column).to_numpy(zero_copy_only=False)
    order = time_order(times)
    ordered = np.asarray(times)[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    days = []
    for rows in np.split(order, starts[1:]):
        path = chunks[int(paths[rows[0]])].path
        days.append(Day(str(times[rows[0]]), RawChunk(table.take(rows), lines[rows], path)))
    return days


@dataclass
class Updated:
    """A model of the loop, its feature map and the wall time of the update that made it."""

    trained: TrainedModel
    feature_map: FeatureMap
    seconds: float
    cpu_seconds: float

    def score(self, chunk: RawChunk) -> np.ndarray:
        return predict_proba(self.trained.model, self.feature_map.encode(chunk))

    def evaluate(self, chunk: RawChunk) -> dict[str, float]:
        return evaluate(self.trained.model, self.feature_map.encode(chunk))


def _first_seen(days: Sequence[Day], field: str) -> list[set[str]]:
    """The values of ``field`` first seen on each day."""
    seen: set[str] = set()
    out = []
    for day in days:
        values = set(map(str, day.chunk.table.column(field).to_pylist()))
        out.append(values - seen)
        seen |= values
    return out


def _new_values_report(model: Updated, next_day: Day, field: str, new: set[str]) -> dict[str, Any]:
    """How many of ``new`` (values first seen the day before ``next_day``) have their own id in
    ``model``'s map, and the rank percentile of their mean predicted CTR on ``next_day`` among
    the field's values shown that day (0: the highest)."""
    codec = model.feature_map.field(field)
    keys = sorted(new)
    with_ids = 0
    if keys:
        ids, _ = codec.encode(pa.array(keys))
        with_ids = int(np.count_nonzero(ids[:, 0] - codec.offset >= FIRST_VALUE))
    values = np.asarray(list(map(str, next_day.chunk.table.column(field).to_pylist())))
    scores = model.score(next_day.chunk)
    names, inverse = np.unique(values, return_inverse=True)
    mean = np.bincount(inverse, scores) / np.bincount(inverse)
    rank = np.argsort(np.argsort(-mean)) / max(len(names) - 1, 1)  # 0: the highest mean CTR
    shown = np.isin(names, keys)
    return {
        "new": len(keys),
        "with_ids": with_ids,
        "shown_next_day": int(shown.sum()),
        "mean_rank_next_day": float(rank[shown].mean()) if shown.any() else float("nan"),
    }


def run_daily(
    days: Sequence[Day],
    schema: Schema,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    daily_epochs: int | None = None,
    valid_fraction: float = 0.1,
    decay: float = DEFAULT_DECAY,
    track: str | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """The day-by-day loop of the module docs over ``days`` (at least two)."""
    if len(days) < 2:
        raise ConfigError(f"a daily evaluation needs at least two days, got {len(days)}")
    if track is not None and track not in schema.names:
        raise ConfigError(f"--track {track!r} is not a field of the schema ({schema.names})")
    split = SplitSpec.parse("none")  # a seeded valid_fraction of each day's rows validates
    warm_config = replace(train_config, epochs=daily_epochs or train_config.epochs)
    first_seen = _first_seen(days, track) if track else []

    def fit(chunks: list[RawChunk], parent: Parent | None, config: TrainConfig) -> Updated:
        started, cpu = time.perf_counter(), time.process_time()
        dataset = build_dataset(
            chunks,
            schema,
            split=split,
            valid_fraction=valid_fraction,
            seed=config.seed,
            base=parent.feature_map if parent else None,
            decay=decay,
        )
        trained = fit_and_evaluate(dataset, model_config, config, parent=parent)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        return Updated(trained, dataset.feature_map, seconds, cpu)

    records: list[dict[str, Any]] = []
    first = fit([days[0].chunk], None, train_config)
    warm = retrain = frozen = first
    for t in range(len(days) - 1):
        day, test = days[t], days[t + 1]
        if t > 0:
            optimizer_state = warm.trained.fit.optimizer_state or None
            parent = Parent(warm.trained.model, model_config, warm.feature_map, optimizer_state)
            warm = fit([day.chunk], parent, warm_config)
            retrain = fit([d.chunk for d in days[: t + 1]], None, train_config)
        record: dict[str, Any] = {
            "day": day.time,
            "test_day": test.time,
            "test_rows": len(test.chunk),
            "initial_seconds": first.seconds if t == 0 else 0.0,
        }
        for name, model in (("warm", warm), ("retrain", retrain), ("frozen", frozen)):
            record[name] = {
                **model.evaluate(test.chunk),
                "features": model.feature_map.num_features,
            }
            if name != "frozen":
                record[name]["update_seconds"] = model.seconds if t > 0 else 0.0
                record[name]["update_cpu_seconds"] = model.cpu_seconds if t > 0 else 0.0
                record[name]["epochs"] = model.trained.metrics["epochs_run"]
        if t > 0 and "growth" in warm.trained.metrics:
            record["warm"]["added"] = warm.trained.metrics["growth"]["added"]
        if track:
            record["new_values"] = _new_values_report(warm, test, track, first_seen[t])
            frozen_view = _new_values_report(frozen, test, track, first_seen[t])
            record["new_values"]["frozen_with_ids"] = frozen_view["with_ids"]
        records.append(record)
        log(
            f"day {day.time} → {test.time}: AUC "
            + ", ".join(f"{m} {record[m]['auc']:.4f}" for m in MODELS)
            + (
                f"; update {record['warm']['update_seconds']:.1f}s warm, "
                f"{record['retrain']['update_seconds']:.1f}s retrain"
                if t > 0
                else ""
            )
        )
    return {
        "days": records,
        "mean": _means(records),
        "setup": {
            "model": model_config.to_dict(),
            "train": train_config.to_dict(),
            "daily_epochs": warm_config.epochs,
            "valid_fraction": valid_fraction,
            "decay": decay,
            "track": track,
            "days": [d.time for d in days],
            "rows": [len(d.chunk) for d in days],
        },
    }


def _means(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean next-day AUC and Logloss per model, and the total update time of days 2.. (the
    first model is shared by all three)."""
    out: dict[str, Any] = {}
    for name in MODELS:
        out[name] = {
            "auc": float(np.nanmean([r[name]["auc"] for r in records])),
            "logloss": float(np.nanmean([r[name]["logloss"] for r in records])),
        }
    for name in ("warm", "retrain"):
        for key in ("update_seconds", "update_cpu_seconds"):
            out[name][key] = float(sum(r[name][key] for r in records))
    retrain, retrain_cpu = (out["retrain"][k] for k in ("update_seconds", "update_cpu_seconds"))
    out["time_ratio"] = out["warm"]["update_seconds"] / retrain if retrain else float("nan")
    out["cpu_ratio"] = (
        out["warm"]["update_cpu_seconds"] / retrain_cpu if retrain_cpu else float("nan")
    )
    out["auc_gap"] = out["warm"]["auc"] - out["retrain"]["auc"]
    return out


# -- reporting ---------------------------------------------------------------------------------


def daily_table(results: dict[str, Any]) -> str:
    """A Markdown table: per day, next-day AUC and Logloss of each model and the update times."""
    header = ["train ≤ day", "test day", "rows"]
    header += [f"{m} AUC" for m in MODELS] + [f"{m} Logloss" for m in MODELS]
    header += ["warm s", "retrain s"]
    tracked = any("new_values" in r for r in results["days"])
    if tracked:
        header += ["new values (own ids)", "their rank next day"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def row(label: str, test: str, rows: str, r: dict[str, Any], extra: list[str]) -> str:
        cells = [label, test, rows]
        cells += [f"{r[m]['auc']:.4f}" for m in MODELS]
        cells += [f"{r[m]['logloss']:.4f}" for m in MODELS]
        cells += [f"{r['warm']['update_seconds']:.1f}", f"{r['retrain']['update_seconds']:.1f}"]
        return "| " + " | ".join(cells + extra) + " |"

    for r in results["days"]:
        extra = []
        if tracked:
            new = r.get("new_values", {})
            extra = [
                f"{new.get('new', 0)} ({new.get('with_ids', 0)})",
                f"{new.get('mean_rank_next_day', float('nan')):.2f}",
            ]
        lines.append(row(r["day"], r["test_day"], f"{r['test_rows']:,}", r, extra))
    mean = results["mean"]
    lines.append(row("mean", "", "", mean, ["", ""] if tracked else []))
    lines.append("")
    lines.append(
        f"Warm − retrain mean next-day AUC: {mean['auc_gap']:+.4f}; total update time warm / "
        f"retrain: {mean['time_ratio']:.2f} ({mean['warm']['update_seconds']:.1f} s / "
        f"{mean['retrain']['update_seconds']:.1f} s; CPU time {mean['cpu_ratio']:.2f}); "
        "frozen day-1 model: "
        f"{mean['frozen']['auc'] - mean['retrain']['auc']:+.4f} AUC vs retrain."
    )
    return "\n".join(lines)


def plot_daily(results: dict[str, Any], path: str | Path) -> Path:
    """Next-day AUC per model, and each day's update time (warm vs retrain)."""
    days = [r["test_day"] for r in results["days"]]
    x = np.arange(len(days))
    fig, (ax_auc, ax_time) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in MODELS:
        ax_auc.plot(x, [r[name]["auc"] for r in results["days"]], marker="o", label=name)
    ax_auc.set_xticks(x, days)
    ax_auc.set(xlabel="test day", ylabel="next-day AUC", title="Train on days ≤ t, test on t + 1")
    for i, name in enumerate(("warm", "retrain")):
        seconds = [r[name]["update_seconds"] for r in results["days"]]
        ax_time.bar(x + (i - 0.5) * 0.4, seconds, 0.4, label=name)
    ax_time.set_xticks(x, days)
    ax_time.set(xlabel="test day", ylabel="update time (s)", title="Daily update time")
    return save_panels(fig, (ax_auc, ax_time), path)


def write_daily(results: dict[str, Any], out: str | Path) -> list[Path]:
    """daily.json, daily.md and daily.png under ``out``."""
    out = Path(out)
    write_json(out / "daily.json", results)
    write_text(out / "daily.md", daily_table(results) + "\n")
    return [out / "daily.json", out / "daily.md", plot_daily(results, out / "daily.png")]
