"""``deepfm compare``: models × seeds on one store; the paper's Tables IV and V with Welch t-tests.

* **Table IV**: test AUC and Logloss, mean ± sample standard deviation over the seeds.
* **Table V**: each DeepFM model's relative improvement over its two components: the FM
  component (``fm``) and its deep component: DeepFM-D ↔ DNN, DeepFM-IP ↔ IPNN, DeepFM-OP ↔ OPNN,
  DeepFM-*P ↔ PNN* (:data:`DEEP_COMPONENT`). AUC: ``(AUC − AUC_base) / AUC_base``; Logloss:
  ``(Logloss_base − Logloss) / Logloss_base``, so a positive number is an improvement for both.
* **p-values**: two-sided Welch t-tests (unequal variances, SciPy) of each DeepFM model's per-seed
  AUC (and Logloss) against each baseline's.

The seeds vary the training (initialisation, batch order, dropout), not the store's split.
:func:`run_criteo_protocols` runs the paper's two Criteo protocols on one Criteo-format file:
random 9:1 and sequential 6:1, each with its Table III preset, preparing both stores itself.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from deepfm.errors import ConfigError
from deepfm.experiments.runs import (
    RunSpec,
    StudyConfig,
    StudyData,
    fmt,
    markdown_table,
    mean_std,
    open_study_store,
    run_specs,
    write_csv,
    write_json,
)
from deepfm.experiments.study_plots import metric_bars
from deepfm.outputs import write_text

COMMAND = "compare"
DEFAULT_SEEDS = 5
FM_COMPONENT = "fm"
#: each DeepFM model's deep component: the model its deep part is, on its own
DEEP_COMPONENT = {
    "deepfm": "dnn",
    "deepfm_ip": "ipnn",
    "deepfm_op": "opnn",
    "deepfm_star": "pnn_star",
}
DISPLAY = {
    "lr": "LR", "fm": "FM", "dnn": "DNN", "fnn": "FNN", "ipnn": "IPNN", "opnn": "OPNN",
    "pnn_star": "PNN*", "lr_dnn": "LR & DNN", "fm_dnn": "FM & DNN", "deepfm": "DeepFM-D",
    "deepfm_ip": "DeepFM-IP", "deepfm_op": "DeepFM-OP", "deepfm_star": "DeepFM-*P",
}  # fmt: skip
#: the thirteen models of the paper's Table IV and Fig. 9, the studies' default; other registry
#: models (``poly2``) join with ``--models``
TABLE_IV_MODELS = tuple(DISPLAY)
DISPLAY["poly2"] = "Poly-2"
METRICS = ("auc", "logloss")


def display(name: str) -> str:
    return DISPLAY.get(name, name)


def is_deepfm(name: str) -> bool:
    return name in DEEP_COMPONENT


# -- statistics ----------------------------------------------------------------------------------


def welch_p_value(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test (unequal variances) that ``a`` and ``b`` have the
    same mean; NaN when a sample has fewer than 2 values or both have no spread at all."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return math.nan
    if x.var() == 0 and y.var() == 0:
        return math.nan  # the statistic is undefined (SciPy returns NaN and warns)
    with warnings.catch_warnings():
        # one side without spread (LR's FTRL runs can agree to the last digit) makes SciPy warn
        # about precision in its moments; the statistic is still well defined
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def relative_improvement(value: float, base: float, metric: str) -> float:
    """Improvement of ``value`` over ``base`` in percent; positive is better for both metrics
    (AUC: higher is better; Logloss: lower is better)."""
    if metric == "auc":
        return 100.0 * (value - base) / base
    if metric == "logloss":
        return 100.0 * (base - value) / base
    raise ValueError(f"unknown metric {metric!r}")


def summarize(per_model: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Table IV, Table V and p-values from each model's runs (each with ``test`` metrics)."""
    models: dict[str, dict[str, Any]] = {}
    for name, runs in per_model.items():
        record: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
        for metric in METRICS:
            values = [r["test"][metric] for r in runs]
            record[metric] = values
            record[f"{metric}_mean"], record[f"{metric}_std"] = mean_std(values)
        record["best_epoch"] = [r["best_epoch"] for r in runs]
        record["train_seconds_mean"] = float(np.mean([r["train_seconds"] for r in runs]))
        models[name] = record
    baselines = [n for n in models if not is_deepfm(n)]
    for name in (n for n in models if is_deepfm(n)):
        models[name]["p_values"] = {
            base: {m: welch_p_value(models[name][m], models[base][m]) for m in METRICS}
            | {f"{m}_diff": models[name][f"{m}_mean"] - models[base][f"{m}_mean"] for m in METRICS}
            for base in baselines
        }
    improvements = {}
    for name in (n for n in models if is_deepfm(n)):
        row: dict[str, Any] = {"fm_component": FM_COMPONENT, "deep_component": DEEP_COMPONENT[name]}
        for role in ("fm_component", "deep_component"):
            base = row[role]
            if base in models:
                row[f"over_{role}"] = {
                    m: relative_improvement(models[name][f"{m}_mean"], models[base][f"{m}_mean"], m)
                    for m in METRICS
                }
        improvements[name] = row
    return {"models": models, "improvement": improvements}


# -- tables --------------------------------------------------------------------------------------


def _pm(mean: float, std: float) -> str:
    return f"{fmt(mean)} ± {fmt(std)}" if std is not None and std == std else fmt(mean)


def table_iv(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["model", "AUC", "Logloss", "seeds", "best epochs"]
    rows = [
        [
            display(name),
            _pm(r["auc_mean"], r["auc_std"]),
            _pm(r["logloss_mean"], r["logloss_std"]),
            len(r["seeds"]),
            ",".join(str(e) for e in r["best_epoch"]),
        ]
        for name, r in summary["models"].items()
    ]
    return header, rows


def table_v(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    header = ["model", "FM component", "AUC vs FM", "Logloss vs FM", "deep component",
              "AUC vs deep", "Logloss vs deep"]  # fmt: skip
    rows = []
    for name, r in summary["improvement"].items():
        cells = [display(name)]
        for role in ("fm_component", "deep_component"):
            over = r.get(f"over_{role}")
            cells.append(display(r[role]) + ("" if over else " (not run)"))
            cells += [f"{over[m]:+.2f}%" if over else "–" for m in METRICS]
        rows.append(cells)
    return header, rows


def p_value_table(summary: dict[str, Any], metric: str) -> tuple[list[str], list[list[Any]]]:
    deepfms = [n for n in summary["models"] if is_deepfm(n)]
    baselines = [n for n in summary["models"] if not is_deepfm(n)]
    header = ["baseline", *(display(n) for n in deepfms)]
    rows = [
        [display(b), *(_p(summary["models"][d]["p_values"][b], metric) for d in deepfms)]
        for b in baselines
    ]
    return header, rows


def _p(test: dict[str, float], metric: str) -> str:
    """The p-value and which side is better: (+) DeepFM, (−) the baseline."""
    p, diff = test[metric], test[f"{metric}_diff"]
    if p is None or p != p:
        return "–"
    better = diff > 0 if metric == "auc" else diff < 0
    return (f"{p:.2e}" if p < 1e-3 else f"{p:.3f}") + (" (+)" if better else " (−)")


def compare_markdown(summary: dict[str, Any], title: str) -> str:
    parts = [f"# {title}", "", summary.get("about", ""), ""]
    parts += ["## Table IV: test AUC and Logloss (mean ± std over seeds)", ""]
    parts += [markdown_table(*table_iv(summary)), ""]
    if summary["improvement"]:
        parts += [
            "## Table V: relative improvement of DeepFM over its components",
            "",
            "AUC: (AUC − AUC_base) / AUC_base; Logloss: (Logloss_base − Logloss) / Logloss_base "
            "(positive = better). Deep components: DeepFM-D ↔ DNN, DeepFM-IP ↔ IPNN, "
            "DeepFM-OP ↔ OPNN, DeepFM-*P ↔ PNN*.",
            "",
            markdown_table(*table_v(summary)),
            "",
        ]
        if any(not is_deepfm(n) for n in summary["models"]):
            for metric, label in (("auc", "AUC"), ("logloss", "Logloss")):
                parts += [
                    f"## Welch t-test p-values ({label}): DeepFM models against each baseline",
                    "",
                    "Two-sided, unequal variances (scipy.stats.ttest_ind(equal_var=False)), "
                    "over the per-seed test values; (+): the DeepFM model's mean is better, "
                    "(−): the baseline's is; – when a side has fewer than 2 seeds.",
                    "",
                    markdown_table(*p_value_table(summary, metric)),
                    "",
                ]
    return "\n".join(parts)


def write_compare(summary: dict[str, Any], out: str | Path, title: str) -> list[Path]:
    """``compare.json`` (all numbers), ``compare.md``, ``compare.csv``, ``compare_metrics.png``."""
    out = Path(out)
    paths = [write_json(out / f"{COMMAND}.json", summary)]
    md = out / f"{COMMAND}.md"
    write_text(md, compare_markdown(summary, title) + "\n")
    paths.append(md)
    header = ["model", "auc_mean", "auc_std", "logloss_mean", "logloss_std", "seeds"]
    header += ["auc_vs_fm_pct", "logloss_vs_fm_pct", "deep_component"]
    header += ["auc_vs_deep_pct", "logloss_vs_deep_pct"]
    rows = []
    for name, r in summary["models"].items():
        imp = summary["improvement"].get(name, {})
        fm_over, deep_over = imp.get("over_fm_component", {}), imp.get("over_deep_component", {})
        rows.append(
            [name, r["auc_mean"], r["auc_std"], r["logloss_mean"], r["logloss_std"],
             len(r["seeds"]), fm_over.get("auc"), fm_over.get("logloss"),
             imp.get("deep_component"), deep_over.get("auc"), deep_over.get("logloss")]
        )  # fmt: skip
    paths.append(write_csv(out / f"{COMMAND}.csv", header, rows))
    names = list(summary["models"])
    column = lambda key: [summary["models"][n][key] for n in names]  # noqa: E731
    paths.append(
        metric_bars(
            [display(n) for n in names],
            (column("auc_mean"), column("auc_std")),
            (column("logloss_mean"), column("logloss_std")),
            out / f"{COMMAND}_metrics.png",
            title=title,
        )
    )
    return paths


# -- running -------------------------------------------------------------------------------------


def compare_specs(
    data: StudyData,
    models: Sequence[str],
    seeds: Sequence[int],
    config: StudyConfig,
    *,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> list[RunSpec]:
    specs = []
    for name in models:
        model_config = config.model_config(name, **(model_overrides or {}))
        for seed in seeds:
            train_config = config.train_config(seed, **(train_overrides or {}))
            specs.append(RunSpec("fit", data.fingerprint, model_config, train_config))
    return specs


def run_compare(
    store: str | Path,
    out: str | Path,
    *,
    models: Sequence[str],
    seeds: Sequence[int],
    config: StudyConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    title: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train every model with every seed on ``store`` (finished runs reused from
    ``out/runs``), write the tables and the plot to ``out`` and return the summary."""
    if not models:
        raise ConfigError("compare needs at least one model")
    if not seeds:
        raise ConfigError("compare needs at least one seed (--seeds N with N >= 1)")
    config = config or StudyConfig()
    data = open_study_store(store)
    specs = compare_specs(
        data,
        models,
        seeds,
        config,
        model_overrides=model_overrides,
        train_overrides=train_overrides,
    )
    per_model = run_specs(data, specs, out, desc=COMMAND, progress=progress)
    summary = summarize({name: per_model.get(name, []) for name in models})
    summary["about"] = (
        f"Store `{data.path}` ({data.dataset.rows()['train']:,} train / "
        f"{data.dataset.rows()['valid']:,} valid / {data.dataset.rows()['test']:,} test rows); "
        f"seeds {', '.join(map(str, seeds))}; preset {config.preset.name}."
    )
    summary.update(
        store=str(data.path),
        store_fingerprint=data.fingerprint,
        rows=data.dataset.rows(),
        seeds=list(seeds),
        preset=config.preset.name,
        preset_status=config.preset.status,
        configs={s.model.name: s.to_dict() for s in specs},
        runs=[s.run_id for s in specs],
    )
    write_compare(summary, out, title or f"Model comparison on {Path(store).name}")
    return summary


# -- the paper's two Criteo protocols ------------------------------------------------------------

#: protocol name → (split of ``deepfm prepare``, Table III preset)
CRITEO_PROTOCOLS = {
    "random": ("random:0.9", "criteo-random"),
    "sequential": ("sequential:6/7", "criteo-sequential"),
}


def protocol_store(
    file: str | Path, data_format: str, split: str, out: Path, *, progress: bool
) -> Path:
    """A store of ``file`` with ``split`` at ``out``: reused when it holds the same file (same
    sha256) with the same split, prepared (again) otherwise."""
    from deepfm.common import file_sha256
    from deepfm.data.formats import get_format
    from deepfm.data.prepare import prepare_store
    from deepfm.data.splits import SplitSpec
    from deepfm.data.store import Store, is_store

    spec = SplitSpec.parse(split)
    if is_store(out):
        manifest = Store.open(out).manifest
        sources = [s.get("sha256") for s in manifest.get("sources", [])]
        if (
            sources == [file_sha256(file)]
            and manifest["split"]["spec"] == str(spec)
            and manifest["data_format"] == data_format
        ):
            return out
    prepare_store(
        get_format(data_format),
        [file],
        out,
        split=spec,
        valid_fraction=0.1,
        seed=0,
        overwrite=True,
        progress=(lambda text: print(text, flush=True)) if progress else None,
    )
    return out


def run_criteo_protocols(
    file: str | Path,
    out: str | Path,
    *,
    data_format: str = "criteo",
    models: Sequence[str],
    seeds: Sequence[int],
    config: StudyConfig | None = None,
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Criteo-Random (9:1) and Criteo-Sequential (6:1) on ``file``: ``out/stores/<protocol>``,
    ``out/<protocol>/compare.*``, and both side by side in ``out/compare.{json,md,csv}``.
    Without a ``config`` each protocol uses its Table III preset."""
    from deepfm.models.presets import load_preset

    if not Path(file).is_file():
        raise ConfigError(f"--criteo {file}: no such file")
    out = Path(out)
    summaries = {}
    for protocol, (split, preset_name) in CRITEO_PROTOCOLS.items():
        store = protocol_store(
            file, data_format, split, out / "stores" / protocol, progress=progress
        )
        protocol_config = config or StudyConfig(load_preset(preset_name))
        summaries[protocol] = run_compare(
            store,
            out / protocol,
            models=models,
            seeds=seeds,
            config=protocol_config,
            model_overrides=model_overrides,
            train_overrides=train_overrides,
            title=f"Criteo-{protocol.capitalize()} ({split})",
            progress=progress,
        )
    combined = {"file": str(file), "protocols": summaries}
    write_json(out / f"{COMMAND}.json", combined)
    lines = [f"# The paper's Criteo protocols on {Path(file).name}", ""]
    header = ["model"]
    for protocol in CRITEO_PROTOCOLS:
        header += [f"AUC ({protocol})", f"Logloss ({protocol})"]
    rows = []
    for name in models:
        row = [display(name)]
        for protocol in CRITEO_PROTOCOLS:
            r = summaries[protocol]["models"][name]
            row += [_pm(r["auc_mean"], r["auc_std"]), _pm(r["logloss_mean"], r["logloss_std"])]
        rows.append(row)
    lines += [markdown_table(header, rows), ""]
    for protocol, (split, _) in CRITEO_PROTOCOLS.items():
        status = summaries[protocol]["preset_status"]
        note = " (values assumed, see the preset file)" if status != "paper" else ""
        lines.append(
            f"- {protocol}: split {split}, preset {summaries[protocol]['preset']}{note}; "
            f"tables and p-values in [{protocol}/compare.md]({protocol}/compare.md)"
        )
    write_text(out / f"{COMMAND}.md", "\n".join(lines) + "\n")
    csv_header = ["protocol", "model", "auc_mean", "auc_std", "logloss_mean", "logloss_std"]
    csv_rows = [
        [p, n, r["auc_mean"], r["auc_std"], r["logloss_mean"], r["logloss_std"]]
        for p, s in summaries.items()
        for n, r in s["models"].items()
    ]
    write_csv(out / f"{COMMAND}.csv", csv_header, csv_rows)
    return combined
