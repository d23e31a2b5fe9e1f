"""A simulated app market whose click model is known: the embedded default data.

The market has apps (id, category, cumulative downloads with a heavy-tailed law), users (id,
gender, age group, a hidden type, a download history of apps of the type's favourite categories)
and a context (hour of day, weekday). The true click probability of an impression is
``sigmoid(logit)`` with

* order-1 effects: an app's quality and popularity, a user's activity, the hour of day;
* order-2 interactions: app category × hour (food-delivery apps at meal times, news in the
  morning, games at night: the paper's example) and download history × category (users click
  apps like the ones they already have);
* order-3 interactions: gender × age group × category (male teenagers and shooting/RPG games:
  the paper's example; young women and social/shopping apps);
* a low-rank random user × app term, so the task is not trivially separable.

Every row carries ``p_true``, so the oracle AUC and Logloss on any split can be computed: the best
any model can reach.

**Days.** :meth:`AppMarket.add_arrivals` makes the market grow over a week: new apps and new users
are appended (drawn from their own seeded stream, so the apps and users of day 1 stay exactly as
they are) with the day they arrive. :meth:`AppMarket.day_impressions` logs one day: its users
and apps only, a new app shown more on its launch day (the store's "new apps" shelf), and a
``day`` column (``--split time:day``).

Generation streams in fixed chunks seeded by ``(seed, chunk index)``, so the same seed gives the
same rows whatever the number of rows, without holding them all at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv

from deepfm.common import sigmoid
from deepfm.data.schema import FieldSpec, Schema
from deepfm.outputs import atomic_path

CATEGORIES = (
    "food_delivery",
    "shooting",
    "rpg",
    "social",
    "shopping",
    "news",
    "music",
    "education",
    "travel",
    "finance",
    "tools",
    "puzzle",
)
GENDERS = ("M", "F")
AGE_GROUPS = ("teen", "young", "adult", "senior")
#: Each user type favours two categories; its history is drawn from them.
TYPE_CATEGORIES = ((1, 2), (3, 4), (5, 9), (6, 11), (7, 8), (0, 10))
CHUNK_ROWS = 65_536
HISTORY_LENGTH = 5
#: how much more a new app is shown on its launch day (the "new apps" shelf of the store)
LAUNCH_BOOST = 8.0

APP_MARKET_SCHEMA = Schema(
    fields=(
        FieldSpec("user_id", min_count=20),
        FieldSpec("gender"),
        FieldSpec("age"),
        FieldSpec("history", kind="multi", separator="|", pooling="mean", max_len=HISTORY_LENGTH),
        FieldSpec("app_id"),
        FieldSpec("category"),
        FieldSpec("downloads", kind="numeric"),
        FieldSpec("hour"),
        FieldSpec("weekday"),
    ),
    label="label",
    min_count=1,
)
#: the fields of each planted order-2 effect (see ``AppMarket.logit``), as crosses of an LR:
#: category × hour (meal, morning and night apps) and history × category
PLANTED_CROSSES = ("category×hour", "history×category")
USER_FIELDS = ("user_id", "gender", "age", "history")
APP_FIELDS = ("app_id", "category", "downloads")
CONTEXT_FIELDS = ("hour", "weekday")


@dataclass(frozen=True)
class MarketConfig:
    """Size and strength of the simulated market (defaults: the demo's market)."""

    n_apps: int = 400
    n_users: int = 20000
    n_types: int = len(TYPE_CATEGORIES)
    latent_dim: int = 4
    bias: float = -2.6
    history_weight: float = 3.0
    triple_weight: float = 3.0
    meal_weight: float = 2.0
    latent_scale: float = 0.15


class AppMarket:
    """Users, apps and the true click model, fixed by ``seed``."""

    def __init__(
        self,
        seed: int = 0,
        config: MarketConfig | None = None,
        user_types: np.ndarray | None = None,
    ) -> None:
        self.config = config = config or MarketConfig()
        rng = np.random.default_rng([seed, 0xA99])
        n_apps = config.n_apps
        self.app_category = rng.integers(0, len(CATEGORIES), n_apps)
        self.app_downloads = np.floor(1000 * (rng.pareto(1.1, n_apps) + 1)).astype(np.int64)
        log_downloads = np.log(self.app_downloads)
        self._popularity_scale = (log_downloads.mean(), log_downloads.std())
        self.app_popularity = (log_downloads - log_downloads.mean()) / log_downloads.std()
        self.app_quality = rng.normal(0.0, 0.3, n_apps)
        self.app_latent = rng.normal(0.0, 1.0, (n_apps, config.latent_dim))

        if user_types is None:
            user_types = rng.integers(0, config.n_types, config.n_users)
        self.user_type = np.asarray(user_types, dtype=np.int64)
        n_users = len(self.user_type)
        self.user_gender = rng.integers(0, len(GENDERS), n_users)
        self.user_age = rng.choice(len(AGE_GROUPS), n_users, p=[0.25, 0.35, 0.28, 0.12])
        self.user_activity = rng.normal(0.0, 0.3, n_users)
        self.user_latent = rng.normal(0.0, 1.0, (n_users, config.latent_dim))
        self.user_history = self._draw_histories(rng)
        # share of each user's history in each category: [users, categories]
        onehot = np.eye(len(CATEGORIES))[self.app_category[self.user_history]]
        self.history_share = onehot.mean(axis=1)
        self.exposure = np.exp(0.6 * self.app_popularity)
        self.exposure /= self.exposure.sum()
        # the day each app and user arrives (1: from the start; add_arrivals appends later ones)
        self.app_day = np.ones(n_apps, np.int64)
        self.user_day = np.ones(n_users, np.int64)

    @property
    def n_users(self) -> int:
        return len(self.user_type)

    @property
    def n_apps(self) -> int:
        return len(self.app_category)

    def _draw_histories(self, rng: np.random.Generator) -> np.ndarray:
        """Each user downloaded HISTORY_LENGTH distinct apps of the type's favourite categories."""
        histories = np.empty((self.n_users, HISTORY_LENGTH), dtype=np.int64)
        weight = np.exp(0.5 * self.app_popularity)
        for kind, categories in enumerate(TYPE_CATEGORIES[: self.config.n_types]):
            members = np.flatnonzero(self.user_type == kind)
            pool = np.flatnonzero(np.isin(self.app_category, categories))
            p = weight[pool] / weight[pool].sum()
            for user in members:
                histories[user] = rng.choice(pool, HISTORY_LENGTH, replace=False, p=p)
        return histories

    def add_arrivals(
        self, days: int, apps_per_day: int, users_per_day: int, seed: int = 0
    ) -> AppMarket:
        """Append ``apps_per_day`` new apps and ``users_per_day`` new users on each of days
        ``2 .. days`` (drawn like the first ones, from a stream of their own; a new user's
        history holds apps that exist on its day). Returns self."""
        rng = np.random.default_rng([seed, 0xA77])
        c = self.config
        n = apps_per_day * max(days - 1, 0)
        mean, std = self._popularity_scale
        downloads = np.floor(1000 * (rng.pareto(1.1, n) + 1)).astype(np.int64)
        self.app_category = np.concatenate([self.app_category, rng.integers(0, len(CATEGORIES), n)])
        self.app_downloads = np.concatenate([self.app_downloads, downloads])
        self.app_popularity = np.concatenate(
            [self.app_popularity, (np.log(downloads) - mean) / std]
        )
        self.app_quality = np.concatenate([self.app_quality, rng.normal(0.0, 0.3, n)])
        self.app_latent = np.concatenate([self.app_latent, rng.normal(0.0, 1.0, (n, c.latent_dim))])
        self.app_day = np.concatenate(
            [self.app_day, np.repeat(np.arange(2, days + 1), apps_per_day)]
        )
        self.exposure = np.exp(0.6 * self.app_popularity)
        self.exposure /= self.exposure.sum()

        m = users_per_day * max(days - 1, 0)
        types = rng.integers(0, c.n_types, m) if m else np.zeros(0, np.int64)
        arrival = np.repeat(np.arange(2, days + 1), users_per_day)
        weight = np.exp(0.5 * self.app_popularity)
        histories = np.empty((m, HISTORY_LENGTH), dtype=np.int64)
        for user, (kind, day) in enumerate(zip(types, arrival, strict=True)):
            pool = np.flatnonzero(
                np.isin(self.app_category, TYPE_CATEGORIES[kind]) & (self.app_day <= day)
            )
            histories[user] = rng.choice(
                pool, HISTORY_LENGTH, replace=False, p=weight[pool] / weight[pool].sum()
            )
        self.user_type = np.concatenate([self.user_type, types])
        self.user_gender = np.concatenate([self.user_gender, rng.integers(0, len(GENDERS), m)])
        self.user_age = np.concatenate(
            [self.user_age, rng.choice(len(AGE_GROUPS), m, p=[0.25, 0.35, 0.28, 0.12])]
        )
        self.user_activity = np.concatenate([self.user_activity, rng.normal(0.0, 0.3, m)])
        self.user_latent = np.concatenate(
            [self.user_latent, rng.normal(0.0, 1.0, (m, c.latent_dim))]
        )
        self.user_history = np.concatenate([self.user_history, histories])
        self.user_day = np.concatenate([self.user_day, arrival])
        onehot = np.eye(len(CATEGORIES))[self.app_category[self.user_history]]
        self.history_share = onehot.mean(axis=1)
        return self

    def apps_on(self, day: int) -> np.ndarray:
        """The apps that exist on ``day``."""
        return np.flatnonzero(self.app_day <= day)

    def users_on(self, day: int) -> np.ndarray:
        """The users that exist on ``day``."""
        return np.flatnonzero(self.user_day <= day)

    # -- the true click model ------------------------------------------------------------------

    def logit(
        self, user: np.ndarray, app: np.ndarray, hour: np.ndarray, weekday: np.ndarray
    ) -> np.ndarray:
        """True logit of impressions (all arguments broadcast to one shape)."""
        c = self.config
        category = self.app_category[app]
        order1 = (
            self.app_quality[app]
            + 0.35 * self.app_popularity[app]
            + self.user_activity[user]
            + 0.25 * np.sin((hour - 8) / 24 * 2 * np.pi)
            + 0.1 * (weekday >= 5)
        )
        meal = np.isin(hour, (11, 12, 13, 18, 19, 20))
        morning = (hour >= 6) & (hour <= 9)
        night = (hour >= 21) | (hour <= 1)
        gaming = np.isin(category, (1, 2, 11))
        order2 = (
            np.where(category == 0, np.where(meal, c.meal_weight, -0.8), 0.0)
            + np.where((category == 5) & morning, 1.2, 0.0)
            + np.where(gaming & night, 0.8, 0.0)
            + c.history_weight * (self.history_share[user, category] - 0.3)
        )
        male = self.user_gender[user] == 0
        age = self.user_age[user]
        games, social = np.isin(category, (1, 2)), np.isin(category, (3, 4))
        # signs flip with gender inside an age group, so every pairwise marginal (gender ×
        # category, age × category) nearly cancels: only a model of the triple conjunction
        # (the deep component) can use it. Male teenagers and shooting/RPG games is the
        # paper's example.
        flip = np.where(male, 1.0, -1.0)
        order3 = (
            c.triple_weight
            * flip
            * (
                games * np.select([age == 0, age == 2], [1.0, -0.6], 0.0)
                + social * np.select([age == 1, age == 3], [-0.7, 0.5], 0.0)
            )
        )
        latent = c.latent_scale * np.einsum(
            "...d,...d->...", self.user_latent[user], self.app_latent[app]
        )
        return c.bias + order1 + order2 + order3 + latent

    def click_probability(self, user, app, hour, weekday) -> np.ndarray:
        return sigmoid(self.logit(np.asarray(user), np.asarray(app), hour, weekday))

    # -- rows ----------------------------------------------------------------------------------

    def impressions(
        self, rng: np.random.Generator, n: int, day: int | None = None
    ) -> dict[str, np.ndarray]:
        """Random impressions: users uniform, apps by exposure (popular apps shown more); with
        ``day``, of the users and apps that exist on that day only (any weekday)."""
        hour_profile = 1.0 + 0.6 * np.sin((np.arange(24) - 8) / 24 * 2 * np.pi)
        if day is None:
            user, app = (
                rng.integers(0, self.n_users, n),
                rng.choice(self.n_apps, n, p=self.exposure),
            )
        else:
            users, apps = self.users_on(day), self.apps_on(day)
            exposure = self.exposure[apps] / self.exposure[apps].sum()
            user, app = users[rng.integers(0, len(users), n)], rng.choice(apps, n, p=exposure)
        return {
            "user": user,
            "app": app,
            "hour": rng.choice(24, n, p=hour_profile / hour_profile.sum()),
            "weekday": rng.integers(0, 7, n),
        }

    def day_impressions(self, rng: np.random.Generator, n: int, day: int) -> dict[str, np.ndarray]:
        """Impressions of ``day`` (1-based; weekday ``(day - 1) % 7``): the users and apps of
        that day, apps by exposure with the apps launched that day shown ``LAUNCH_BOOST``
        times more."""
        hour_profile = 1.0 + 0.6 * np.sin((np.arange(24) - 8) / 24 * 2 * np.pi)
        apps, users = self.apps_on(day), self.users_on(day)
        exposure = self.exposure[apps] * np.where(self.app_day[apps] == day, LAUNCH_BOOST, 1.0)
        return {
            "user": users[rng.integers(0, len(users), n)],
            "app": rng.choice(apps, n, p=exposure / exposure.sum()),
            "hour": rng.choice(24, n, p=hour_profile / hour_profile.sum()),
            "weekday": np.full(n, (day - 1) % 7),
        }

    def generate_day(self, day: int, rows: int, seed: int = 0) -> pa.Table:
        """``rows`` labeled impressions of ``day`` with a ``day`` column."""
        rng = np.random.default_rng([seed, 0xDA7E, day])
        draw = self.day_impressions(rng, rows, day)
        table = self.table(draw["user"], draw["app"], draw["hour"], draw["weekday"], rng)
        return table.append_column("day", pa.array(np.full(rows, day, np.int64)))

    def table(
        self,
        user: np.ndarray,
        app: np.ndarray,
        hour: np.ndarray,
        weekday: np.ndarray,
        rng: np.random.Generator | None = None,
    ) -> pa.Table:
        """Raw records of impressions with ``p_true``, and a drawn ``label`` if ``rng`` is given."""
        p = self.click_probability(user, app, hour, weekday)
        history_text = np.array(["|".join(f"a{a}" for a in h) for h in self.user_history])
        columns = {
            "user_id": _strings("u", user),
            "gender": _dictionary(GENDERS, self.user_gender[user]),
            "age": _dictionary(AGE_GROUPS, self.user_age[user]),
            "history": pa.array(history_text[user]),
            "app_id": _strings("a", app),
            "category": _dictionary(CATEGORIES, self.app_category[app]),
            "downloads": pa.array(self.app_downloads[app].astype(np.float64)),
            "hour": _strings("h", hour),
            "weekday": _strings("d", weekday),
            "user_type": pa.array(self.user_type[user]),
            "p_true": pa.array(p),
        }
        if rng is not None:
            columns["label"] = pa.array((rng.random(len(p)) < p).astype(np.float32))
        return pa.table(columns)

    def generate(self, rows: int, seed: int = 0, day: int | None = None) -> Iterator[pa.Table]:
        """``rows`` labeled impressions in chunks of at most CHUNK_ROWS rows (with ``day``: of
        that day's users and apps, :meth:`impressions`)."""
        for index, start in enumerate(range(0, rows, CHUNK_ROWS)):
            rng = np.random.default_rng([seed, 0x515, index])
            draw = self.impressions(rng, min(CHUNK_ROWS, rows - start), day)
            yield self.table(draw["user"], draw["app"], draw["hour"], draw["weekday"], rng)


def _strings(prefix: str, ids: np.ndarray) -> pa.Array:
    """Ids as dictionary-encoded strings ``prefix<id>`` (one string per distinct id)."""
    distinct, inverse = np.unique(ids, return_inverse=True)
    dictionary = pa.array([f"{prefix}{i}" for i in distinct])
    return pa.DictionaryArray.from_arrays(pa.array(inverse.astype(np.int32)), dictionary)


def _dictionary(names: tuple[str, ...], codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32)), pa.array(names))


def write_csv(path: str | Path, rows: int, seed: int = 0, market_seed: int | None = None) -> Path:
    """Write ``rows`` generated impressions as CSV (the ``appmarket`` format), streaming."""
    market = AppMarket(seed if market_seed is None else market_seed)
    return write_tables(path, market.generate(rows, seed))


def market_days(
    days: int,
    rows_per_day: int,
    *,
    apps_per_day: int = 0,
    users_per_day: int = 0,
    seed: int = 0,
    config: MarketConfig | None = None,
) -> tuple[AppMarket, list[pa.Table]]:
    """A market that grows over ``days`` (``apps_per_day`` new apps and ``users_per_day`` new
    users arrive on each day after the first, :meth:`AppMarket.add_arrivals`) and
    ``rows_per_day`` logged impressions of each day (:meth:`AppMarket.generate_day`)."""
    market = AppMarket(seed, config).add_arrivals(days, apps_per_day, users_per_day, seed)
    return market, [market.generate_day(day, rows_per_day, seed) for day in range(1, days + 1)]


def write_tables(path: str | Path, tables) -> Path:
    """Write generated impression tables as CSV (the ``appmarket`` format: fields, label,
    ``p_true`` and ``day`` when the tables have it), streaming to a temporary file renamed into
    place when complete (:func:`deepfm.outputs.atomic_path`)."""
    with atomic_path(path) as tmp:
        writer = None
        try:
            for table in tables:
                extra = ["day"] if "day" in table.column_names else []
                table = table.select([*APP_MARKET_SCHEMA.names, "label", "p_true", *extra])
                table = pa.table(
                    {
                        n: c.cast(c.type.value_type) if pa.types.is_dictionary(c.type) else c
                        for n, c in zip(table.column_names, table.columns, strict=True)
                    }
                )
                if writer is None:
                    writer = pa_csv.CSVWriter(str(tmp), table.schema)
                writer.write_table(table)
        finally:
            if writer is not None:
                writer.close()
    return Path(path)
