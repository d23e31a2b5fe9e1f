"""``deepfm abtest``: a simulated online A/B test of DeepFM-D against LR (Sec. IV-D1–D2, Fig. 15).

The paper compares DeepFM-D with *"a well-engineered LR model"*: LR with expert-chosen crosses
(Sec. II-B). The control arm here is that LR, with the crosses of the market's planted order-2
effects (``lr_crosses``, :data:`~deepfm.experiments.simulate.ENGINEERED_CROSSES`); plain LR
(``lr``, no crosses) is a second reference arm. The users of the simulated market are split into
the three arms (a third of every user type in each). The market grows during the week:
``new_apps`` apps and ``new_users`` users arrive on every day after the first
(:meth:`~deepfm.data.synthetic.AppMarket.add_arrivals`; new users are dealt into the arms like
the first ones). Before day 1 every model learns from logs of the market's existing exposure
policy on day 1's users and apps (apps shown at random, popular ones more often). Then, every
day:

1. each user visits with probability ``visit_rate`` at an hour drawn from the market's daily
   profile (the weekday is the day's); a visitor is shown the top-L list of the arm's model for
   that context among the apps launched so far (L impressions), and downloads each app with its
   *true* click probability;
2. per arm: CTR = downloads / impressions, CVR = downloads / users of the arm, the expected CTR
   (mean true click probability of the shown apps: the CTR without the noise of the download
   draws), the relative lift of DeepFM-D over each LR baseline (``treatment / control - 1``),
   the wall time of the arm's update, and how yesterday's launches fare (impressions, apps
   shown, downloads);
3. the day's impressions join the logs, with ``shelf_rows`` impressions of the store's own
   "new apps" shelf (the day's launches shown more, :meth:`AppMarket.generate_day`; in no arm),
   and the models are updated for the next day.

Updates (``update``): **warm** (the default, as in the paper's deployment): the feature map grows
with the day's logs (new apps and users get their own ids, old ids keep their rows) and every
model continues from yesterday's weights and optimiser state (FTRL's ``z``, ``n`` included) for
at most ``daily_epochs`` epochs over the day's logs only (:func:`~deepfm.train.run.
fit_and_evaluate` with a parent, as ``deepfm train --warm-start``). **retrain**: the feature map
and every model are fitted from scratch on all logs so far, every day. Deterministic by seed at a
fixed thread count (times aside).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyarrow as pa
from torch import nn

from deepfm.data.codecs import FIRST_VALUE
from deepfm.data.featuremap import FeatureMap
from deepfm.data.pipeline import Dataset
from deepfm.data.synthetic import AppMarket
from deepfm.errors import ConfigError
from deepfm.experiments.recsys_metrics import top_l
from deepfm.experiments.simulate import (
    ENGINEERED_CROSSES,
    ENGINEERED_LR,
    MODEL_LABELS,
    MOST_ROWS,
    ONLINE_MODEL,
    TrainConfigs,
    baseline_note,
    check_population,
    config_for,
    default_train_configs,
    log_dataset,
    online_model_config,
    score_matrix,
    simulation_market,
)
from deepfm.models.registry import ModelConfig, parse_crosses
from deepfm.outputs import save_figure, write_json, write_text
from deepfm.train.run import Parent, TrainedModel, fit_and_evaluate
from deepfm.train.trainer import TrainConfig

#: the paper's control (the well-engineered LR), plain LR as a second reference, the treatment
CONTROL, REFERENCE, TREATMENT = ENGINEERED_LR, "lr", "deepfm"
BASELINES = (CONTROL, REFERENCE)
ARMS = (*BASELINES, TREATMENT)
#: how the models are updated every day: warm starts on the day's logs, or refits on all logs
UPDATES = ("warm", "retrain")
#: the per-arm rates whose lift is reported
RATES = ("ctr", "cvr", "expected_ctr")
Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class ABTestConfig:
    """The population, the logs before day 1, the daily traffic and the retraining."""

    days: int = 7
    n_types: int = 6
    users_per_type: int = 100
    initial_rows: int = 60_000
    list_size: int = 10
    visit_rate: float = 0.8
    update: str = "warm"
    daily_epochs: int = 3
    new_apps: int = 10
    new_users: int = 30
    shelf_rows: int = 2000
    seed: int = 0
    crosses: tuple[str, ...] = ENGINEERED_CROSSES

    def __post_init__(self) -> None:
        object.__setattr__(self, "crosses", parse_crosses(self.crosses))
        check_population(self.n_types, self.users_per_type)
        if self.days < 1:
            raise ConfigError(f"the test lasts at least one day, got {self.days}")
        if not 1000 <= self.initial_rows <= MOST_ROWS:
            raise ConfigError(
                f"the logs before day 1 need >= 1000 rows (at most {MOST_ROWS:,}), got "
                f"{self.initial_rows:,}"
            )
        if self.days > 366:
            raise ConfigError(f"the test lasts at most a year (366 days), got {self.days:,}")
        if self.list_size < 1:
            raise ConfigError(f"the list size must be positive, got {self.list_size}")
        if not 0 < self.visit_rate <= 1:
            raise ConfigError(f"visit_rate must be in (0, 1], got {self.visit_rate}")
        if self.daily_epochs < 1:
            raise ConfigError(f"daily_epochs must be at least 1, got {self.daily_epochs}")
        if self.update not in UPDATES:
            raise ConfigError(f"update must be one of {', '.join(UPDATES)}, got {self.update!r}")
        if min(self.new_apps, self.new_users, self.shelf_rows) < 0:
            raise ConfigError("new_apps, new_users and shelf_rows cannot be negative")


def assign_arms(user_type: np.ndarray, seed: int, arms: int = len(ARMS)) -> np.ndarray:
    """The arm (``0 .. arms - 1``, the index into :data:`ARMS`) of every user: a seeded shuffle
    within each type, dealt in turn, so every arm holds an equal share of every type (±1)."""
    keys = np.random.default_rng([seed, 0xAB]).random(len(user_type))
    order = np.lexsort((keys, user_type))
    arm = np.empty(len(user_type), dtype=np.int64)
    arm[order] = np.arange(len(user_type)) % arms
    return arm


def daily_visits(
    market: AppMarket, day: int, visit_rate: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who visits on ``day`` (1-based), at which hour and weekday: three ``[visitors]`` arrays."""
    visitors = np.flatnonzero(rng.random(market.n_users) < visit_rate)
    # the same daily profile as the market's logged impressions (AppMarket.impressions)
    hour_profile = 1.0 + 0.6 * np.sin((np.arange(24) - 8) / 24 * 2 * np.pi)
    hours = rng.choice(24, len(visitors), p=hour_profile / hour_profile.sum())
    weekdays = np.full(len(visitors), (day - 1) % 7)
    return visitors, hours, weekdays


class Arm:
    """One model of the test and how it is updated each day."""

    def __init__(
        self,
        name: str,
        model_config: ModelConfig,
        train_config: TrainConfig,
        daily_epochs: int,
    ) -> None:
        self.name = name
        self.config = model_config
        self.full = train_config
        # a warm-started day: a few epochs, stop at the first epoch without a better AUC
        self.daily = replace(train_config, epochs=daily_epochs, patience=1)
        self.trained: TrainedModel | None = None
        self.feature_map: FeatureMap | None = None

    @property
    def model(self) -> nn.Module:
        assert self.trained is not None
        return self.trained.model

    def update(self, dataset: Dataset, warm: bool) -> tuple[dict[str, float], float]:
        """Fit on ``dataset``: continued from yesterday's model when ``warm`` (the dataset is
        the day's new logs on the grown map), else from scratch (all logs so far). Returns the
        validation AUC/Logloss and the wall seconds of the fit."""
        parent = None
        if warm and self.trained is not None:
            assert self.feature_map is not None
            state = self.trained.fit.optimizer_state or None
            parent = Parent(self.trained.model, self.config, self.feature_map, state)
        config = self.daily if parent is not None else self.full
        started = time.perf_counter()
        self.trained = fit_and_evaluate(dataset, self.config, config, parent=parent)
        self.feature_map = dataset.feature_map
        return self.trained.metrics.get("valid", {}), time.perf_counter() - started


def serve_day(
    arm: Arm,
    market: AppMarket,
    day: int,
    users: np.ndarray,
    hours: np.ndarray,
    weekdays: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> pa.Table:
    """Show each user the top-``size`` list of the apps that exist on ``day``; the impressions
    with drawn downloads (``label``)."""
    assert arm.feature_map is not None
    scores = score_matrix(arm.model, arm.feature_map, market, users, hours, weekdays)
    scores[:, market.app_day > day] = -np.inf  # apps not launched yet
    lists = top_l(scores, size)
    return market.table(
        np.repeat(users, size),
        lists.ravel(),
        np.repeat(hours, size),
        np.repeat(weekdays, size),
        rng,
    )


def run_abtest(
    config: ABTestConfig | None = None,
    *,
    train_config: TrainConfigs | None = None,
    model_config: ModelConfig | None = None,
    log: Log = _quiet,
) -> dict[str, Any]:
    """Run the test; returns what abtest.json holds (``days``, ``total``, ``setup``)."""
    config = config or ABTestConfig()
    train_config = train_config or default_train_configs(config.seed)
    model_config = model_config or ONLINE_MODEL
    market = simulation_market(config.n_types, config.users_per_type, config.seed)
    market.add_arrivals(config.days, config.new_apps, config.new_users, config.seed)
    if config.list_size > len(market.apps_on(1)):
        raise ConfigError(f"lists longer than the {len(market.apps_on(1))} apps of the market")
    # the first users and the newcomers are each dealt into the arms by type, in thirds
    first = int(np.sum(market.user_day == 1))
    arm_of = np.concatenate(
        [
            assign_arms(market.user_type[:first], config.seed),
            assign_arms(market.user_type[first:], config.seed + 1),
        ]
    )
    warm = config.update == "warm"
    arms = {
        name: Arm(
            name,
            online_model_config(name, model_config, config.crosses),
            config_for(train_config, name),
            config.daily_epochs,
        )
        for name in ARMS
    }
    logs = list(market.generate(config.initial_rows, config.seed, day=1))  # before day 1
    new_logs = logs
    feature_map: FeatureMap | None = None
    days: list[dict[str, Any]] = []
    seen_by = ", ".join(f"{np.sum(arm_of == i)} see {MODEL_LABELS[n]}" for i, n in enumerate(ARMS))
    log(f"A/B test: {market.n_users} users by day {config.days} ({seen_by}), {config.days} days")
    for day in range(1, config.days + 1):
        # the update: yesterday's logs grow the map and continue each model (warm), or every
        # model and the map are fitted again on all logs (retrain; and before day 1)
        started = time.perf_counter()
        dataset = log_dataset(
            new_logs if warm else logs, split="none", seed=config.seed + day, base=feature_map
        )
        data_seconds = time.perf_counter() - started
        updates = {name: arm.update(dataset, warm) for name, arm in arms.items()}
        if warm:
            feature_map = dataset.feature_map
        # the apps launched yesterday (day 1's apps are the market's first ones, not launches)
        launched = np.flatnonzero(market.app_day == day - 1) if day > 2 else np.zeros(0, int)
        rng = np.random.default_rng([config.seed, 0xDA7, day])
        users, hours, weekdays = daily_visits(market, day, config.visit_rate, rng)
        present = market.user_day[users] <= day
        users, hours, weekdays = users[present], hours[present], weekdays[present]
        record: dict[str, Any] = {
            "day": day,
            "log_rows": sum(t.num_rows for t in logs),
            "data_seconds": data_seconds,
            "new_apps": int(np.sum(market.app_day == day)) if day > 1 else 0,
            "new_users": int(np.sum(market.user_day == day)) if day > 1 else 0,
            "features": dataset.feature_map.num_features,
            "launched_yesterday_with_ids": _with_ids(dataset.feature_map, launched),
        }
        shown = []
        for index, (name, arm) in enumerate(arms.items()):
            mine = arm_of[users] == index
            table = serve_day(
                arm, market, day, users[mine], hours[mine], weekdays[mine], config.list_size, rng
            )
            downloads = float(np.sum(table.column("label").to_numpy()))
            expected = float(np.sum(table.column("p_true").to_numpy()))
            impressions = table.num_rows
            apps = np.asarray([int(a[1:]) for a in table.column("app_id").to_pylist()])
            labels = table.column("label").to_numpy()
            fresh = np.isin(apps, launched)
            arm_users = int(np.sum((arm_of == index) & (market.user_day <= day)))
            valid, seconds = updates[name]
            record[name] = {
                "ctr": downloads / impressions if impressions else float("nan"),
                "cvr": downloads / arm_users,
                "users": arm_users,
                "impressions": impressions,
                "downloads": int(downloads),
                "visitors": int(mine.sum()),
                "expected_ctr": expected / impressions if impressions else float("nan"),
                "expected_downloads": expected,
                "valid_auc": valid.get("auc", float("nan")),
                "update_seconds": seconds,
                "launched_yesterday_shown": int(fresh.sum()),
                "launched_yesterday_apps_shown": len(np.unique(apps[fresh])),
                "launched_yesterday_downloads": int(labels[fresh].sum()),
            }
            shown.append(table)
        record["lift"] = {base: lifts(record[base], record[TREATMENT]) for base in BASELINES}
        days.append(record)
        ctrs = ", ".join(f"{MODEL_LABELS[n]} {record[n]['ctr']:.4f}" for n in ARMS)
        gains = ", ".join(
            f"{100 * record['lift'][b]['ctr']:+.1f}% over {MODEL_LABELS[b]}" for b in BASELINES
        )
        spent = sum(record[n]["update_seconds"] for n in ARMS) + data_seconds
        log(f"day {day}/{config.days}: CTR {ctrs} (DeepFM-D {gains}); update {spent:.1f}s")
        # the store's "new apps" shelf: the day's launches shown beside the arms' lists, so
        # they are in the logs (and get ids) from tomorrow's update on; not counted in any arm
        shelf = (
            market.generate_day(day, config.shelf_rows, config.seed) if config.shelf_rows else None
        )
        new_logs = [*shown, *([shelf.drop_columns(["day"])] if shelf is not None else [])]
        logs = [*logs, *new_logs]
    return {
        "days": days,
        "total": _total(days),
        "setup": {
            "config": asdict(config),
            "baseline": {"model": CONTROL, "crosses": list(config.crosses)},
            "model": model_config.to_dict(),
            "train": {name: arm.full.to_dict() for name, arm in arms.items()},
            "users": {name: int(np.sum(arm_of == i)) for i, name in enumerate(ARMS)},
        },
    }


def _with_ids(feature_map: FeatureMap, apps: np.ndarray) -> int:
    """How many of ``apps`` have their own id (not OOV) in ``feature_map``."""
    if not len(apps):
        return 0
    codec = feature_map.field("app_id")
    ids, _ = codec.encode(pa.array([f"a{a}" for a in apps]))
    return int(np.count_nonzero(ids[:, 0] - codec.offset >= FIRST_VALUE))


def lifts(control: dict[str, float], treatment: dict[str, float]) -> dict[str, float]:
    """Relative improvement of the treatment over a control: ``t / c - 1`` for each rate of
    :data:`RATES` the two records hold (CTR, CVR, expected CTR)."""
    return {k: treatment[k] / control[k] - 1.0 for k in RATES if k in control and k in treatment}


def _total(days: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole test pooled: downloads / impressions, downloads per user per day, and the
    expected downloads / impressions."""
    out: dict[str, Any] = {}
    for name in ARMS:
        update = sum(d[name]["update_seconds"] for d in days[1:])  # day 1: the first training
        downloads = sum(d[name]["downloads"] for d in days)
        expected = sum(d[name]["expected_downloads"] for d in days)
        impressions = sum(d[name]["impressions"] for d in days)
        user_days = sum(d[name]["users"] for d in days)
        out[name] = {
            "ctr": downloads / impressions,
            "cvr": downloads / user_days,
            "expected_ctr": expected / impressions,
            "downloads": downloads,
            "impressions": impressions,
            "update_seconds": update,
        }
    out["lift"] = {base: lifts(out[base], out[TREATMENT]) for base in BASELINES}
    return out


# -- reporting ---------------------------------------------------------------------------------


def abtest_table(results: dict[str, Any], rate: str = "ctr") -> str:
    """A Markdown table of one rate (``ctr``, ``cvr`` or ``expected_ctr``): per day and in
    total, each arm's value and DeepFM-D's lift over each LR baseline."""
    digits = 3 if rate == "cvr" else 4
    header = ["day", *(f"{MODEL_LABELS[n]}" for n in ARMS)]
    header += [f"lift over {MODEL_LABELS[b]}" for b in BASELINES]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = [(str(d["day"]), d) for d in results["days"]] + [("all", results["total"])]
    for label, r in rows:
        cells = [label, *(f"{r[n][rate]:.{digits}f}" for n in ARMS)]
        cells += [f"{100 * r['lift'][b][rate]:+.1f}%" for b in BASELINES]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


RATE_TITLES = {
    "ctr": "CTR (downloads / impressions)",
    "cvr": "CVR (downloads / users of the arm)",
    "expected_ctr": "Expected CTR (mean true click probability of the shown apps)",
}


def updates_table(results: dict[str, Any]) -> str:
    """A Markdown table of the daily updates: the market's arrivals, each arm's update time
    (the day's update: before day 1, the first training) and how many impressions of the apps
    launched the day before each arm showed (their downloads in brackets)."""
    header = ["day", "new apps", "new users", "features", "yesterday's launches with ids"]
    header += [f"{MODEL_LABELS[n]} update s" for n in ARMS]
    header += [f"{MODEL_LABELS[n]} shows of yesterday's launches" for n in ARMS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for d in results["days"]:
        cells = [str(d["day"]), str(d["new_apps"]), str(d["new_users"]), f"{d['features']:,}"]
        cells.append(str(d["launched_yesterday_with_ids"]))
        cells += [f"{d[n]['update_seconds']:.1f}" for n in ARMS]
        cells += [
            f"{d[n]['launched_yesterday_shown']} ({d[n]['launched_yesterday_downloads']})"
            for n in ARMS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    total = results["total"]
    cells = ["days 2+", "", "", "", ""] + [f"{total[n]['update_seconds']:.1f}" for n in ARMS]
    lines.append("| " + " | ".join(cells + [""] * len(ARMS)) + " |")
    return "\n".join(lines)


def abtest_markdown(results: dict[str, Any]) -> str:
    """abtest.md: which LR is the baseline, one table per rate, then the daily updates."""
    parts = [baseline_note(results["setup"]["baseline"]["crosses"])]
    for rate, title in RATE_TITLES.items():
        parts += [f"## {title}", abtest_table(results, rate)]
    update = results["setup"]["config"]["update"]
    parts += [f"## Daily updates ({update})", updates_table(results)]
    return "\n\n".join(parts) + "\n"


def plot_abtest(results: dict[str, Any], path: str | Path) -> Path:
    """Like the paper's Fig. 15: daily CTR of each arm, and DeepFM-D's daily CTR and CVR lift
    over each LR baseline in %."""
    days = [d["day"] for d in results["days"]]
    x = np.arange(len(days))
    fig, (ax_ctr, ax_lift) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(ARMS)
    for i, name in enumerate(ARMS):
        ctr = [d[name]["ctr"] for d in results["days"]]
        ax_ctr.bar(x + (i - (len(ARMS) - 1) / 2) * width, ctr, width, label=MODEL_LABELS[name])
    ax_ctr.set_xticks(x, [f"day {d}" for d in days])
    ax_ctr.set(ylabel="CTR (downloads / impressions)", title="Daily CTR per arm")
    top = max(d[name]["ctr"] for d in results["days"] for name in ARMS)
    ax_ctr.set_ylim(0, 1.25 * top if top > 0 else 1.0)  # headroom for the legend
    ax_ctr.legend(loc="upper center", ncol=len(ARMS), fontsize=8)
    series = [(b, rate) for b in BASELINES for rate in ("ctr", "cvr")]
    width = 0.8 / len(series)
    lifts_seen = []
    for i, (base, rate) in enumerate(series):
        lift = [100 * d["lift"][base][rate] for d in results["days"]]
        lifts_seen += lift
        bars = ax_lift.bar(
            x + (i - (len(series) - 1) / 2) * width,
            lift,
            width,
            label=f"{rate.upper()} over {MODEL_LABELS[base]}",
            color=f"C{ARMS.index(base)}",  # the baseline arm's colour on the left
            hatch="//" if rate == "cvr" else None,
            edgecolor="white",
        )
        ax_lift.bar_label(bars, fmt="%.0f", fontsize=6, padding=2)
    ax_lift.axhline(0, color="black", linewidth=0.8)
    ax_lift.set_xticks(x, [f"day {d}" for d in days])
    ax_lift.set(ylabel="lift of DeepFM-D (%)", title="Relative improvement of DeepFM-D")
    ax_lift.set_ylim(min(0.0, 1.25 * min(lifts_seen)), max(1.0, 1.35 * max(lifts_seen)))
    ax_lift.legend(loc="upper center", ncol=2, fontsize=8)
    for ax in (ax_ctr, ax_lift):
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)
    return Path(path)


def write_abtest(results: dict[str, Any], out: str | Path) -> list[Path]:
    """abtest.json, abtest.md and abtest.png under ``out``."""
    out = Path(out)
    write_json(out / "abtest.json", results)
    write_text(out / "abtest.md", abtest_markdown(results))
    return [out / "abtest.json", out / "abtest.md", plot_abtest(results, out / "abtest.png")]
