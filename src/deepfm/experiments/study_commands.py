"""The paper's offline studies as commands: ``compare``, ``efficiency``, ``sweep``, ``tune``,
``workers``, ``report``, and ``market-store`` (a store of the simulated app market to study on).

Every study takes ``--out DIR``, writes ``DIR/<command>.json`` (all numbers), ``.md`` and ``.csv``
tables and ``.png`` plots (each with its data as JSON beside it), caches each finished training
run in ``DIR/runs`` (so that a study started again reuses them) and refreshes ``DIR/report.md``.
Settings are layered: defaults < ``--preset`` < ``--config FILE`` < flags given explicitly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from deepfm.cli import add_flag
from deepfm.errors import ConfigError

MODELS_HELP = "comma list of registry names (default: Table IV's 13; add poly2 by name)"


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- options -------------------------------------------------------------------------------------


def _study_parser(subparsers, name: str, text: str, *, model_flag: bool) -> argparse.ArgumentParser:
    from deepfm.cli import add_model_options, add_train_options, option_dests

    parser = subparsers.add_parser(name, help=text, description=text)
    add_model_options(parser, model_flag=model_flag)
    add_train_options(parser)
    # the trainer flags are overrides when given: their defaults are cleared to None so that a
    # study config's ``train`` values are not silently replaced
    parser.set_defaults(**dict.fromkeys(option_dests(add_train_options)))
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="study config YAML: preset keys (defaults, models; keep_prob) and a 'train' "
        "section of trainer settings, e.g. the best.yaml of `deepfm tune`",
    )
    add_flag(parser, "--out", required=True, metavar="DIR", help="output directory")
    return parser


def _store_option(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    add_flag(
        parser,
        "--store",
        required=required,
        help="a store written by `deepfm prepare` (with test split)",
    )


def _positive(value: int | None, flag: str, most: int | None = None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag} must be at least 1, got {value}")
    if value is not None and most is not None and value > most:
        raise ConfigError(f"{flag} must be at most {most:,}, got {value:,}")


#: upper bounds of counts that size a study up front (each seed or repeat is a training run)
MOST_RUNS, MOST_WORKERS, MOST_ROWS = 1000, 64, 100_000_000


#: what the studies write in their --out (a directory holding only such names is a study's,
#: from before results directories were marked)
STUDY_FILES = (
    *(f"{study}*" for study in ("compare", "efficiency", "sweep", "tune", "workers")),
    *("report.md", "runs", "stores", "random", "sequential", "best.yaml", "space.yaml"),
)


def _settings(args: argparse.Namespace):
    """(study config, model overrides, train overrides) from the parsed flags; the --out
    directory is claimed (a new, empty or results directory; never an input)."""
    from deepfm.cli import input_paths
    from deepfm.experiments.runs import study_config
    from deepfm.outputs import claim_results

    for flag in ("checkpoint_every", "resume"):
        if getattr(args, flag, None):
            raise ConfigError(
                f"--{flag.replace('_', '-')} does not apply to studies: each finished run is "
                "cached in --out DIR/runs, so running the same command again resumes the study"
            )
    _positive(args.threads, "--threads")
    config = study_config(args.preset, args.config)
    inputs = [*input_paths(args), *([args.criteo] if getattr(args, "criteo", None) else [])]
    claim_results(args.out, args.command, inputs=inputs, own_files=STUDY_FILES)
    if config.preset.assumed:
        _say(f"note: preset {config.preset.name}: {config.preset.description}")
    return config, *study_overrides(args)


def study_overrides(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model, train) settings given as flags: those named like a ModelConfig field, and
    those named like a TrainConfig field a study config may set (``runs.TRAIN_KEYS``)."""
    from deepfm.cli import add_model_options, add_train_options, config_flags
    from deepfm.experiments.runs import TRAIN_KEYS
    from deepfm.models import ModelConfig
    from deepfm.train.trainer import TrainConfig

    model = config_flags(args, add_model_options, ModelConfig)
    train = config_flags(args, add_train_options, TrainConfig)
    return (
        {k: v for k, v in model.items() if v is not None},
        {k: v for k, v in train.items() if k in TRAIN_KEYS and v is not None},
    )


def _run_options(
    args: argparse.Namespace, model: dict[str, Any], train: dict[str, Any]
) -> dict[str, Any]:
    """What every study passes on to its runs: the model and trainer overrides of the flags
    (:func:`study_overrides`, after the study's own checks) and whether to show progress."""
    return {"model_overrides": model, "train_overrides": train, "progress": not args.quiet}


def _seeds(args: argparse.Namespace, count: int) -> list[int]:
    _positive(count, "--seeds", MOST_RUNS)
    base = args.seed or 0
    return list(range(base, base + count))


def _finish(out: str | Path, paths_text: str) -> None:
    from deepfm.experiments.report import write_report

    report = write_report(out)
    print(f"\nwrote {paths_text} in {out}; report: {report}")


# -- handlers ------------------------------------------------------------------------------------


def cmd_compare(args: argparse.Namespace) -> int:
    from deepfm.experiments.compare import (
        TABLE_IV_MODELS,
        compare_markdown,
        run_compare,
        run_criteo_protocols,
    )
    from deepfm.experiments.runs import parse_models, study_config

    if bool(args.store) == bool(args.criteo):
        raise ConfigError("give either --store STORE or --criteo FILE")
    models = parse_models(args.models, TABLE_IV_MODELS)
    seeds = _seeds(args, args.seeds)
    config, model, train = _settings(args)
    options: dict[str, Any] = {"models": models, "seeds": seeds, **_run_options(args, model, train)}
    if args.criteo:
        # each protocol has its Table III preset unless a preset or config is given
        given = args.preset or args.config
        run_criteo_protocols(
            args.criteo,
            args.out,
            data_format=args.criteo_format,
            config=study_config(args.preset, args.config) if given else None,
            **options,
        )
        print((Path(args.out) / "compare.md").read_text(encoding="utf-8"))
    else:
        summary = run_compare(args.store, args.out, config=config, **options)
        print(compare_markdown(summary, f"Model comparison on {Path(args.store).name}"))
    _finish(args.out, "compare.json, compare.md, compare.csv, compare_metrics.png")
    return 0


def cmd_efficiency(args: argparse.Namespace) -> int:
    from deepfm.experiments.compare import TABLE_IV_MODELS
    from deepfm.experiments.efficiency import (
        DEFAULT_EPOCHS,
        efficiency_table,
        run_efficiency,
    )
    from deepfm.experiments.runs import markdown_table, parse_models

    _positive(args.repeats, "--repeats", MOST_RUNS)
    config, model, train = _settings(args)
    epochs = train.pop("epochs", None) or int(config.train.get("epochs", DEFAULT_EPOCHS))
    summary = run_efficiency(
        args.store,
        args.out,
        models=parse_models(args.models, TABLE_IV_MODELS),
        config=config,
        epochs=epochs,
        repeats=args.repeats,
        seed=args.seed or 0,
        **_run_options(args, model, train),
    )
    print(f"\n{summary['about']}\n")
    print(markdown_table(*efficiency_table(summary)))
    _finish(args.out, "efficiency.json, efficiency.md, efficiency.csv, efficiency_relative.png")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from deepfm.experiments.runs import parse_models
    from deepfm.experiments.sweep import DEFAULT_MODELS, parse_values, run_sweep, sweep_tables

    values = parse_values(args.param, args.values)
    for flag in ("width", "depth", "total"):
        _positive(getattr(args, flag), f"--{flag}")
    config, model, train = _settings(args)
    swept = {"activation": "activation", "dropout": "dropout"}.get(args.param, "hidden")
    if swept in model:
        raise ConfigError(f"--{swept} is what --param {args.param} varies: leave it out")
    entry = run_sweep(
        args.store,
        args.out,
        param=args.param,
        models=parse_models(args.models, DEFAULT_MODELS),
        values=values,
        seeds=_seeds(args, args.seeds),
        config=config,
        width=args.width,
        depth=args.depth,
        total=args.total,
        **_run_options(args, model, train),
    )
    print(sweep_tables(args.param, entry))
    _finish(args.out, f"sweep.json, sweep.md, sweep.csv, sweep_{args.param}.png")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from deepfm.experiments.tune import load_space, run_tune

    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("deepfm tune needs Optuna: pip install 'deepfm[tune]'") from None
    _positive(args.trials, "--trials")
    if args.timeout is not None and not 0 < args.timeout < float("inf"):
        raise ConfigError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    space = load_space(args.space)
    config, model, train = _settings(args)
    summary = run_tune(
        args.store,
        args.out,
        model=args.model,
        space=space,
        trials=args.trials,
        timeout=args.timeout,
        seed=args.seed or 0,
        config=config,
        **_run_options(args, model, train),
    )
    best = summary["best"]
    print(
        f"\nbest of {len(summary['trials'])} trials: #{best['number']} validation AUC "
        f"{best['valid_auc']:.5f} with {best['params']}"
    )
    _finish(args.out, "tune.json, tune.md, tune.csv, tune_history.png, best.yaml")
    return 0


def cmd_workers(args: argparse.Namespace) -> int:
    from deepfm.experiments.runs import markdown_table
    from deepfm.experiments.workers import DEFAULT_EPOCHS, run_workers

    _positive(args.workers, "--workers", MOST_WORKERS)
    _positive(args.eval_every, "--eval-every")
    _positive(args.eval_rows, "--eval-rows")
    config, model, train = _settings(args)
    if "lr_scaling" in train:
        raise ConfigError("--lr-scaling: the workers study runs both none and sqrt itself")
    epochs = train.pop("epochs", None) or int(config.train.get("epochs", DEFAULT_EPOCHS))
    summary = run_workers(
        args.store,
        args.out,
        model=args.model,
        workers=args.workers,
        config=config,
        epochs=epochs,
        eval_every=args.eval_every,
        eval_rows=args.eval_rows,
        seed=args.seed or 0,
        **_run_options(args, model, train),
    )
    rows = [
        [label, r["world"], f"{r['lr']:.5g}", r["steps"],
         f"{r['final']['auc']:.4f}", f"{r['final']['logloss']:.4f}"]
        for label, r in summary["runs"].items()
    ]  # fmt: skip
    header = ["run", "processes", "lr", "steps", "final test AUC", "final test Logloss"]
    print("\n" + markdown_table(header, rows))
    _finish(args.out, "workers.json, workers.md, workers.csv, workers_curves.png")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from deepfm.experiments.report import write_report

    print(f"wrote {write_report(args.run_dir)}")
    return 0


def cmd_market_store(args: argparse.Namespace) -> int:
    from deepfm.experiments.runs import prepare_market_store

    _positive(args.rows, "--rows", MOST_ROWS)
    path = prepare_market_store(
        args.out, args.rows, seed=args.seed, split=args.split, overwrite=args.overwrite
    )
    print(f"store written to {path}")
    return 0


# -- registration --------------------------------------------------------------------------------


def register_commands(subparsers) -> None:
    from deepfm.experiments.sweep import DEFAULT_DEPTH, DEFAULT_TOTAL, PARAMS

    compare = _study_parser(
        subparsers,
        "compare",
        "models × seeds on one store: Table IV (AUC, Logloss mean ± std), Table V (DeepFM over "
        "its FM and deep components), Welch t-test p-values",
        model_flag=False,
    )
    _store_option(compare, required=False)
    compare.add_argument(
        "--criteo",
        metavar="FILE",
        help="instead of --store: run the paper's two Criteo protocols (random 9:1, sequential "
        "6:1, each with its Table III preset) on this Criteo-format file",
    )
    compare.add_argument(
        "--criteo-format", default="criteo", choices=("criteo", "criteo-csv"), help="of --criteo"
    )
    add_flag(
        compare,
        "--models",
        help="comma list of registry names (default: Table IV's 13; poly2 too if named)",
    )
    add_flag(compare, "--seeds", default=5, help="runs per model: seeds from --seed")
    compare.set_defaults(handler=cmd_compare)

    efficiency = _study_parser(
        subparsers,
        "efficiency",
        "training time per epoch of each model relative to LR's (Fig. 9)",
        model_flag=False,
    )
    _store_option(efficiency)
    add_flag(
        efficiency,
        "--models",
        help="comma list of registry names (default: Table IV's 13; poly2 too if named)",
    )
    efficiency.add_argument(
        "--repeats", type=int, default=1, help="timed runs per model (median; default 1)"
    )
    efficiency.epilog = "--epochs: epochs timed per run (default 2; early stopping is off)"
    efficiency.set_defaults(handler=cmd_efficiency)

    sweep = _study_parser(
        subparsers,
        "sweep",
        "one hyper-parameter at a time (Sec. IV-C, Fig. 10-14): activation, keep probability, "
        "neurons per layer, hidden layers, network shape",
        model_flag=False,
    )
    _store_option(sweep)
    sweep.add_argument("--param", required=True, choices=PARAMS, help="what to vary")
    sweep.add_argument(
        "--values",
        help="comma list instead of the paper's values (dropout: keep probabilities; shape: "
        "constant,increasing,decreasing,diamond)",
    )
    add_flag(
        sweep, "--models", help="comma list (default: fnn,ipnn,opnn,pnn_star,lr_dnn,fm_dnn,deepfm)"
    )
    add_flag(sweep, "--seeds", default=1, help="runs per point (default 1)")
    sweep.add_argument("--width", type=int, help="layers: neurons per layer (default: --hidden's)")
    sweep.add_argument(
        "--depth", type=int, default=DEFAULT_DEPTH, help="neurons and shape: hidden layers"
    )
    sweep.add_argument(
        "--total", type=int, default=DEFAULT_TOTAL, help="shape: neurons over all layers"
    )
    sweep.set_defaults(handler=cmd_sweep)

    tune = _study_parser(
        subparsers,
        "tune",
        "Optuna search (TPE, median pruning on validation AUC) over a YAML search space; "
        "writes the best config as best.yaml for --config",
        model_flag=True,
    )
    _store_option(tune)
    tune.add_argument("--space", metavar="FILE", help="search space YAML (default: see tune.md)")
    tune.add_argument("--trials", type=int, default=20, help="finished trials wanted (default 20)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds")
    tune.set_defaults(handler=cmd_tune)

    workers = _study_parser(
        subparsers,
        "workers",
        "learning curves of 1 worker, N workers, and N workers at sqrt(N) x lr (Fig. 6)",
        model_flag=True,
    )
    _store_option(workers)
    add_flag(workers, "--workers", default=2, help="processes N (default 2)")
    workers.add_argument("--eval-every", type=int, help="steps between test evaluations")
    workers.add_argument(
        "--eval-rows", type=int, help="score only the first rows of the test split"
    )
    workers.epilog = "--epochs: epochs of each run (default 3; early stopping is off)"
    workers.set_defaults(handler=cmd_workers)

    report = subparsers.add_parser(
        "report", help="one Markdown file linking every table and plot of the studies in RUN_DIR"
    )
    report.add_argument("run_dir", metavar="RUN_DIR", help="a study's --out (or a folder above)")
    report.set_defaults(handler=cmd_report)

    market = subparsers.add_parser(
        "market-store", help="a store of the simulated app market (the demo data) for studies"
    )
    add_flag(market, "--rows", default=200_000, help="impressions (default 200k)")
    add_flag(market, "--seed", default=0, help="market, impressions and split")
    add_flag(market, "--split", default="random:0.9", help="random:0.9 or sequential:6/7")
    add_flag(market, "--out", required=True, metavar="STORE", help="store directory")
    add_flag(market, "--overwrite", help="replace an existing store")
    market.set_defaults(handler=cmd_market_store)
