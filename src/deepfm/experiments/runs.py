"""What every study shares: study configs, reproducible run ids, cached runs, tables and plots.

* **Study config** (``--config FILE``): a preset (``defaults`` and per-model ``models`` settings,
  the paper's keep probability as ``keep_prob``) plus a ``train`` section of
  :class:`~deepfm.train.trainer.TrainConfig` fields. Settings are layered: model/trainer
  defaults < ``--preset`` < ``--config`` < flags given on the command line.
* **Run ids**: a run is the pair (model config, train config) on one store, plus the study's own
  ``extra`` (a repeat number, a number of workers). Its id is a digest of all of it; the result is
  cached as ``OUT/runs/<id>.json`` as soon as it finishes, so a study started again after an
  interruption reuses every finished run, and studies writing to one ``OUT`` share runs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from deepfm import outputs
from deepfm.common import read_yaml
from deepfm.data.pipeline import Dataset
from deepfm.data.store import Store
from deepfm.errors import ConfigError
from deepfm.models.presets import Preset, load_preset, parse_preset
from deepfm.models.registry import ModelConfig, get_entry, model_names
from deepfm.outputs import to_json, write_text
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

#: torch CPU threads of a study's runs unless configured: results depend on the thread count
STUDY_THREADS = 1
#: TrainConfig fields a study config may set (seeds and the per-invocation settings, progress
#: and checkpoints, belong to the study)
TRAIN_KEYS = tuple(
    f.name for f in fields(TrainConfig) if f.name not in ("seed", *TrainConfig.per_invocation())
)


# -- study configs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyConfig:
    """Model settings (a :class:`Preset`) and trainer settings (TrainConfig fields)."""

    preset: Preset = field(default_factory=lambda: Preset("none"))
    train: dict[str, Any] = field(default_factory=dict)

    def model_config(self, name: str, **overrides: Any) -> ModelConfig:
        """``name``'s config; ``overrides`` that are not None win."""
        return self.preset.model_config(name, **overrides)

    def train_config(self, seed: int, **overrides: Any) -> TrainConfig:
        """Trainer defaults < this config's ``train`` < ``overrides`` that are not None; the
        trainer's own progress bars are off (a study shows one bar over its runs)."""
        settings: dict[str, Any] = {"threads": STUDY_THREADS, **self.train}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return TrainConfig(**settings, seed=seed, progress=False)


def merge_presets(base: Preset, top: Preset) -> Preset:
    """``top``'s settings over ``base``'s, model by model."""
    models = {n: dict(s) for n, s in base.models.items()}
    for name, settings in top.models.items():
        models[name] = {**models.get(name, {}), **settings}
    return Preset(
        name=f"{base.name}+{top.name}" if base.name != "none" else top.name,
        status="assumed" if base.assumed or top.assumed else "paper",
        description="; ".join(d for d in (base.description, top.description) if d),
        defaults={**base.defaults, **top.defaults},
        models=models,
    )


def parse_study_config(data: Any, source: str) -> StudyConfig:
    """Validate a study config's YAML content (``source`` names it in errors)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a study config is a mapping with preset keys and 'train'")
    data = dict(data)
    train = data.pop("train", None) or {}
    if not isinstance(train, dict):
        raise ConfigError(f"{source}: 'train' maps TrainConfig settings to values")
    unknown = sorted(set(train) - set(TRAIN_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: unknown train settings {unknown}; known: {', '.join(TRAIN_KEYS)} "
            "(seeds are given by --seed/--seeds)"
        )
    try:
        TrainConfig(**train)  # validates every value
    except TypeError as exc:
        raise ConfigError(f"{source}: train: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: train: {exc}") from None
    data.setdefault("name", Path(source).stem)
    return StudyConfig(parse_preset(data, source), dict(train))


def load_study_config(path: str | Path) -> StudyConfig:
    return parse_study_config(read_yaml(path, "the config file"), str(path))


def study_config(preset: str | None = None, config: str | None = None) -> StudyConfig:
    """``--preset`` (a shipped name or a file), then ``--config`` over it."""
    base = load_preset(preset) if preset else Preset("none")
    if not config:
        return StudyConfig(base)
    loaded = load_study_config(config)
    return StudyConfig(merge_presets(base, loaded.preset), loaded.train)


def parse_models(text: str | None, default: Sequence[str] | None = None) -> list[str]:
    """``a,b,c`` → registry names (validated, order kept, duplicates dropped)."""
    if text is None:
        return list(default if default is not None else model_names())
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise ConfigError("--models: give at least one model name, e.g. lr,fm,deepfm")
    for name in names:
        get_entry(name)  # a ConfigError naming the known models
    return names


# -- stores --------------------------------------------------------------------------------------


@dataclass
class StudyData:
    """A store opened for a study: its splits and a fingerprint of its manifest."""

    path: Path
    dataset: Dataset
    fingerprint: str

    @property
    def test(self):
        assert self.dataset.test is not None
        return self.dataset.test


def open_study_store(path: str | Path, *, need_test: bool = True) -> StudyData:
    """Open ``path``; studies report test metrics, so the store needs a test split."""
    store = Store.open(path)
    if not store.labeled:
        raise ConfigError(f"store {path} has no labels: studies need labeled rows")
    if store.rows("train") == 0:
        raise ConfigError(f"store {path} has no training rows")
    if need_test and store.rows("test") == 0:
        raise ConfigError(
            f"store {path} has no test split: prepare it with --split random:0.9 or sequential:6/7"
        )
    return StudyData(Path(path), store.dataset(), store_fingerprint(store.manifest))


def store_fingerprint(manifest: dict[str, Any]) -> str:
    """A digest of what a store holds: its sources (sha256), format, split, row counts and
    feature map. Another store, or the same data prepared differently, gives other run ids;
    preparing the same data again the same way (prepare is deterministic) gives the same."""
    keys = ("data_format", "split", "rows", "num_features", "feature_map")
    identity = {k: manifest.get(k) for k in keys}
    identity["sources"] = [s.get("sha256") for s in manifest.get("sources", [])]
    return hashlib.sha256(canonical(identity).encode()).hexdigest()[:16]


def prepare_market_store(
    out: str | Path,
    rows: int,
    *,
    seed: int = 0,
    split: str = "random:0.9",
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """A store of ``rows`` impressions of the simulated app market (the demo's data), written
    through the same CSV → ``prepare`` path as a user's own data."""
    import tempfile

    from deepfm.data.formats import get_format
    from deepfm.data.prepare import prepare_store
    from deepfm.data.splits import SplitSpec
    from deepfm.data.synthetic import APP_MARKET_SCHEMA
    from deepfm.data.synthetic import write_csv as write_market_csv
    from deepfm.outputs import STORE, claim_directory

    spec = SplitSpec.parse(split)
    claim_directory(out, STORE, overwrite=overwrite)  # before generating anything
    with tempfile.TemporaryDirectory(prefix="deepfm-market-") as tmp:
        csv_path = write_market_csv(Path(tmp) / "app_market.csv", rows, seed=seed)
        prepare_store(
            get_format("csv", APP_MARKET_SCHEMA),
            [csv_path],
            out,
            split=spec,
            valid_fraction=0.1,
            seed=seed,
            overwrite=overwrite,
            progress=(lambda text: print(text, flush=True)) if progress else None,
        )
    return Path(out)


# -- runs and their cache ------------------------------------------------------------------------


def canonical(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study: what is trained, how, on which store, and why."""

    kind: str
    store: str
    model: ModelConfig
    train: TrainConfig
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        train = {
            k: v for k, v in self.train.to_dict().items() if k not in TrainConfig.per_invocation()
        }
        return {
            "kind": self.kind,
            "store": self.store,
            "model": self.model.to_dict(),
            "train": train,
            "extra": self.extra,
        }

    @property
    def run_id(self) -> str:
        """``<kind>-<model>-s<seed>-<digest>``: readable, and different for any change."""
        digest = hashlib.sha256(canonical(self.to_dict()).encode()).hexdigest()[:12]
        return f"{self.kind}-{self.model.name}-s{self.train.seed}-{digest}"


def write_json(path: str | Path, data: Any) -> Path:
    """Strict JSON, written through a temporary file (a killed study leaves no half file).
    Missing numbers are null without a warning: the tables show them as "–" (a single seed has
    no standard deviation; an undefined AUC was warned about when it was computed)."""
    return outputs.write_json(path, data, indent=1, warn=False)


class RunCache:
    """Finished runs as ``DIR/<run id>.json`` (spec and result)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    def path(self, spec: RunSpec) -> Path:
        return self.directory / f"{spec.run_id}.json"

    def get(self, spec: RunSpec) -> dict[str, Any] | None:
        path = self.path(spec)
        if not path.is_file():
            return None
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None  # damaged: run again
        return saved.get("result") if saved.get("spec") == to_json(spec.to_dict()) else None

    def put(self, spec: RunSpec, result: dict[str, Any]) -> None:
        write_json(
            self.path(spec), {"run_id": spec.run_id, "spec": spec.to_dict(), "result": result}
        )


def fit_run(
    dataset: Dataset,
    model_config: ModelConfig,
    train_config: TrainConfig,
    *,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """A study's run: the metrics of :func:`~deepfm.train.run.fit_and_evaluate` (``valid``
    and ``test`` AUC/Logloss with the weights of the best epoch, epochs, time, history)."""
    return fit_and_evaluate(dataset, model_config, train_config, on_epoch=on_epoch).metrics


Runner = Callable[[RunSpec], dict[str, Any]]


def run_all(
    specs: Sequence[RunSpec],
    runner: Runner,
    cache: RunCache,
    *,
    desc: str,
    progress: bool = True,
    on_result: Callable[[RunSpec, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every spec's result, from the cache or by ``runner`` (cached as soon as it finishes)."""
    from tqdm.auto import tqdm

    results = []
    cached = sum(cache.get(s) is not None for s in specs)
    with tqdm(total=len(specs), desc=desc, unit="run", disable=not progress) as bar:
        if cached:
            bar.write(
                f"{desc}: reusing {cached} finished run(s) of {len(specs)} from {cache.directory}"
            )
        for spec in specs:
            result = cache.get(spec)
            if result is None:
                bar.set_postfix_str(f"{spec.model.name} seed {spec.train.seed}")
                result = runner(spec)
                cache.put(spec, result)
            results.append(result)
            if on_result is not None:
                on_result(spec, result)
            bar.update()
    return results


def run_specs(
    data: StudyData, specs: Sequence[RunSpec], out: str | Path, *, desc: str, progress: bool
) -> dict[str, list[dict[str, Any]]]:
    """Train every spec on the study's store through the one fit path (:func:`fit_run`;
    finished runs cached in ``out/runs``); the results grouped by model, in spec order."""
    results = run_all(
        specs,
        lambda spec: fit_run(data.dataset, spec.model, spec.train),
        RunCache(Path(out) / "runs"),
        desc=desc,
        progress=progress,
    )
    per_model: dict[str, list[dict[str, Any]]] = {}
    for spec, result in zip(specs, results, strict=True):
        per_model.setdefault(spec.model.name, []).append(result)
    return per_model


# -- tables --------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 4) -> str:
    """A number for a table; missing values (None, NaN) as an en dash."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else v for v in to_json(list(row))])
    return write_text(path, buffer.getvalue())


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    import numpy as np

    array = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if len(array) == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if len(array) > 1 else math.nan
    return float(array.mean()), std
