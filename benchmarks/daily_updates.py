"""Daily updates on the app market (issue 16's "Done means"): 7 days with new apps and users
arriving every day; train on days <= t, test on day t + 1, for the warm-started DeepFM-D, one
retrained from scratch every day and the frozen day-1 model.

Bars checked (and printed): warm mean next-day AUC >= retrain - 0.002; total warm update time
<= 1/3 of retraining's; frozen day-1 clearly below both; apps launched on a day get their own ids
in the warm model and are ranked by it the next day.

    python benchmarks/daily_updates.py                  # the recorded size (a few minutes)
    python benchmarks/daily_updates.py --rows 5000 --days 3   # a smoke run

Writes benchmarks/results/daily_updates.json (with the load average and the machine) unless
``--out`` says otherwise. Times are wall seconds of each update (dataset + training) measured in
the same run, so the ratio is fair on a noisy machine; CPU seconds are reported beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from deepfm.data.formats import get_format
from deepfm.data.reader import BadRows
from deepfm.data.synthetic import MarketConfig, market_days, write_tables
from deepfm.experiments.daily import daily_table, run_daily, split_days
from deepfm.experiments.simulate import ONLINE_MODEL
from deepfm.train.trainer import TrainConfig


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--rows", type=int, default=30_000, help="impressions per day")
    parser.add_argument("--apps", type=int, default=300, help="apps on day 1")
    parser.add_argument("--users", type=int, default=3000, help="users on day 1")
    parser.add_argument("--new-apps", type=int, default=15, help="apps arriving each later day")
    parser.add_argument("--new-users", type=int, default=150, help="users arriving each day")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs of a retraining")
    parser.add_argument("--daily-epochs", type=int, default=2, help="most epochs of a warm day")
    parser.add_argument("--hidden", default="200,200,200")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/daily_updates.json")
    args = parser.parse_args()

    hidden = tuple(int(h) for h in args.hidden.split(","))
    config = MarketConfig(n_apps=args.apps, n_users=args.users)
    _, tables = market_days(
        args.days,
        args.rows,
        apps_per_day=args.new_apps,
        users_per_day=args.new_users,
        seed=args.seed,
        config=config,
    )
    with tempfile.TemporaryDirectory() as folder:
        path = write_tables(Path(folder) / "week.csv", tables)  # read back as a user would
        data_format = get_format("appmarket").keep_columns(["day"])
        days = split_days(list(data_format.read([path], BadRows())), "day")
    load_before = os.getloadavg()
    started, cpu = time.perf_counter(), cpu_seconds()
    results = run_daily(
        days,
        data_format.schema,
        ONLINE_MODEL.replace(hidden=hidden),
        TrainConfig(
            epochs=args.epochs, patience=2, seed=args.seed, threads=args.threads, progress=False
        ),
        daily_epochs=args.daily_epochs,
        track="app_id",
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    mean = results["mean"]
    new = [d["new_values"] for d in results["days"][1:]]
    below = mean["frozen"]["auc"] < min(mean["warm"]["auc"], mean["retrain"]["auc"])
    checks = {
        "warm_auc_at_least_retrain_minus_0.002": mean["auc_gap"] >= -0.002,
        "warm_time_at_most_a_third": mean["time_ratio"] <= 1 / 3,
        "frozen_below_both": below,
        "new_apps_get_ids": all(n["with_ids"] == n["new"] for n in new),
        "new_apps_ranked_next_day": all(n["shown_next_day"] > 0 for n in new),
    }
    results["benchmark"] = {
        "command": "python " + " ".join(sys.argv),
        "args": vars(args),
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": cpu_seconds() - cpu,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checks": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(daily_table(results))
    print(f"\nload average before/after: {load_before} / {os.getloadavg()}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'} {name}")
    print(f"wrote {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
