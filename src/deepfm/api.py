"""The scikit-learn-style estimator: ``CTRClassifier(...).fit(X, y)``, ``predict_proba``, ``save``.

``X`` is a table in memory (a pandas or polars DataFrame, or an Arrow table), a prepared store
(``deepfm prepare``; a :class:`~deepfm.data.store.Store` or its path), or, to score, rows
already encoded with this estimator's feature map (:class:`~deepfm.data.encoded.EncodedArrays`,
e.g. ``store.split("test")``). A table's field kinds come from its column types: strings,
booleans and categories are categorical, numbers numeric (bucketised as in Criteo), lists
multi-valued; ``schema=`` overrides them (a :class:`~deepfm.data.schema.Schema`, a mapping of
column names to kinds or field settings, or a YAML schema file).

Everything below the estimator is the command line's: a table becomes one chunk of raw columns,
split and fitted by :func:`~deepfm.data.pipeline.build_dataset` (the field codecs, fitted on
the training rows only: the encoder of ``prepare``, the predictor and the server), trained by
:func:`~deepfm.train.run.fit_and_evaluate` (the one fit path of ``deepfm train`` and every
study), and saved as an ordinary bundle (``Predictor``, ``deepfm serve`` and ``export`` take
it). So ``fit`` on the rows of a file reaches the AUC of ``deepfm train`` on that file with the
same settings and seed.

Settings left ``None`` take the default of the config they belong to
(:class:`~deepfm.models.registry.ModelConfig`, :class:`~deepfm.train.trainer.TrainConfig`, the
preset): the estimator keeps no defaults of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from sklearn.base import BaseEstimator, ClassifierMixin

from deepfm.data.encoded import EncodedArrays
from deepfm.data.formats import table_chunk
from deepfm.data.pipeline import Dataset, build_dataset
from deepfm.data.schema import FieldSpec, Schema, load_schema
from deepfm.data.splits import SplitSpec
from deepfm.data.store import Store, is_store
from deepfm.errors import ConfigError, DataError
from deepfm.models.presets import Preset, load_preset
from deepfm.models.registry import ModelConfig
from deepfm.train.trainer import TrainConfig

#: the column the labels travel in through the shared data path (``FeatureMap.encode``)
LABEL = "label"
#: the data format a bundle of this estimator records: ``deepfm predict --data FILE.csv`` reads
#: CSV files with the same column names through the saved schema
BUNDLE_FORMAT = "csv"
#: estimator parameters that are ModelConfig fields (``model`` is ModelConfig.name)
MODEL_PARAMS = ("embed_dim", "hidden", "activation", "dropout", "l2", "crosses", "cross_buckets")
#: estimator parameters that are TrainConfig fields; the others are the command line's
#: (progress bars, checkpoints and resuming, torchrun's learning-rate scaling)
TRAIN_PARAMS = tuple(
    f.name
    for f in fields(TrainConfig)
    if f.name not in ("progress", "checkpoint_every", "checkpoint_dir", "resume", "lr_scaling")
)

Table = Any  # pandas.DataFrame | polars.DataFrame | pyarrow.Table: libraries imported lazily


class CTRClassifier(ClassifierMixin, BaseEstimator):
    """A click-through-rate classifier: any model of the registry (``deepfm models``), trained
    by the project's trainer. ``predict_proba(X)[:, 1]`` is the click probability.

    ``model``: registry name (``deepfm``, ``deepfm_ip``, ``lr``, ``fnn``, ...); ``preset``: the
    paper's Table III settings (``criteo-random``, ``criteo-sequential`` or a YAML file), below
    the settings given here. ``schema``: field kinds (see the module docs); ``min_count`` and
    ``hash_buckets``: as ``deepfm train``'s flags. Without ``eval_set``, ``valid_fraction`` of
    the training rows (seeded by ``seed``) are held out for early stopping, as ``deepfm train``
    does; ``valid_fraction=0`` trains on every row for ``epochs`` epochs. ``verbose`` shows the
    trainer's progress bars. Every other parameter is the ModelConfig or TrainConfig field of
    the same name (``dropout`` is the drop rate: the paper's keep probability is 1 - dropout).

    ``calibration``: ``beta`` (the default) fits the calibration of the logits on the
    validation rows, and ``model_`` and ``predict_proba`` apply it (as every scoring path of a
    bundle does); ``none``: the raw model. ``time_limit``: seconds of training at most.

    Fitted attributes: ``model_`` (the torch module, calibrated), ``feature_map_``,
    ``model_config_``, ``train_config_``, ``metrics_`` (validation AUC/Logloss, best epoch,
    history, timings, calibration), ``classes_`` (``[0, 1]``), ``feature_names_in_``.
    """

    def __init__(
        self,
        model: str = "deepfm",
        *,
        preset: str | None = None,
        schema: Schema | Mapping[str, Any] | str | Path | None = None,
        min_count: int | None = None,
        hash_buckets: int | None = None,
        valid_fraction: float = 0.1,
        verbose: bool = False,
        embed_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        activation: str | None = None,
        dropout: float | None = None,
        l2: float | None = None,
        crosses: Sequence[str] | str | None = None,
        cross_buckets: int | None = None,
        epochs: int | None = None,
        batch_size: int | None = None,
        lr: float | None = None,
        patience: int | None = None,
        monitor: str | None = None,
        calibration: str | None = None,
        lr_decay: float | None = None,
        decay_patience: int | None = None,
        seed: int | None = None,
        threads: int | None = None,
        eval_batch_size: int | None = None,
        ftrl_beta: float | None = None,
        ftrl_l1: float | None = None,
        ftrl_l2: float | None = None,
        id_prior: float | None = None,
        device: str | None = None,
        precision: str | None = None,
        compile: bool | None = None,
        embedding_updates: str | None = None,
        sync_loading: bool | None = None,
        time_limit: float | None = None,
    ) -> None:
        self.model = model
        self.preset = preset
        self.schema = schema
        self.min_count = min_count
        self.hash_buckets = hash_buckets
        self.valid_fraction = valid_fraction
        self.verbose = verbose
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.activation = activation
        self.dropout = dropout
        self.l2 = l2
        self.crosses = crosses
        self.cross_buckets = cross_buckets
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.patience = patience
        self.monitor = monitor
        self.calibration = calibration
        self.lr_decay = lr_decay
        self.decay_patience = decay_patience
        self.seed = seed
        self.threads = threads
        self.eval_batch_size = eval_batch_size
        self.ftrl_beta = ftrl_beta
        self.ftrl_l1 = ftrl_l1
        self.ftrl_l2 = ftrl_l2
        self.id_prior = id_prior
        self.device = device
        self.precision = precision
        self.compile = compile
        self.embedding_updates = embedding_updates
        self.sync_loading = sync_loading
        self.time_limit = time_limit

    # -- settings ------------------------------------------------------------------------------

    def model_config(self) -> ModelConfig:
        """ModelConfig defaults < ``preset`` < the settings given here."""
        preset = load_preset(self.preset) if self.preset else Preset("none")
        overrides = {name: getattr(self, name) for name in MODEL_PARAMS}
        if overrides["hidden"] is not None:
            overrides["hidden"] = tuple(overrides["hidden"])
        return preset.model_config(self.model, **overrides)

    def train_config(self) -> TrainConfig:
        """TrainConfig defaults < the settings given here."""
        given = {n: getattr(self, n) for n in TRAIN_PARAMS if getattr(self, n) is not None}
        return TrainConfig(**given, progress=bool(self.verbose))

    # -- fitting -------------------------------------------------------------------------------

    def fit(
        self,
        X: Table | Store | str | Path,
        y: Sequence[float] | np.ndarray | None = None,
        eval_set: Sequence[tuple[Table, Sequence[float] | np.ndarray]] | None = None,
    ) -> CTRClassifier:
        """Fit the feature map on the training rows, then train with early stopping on
        ``eval_set`` (its first ``(X, y)`` pair) or on ``valid_fraction`` of ``X``. With a
        store, ``y`` and ``eval_set`` are the store's (its train and valid splits)."""
        from deepfm.train.run import fit_and_evaluate

        model_config, train_config = self.model_config(), self.train_config()
        if _is_store(X):
            if y is not None or eval_set:
                raise ConfigError("a store holds its labels and validation rows: give X alone")
            dataset = _store_dataset(X)
            names = [f.name for f in dataset.feature_map.fields]
        else:
            table = to_arrow(X)
            names = table.column_names
            dataset = self._dataset(table, y, eval_set, train_config.seed)
        trained = fit_and_evaluate(dataset, model_config, train_config)
        self.model_ = trained.model
        self.feature_map_ = dataset.feature_map
        self.model_config_ = trained.config
        self.train_config_ = train_config
        self.metrics_ = trained.metrics
        self.classes_ = np.array([0, 1])
        self.feature_names_in_ = np.asarray(names, dtype=object)
        return self

    def _dataset(self, table: pa.Table, y, eval_set, seed: int) -> Dataset:
        schema = infer_schema(table, self.schema).with_options(self.min_count, self.hash_buckets)
        chunk = table_chunk(with_labels(table, schema, y))
        valid_fraction = 0.0 if eval_set else self.valid_fraction
        dataset = build_dataset(
            [chunk], schema, split=SplitSpec.parse("none"), valid_fraction=valid_fraction,
            seed=seed,
        )  # fmt: skip
        if eval_set:
            if len(eval_set) != 1:
                raise ConfigError("eval_set takes one (X, y) pair: early stopping watches one set")
            ((valid_x, valid_y),) = eval_set
            rows = with_labels(to_arrow(valid_x), schema, valid_y)
            dataset.valid = dataset.feature_map.encode(table_chunk(rows))
        return dataset

    # -- scoring -------------------------------------------------------------------------------

    def encode(self, X: Table | EncodedArrays) -> EncodedArrays:
        """Rows of ``X`` as feature ids (through the fitted codecs: unseen values → OOV)."""
        feature_map = self._fitted().feature_map_
        if isinstance(X, EncodedArrays):
            if X.ids.ndim != 2 or X.ids.shape[1] != feature_map.num_slots:
                raise DataError(
                    f"encoded rows have {X.ids.shape[1:]} slots, this model's feature map "
                    f"{feature_map.num_slots}: encode them with this estimator's feature map"
                )
            return X
        table = to_arrow(X)
        missing = [f.name for f in feature_map.fields if f.name not in table.column_names]
        if missing:
            raise DataError(f"X lacks the column(s) the model was fitted on: {', '.join(missing)}")
        return feature_map.encode(table_chunk(table.drop_columns(_label_column(table))))

    def predict_proba(self, X: Table | EncodedArrays) -> np.ndarray:
        """``[rows, 2]``: the probability of no click and of a click, rows in order."""
        from deepfm.train.trainer import predict_proba, torch_threads

        encoded = self.encode(X)
        config = self.train_config_
        with torch_threads(config.threads):
            click = predict_proba(self.model_, encoded, config.eval_batch_size)
        return np.column_stack([1.0 - click, click])

    def predict(self, X: Table | EncodedArrays) -> np.ndarray:
        """1 where the click probability is at least 0.5, else 0."""
        return (self.predict_proba(X)[:, 1] >= 0.5).astype(np.int64)

    # -- persistence ---------------------------------------------------------------------------

    def save(self, directory: str | Path, *, overwrite: bool = False) -> Path:
        """Write the fitted model as a bundle (see ``deepfm train``): ``Predictor.load``,
        ``deepfm serve``, ``deepfm export`` and ``CTRClassifier.load`` read it. ``directory``
        must be new or empty, or a bundle with ``overwrite`` (never anything else: README,
        "Safety")."""
        from deepfm.serve.bundle import save_bundle

        self._fitted()
        return save_bundle(
            directory,
            self.model_,
            self.model_config_,
            self.feature_map_,
            data_format=BUNDLE_FORMAT,
            metrics=self.metrics_,
            train_config=self.train_config_.to_dict(),
            overwrite=overwrite,
        )

    @classmethod
    def load(cls, directory: str | Path) -> CTRClassifier:
        """A fitted estimator from a bundle (any bundle: one of ``deepfm train`` too), with the
        model and training settings it was trained with."""
        from deepfm.serve.bundle import load_bundle

        bundle = load_bundle(directory)
        config = bundle.config
        train = {k: v for k, v in bundle.train_config.items() if k in TRAIN_PARAMS}
        model_settings = {name: getattr(config, name) for name in MODEL_PARAMS}
        estimator = cls(config.name, **model_settings, **train)
        estimator.model_ = bundle.model
        estimator.feature_map_ = bundle.feature_map
        estimator.model_config_ = config
        estimator.train_config_ = estimator.train_config()
        estimator.metrics_ = bundle.metrics
        estimator.classes_ = np.array([0, 1])
        names = [f.name for f in bundle.feature_map.fields]
        estimator.feature_names_in_ = np.asarray(names, dtype=object)
        return estimator

    def _fitted(self) -> CTRClassifier:
        if not hasattr(self, "model_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this CTRClassifier is not fitted yet: call fit(X, y) first")
        return self


# -- tables and schemas ------------------------------------------------------------------------


def to_arrow(X: Table) -> pa.Table:
    """An Arrow table of a pandas or polars DataFrame (or an Arrow table as it is)."""
    if isinstance(X, pa.Table):
        return X
    if isinstance(X, pa.RecordBatch):
        return pa.Table.from_batches([X])
    module = type(X).__module__.split(".")[0]
    if module == "pandas":
        try:
            return pa.Table.from_pandas(X, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise DataError(f"a column of the DataFrame has mixed types: {exc}") from None
    if module == "polars":
        return X.to_arrow()
    raise ConfigError(
        f"X must be a pandas or polars DataFrame, an Arrow table or a prepared store, not "
        f"{type(X).__name__} (field names and kinds come from the columns)"
    )


def kind_of(column_type: pa.DataType) -> str | None:
    """The field kind a column type stands for: strings, booleans and categories are
    categorical, numbers numeric, lists multi-valued; None for other types (dates, structs)."""
    if pa.types.is_dictionary(column_type):
        return "categorical"
    if pa.types.is_list(column_type) or pa.types.is_large_list(column_type):
        return "multi"
    if pa.types.is_integer(column_type) or pa.types.is_floating(column_type):
        return "numeric"
    text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
    if text or pa.types.is_boolean(column_type):
        return "categorical"
    return None


def infer_schema(
    table: pa.Table, schema: Schema | Mapping[str, Any] | str | Path | None = None
) -> Schema:
    """The fields of ``table``: a full ``Schema`` (or YAML schema file) as given; otherwise one
    field per column, its kind from the column type, with ``schema``'s entries (a kind, or
    FieldSpec settings) replacing the inferred ones."""
    if isinstance(schema, str | Path):
        schema = load_schema(schema)
    if isinstance(schema, Schema):
        missing = [name for name in schema.names if name not in table.column_names]
        if missing:
            raise DataError(f"X lacks the schema's column(s): {', '.join(missing)}")
        return Schema(schema.fields, label=LABEL, min_count=schema.min_count,
                      hash_buckets=schema.hash_buckets)  # fmt: skip
    overrides = dict(schema or {})
    unknown = sorted(set(overrides) - set(table.column_names))
    if unknown:
        raise ConfigError(f"schema names columns X does not have: {', '.join(unknown)}")
    specs = []
    for name in table.column_names:
        given = overrides.get(name)
        if isinstance(given, FieldSpec):
            specs.append(given)
            continue
        settings = {"kind": given} if isinstance(given, str) else dict(given or {})
        if "kind" not in settings:
            kind = kind_of(table.schema.field(name).type)
            if kind is None:
                raise ConfigError(
                    f"column {name!r} has type {table.schema.field(name).type}: give its kind "
                    "with schema={name: 'categorical' | 'numeric' | 'multi' | 'hashed'}"
                )
            settings["kind"] = kind
        try:
            specs.append(FieldSpec(name, **settings))
        except TypeError as exc:
            raise ConfigError(f"schema[{name!r}]: {exc}") from None
    return Schema(tuple(specs), label=LABEL)


def _label_column(table: pa.Table) -> list[str]:
    return [LABEL] if LABEL in table.column_names else []


def with_labels(table: pa.Table, schema: Schema, y) -> pa.Table:
    """The schema's columns of ``table`` and the labels ``y`` (0/1) as the label column."""
    if LABEL in schema.names:
        raise ConfigError(
            f"a feature column is named {LABEL!r}, the name labels travel under: rename it"
        )
    if y is None:
        raise ConfigError("fit needs the labels y (0/1, one per row of X)")
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    if len(labels) != table.num_rows:
        raise DataError(f"X has {table.num_rows} rows but y has {len(labels)} labels")
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"y[{first}] is {float(labels[first])}: labels are 0 (no click) or 1 (click)"
        )
    columns = {name: table.column(name) for name in schema.names}
    return pa.table({**columns, LABEL: pa.array(labels.astype(np.float32))})


def _is_store(X: Any) -> bool:
    return isinstance(X, Store) or (isinstance(X, str | Path) and is_store(X))


def _store_dataset(X: Store | str | Path) -> Dataset:
    store = X if isinstance(X, Store) else Store.open(X)
    if not store.labeled:
        raise ConfigError(f"store {store.path} has no labels: fitting needs labeled rows")
    return store.dataset()


__all__ = ["CTRClassifier", "infer_schema", "to_arrow"]
