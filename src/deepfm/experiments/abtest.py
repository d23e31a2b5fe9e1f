"""``deepfm abtest``: a simulated online A/B test of DeepFM-D against LR (Sec. IV-D1–D2, Fig. 15).

The paper compares DeepFM-D with *"a well-engineered LR model"*: LR with expert-chosen crosses
(Sec. II-B). The control arm here is that LR, with the crosses of the market's planted order-2
effects (``lr_crosses``, :data:`~deepfm.experiments.simulate.ENGINEERED_CROSSES`); plain LR
(``lr``, no crosses) is a second reference arm. The users of the simulated market are split into
the three arms (a third of every user type in each). Before day 1 every model learns from logs of
the market's existing exposure policy (apps shown at random, popular ones more often). Then,
every day:

1. each user visits with probability ``visit_rate`` at an hour drawn from the market's daily
   profile (the weekday is the day's); a visitor is shown the top-L list of the arm's model for
   that context (L impressions), and downloads each app with its *true* click probability;
2. per arm: CTR = downloads / impressions, CVR = downloads / users of the arm, the expected CTR
   (mean true click probability of the shown apps: the CTR without the noise of the download
   draws), and the relative lift of DeepFM-D over each LR baseline (``treatment / control - 1``);
3. the day's impressions join the logs, and every model retrains on all logs so far.

Retraining: the feature map is fitted once, on the logs before day 1 (the market is closed: every
user and app is already in them, and a value never seen would map to OOV). DeepFM-D continues from
yesterday's weights (``warm_start``, a few epochs over all logs); the LRs are refitted from zero
every day, because FTRL's per-coordinate state is part of the model and the trainer starts a fresh
optimiser. With ``warm_start=False`` every model is refitted from zero (slower). Deterministic by
seed at a fixed thread count.
"""

from __future__ import annotations

import json
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

from deepfm.data.encoded import EncodedArrays
from deepfm.data.featuremap import FeatureMap
from deepfm.data.formats import table_chunk
from deepfm.data.pipeline import Dataset
from deepfm.data.splits import TRAIN, VALID, SplitSpec, assign
from deepfm.data.synthetic import AppMarket
from deepfm.errors import ConfigError
from deepfm.experiments.recsys_metrics import top_l
from deepfm.experiments.simulate import (
    ENGINEERED_CROSSES,
    ENGINEERED_LR,
    MODEL_LABELS,
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
from deepfm.models.registry import ModelConfig, get_entry, parse_crosses
from deepfm.train.run import fit_and_evaluate
from deepfm.train.trainer import TrainConfig

#: the paper's control (the well-engineered LR), plain LR as a second reference, the treatment
CONTROL, REFERENCE, TREATMENT = ENGINEERED_LR, "lr", "deepfm"
BASELINES = (CONTROL, REFERENCE)
ARMS = (*BASELINES, TREATMENT)
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
    warm_start: bool = True
    daily_epochs: int = 3
    seed: int = 0
    crosses: tuple[str, ...] = ENGINEERED_CROSSES

    def __post_init__(self) -> None:
        object.__setattr__(self, "crosses", parse_crosses(self.crosses))
        check_population(self.n_types, self.users_per_type)
        if self.days < 1:
            raise ConfigError(f"the test lasts at least one day, got {self.days}")
        if self.initial_rows < 1000:
            raise ConfigError(f"the logs before day 1 need >= 1000 rows, got {self.initial_rows}")
        if self.list_size < 1:
            raise ConfigError(f"the list size must be positive, got {self.list_size}")
        if not 0 < self.visit_rate <= 1:
            raise ConfigError(f"visit_rate must be in (0, 1], got {self.visit_rate}")
        if self.daily_epochs < 1:
            raise ConfigError(f"daily_epochs must be at least 1, got {self.daily_epochs}")


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


def serve_lists(
    model: nn.Module,
    feature_map: FeatureMap,
    market: AppMarket,
    users: np.ndarray,
    hours: np.ndarray,
    weekdays: np.ndarray,
    size: int,
    rng: np.random.Generator,
) -> pa.Table:
    """Show each user their top-``size`` list; the impressions with drawn downloads (``label``)."""
    lists = top_l(score_matrix(model, feature_map, market, users, hours, weekdays), size)
    return market.table(
        np.repeat(users, size),
        lists.ravel(),
        np.repeat(hours, size),
        np.repeat(weekdays, size),
        rng,
    )


def split_logs(logs: EncodedArrays, seed: int) -> tuple[EncodedArrays, EncodedArrays]:
    """A seeded 10% of the logged rows for early stopping, the rest for training."""
    codes = assign(SplitSpec.parse("none"), np.arange(len(logs)), valid_fraction=0.1, seed=seed)
    return logs.take(codes == TRAIN), logs.take(codes == VALID)


class Arm:
    """One model of the test: its weights persist across days when warm-started."""

    def __init__(
        self,
        name: str,
        feature_map: FeatureMap,
        model_config: ModelConfig,
        train_config: TrainConfig,
        daily_epochs: int,
    ) -> None:
        self.name = name
        self.entry = get_entry(model_config.name)
        self.feature_map = feature_map
        self.config = model_config
        self.full = train_config
        # a warm-started day: a few epochs, stop at the first epoch without a better AUC
        self.daily = replace(train_config, epochs=daily_epochs, patience=1)
        self.model: nn.Module | None = None

    def retrain(
        self, train: EncodedArrays, valid: EncodedArrays, warm_start: bool
    ) -> dict[str, float]:
        """Fit on all logs so far; returns the best validation AUC/Logloss."""
        # FTRL keeps its model in its optimiser state, which a fresh trainer does not carry over
        warm = warm_start and self.model is not None and self.entry.optimizer != "ftrl"
        logs = Dataset(self.feature_map, train, valid, None)
        config = self.daily if warm else self.full
        trained = fit_and_evaluate(logs, self.config, config, model=self.model if warm else None)
        self.model = trained.model
        return trained.metrics.get("valid", {})


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
    if config.list_size > market.n_apps:
        raise ConfigError(f"lists longer than the {market.n_apps} apps of the market")
    arm_of = assign_arms(market.user_type, config.seed)
    initial = log_dataset(
        list(market.generate(config.initial_rows, config.seed)), split="none", seed=config.seed
    )
    feature_map = initial.feature_map
    logs = EncodedArrays.concat(
        [initial.train, initial.valid], feature_map.num_slots, feature_map.needs_values
    )
    arms = {
        name: Arm(
            name,
            feature_map,
            online_model_config(name, model_config, config.crosses),
            config_for(train_config, name),
            config.daily_epochs,
        )
        for name in ARMS
    }
    days: list[dict[str, Any]] = []
    seen_by = ", ".join(f"{np.sum(arm_of == i)} see {MODEL_LABELS[n]}" for i, n in enumerate(ARMS))
    log(f"A/B test: {market.n_users} users ({seen_by}), {config.days} days")
    for day in range(1, config.days + 1):
        train, valid = split_logs(logs, config.seed + day)
        valid_metrics = {}
        for name, arm in arms.items():
            valid_metrics[name] = arm.retrain(train, valid, config.warm_start)
        rng = np.random.default_rng([config.seed, 0xDA7, day])
        users, hours, weekdays = daily_visits(market, day, config.visit_rate, rng)
        record: dict[str, Any] = {"day": day, "log_rows": len(logs)}
        shown = []
        for index, (name, arm) in enumerate(arms.items()):
            mine = arm_of[users] == index
            assert arm.model is not None
            table = serve_lists(
                arm.model,
                feature_map,
                market,
                users[mine],
                hours[mine],
                weekdays[mine],
                config.list_size,
                rng,
            )
            downloads = float(np.sum(table.column("label").to_numpy()))
            expected = float(np.sum(table.column("p_true").to_numpy()))
            impressions = table.num_rows
            record[name] = {
                "ctr": downloads / impressions if impressions else float("nan"),
                "cvr": downloads / int(np.sum(arm_of == index)),
                "users": int(np.sum(arm_of == index)),
                "impressions": impressions,
                "downloads": int(downloads),
                "visitors": int(mine.sum()),
                "expected_ctr": expected / impressions if impressions else float("nan"),
                "expected_downloads": expected,
                "valid_auc": valid_metrics[name].get("auc", float("nan")),
            }
            shown.append(table)
        record["lift"] = {base: lifts(record[base], record[TREATMENT]) for base in BASELINES}
        days.append(record)
        ctrs = ", ".join(f"{MODEL_LABELS[n]} {record[n]['ctr']:.4f}" for n in ARMS)
        gains = ", ".join(
            f"{100 * record['lift'][b]['ctr']:+.1f}% over {MODEL_LABELS[b]}" for b in BASELINES
        )
        log(f"day {day}/{config.days}: CTR {ctrs} (DeepFM-D {gains})")
        new = [feature_map.encode(table_chunk(t, f"<day {day}>")) for t in shown]
        logs = EncodedArrays.concat([logs, *new], feature_map.num_slots, feature_map.needs_values)
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


def lifts(control: dict[str, float], treatment: dict[str, float]) -> dict[str, float]:
    """Relative improvement of the treatment over a control: ``t / c - 1`` for each rate of
    :data:`RATES` the two records hold (CTR, CVR, expected CTR)."""
    return {k: treatment[k] / control[k] - 1.0 for k in RATES if k in control and k in treatment}


def _total(days: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole test pooled: downloads / impressions, downloads per user per day, and the
    expected downloads / impressions."""
    out: dict[str, Any] = {}
    for name in ARMS:
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


def abtest_markdown(results: dict[str, Any]) -> str:
    """abtest.md: which LR is the baseline, then one table per rate."""
    parts = [baseline_note(results["setup"]["baseline"]["crosses"])]
    for rate, title in RATE_TITLES.items():
        parts += [f"## {title}", abtest_table(results, rate)]
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_abtest(results: dict[str, Any], out: str | Path) -> list[Path]:
    """abtest.json, abtest.md and abtest.png under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "abtest.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "abtest.md").write_text(abtest_markdown(results))
    return [out / "abtest.json", out / "abtest.md", plot_abtest(results, out / "abtest.png")]
