"""Accuracy of ``deepfm train``'s defaults, before and after (issue 13), on every shared sample
and on the simulated app market.

``python benchmarks/accuracy_defaults.py [--seeds 0,1,2] [--market-rows 40000]
[--market-models deepfm,dnn] [--datasets criteo,avazu,frappe,movielens,ipinyou]
[--out benchmarks/results/accuracy_defaults.json] [--set id_prior=1000 --set l2=1e-4]``;
``--table JSON...`` prints the before/after table of result files. ``--set NAME=VALUE`` changes
a TrainConfig or ModelConfig field from its default for every model trained (how defaults are
chosen: on the validation metrics the runs record).

Each sample of ``$DEEPFM_SHARED_DATA`` (default ``../shared/data``) is split once (seed 0):
20% of its rows are held out as the test set, which nothing reads until the end (no setting
was chosen on it); 10% of the rest is the validation set, the only rows that early stopping
and calibration see. Per model seed (initialisation, batch order, dropout), DeepFM-D trains
with the defaults as they are (``after``; ``after-raw``: the same model without its
calibration, so AUC is equal and only Logloss moves), and each of ``--references`` (default LR
with FTRL and FM) with the defaults too. ``--table OLD.json NEW.json`` prints the before/after
table of two result files (before: OLD's ``after``, measured on the code of its date).

On the app market
(``deepfm demo``'s generator, ``--market-rows`` impressions, 9:1 split) the script reports each
of ``--market-models`` beside the oracle's AUC (the true click probabilities) and the Table V
sign of each DeepFM model against its deep component. One torch thread per run; test AUC and
Logloss per run, and their means, go to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepfm.data.formats import get_format
from deepfm.data.pipeline import Dataset, load_dataset
from deepfm.data.splits import SplitSpec
from deepfm.experiments.demo import market_dataset, oracle_metrics
from deepfm.models.registry import ModelConfig
from deepfm.nn.calibration import uncalibrated
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import Batches, TrainConfig, evaluate

#: name -> (format, path under the shared data directory)
SAMPLES = {
    "criteo": ("criteo", "criteo/criteo_train_sample.txt"),
    "avazu": ("avazu", "avazu/avazu_train_sample.csv"),
    "frappe": ("frappe", "frappe/frappe.validation.libfm"),
    "movielens": ("movielens-100k", "movielens_100k"),
    "ipinyou": ("ipinyou", "ipinyou/train.fm.txt"),
}
#: each DeepFM model's deep component (Table V)
DEEP_PART = {"deepfm": "dnn", "deepfm_ip": "ipnn", "deepfm_op": "opnn", "deepfm_star": "pnn_star"}


def shared_dir() -> Path:
    return Path(os.environ.get("DEEPFM_SHARED_DATA", Path(__file__).parents[2] / "shared/data"))


def sample_dataset(name: str) -> Dataset:
    data_format, path = SAMPLES[name]
    return load_dataset(
        get_format(data_format),
        [shared_dir() / path],
        split=SplitSpec.parse("random:0.8"),
        valid_fraction=0.1,
        seed=0,
    )


def train_config(seed: int, **changes: Any) -> TrainConfig:
    return TrainConfig(seed=seed, threads=1, progress=False, **changes)


def scored(
    dataset: Dataset, model_name: str, seed: int, changes: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Train ``model_name`` with the defaults, but for ``changes`` (TrainConfig and ModelConfig
    fields: ``--set``); test metrics of the model as trained (``raw``) and calibrated
    (``calibrated``: the same as raw without a calibration)."""
    started = time.perf_counter()
    changes = changes or {}
    train_fields = {f.name for f in fields(TrainConfig)}
    model = ModelConfig(
        name=model_name, **{k: v for k, v in changes.items() if k not in train_fields}
    )
    config = train_config(seed, **{k: v for k, v in changes.items() if k in train_fields})
    trained = fit_and_evaluate(dataset, model, config)
    assert dataset.test is not None
    raw = evaluate(uncalibrated(trained.model), Batches(dataset.test))
    return {
        "raw": raw,
        "calibrated": trained.metrics["test"],
        "valid": trained.metrics["valid"],
        "calibration": trained.metrics["calibration"],
        "best_epoch": trained.metrics["best_epoch"],
        "epochs_run": trained.metrics["epochs_run"],
        "prior_from": trained.metrics["prior_from"],
        "seconds": time.perf_counter() - started,
    }


def mean(runs: list[dict[str, Any]], key: str, metric: str) -> float:
    return statistics.fmean(run[key][metric] for run in runs)


def samples_part(
    names: list[str], seeds: list[int], references: list[str], save, changes: dict[str, Any]
) -> dict[str, Any]:
    """Every sample's runs and means; ``save(out)`` after each sample (long runs keep what
    they measured)."""
    out: dict[str, Any] = {}
    for name in names:
        dataset = sample_dataset(name)
        runs: dict[str, list[dict[str, Any]]] = {"after": []}
        for reference in references:
            runs[reference] = []
        for seed in seeds:
            for policy, model in (("after", "deepfm"), *((r, r) for r in references)):
                runs[policy].append(scored(dataset, model, seed, changes))
                run = runs[policy][-1]
                save({**out, name: {**runs, "rows": dataset.rows()}})  # no means yet
                print(
                    f"  {name} seed {seed} {policy}: test AUC {run['calibrated']['auc']:.4f} "
                    f"Logloss {run['raw']['logloss']:.4f} raw / "
                    f"{run['calibrated']['logloss']:.4f} calibrated, epochs {run['epochs_run']}, "
                    f"{run['seconds']:.0f}s",
                    flush=True,
                )
        variants = [
            ("after-raw", "after", "raw"),
            ("after", "after", "calibrated"),
            *((reference, reference, "calibrated") for reference in references),
        ]
        summary = {
            **runs,
            "rows": dataset.rows(),
            "mean": {
                variant: {
                    "auc": mean(runs[policy], key, "auc"),
                    "logloss": mean(runs[policy], key, "logloss"),
                    "epochs_run": statistics.fmean(r["epochs_run"] for r in runs[policy]),
                }
                for variant, policy, key in variants
            },
        }
        out[name] = summary
        save(out)
        print(f"\n{name} ({dataset.rows()})")
        for variant, m in summary["mean"].items():
            print(
                f"  {variant:13s} AUC {m['auc']:.4f}  Logloss {m['logloss']:.4f}  "
                f"epochs {m['epochs_run']:.1f}",
                flush=True,
            )
    return out


def market_part(
    rows: int, models: list[str], seeds: list[int], changes: dict[str, Any]
) -> dict[str, Any]:
    per_seed = []
    for seed in seeds:
        dataset, p_true = market_dataset(rows, seed)
        entry: dict[str, Any] = {"seed": seed, "oracle": oracle_metrics(dataset, p_true)}
        for name in models:
            entry[name] = scored(dataset, name, seed, changes)
            print(
                f"  market seed {seed} {name}: AUC {entry[name]['calibrated']['auc']:.4f} "
                f"(oracle {entry['oracle']['auc']:.4f})",
                flush=True,
            )
        per_seed.append(entry)
    means = {
        name: {
            metric: statistics.fmean(e[name]["calibrated"][metric] for e in per_seed)
            for metric in ("auc", "logloss")
        }
        for name in models
    }
    means["oracle"] = {
        m: statistics.fmean(e["oracle"][m] for e in per_seed) for m in ("auc", "logloss")
    }
    table_v = {
        f"{deepfm} vs {deep}": means[deepfm]["auc"] - means[deep]["auc"]
        for deepfm, deep in DEEP_PART.items()
        if deepfm in means and deep in means
    }
    return {"rows": rows, "runs": per_seed, "mean": means, "table_v_auc_gain": table_v}


def markdown(before: dict[str, Any], after: dict[str, Any]) -> str:
    """The before/after table (test means over the seeds) of two result files: DeepFM-D's
    ``after`` in each, and ``after``'s references."""
    lines = [
        "| sample (train/valid/test rows) | before AUC / Logloss | after AUC / Logloss "
        "| ΔAUC | ΔLogloss | epochs before → after | LR AUC / Logloss | FM AUC / Logloss |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pair(m: dict[str, Any], key: str) -> str:
        return f"{m[key]['auc']:.4f} / {m[key]['logloss']:.4f}" if key in m else "–"

    for name, sample in after.get("samples", {}).items():
        m, rows = sample["mean"], sample["rows"]
        old = before.get("samples", {}).get(name, {}).get("mean", {})
        if "after" not in old:
            continue
        lines.append(
            f"| {name} ({rows['train']}/{rows['valid']}/{rows['test']}) "
            f"| {pair(old, 'after')} | {pair(m, 'after')} "
            f"| {m['after']['auc'] - old['after']['auc']:+.4f} "
            f"| {m['after']['logloss'] - old['after']['logloss']:+.4f} "
            f"| {old['after']['epochs_run']:.1f} → {m['after']['epochs_run']:.1f} "
            f"| {pair(m, 'lr')} | {pair(m, 'fm')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--table", nargs=2, metavar=("OLD", "NEW"), help="print the before/after table"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--datasets", default=",".join(SAMPLES))
    parser.add_argument(
        "--references", default="lr,fm", help="models trained with the defaults beside DeepFM-D"
    )
    parser.add_argument("--market-rows", type=int, default=40_000)
    parser.add_argument("--market-models", default="deepfm,dnn")
    parser.add_argument("--out", default="benchmarks/results/accuracy_defaults.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a TrainConfig or ModelConfig field other than its default (a number)",
    )
    args = parser.parse_args()
    changes: dict[str, Any] = {}
    known = {f.name for f in (*fields(TrainConfig), *fields(ModelConfig))} - {"name"}
    for item in args.set:
        name, _, value = item.partition("=")
        try:
            changes[name] = float(value) if any(c in value for c in ".e") else int(value)
        except ValueError:
            parser.error(f"--set {item}: write NAME=NUMBER, e.g. id_prior=1000")
        if name not in known:
            parser.error(f"--set {item}: {name!r} is no TrainConfig or ModelConfig field")
    if args.table:
        print(markdown(*(json.loads(Path(p).read_text()) for p in args.table)))
        return
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [n for n in args.datasets.split(",") if n]
    started = time.time()
    result: dict[str, Any] = {
        "command": "python benchmarks/accuracy_defaults.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "table"),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_start": os.getloadavg(),
        "defaults": TrainConfig().to_dict(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(samples: dict[str, Any]) -> None:
        result["samples"] = samples
        result["load_average_end"] = os.getloadavg()
        result["wall_seconds"] = time.time() - started
        out.write_text(json.dumps(result, indent=1, default=float) + "\n")

    references = [r for r in args.references.split(",") if r]
    save(samples_part(names, seeds, references, save, changes))
    if args.market_rows > 0:
        market_models = [m for m in args.market_models.split(",") if m]
        result["market"] = market_part(args.market_rows, market_models, seeds, changes)
        print(json.dumps(result["market"]["mean"], indent=1), result["market"]["table_v_auc_gain"])
    save(result["samples"])
    print(f"wrote {out}")


if __name__ == "__main__":
    np.seterr(over="ignore")
    main()
