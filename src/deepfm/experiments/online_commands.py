"""``deepfm simulate`` and ``deepfm abtest``: the paper's online experiments on the simulator."""

from __future__ import annotations

import argparse
import sys

from deepfm.cli import add_flag
from deepfm.errors import ConfigError


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise ConfigError(f"list sizes like 5,10,20, not {text!r}") from None
    if not sizes:
        raise ConfigError("give at least one list size, e.g. --lists 5,10,20")
    return sizes


def _hidden(sizes: tuple[int, ...] | None):
    """The online model, with ``--hidden`` (parsed by the CLI's one ``parse_hidden``)."""
    from deepfm.experiments.simulate import ONLINE_MODEL

    return ONLINE_MODEL if sizes is None else ONLINE_MODEL.replace(hidden=sizes)


def _train_config(args: argparse.Namespace):
    from deepfm.experiments.simulate import default_train_configs

    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    return default_train_configs(
        args.seed, threads=args.threads, progress=not args.quiet, epochs=args.epochs
    )


def cmd_simulate(args: argparse.Namespace) -> int:
    from deepfm.cli import fields_of
    from deepfm.experiments.simulate import (
        SimulationConfig,
        baseline_note,
        run_simulation,
        simulation_table,
        test_metrics_table,
        write_simulation,
    )
    from deepfm.outputs import claim_results

    config = SimulationConfig(
        **{**fields_of(args, SimulationConfig), "list_sizes": _sizes(args.lists)}
    )
    train_config, model_config = _train_config(args), _hidden(args.hidden)
    plots = ("personalization.*", "coverage.*", "popularity.*")
    claim_results(args.out, "simulate", own_files=("simulate.*", *plots))
    result = run_simulation(config, train_config=train_config, model_config=model_config, log=_log)
    paths = write_simulation(result, args.out)
    print("\n" + baseline_note(config.crosses) + "\n")
    print(simulation_table(result.metrics) + "\n")
    print(test_metrics_table(result.metrics) + "\n")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_abtest(args: argparse.Namespace) -> int:
    from deepfm.cli import fields_of
    from deepfm.experiments.abtest import ABTestConfig, abtest_markdown, run_abtest, write_abtest
    from deepfm.outputs import claim_results

    config = ABTestConfig(**fields_of(args, ABTestConfig))
    train_config, model_config = _train_config(args), _hidden(args.hidden)
    claim_results(args.out, "abtest", own_files=("abtest.*",))
    results = run_abtest(config, train_config=train_config, model_config=model_config, log=_log)
    paths = write_abtest(results, args.out)
    print("\n" + abtest_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_daily(args: argparse.Namespace) -> int:
    from deepfm.cli import data_format_from, input_paths, model_config_from, train_config_from
    from deepfm.data.growth import DEFAULT_DECAY, check_decay
    from deepfm.data.reader import BadRows
    from deepfm.data.splits import SplitSpec
    from deepfm.experiments.daily import daily_table, run_daily, split_days, write_daily
    from deepfm.outputs import claim_results

    split = SplitSpec.parse(args.split)
    if split.kind != "time":
        raise ConfigError(
            f"deepfm daily orders days by a time column: --split time:COLUMN, not {split}"
        )
    inputs = input_paths(args)
    claim_results(args.out, "daily", inputs=inputs, own_files=("daily.*",))  # before any reading
    data_format = data_format_from(args, default="appmarket")
    data_format.keep_columns([split.column])
    schema = data_format.schema.with_options(args.min_count, None)
    days = split_days(list(data_format.read(args.data, BadRows(args.bad_rows))), split.column)
    _log(f"{len(days)} days of {split.column}: " + ", ".join(d.time for d in days))
    results = run_daily(
        days,
        schema,
        model_config_from(args),
        train_config_from(args),
        daily_epochs=args.daily_epochs,
        valid_fraction=args.valid_fraction,
        decay=check_decay(DEFAULT_DECAY if args.decay is None else args.decay),
        track=args.track,
        log=_log,
    )
    paths = write_daily(results, args.out)
    print("\n" + daily_table(results) + "\n")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_market_csv(args: argparse.Namespace) -> int:
    from deepfm.data.synthetic import AppMarket, MarketConfig, market_days, write_tables
    from deepfm.outputs import claim_file

    if args.days < 1 or args.rows_per_day < 1:
        raise ConfigError("--days and --rows-per-day must be at least 1")
    claim_file(args.out, overwrite=args.overwrite)
    config = MarketConfig(n_apps=args.apps, n_users=args.users)
    if args.days == 1 and not (args.new_apps or args.new_users):
        tables = AppMarket(args.seed, config).generate(args.rows_per_day, args.seed)
    else:
        _, tables = market_days(
            args.days,
            args.rows_per_day,
            apps_per_day=args.new_apps,
            users_per_day=args.new_users,
            seed=args.seed,
            config=config,
        )
    path = write_tables(args.out, tables)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _common(parser: argparse.ArgumentParser, out: str) -> None:
    from deepfm.data.synthetic import PLANTED_CROSSES

    add_flag(parser, "--out", default=out, help=f"output directory (default {out})")
    add_flag(parser, "--seed", default=0, help="market, logs, training and traffic")
    # dest: the config field (SimulationConfig, ABTestConfig), read by name
    parser.add_argument(
        "--types",
        dest="n_types",
        metavar="TYPES",
        type=int,
        default=6,
        help="user types t (at most 6)",
    )
    parser.add_argument("--users-per-type", type=int, default=100, help="users per type n")
    add_flag(
        parser, "--hidden", help="DeepFM-D's deep part, e.g. 400,400,400 (default 200,200,200)"
    )
    add_flag(parser, "--epochs", default=10, help="most epochs of a full training")
    add_flag(parser, "--threads", default=1, help="torch CPU threads (results depend on it)")
    add_flag(parser, "--quiet", help="no training progress")
    add_flag(
        parser,
        "--crosses",
        default=",".join(PLANTED_CROSSES),
        help="the crosses of the engineered LR, the paper's baseline (default: the market's "
        f"planted order-2 effects, {','.join(PLANTED_CROSSES)})",
    )


def register_commands(subparsers) -> None:
    simulate = subparsers.add_parser(
        "simulate",
        help="top-L lists of LR (with and without crosses) and DeepFM-D in the simulated app "
        "market (Fig. 16-18)",
        description="Train the engineered LR (with crosses, the paper's baseline), plain LR and "
        "DeepFM-D on the simulated market's logs and measure every user's top-L list: "
        "personalization@L, coverage@L, popularity@L.",
    )
    _common(simulate, "runs/simulate")
    add_flag(simulate, "--rows", default=150_000, help="logged impressions")
    simulate.add_argument("--lists", default="5,10,20", help="list sizes L, e.g. 5,10,20")
    simulate.add_argument("--hour", type=int, default=15, help="hour of every list request")
    simulate.add_argument("--weekday", type=int, default=2, help="weekday (0-6) of the requests")
    simulate.set_defaults(handler=cmd_simulate)

    abtest = subparsers.add_parser(
        "abtest",
        help="simulated A/B test of DeepFM-D against LR with and without crosses, retrained "
        "daily (Fig. 15)",
        description="Three arms of users see the top-L lists of the engineered LR (with "
        "crosses, the paper's baseline), plain LR or DeepFM-D; downloads follow the true click "
        "model; every model is updated every day: warm-started on the day's logs (default) "
        "or retrained on all logs so far; new apps and users arrive during the week.",
    )
    _common(abtest, "runs/abtest")
    add_flag(abtest, "--days", default=7, help="days of the test")
    abtest.add_argument(
        "--initial-rows", type=int, default=60_000, help="logged impressions before day 1"
    )
    abtest.add_argument("--list-size", type=int, default=10, help="L: apps shown per visit")
    abtest.add_argument(
        "--visit-rate", type=float, default=0.8, help="chance that a user visits on a day"
    )
    add_flag(abtest, "--daily-epochs", default=3)
    abtest.add_argument(
        "--update",
        choices=("warm", "retrain"),
        default="warm",
        help="daily warm starts on the day's logs (vocabularies grow; default) or every model "
        "refitted from scratch on all logs",
    )
    add_flag(abtest, "--new-apps", default=10)
    add_flag(abtest, "--new-users", default=30)
    abtest.add_argument(
        "--shelf-rows",
        type=int,
        default=2000,
        help="daily impressions of the store's own shelf (new apps shown more), logged beside "
        "the arms' lists",
    )
    abtest.set_defaults(handler=cmd_abtest)

    from deepfm.cli import add_data_options, add_model_options, add_train_options

    daily = subparsers.add_parser(
        "daily",
        help="daily updates evaluated in time order: warm-started, retrained and frozen "
        "day-1 models, each tested on the next day",
        description="For every day t of a time column: continue yesterday's model on day t "
        "(vocabularies grow, old ids keep their rows), retrain from scratch on days <= t, and "
        "keep the day-1 model; score all three on day t + 1 (AUC, Logloss, update time).",
    )
    add_data_options(daily, fitting=False)
    add_flag(daily, "--split", default="time:day", help="time:COLUMN (default time:day)")
    add_flag(daily, "--valid-fraction", default=0.1, help="of each update's rows")
    add_flag(daily, "--min-count", help="rare values → OOV (the format's default)")
    add_flag(daily, "--decay")
    add_flag(daily, "--daily-epochs", help="most epochs of a warm update (default: --epochs)")
    daily.add_argument(
        "--track", help="a field whose new values are followed (e.g. app_id): own ids, rank"
    )
    add_flag(daily, "--out", default="runs/daily")
    add_model_options(daily)
    add_train_options(daily)
    daily.set_defaults(handler=cmd_daily)

    market = subparsers.add_parser(
        "market-csv",
        help="write the simulated app market's impressions as CSV (format appmarket), by day",
    )
    add_flag(market, "--out", required=True, help="CSV file to write")
    add_flag(market, "--overwrite", help="replace an existing --out file")
    add_flag(market, "--days", default=1)
    market.add_argument("--rows-per-day", type=int, default=100_000)
    add_flag(market, "--new-apps", default=0)
    add_flag(market, "--new-users", default=0)
    market.add_argument("--apps", type=int, default=400, help="apps on day 1")
    market.add_argument("--users", type=int, default=20_000, help="users on day 1")
    add_flag(market, "--seed", default=0)
    market.set_defaults(handler=cmd_market_csv)
