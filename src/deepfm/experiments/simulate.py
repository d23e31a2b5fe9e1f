"""``deepfm simulate``: top-L lists of LR and DeepFM-D in the simulated app market (Sec. IV-D3).

The paper's online simulation: t user types × n users each; a user of type i has a download
history of apps of type i's favourite categories; the candidates are all apps of the market. The
models are trained on the market's impression logs, each user's top-L list is built with each
model at one common request context (hour, weekday), and the lists are measured with
personalization@L, coverage@L and popularity@L (Eq. 14–18, :mod:`recsys_metrics`), as in
Fig. 16–18. Because the simulator knows every true click probability, each list's expected CTR
is reported too, beside the *oracle* lists (ranked by the true CTR): the best reachable.

The models: the paper's baseline is *"a well-engineered LR model"*, an LR with expert-chosen
pairwise crosses (Sec. II-B, Eq. 2). Here the expert knows the simulator: ``lr_crosses`` is LR
with the crosses of the market's planted order-2 effects (:data:`ENGINEERED_CROSSES`). Plain LR
(``lr``, no crosses) is kept as a second reference, and DeepFM-D (``deepfm``) is the model under
test.

``simulate.json`` holds ``{"lr_crosses": {"5": {metrics}, "10": ..., "20": ...}, "lr": ...,
"deepfm": ..., "oracle": ..., "setup": {config, the engineered LR's crosses, row counts, test
AUC/Logloss of each model}}``.

Scoring is batched: the raw records of a block of users × all apps are built at once, encoded
with the fitted feature map and scored in one forward pass per block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
from torch import nn

from deepfm.data.featuremap import FeatureMap
from deepfm.data.formats import table_chunk
from deepfm.data.pipeline import Dataset, build_dataset
from deepfm.data.splits import SplitSpec
from deepfm.data.synthetic import (
    APP_MARKET_SCHEMA,
    PLANTED_CROSSES,
    TYPE_CATEGORIES,
    AppMarket,
)
from deepfm.errors import ConfigError
from deepfm.experiments.recsys_metrics import coverage, personalization, popularity, top_l
from deepfm.models.registry import ModelConfig, parse_crosses
from deepfm.outputs import save_figure, write_json, write_text
from deepfm.train.metrics import auc_logloss
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import Batches, TrainConfig, predict_proba

#: the paper's well-engineered LR: LR with the crosses of the market's planted order-2 effects
#: (data/synthetic.py): app category × hour of day (food delivery at meal times, news in the
#: morning, games at night) and download history × app category (users click apps like the ones
#: they have). The order-3 gender × age × category effect has no pairwise trace to cross (its
#: pairwise marginals are built to cancel), and user × app (the low-rank term) is too sparse.
ENGINEERED_CROSSES = PLANTED_CROSSES
ENGINEERED_LR = "lr_crosses"
MODELS = (ENGINEERED_LR, "lr", "deepfm")
MODEL_LABELS = {
    ENGINEERED_LR: "LR + crosses",
    "lr": "LR",
    "deepfm": "DeepFM-D",
    "oracle": "oracle (true CTR)",
}
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class SimulationConfig:
    """The simulated population and the logs the models learn from.

    ``hour``/``weekday``: the context of every list request (15:00 on a Wednesday by default: no
    meal, morning or night effect, so the lists differ by user only).
    """

    n_types: int = len(TYPE_CATEGORIES)
    users_per_type: int = 100
    rows: int = 150_000
    list_sizes: tuple[int, ...] = (5, 10, 20)
    hour: int = 15
    weekday: int = 2
    seed: int = 0
    models: tuple[str, ...] = MODELS
    crosses: tuple[str, ...] = ENGINEERED_CROSSES

    def __post_init__(self) -> None:
        object.__setattr__(self, "list_sizes", tuple(int(s) for s in self.list_sizes))
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "crosses", parse_crosses(self.crosses))
        check_population(self.n_types, self.users_per_type)
        if not 1000 <= self.rows <= MOST_ROWS:
            raise ConfigError(
                f"the logs need at least 1000 rows (at most {MOST_ROWS:,}), got {self.rows:,}"
            )
        if not self.list_sizes or min(self.list_sizes) < 1:
            raise ConfigError(f"list sizes must be positive, got {self.list_sizes}")
        if not 0 <= self.hour < 24 or not 0 <= self.weekday < 7:
            raise ConfigError("the request context needs hour in 0..23 and weekday in 0..6")
        if not self.models:
            raise ConfigError("name at least one model to simulate")


def registry_name(key: str) -> str:
    """The registry model behind a result key: the engineered LR is ``lr`` with crosses."""
    return "lr" if key == ENGINEERED_LR else key


def online_model_config(key: str, model_config: ModelConfig, crosses: Sequence[str]) -> ModelConfig:
    """The config of result key ``key``: ``model_config`` (DeepFM-D's settings) under the key's
    registry name, with ``crosses`` for the engineered LR and none for any other model."""
    chosen = tuple(crosses) if key == ENGINEERED_LR else ()
    return model_config.replace(name=registry_name(key), crosses=chosen)


def baseline_note(crosses: Sequence[str]) -> str:
    """One line that says which LR is the paper's baseline and which crosses it has."""
    return (
        f"{MODEL_LABELS[ENGINEERED_LR]}: the paper's well-engineered LR baseline, with the crosses "
        f"{', '.join(crosses)} (the market's planted order-2 effects); "
        f"{MODEL_LABELS['lr']}: no crosses (second reference)."
    )


#: bounds that keep the simulator's up-front allocations (users x apps, logs) in memory
MOST_USERS_PER_TYPE, MOST_ROWS = 100_000, 100_000_000


def check_population(n_types: int, users_per_type: int) -> None:
    if not 1 <= n_types <= len(TYPE_CATEGORIES):
        raise ConfigError(f"the market has 1..{len(TYPE_CATEGORIES)} user types, got {n_types}")
    if not 2 <= users_per_type <= MOST_USERS_PER_TYPE:
        raise ConfigError(
            f"need at least 2 users per type (at most {MOST_USERS_PER_TYPE:,}), got "
            f"{users_per_type:,}"
        )


def simulation_market(n_types: int, users_per_type: int, seed: int) -> AppMarket:
    """The market with ``n_types`` × ``users_per_type`` users; user ``u`` has type ``u // n``."""
    check_population(n_types, users_per_type)
    return AppMarket(seed, user_types=np.repeat(np.arange(n_types), users_per_type))


def app_popularity(market: AppMarket) -> np.ndarray:
    """Each app's download percentile: the share of apps with at most its downloads, ``(0, 1]``.

    A percentile rather than the raw count, because the counts are heavy-tailed (Pareto): a
    list's mean count would be decided by whether it holds one of the few giants.
    """
    downloads = market.app_downloads
    return np.searchsorted(np.sort(downloads), downloads, side="right") / len(downloads)


def log_dataset(
    tables: Sequence[pa.Table], *, split: str, seed: int, base: FeatureMap | None = None
) -> Dataset:
    """Encode impression logs (raw tables, in order); the feature map is fitted on train rows
    (with ``base``: ``base`` grown with them, a warm start)."""
    chunks, start = [], 0
    for table in tables:
        chunks.append(table_chunk(table, "<app-market logs>", first_line=start + 1))
        start += table.num_rows
    return build_dataset(
        chunks,
        APP_MARKET_SCHEMA,
        split=SplitSpec.parse(split),
        valid_fraction=0.1,
        seed=seed,
        base=base,
    )


def pair_table(
    market: AppMarket, users: np.ndarray, hours: np.ndarray, weekdays: np.ndarray
) -> pa.Table:
    """Raw records of every (user, app) pair, users major: ``len(users) * n_apps`` rows."""
    apps = np.arange(market.n_apps)
    n = len(users)
    return market.table(
        np.repeat(users, market.n_apps),
        np.tile(apps, n),
        np.repeat(hours, market.n_apps),
        np.repeat(weekdays, market.n_apps),
    )


def score_matrix(
    model: nn.Module,
    feature_map: FeatureMap,
    market: AppMarket,
    users: np.ndarray,
    hours: np.ndarray,
    weekdays: np.ndarray,
    *,
    block_users: int = 1024,
) -> np.ndarray:
    """Predicted CTR of every app for each user at the user's context: ``[len(users), n_apps]``.

    ``hours``, ``weekdays``: ``[len(users)]``. One encode and one batched forward pass per block
    of ``block_users`` users.
    """
    users = np.asarray(users, dtype=np.int64)
    hours = np.broadcast_to(hours, users.shape)
    weekdays = np.broadcast_to(weekdays, users.shape)
    out = np.empty((len(users), market.n_apps))
    for start in range(0, len(users), block_users):
        part = slice(start, start + block_users)
        table = pair_table(market, users[part], hours[part], weekdays[part])
        encoded = feature_map.encode(table_chunk(table, "<candidates>"))
        out[part] = predict_proba(model, Batches(encoded)).reshape(-1, market.n_apps)
    return out


def true_ctr_matrix(
    market: AppMarket, users: np.ndarray, hours: np.ndarray, weekdays: np.ndarray
) -> np.ndarray:
    """True click probability of every app for each user at the user's context: ``[U, n_apps]``."""
    users = np.asarray(users, dtype=np.int64)[:, None]
    hours = np.broadcast_to(hours, users.shape[:1])[:, None]
    weekdays = np.broadcast_to(weekdays, users.shape[:1])[:, None]
    return market.click_probability(users, np.arange(market.n_apps)[None, :], hours, weekdays)


def list_metrics(
    lists: np.ndarray, groups: np.ndarray, item_popularity: np.ndarray, true_ctr: np.ndarray
) -> dict[str, float]:
    """The paper's three list metrics, and the lists' mean true CTR (``true_ctr``: ``[U, I]``)."""
    pers = personalization(lists, groups)
    pop_mean, pop_var = popularity(lists, item_popularity)
    return {
        "personalization": pers.overall,
        "personalization_within": pers.within,
        "personalization_across": pers.across,
        "coverage": coverage(lists, len(item_popularity)),
        "popularity_mean": pop_mean,
        "popularity_var": pop_var,
        "true_ctr": float(np.take_along_axis(true_ctr, lists, axis=1).mean()),
    }


#: The online experiments' models: the paper's DeepFM-D with a 200-200-200 deep part (its offline
#: benchmarks use 400-400-400). On the default simulation 200³ trains 2-3x faster on CPU and gave
#: test AUC 0.803 vs 0.808 and personalization@10 0.635 vs 0.646 (seed 0).
ONLINE_MODEL = ModelConfig(hidden=(200, 200, 200))


def default_train_config(
    seed: int, *, threads: int | None = 1, progress: bool = False, epochs: int = 10
) -> TrainConfig:
    """Modest training for the online experiments: up to ``epochs``, stop after 2 stale epochs.

    One thread by default: results depend on the thread count (summation order), and these small
    models run no slower on one thread than on two busy cores.
    """
    return TrainConfig(epochs=epochs, patience=2, seed=seed, threads=threads, progress=progress)


#: FTRL's α for the LR baselines of the online experiments, chosen on validation AUC of the
#: market's logs (seed 0, at most 10 epochs; 30k, 60k and 150k rows). The trainer's default,
#: 0.05, suits the many steps of Criteo-size data; on these logs it leaves LR + crosses far from
#: converged (150k rows: validation AUC 0.791 after 10 epochs, still rising after 40, test AUC
#: 0.785 against 0.802 at α = 0.5, which converges in 7-9 epochs). α = 0.5 gave the engineered
#: LR's best or near-best validation AUC at every size (within 0.0015 of α = 1.0), and plain LR
#: within 0.0015 of its own best (α = 0.2).
ONLINE_FTRL_ALPHA = 0.5


def default_train_configs(seed: int, **options: Any) -> dict[str, TrainConfig]:
    """The online experiments' training (``options``: those of :func:`default_train_config`):
    DeepFM-D with Adam at the trainer's default rate, both LRs with FTRL at
    :data:`ONLINE_FTRL_ALPHA`."""
    base = default_train_config(seed, **options)
    return {"lr": replace(base, lr=ONLINE_FTRL_ALPHA), "deepfm": base}


#: One training config for every model, or one per model name (e.g. FTRL and Adam need
#: different learning rates).
TrainConfigs = TrainConfig | Mapping[str, TrainConfig]


def config_for(configs: TrainConfigs, key: str) -> TrainConfig:
    """The training config of result key ``key``, or else of its registry model (the
    engineered LR trains as ``lr`` does unless given its own)."""
    if isinstance(configs, TrainConfig):
        return configs
    for name in (key, registry_name(key)):
        if name in configs:
            return configs[name]
    raise ConfigError(f"no training config for model {key!r} (have {sorted(configs)})")


@dataclass
class SimulationResult:
    """``lists[model][L]``: ``[U, L]`` app indices; ``metrics`` is what simulate.json holds."""

    metrics: dict[str, Any]
    lists: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)


def run_simulation(
    config: SimulationConfig | None = None,
    *,
    train_config: TrainConfigs | None = None,
    model_config: ModelConfig | None = None,
    log: Log = _quiet,
) -> SimulationResult:
    """Train every model on the market's logs and measure each model's top-L lists."""
    config = config or SimulationConfig()
    train_config = train_config or default_train_configs(config.seed)
    model_config = model_config or ONLINE_MODEL
    market = simulation_market(config.n_types, config.users_per_type, config.seed)
    if max(config.list_sizes) > market.n_apps:
        raise ConfigError(f"lists longer than the {market.n_apps} apps of the market")
    log(f"market: {market.n_users} users ({config.n_types} types), {market.n_apps} apps")
    tables = list(market.generate(config.rows, config.seed))
    dataset = log_dataset(tables, split="random:0.9", seed=config.seed)
    users = np.arange(market.n_users)
    groups = market.user_type
    pop = app_popularity(market)
    truth = true_ctr_matrix(market, users, config.hour, config.weekday)
    assert dataset.test is not None and dataset.test.labels is not None
    # the oracle's test metrics: the true CTR of the test rows (line numbers count from 1)
    test_p = np.concatenate([t.column("p_true").to_numpy() for t in tables])[dataset.test.lines - 1]
    metrics: dict[str, Any] = {}
    setup: dict[str, Any] = {
        "config": asdict(config),
        "baseline": {"model": ENGINEERED_LR, "crosses": list(config.crosses)},
        "rows": dataset.rows(),
        "test": {"oracle": auc_logloss(dataset.test.labels, test_p)},
    }
    result = SimulationResult(metrics)
    scores = {}
    for name in config.models:
        log(f"training {MODEL_LABELS.get(name, name)} on {len(dataset.train):,} logged rows")
        trained = fit_and_evaluate(
            dataset,
            online_model_config(name, model_config, config.crosses),
            config_for(train_config, name),
        )
        setup["test"][name] = trained.metrics["test"]
        scores[name] = score_matrix(
            trained.model, dataset.feature_map, market, users, config.hour, config.weekday
        )
    scores["oracle"] = truth
    for name, score in scores.items():
        result.lists[name] = {size: top_l(score, size) for size in config.list_sizes}
        metrics[name] = {
            str(size): list_metrics(lists, groups, pop, truth)
            for size, lists in result.lists[name].items()
        }
    metrics["setup"] = setup
    return result


# -- reporting ---------------------------------------------------------------------------------


def simulation_table(metrics: dict[str, Any]) -> str:
    """A Markdown table: one row per model and list size."""
    lines = [
        "| model | L | personalization@L (within / across) | coverage@L | popularity@L "
        "(mean ± sd) | true CTR of the lists |",
        "|---|---|---|---|---|---|",
    ]
    for name in _model_keys(metrics):
        for size, m in metrics[name].items():
            lines.append(
                f"| {MODEL_LABELS.get(name, name)} | {size} | {m['personalization']:.3f} "
                f"({m['personalization_within']:.3f} / {m['personalization_across']:.3f}) | "
                f"{m['coverage']:.3f} | {m['popularity_mean']:.3f} ± "
                f"{np.sqrt(m['popularity_var']):.3f} | {m['true_ctr']:.3f} |"
            )
    return "\n".join(lines)


def test_metrics_table(metrics: dict[str, Any]) -> str:
    """A Markdown table of each model's AUC/Logloss on the held-out logs, beside the oracle's."""
    lines = ["| model | test AUC | test Logloss |", "|---|---|---|"]
    for name, m in metrics["setup"]["test"].items():
        label = MODEL_LABELS.get(name, name)
        lines.append(f"| {label} | {m['auc']:.4f} | {m['logloss']:.4f} |")
    return "\n".join(lines)


def _model_keys(metrics: dict[str, Any]) -> list[str]:
    return [k for k in metrics if k != "setup"]


def grouped_bars(
    values: dict[str, Sequence[float]],
    groups: Sequence[str],
    path: str | Path,
    *,
    ylabel: str,
    title: str,
    errors: dict[str, Sequence[float]] | None = None,
) -> Path:
    """One bar per series (``values`` key) in each group (x position), value printed on top."""
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(len(values), 1)
    x = np.arange(len(groups))
    for i, (name, ys) in enumerate(values.items()):
        bars = ax.bar(
            x + (i - (len(values) - 1) / 2) * width,
            ys,
            width,
            yerr=None if errors is None else errors[name],
            capsize=3,
            label=name,
            color=None if name != MODEL_LABELS["oracle"] else "0.75",
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(x, groups)
    ax.set(ylabel=ylabel, title=title)
    top = max(max(ys) for ys in values.values())
    ax.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # headroom for the legend
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=len(values))
    save_figure(fig, path)
    return Path(path)


def plot_simulation(metrics: dict[str, Any], out: str | Path) -> list[Path]:
    """personalization.png, coverage.png, popularity.png (the paper's Fig. 16, 17, 18)."""
    out = Path(out)
    names = _model_keys(metrics)
    sizes = list(metrics[names[0]])
    labels = [f"L = {s}" for s in sizes]

    def series(key: str) -> dict[str, list[float]]:
        return {MODEL_LABELS.get(n, n): [metrics[n][s][key] for s in sizes] for n in names}

    sd = {
        MODEL_LABELS.get(n, n): [np.sqrt(metrics[n][s]["popularity_var"]) for s in sizes]
        for n in names
    }
    return [
        grouped_bars(
            series("personalization"),
            labels,
            out / "personalization.png",
            ylabel="personalization@L",
            title="Personalization of the top-L lists (higher: more personal)",
        ),
        grouped_bars(
            series("coverage"),
            labels,
            out / "coverage.png",
            ylabel="coverage@L",
            title="Share of the apps in some top-L list",
        ),
        grouped_bars(
            series("popularity_mean"),
            labels,
            out / "popularity.png",
            ylabel="popularity@L (download percentile)",
            title="Popularity of the listed apps (bars: ±1 sd across lists)",
            errors=sd,
        ),
    ]


def write_simulation(result: SimulationResult, out: str | Path) -> list[Path]:
    """simulate.json, simulate.md and the three bar charts under ``out``."""
    out = Path(out)
    write_json(out / "simulate.json", result.metrics)
    note = ""
    if ENGINEERED_LR in result.metrics:
        note = baseline_note(result.metrics["setup"]["baseline"]["crosses"]) + "\n\n"
    report = (
        "## Top-L lists\n\n"
        + note
        + simulation_table(result.metrics)
        + "\n\n## Click models on the held-out logs\n\n"
        + test_metrics_table(result.metrics)
        + "\n"
    )
    write_text(out / "simulate.md", report)
    return [out / "simulate.json", out / "simulate.md", *plot_simulation(result.metrics, out)]
