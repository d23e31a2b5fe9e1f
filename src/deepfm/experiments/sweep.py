"""``deepfm sweep``: the hyper-parameter study of Sec. IV-C (Fig. 10-14) for any chosen models.

One parameter at a time, every other setting from the preset/config/flags:

* ``activation``: relu, tanh;
* ``dropout``: the paper's keep probability 1.0, 0.9, …, 0.5 (our drop rate is 1 − keep);
* ``neurons``: neurons per hidden layer (100, 200, 400, 800) at a fixed depth (3 by default);
* ``layers``: 1 to 7 hidden layers of a fixed width (the base config's first layer, 400);
* ``shape``: a fixed total of neurons (600) over a fixed depth (3) arranged constant,
  increasing, decreasing or diamond (:func:`shape_sizes`: 200-200-200, 100-200-300,
  300-200-100, 150-300-150).

Results accumulate in ``OUT/sweep.json`` (one entry per parameter), ``sweep.md``, ``sweep.csv``
and one line chart per parameter, ``sweep_<param>.png``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfm.errors import ConfigError
from deepfm.experiments.compare import display
from deepfm.experiments.runs import (
    RunSpec,
    StudyConfig,
    fmt,
    markdown_table,
    mean_std,
    open_study_store,
    run_specs,
    to_json,
    write_csv,
    write_json,
)
from deepfm.experiments.study_plots import sweep_lines
from deepfm.models.presets import dropout_of
from deepfm.outputs import make_dirs, write_text

COMMAND = "sweep"
PARAMS = ("activation", "dropout", "neurons", "layers", "shape")
SHAPES = ("constant", "increasing", "decreasing", "diamond")
#: the models of the paper's Fig. 10-14 (the ones with a deep component)
DEFAULT_MODELS = ("fnn", "ipnn", "opnn", "pnn_star", "lr_dnn", "fm_dnn", "deepfm")
DEFAULT_VALUES: dict[str, tuple[Any, ...]] = {
    "activation": ("relu", "tanh"),
    "dropout": (1.0, 0.9, 0.8, 0.7, 0.6, 0.5),  # keep probabilities, as the paper plots them
    "neurons": (100, 200, 400, 800),
    "layers": (1, 2, 3, 4, 5, 6, 7),
    "shape": SHAPES,
}
AXIS_LABEL = {
    "activation": "activation function",
    "dropout": "keep probability (drop rate = 1 − keep)",
    "neurons": "neurons per layer",
    "layers": "hidden layers",
    "shape": "network shape",
}
DEFAULT_TOTAL = 600
DEFAULT_DEPTH = 3


# -- network shapes ------------------------------------------------------------------------------


def shape_weights(shape: str, layers: int) -> list[int]:
    """Relative layer sizes of a shape: constant 1,1,1; increasing 1,2,3; decreasing 3,2,1;
    diamond rising to the middle and falling back (1,2,1; 1,2,2,1; 1,2,3,2,1)."""
    if shape == "constant":
        return [1] * layers
    if shape == "increasing":
        return list(range(1, layers + 1))
    if shape == "decreasing":
        return list(range(layers, 0, -1))
    if shape == "diamond":
        return [min(i + 1, layers - i) for i in range(layers)]
    raise ConfigError(f"unknown network shape {shape!r}; choose from {', '.join(SHAPES)}")


def shape_sizes(shape: str, total: int, layers: int) -> tuple[int, ...]:
    """Layer sizes of ``shape`` summing exactly to ``total``: proportional to the shape's
    weights, rounded down, the remaining neurons given to the largest remainders."""
    if layers < 1:
        raise ConfigError(f"a network shape needs at least 1 layer, got {layers}")
    weights = shape_weights(shape, layers)
    exact = [total * w / sum(weights) for w in weights]
    sizes = [math.floor(x) for x in exact]
    by_remainder = sorted(range(layers), key=lambda i: (sizes[i] - exact[i], i))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    if min(sizes) < 1:
        raise ConfigError(
            f"{total} neurons are too few for a {shape} network of {layers} layers "
            f"(every layer needs at least 1)"
        )
    assert sum(sizes) == total
    return tuple(sizes)


# -- sweep points --------------------------------------------------------------------------------


def parse_values(param: str, text: str | None) -> list[Any]:
    """``--values`` for ``param`` (a comma list), or the paper's values."""
    if param not in PARAMS:
        raise ConfigError(f"--param must be one of {', '.join(PARAMS)}, not {param!r}")
    if text is None:
        return list(DEFAULT_VALUES[param])
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError("--values: give at least one value")
    if param in ("activation", "shape"):
        if param == "shape":
            for item in items:
                shape_weights(item, 1)  # validates the name
        return items
    try:
        values: list[Any] = [float(t) if param == "dropout" else int(t) for t in items]
    except ValueError:
        kind = "keep probabilities" if param == "dropout" else "integers"
        raise ConfigError(f"--values for {param}: expected {kind}, got {text!r}") from None
    if param == "dropout" and not all(0 < v <= 1 for v in values):
        raise ConfigError("--values for dropout are keep probabilities in (0, 1]")
    if param != "dropout" and not all(v >= 1 for v in values):
        raise ConfigError(f"--values for {param} must be positive integers")
    return values


def point_overrides(
    param: str, value: Any, *, width: int, depth: int, total: int
) -> dict[str, Any]:
    """ModelConfig settings of one sweep point."""
    if param == "activation":
        return {"activation": value}
    if param == "dropout":
        return {"dropout": dropout_of(value)}  # the sweep's values are keep probabilities
    if param == "neurons":
        return {"hidden": (int(value),) * depth}
    if param == "layers":
        return {"hidden": (width,) * int(value)}
    return {"hidden": shape_sizes(value, total, depth)}


def point_label(param: str, value: Any, overrides: dict[str, Any]) -> str:
    if param == "shape":
        return f"{value} ({'-'.join(map(str, overrides['hidden']))})"
    return str(value)


# -- tables --------------------------------------------------------------------------------------


def sweep_tables(param: str, entry: dict[str, Any]) -> str:
    labels = entry["labels"]
    parts = [f"## {param}: {AXIS_LABEL[param]}", "", entry["about"], ""]
    for metric, label in (("auc", "test AUC"), ("logloss", "test Logloss")):
        rows = [
            [display(name), *(fmt(points[lab][f"{metric}_mean"]) for lab in labels)]
            for name, points in entry["models"].items()
        ]
        parts += [f"{label}:", "", markdown_table(["model", *labels], rows), ""]
    parts.append(f"![{param}](sweep_{param}.png)")
    return "\n".join(parts)


def write_sweep(all_params: dict[str, Any], out: Path) -> list[Path]:
    paths = [write_json(out / f"{COMMAND}.json", {"params": all_params})]
    md = ["# Hyper-parameter study (Sec. IV-C)", ""]
    md += [sweep_tables(p, all_params[p]) + "\n" for p in PARAMS if p in all_params]
    write_text(out / f"{COMMAND}.md", "\n".join(md))
    paths.append(out / f"{COMMAND}.md")
    header = ["param", "value", "model", "hidden", "activation", "dropout"]
    header += ["auc_mean", "auc_std", "logloss_mean", "logloss_std", "seeds"]
    rows = [
        [param, label, name, "-".join(map(str, p["hidden"])), p["activation"], p["dropout"],
         p["auc_mean"], p["auc_std"], p["logloss_mean"], p["logloss_std"], len(p["auc"])]
        for param, entry in all_params.items()
        for name, points in entry["models"].items()
        for label, p in points.items()
    ]  # fmt: skip
    paths.append(write_csv(out / f"{COMMAND}.csv", header, rows))
    return paths


def _previous(out: Path) -> dict[str, Any]:
    """Parameters swept earlier into ``out`` (kept beside the new one)."""
    path = out / f"{COMMAND}.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")).get("params", {}))
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return {}


# -- running -------------------------------------------------------------------------------------


def run_sweep(
    store: str | Path,
    out: str | Path,
    *,
    param: str,
    models: Sequence[str] = DEFAULT_MODELS,
    values: Sequence[Any] | None = None,
    seeds: Sequence[int] = (0,),
    config: StudyConfig | None = None,
    width: int | None = None,
    depth: int = DEFAULT_DEPTH,
    total: int = DEFAULT_TOTAL,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every model at every value of ``param`` (× seeds) and write the tables/plot."""
    values = list(values) if values is not None else parse_values(param, None)
    if not models or not seeds:
        raise ConfigError("a sweep needs at least one model and one seed")
    if depth < 1:
        raise ConfigError(f"--depth must be at least 1, got {depth}")
    config = config or StudyConfig()
    data = open_study_store(store)
    out = Path(out)
    specs, points = [], []
    for name in models:
        base = config.model_config(name, **(model_overrides or {}))
        layer_width = width or base.hidden[0]
        for value in values:
            changes = point_overrides(param, value, width=layer_width, depth=depth, total=total)
            model_config = base.replace(**changes)
            for seed in seeds:
                train_config = config.train_config(seed, **(train_overrides or {}))
                specs.append(RunSpec("fit", data.fingerprint, model_config, train_config))
                points.append((name, point_label(param, value, changes), model_config))
    per_model = run_specs(data, specs, out, desc=f"{COMMAND} {param}", progress=progress)
    results = [result for name in models for result in per_model.get(name, [])]  # spec order
    labels = list(dict.fromkeys(label for _, label, _ in points))
    grouped: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in models}
    for (name, label, model_config), result in zip(points, results, strict=True):
        point = grouped[name].setdefault(
            label,
            {
                "hidden": list(model_config.hidden),
                "activation": model_config.activation,
                "dropout": model_config.dropout,
                "auc": [],
                "logloss": [],
                "seeds": [],
            },
        )
        point["auc"].append(result["test"]["auc"])
        point["logloss"].append(result["test"]["logloss"])
        point["seeds"].append(result["seed"])
    for name_points in grouped.values():
        for point in name_points.values():
            for metric in ("auc", "logloss"):
                point[f"{metric}_mean"], point[f"{metric}_std"] = mean_std(point[metric])
    entry = {
        "values": to_json(values),
        "labels": labels,
        "seeds": list(seeds),
        "models": grouped,
        "store": str(data.path),
        "preset": config.preset.name,
        "about": (
            f"Store `{data.path}`; seeds {', '.join(map(str, seeds))}; preset "
            f"{config.preset.name}; every other setting fixed (see sweep.json)."
        ),
    }
    make_dirs(out)
    series = {
        display(name): {
            "auc": [grouped[name][lab]["auc_mean"] for lab in labels],
            "logloss": [grouped[name][lab]["logloss_mean"] for lab in labels],
        }
        for name in models
    }
    sweep_lines(
        AXIS_LABEL[param], labels, series, out / f"{COMMAND}_{param}.png", title=f"Sweep: {param}"
    )
    all_params = _previous(out)
    all_params[param] = entry
    write_sweep(all_params, out)
    return entry
