"""``deepfm <command>``: the command-line interface.

Core commands live here; other steps of the data flow add theirs through ``register_commands``
in the modules listed in ``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deepfm import __version__
from deepfm.errors import ConfigError, DeepFMError, DeepFMWarning, OutputError

COMMAND_MODULES: tuple[str, ...] = (
    # one module per line; each defines register_commands(subparsers)
    "deepfm.data.commands",
    "deepfm.models.commands",
    "deepfm.experiments.online_commands",
    "deepfm.experiments.study_commands",
    "deepfm.serve.commands",
)


# -- shared options ----------------------------------------------------------------------------


def parse_hidden(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(s) for s in text.replace("-", ",").split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"hidden sizes like 400,400,400, not {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError("hidden sizes must be positive integers")
    return sizes


#: flags that several commands take, each defined once: its type and its one meaning (a
#: command gives its own default and says it in its help). Command-specific flags stay with
#: their command; ``tests/test_flags.py`` checks that a name means one thing everywhere.
FLAGS: dict[str, dict[str, Any]] = {
    "--out": {"help": "output directory"},
    "--seed": {"type": int, "help": "random seed"},
    "--seeds": {"type": int, "help": "runs per setting, with seeds --seed, --seed + 1, ..."},
    "--threads": {"type": int, "help": "torch CPU threads (fix for reproducible results)"},
    "--quiet": {"action": "store_true", "help": "no progress output"},
    "--json": {"action": "store_true", "help": "print JSON"},
    "--hidden": {"type": parse_hidden, "help": "hidden layer sizes, e.g. 400,400,400"},
    "--rows": {"type": int, "help": "rows (impressions) to generate"},
    "--models": {"help": "comma list of registry names (see `deepfm models`)"},
    "--epochs": {"type": int, "help": "most epochs (early stopping may end sooner)"},
    "--batch-size": {"type": int, "help": "rows per training step"},
    "--workers": {"type": int, "help": "processes working together"},
    "--store": {"help": "a store written by `deepfm prepare`"},
    "--split": {"help": "random:0.9, sequential:6/7, time:COLUMN or none"},
    "--runtime": {"choices": ("torch", "onnx"), "default": "torch", "help": "scoring runtime"},
    "--preset": {"help": "the paper's Table III settings: criteo-random, criteo-sequential"},
    "--overwrite": {"action": "store_true", "help": "replace an existing output"},
    "--embed-dim": {"type": int, "help": "embedding size"},
    "--crosses": {"metavar": "AxB,...", "help": "field crosses of LR, e.g. 'C1×C2,I1×C3'"},
    "--valid-fraction": {"type": float, "help": "share of the training rows kept for validation"},
    "--min-count": {"type": int, "help": "rare values → OOV"},
    "--decay": {
        "type": float,
        "help": "weight of the counts carried from earlier data when a vocabulary grows "
        "(count = new count + decay x carried count; default 0.9: a window of ~10 updates)",
    },
    "--days": {"type": int, "help": "days to simulate"},
    "--new-apps": {"type": int, "help": "apps launched each later day"},
    "--new-users": {"type": int, "help": "users joining each later day"},
    "--daily-epochs": {"type": int, "help": "most epochs of a warm-started daily update"},
}


def add_flag(parser, name: str, **settings: Any) -> None:
    """Add the shared flag ``name`` (:data:`FLAGS`) with this command's ``settings`` (default,
    help, required, metavar)."""
    parser.add_argument(name, **{**FLAGS[name], **settings})


def add_model_options(parser: argparse.ArgumentParser, *, model_flag: bool = True) -> None:
    """Model flags. Their defaults are None so that ``model_config_from`` can tell a flag given
    on the command line (it wins) from a preset's value; read them through that function.
    ``model_flag=False`` leaves out ``--model`` (for commands that take several models)."""
    from deepfm.models import ModelConfig

    default = ModelConfig()
    group = parser.add_argument_group("model")
    if model_flag:
        group.add_argument("--model", default="deepfm", help="registry name (see `deepfm models`)")
    add_flag(
        group,
        "--preset",
        help="model settings of the paper's Table III: criteo-random or criteo-sequential "
        "(or a YAML file); flags given explicitly override it",
    )
    add_flag(
        group,
        "--embed-dim",
        help="embedding size; default is the paper's: k=10 for FM/DeepFM, k+1 for DNN-family",
    )
    add_flag(
        group,
        "--hidden",
        help="hidden layer sizes of the deep part, e.g. 400,400,400 (default "
        f"{','.join(map(str, default.hidden))})",
    )
    group.add_argument("--activation", help=f"relu or tanh (default {default.activation})")
    group.add_argument(
        "--dropout",
        type=float,
        help="drop rate of the deep part (the paper quotes keep probability = 1 - dropout; "
        f"default {default.dropout})",
    )
    group.add_argument(
        "--l2", type=float, help=f"L2 on the FM part (rows used per batch; default {default.l2})"
    )
    if model_flag:
        add_flag(
            group,
            "--crosses",
            help="lr only: field crosses, each with its own weight table, e.g. "
            "'C1×C2,I1×C3' (× or * or x between two field names)",
        )
    group.add_argument(
        "--cross-buckets",
        type=int,
        help="weights of a hashed cross table: poly2's, or an lr cross with more pairs of "
        f"values than that (default {default.cross_buckets:,})",
    )


class _BundleFlag(argparse.Action):
    """``--bundle DIR``; ``--model DIR``, its former name, still works with a note."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        if option_string == "--model":
            print(
                "note: --model DIR is deprecated where it names a bundle: use --bundle DIR "
                "(--model names a registry model in train and the studies)",
                file=sys.stderr,
            )
        setattr(namespace, self.dest, values)


def add_bundle_option(parser: argparse.ArgumentParser) -> None:
    """The bundle a command reads (evaluate, predict, serve, rank, export). It was ``--model``,
    which in ``train`` and the studies is a registry name: one flag, two meanings. ``--bundle``
    is now the name; ``--model`` stays as a deprecated alias so that scripts keep working."""
    parser.add_argument(
        "--bundle",
        "--model",
        dest="bundle",
        required=True,
        metavar="DIR",
        action=_BundleFlag,
        help="bundle directory (written by train or CTRClassifier.save; --model DIR: deprecated)",
    )


def add_field_flag(group, config: Any, name: str, text: str, **settings: Any) -> None:
    """``--<name>`` (dashes for underscores) for the field ``name`` of the dataclass instance
    ``config``, whose value is the default: the flag's name and default are the field's."""
    default = getattr(config, name)  # a name that is no field fails here, at start-up
    group.add_argument(f"--{name.replace('_', '-')}", default=default, help=text, **settings)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags: each names a TrainConfig field (``--quiet`` is ``progress`` off)
    and defaults to its value; ``train_config_from`` reads them back by name."""
    from deepfm.train.distributed import LR_SCALINGS
    from deepfm.train.trainer import (
        CALIBRATIONS,
        DEEP_ID_PRIOR,
        EMBEDDING_UPDATES,
        MONITORS,
        PRECISIONS,
        TrainConfig,
    )

    default = TrainConfig()
    group = parser.add_argument_group("training")
    add_flag(group, "--epochs", default=default.epochs)
    add_flag(group, "--batch-size", default=default.batch_size)
    add_field_flag(
        group, default, "lr", "learning rate (default: Adam 3e-3; FTRL alpha 0.05)", type=float
    )
    add_field_flag(
        group,
        default,
        "patience",
        "stop after this many epochs without a better validation score",
        type=int,
    )
    add_field_flag(
        group,
        default,
        "monitor",
        "validation score of early stopping and lr decay (default: AUC)",
        choices=MONITORS,
    )
    add_field_flag(
        group,
        default,
        "calibration",
        "beta (default): fit a monotone map of the logits (beta calibration: "
        "b*softplus(s) - a*softplus(-s) + c) on the validation rows, kept in the bundle and "
        "applied by every scoring path; none: the raw model",
        choices=CALIBRATIONS,
    )
    add_field_flag(
        group,
        default,
        "id_prior",
        "L2 on each id's embedding and weight whatever its count (a Gaussian prior: each use "
        "carries ID_PRIOR / the id's count in the training rows), trained once early stopping "
        "would end the run without it, from its best epoch, and kept if validation prefers "
        f"it; default: {DEEP_ID_PRIOR:g} for a model with a deep component, 0 for the others",
        type=float,
    )
    add_flag(group, "--seed", default=default.seed)
    add_flag(group, "--threads", help="torch CPU threads (fix for reproducibility)")
    add_flag(group, "--quiet", help="no progress bars")
    speed = parser.add_argument_group("speed, scale and checkpoints")
    add_field_flag(speed, default, "device", "auto, cpu, cuda or cuda:N")
    add_field_flag(speed, default, "precision", "bf16: CUDA only", choices=PRECISIONS)
    add_field_flag(speed, default, "compile", "torch.compile the model", action="store_true")
    add_field_flag(
        speed,
        default,
        "embedding_updates",
        "Adam on whole tables, or on the rows a batch uses (auto: per device)",
        choices=EMBEDDING_UPDATES,
    )
    add_field_flag(
        speed,
        default,
        "sync_loading",
        "prepare each batch when it is needed",
        action="store_true",
    )
    add_field_flag(
        speed,
        default,
        "lr_scaling",
        "with N processes (torchrun), multiply the learning rate by sqrt(N) or N",
        choices=LR_SCALINGS,
    )
    add_field_flag(
        speed,
        default,
        "checkpoint_every",
        "write a checkpoint every STEPS steps to <--out>.checkpoints (0: none)",
        type=int,
        metavar="STEPS",
    )
    add_field_flag(speed, default, "resume", "continue from the checkpoints in DIR", metavar="DIR")


def add_data_options(parser: argparse.ArgumentParser, *, fitting: bool) -> None:
    """``--data`` files and how they are read (train, evaluate, predict); ``fitting`` adds
    ``--store``, ``--test`` and the fitting options."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", nargs="+", required=not fitting, metavar="PATH", help="input file(s)"
    )
    add_format_options(group)
    if fitting:
        add_flag(group, "--store", help="a store written by `deepfm prepare` (instead of --data)")
        group.add_argument("--test", nargs="+", metavar="PATH", help="test file(s)")
        add_fitting_options(group)


def add_format_options(group) -> None:
    """How raw files are read: one definition for train, evaluate, predict and prepare."""
    from deepfm.data.formats import format_names

    group.add_argument(
        "--format",
        choices=format_names(),
        help="input format (default criteo; evaluate and predict: the bundle's)",
    )
    group.add_argument("--schema", help="YAML schema (needed by --format csv and parquet)")
    group.add_argument(
        "--bad-rows",
        choices=("error", "skip"),
        default="error",
        help="stop on the first malformed row (default) or skip and count malformed rows",
    )
    group.add_argument(
        "--ratings", help="movielens-100k: the ratings file, e.g. ua.test (default u.data)"
    )
    group.add_argument("--featindex", help="ipinyou: feature dictionary (default: beside data)")


def add_fitting_options(group) -> None:
    """How rows are split and the feature map fitted: train and prepare."""
    add_flag(
        group,
        "--split",
        help="random:0.9 (default), sequential:6/7, time:COLUMN (the rows of the last time are the "
        "test rows, e.g. time:day), or none; train: ignored with --test",
    )
    add_flag(
        group,
        "--valid-fraction",
        default=0.1,
        help="share of the training part kept for validation (sequential: its last rows)",
    )
    add_flag(group, "--min-count", help="rare values → OOV (criteo default 10)")
    group.add_argument(
        "--hash-buckets",
        type=int,
        metavar="N",
        help="hash every categorical field with more than N distinct training values into N "
        "buckets (no vocabulary; distinct values may share an id)",
    )


def format_options(args: argparse.Namespace) -> dict[str, Any]:
    """The format-specific options of :func:`add_format_options` (for ``get_format``)."""
    return {"ratings": args.ratings, "featindex": args.featindex}


def option_dests(add_options: Callable[[argparse.ArgumentParser], None]) -> tuple[str, ...]:
    """The names the flags of ``add_options`` are parsed into (read off a throwaway parser):
    what a command reads back follows the option function, with no list of names to keep."""
    parser = argparse.ArgumentParser(add_help=False)
    add_options(parser)
    return tuple(action.dest for action in parser._actions)


def fields_of(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The parsed flags named like a field of the dataclass ``config``: a command whose flags
    all belong to one config reads them this way, with no list of names."""
    return {f.name: getattr(args, f.name) for f in fields(config) if hasattr(args, f.name)}


def config_flags(
    args: argparse.Namespace, add_options: Callable[[argparse.ArgumentParser], None], config: type
) -> dict[str, Any]:
    """:func:`fields_of`, of the flags of ``add_options`` only (a command with flags of several
    configs; ``tests/test_flags.py`` checks the other flags of those groups are not fields
    under another name)."""
    dests = set(option_dests(add_options))
    return {k: v for k, v in fields_of(args, config).items() if k in dests}


def model_config_from(args: argparse.Namespace):
    """The model config: ModelConfig defaults < ``--preset`` values < flags given explicitly."""
    from deepfm.models import ModelConfig
    from deepfm.models.presets import Preset, load_preset

    preset = load_preset(args.preset) if getattr(args, "preset", None) else Preset("none")
    if preset.assumed:
        print(f"note: preset {preset.name}: {preset.description}", file=sys.stderr)
    return preset.model_config(
        args.model or "deepfm", **config_flags(args, add_model_options, ModelConfig)
    )


def train_config_from(args: argparse.Namespace):
    """The TrainConfig of the flags of :func:`add_train_options` (``--quiet`` is ``progress``
    off). Checkpoints go beside the bundle, to ``<--out>.checkpoints`` (the bundle directory
    is replaced as a whole when it is written), or back into the ``--resume`` directory."""
    from deepfm.train.trainer import TrainConfig

    options = config_flags(args, add_train_options, TrainConfig)
    out = getattr(args, "out", None)
    if options.get("checkpoint_every") and not options.get("resume") and out:
        options["checkpoint_dir"] = f"{Path(out)}.checkpoints"
    return TrainConfig(progress=not args.quiet, **options)


def data_format_from(args: argparse.Namespace, default: str = "criteo"):
    from deepfm.data.formats import get_format
    from deepfm.data.schema import load_schema

    schema = load_schema(args.schema) if args.schema else None
    return get_format(args.format or default, schema, **format_options(args))


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def print_json(data: Any, *, indent: int | None = 2) -> None:
    """Strict JSON on stdout (a non-finite number is printed as null, with a warning)."""
    from deepfm.outputs import json_text

    print(json_text(data, indent=indent, name="output"), end="")


# -- commands ----------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from deepfm.experiments.demo import DEMO_FILES, results_table, run_demo
    from deepfm.models import ModelConfig
    from deepfm.outputs import claim_results
    from deepfm.train.trainer import TrainConfig

    if not 100 <= args.rows <= 100_000_000:
        raise ConfigError(f"--rows must be in 100..100,000,000, got {args.rows:,}")
    config = TrainConfig(
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        epochs=args.epochs,
        batch_size=args.batch_size,
    )
    model_config = ModelConfig(hidden=args.hidden)
    claim_results(args.out, "demo", own_files=DEMO_FILES)
    results = run_demo(
        args.rows, args.seed, args.out, train_config=config, model_config=model_config
    )
    rows = results["rows"]
    print(
        f"\nApp market: {rows['train']:,} train / {rows['valid']:,} valid / "
        f"{rows['test']:,} test rows (seed {args.seed})\n"
    )
    print(results_table(results))
    print(f"\nwrote {Path(args.out) / 'results.json'} and learning_curves.png")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from deepfm.train.distributed import Distributed, process_group_session

    model_config = model_config_from(args)
    train_config = train_config_from(args)
    context = Distributed.from_env(train_config.device)  # torchrun: join the process group
    with process_group_session():
        if context.is_main:
            claim_train_outputs(args, train_config)
        return _train(args, model_config, train_config, context)


def input_paths(args: argparse.Namespace) -> list[str]:
    """Every path a command reads (its outputs must be none of them)."""
    names = ["data", "test", "store", "schema", "resume", "input", "config", "space", "preset"]
    names += ["bundle", "warm_start"]  # a bundle read (``--model`` is a registry name)
    paths: list[str] = []
    for name in names:
        value = getattr(args, name, None)
        if value:
            paths += value if isinstance(value, list) else [value]
    return [p for p in paths if Path(p).exists()]  # a preset's name is not a path


def claim_train_outputs(args: argparse.Namespace, train_config) -> None:
    """Before any data is read: the bundle directory (and the checkpoint directory) may be
    written; with --overwrite, a new run's old checkpoints are removed."""
    from deepfm.outputs import BUNDLE, CHECKPOINTS, claim_directory
    from deepfm.train import checkpoint as ckpt

    inputs = input_paths(args)
    claim_directory(args.out, BUNDLE, overwrite=args.overwrite, inputs=inputs)
    directory = train_config.checkpoint_dir
    if directory and not train_config.resume:
        claim_directory(directory, CHECKPOINTS, inputs=inputs, flag="checkpoint directory")
        if args.overwrite and ckpt.has_checkpoint(directory):
            ckpt.clear(directory)
        ckpt.start_directory(directory)


def _train(args, model_config, train_config, context) -> int:
    from deepfm.data.growth import DEFAULT_DECAY, check_decay
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.reader import BadRows
    from deepfm.data.splits import SplitSpec
    from deepfm.serve.bundle import lineage_of, save_bundle
    from deepfm.train.run import fit_and_evaluate

    parent = _warm_start_parent(args, model_config) if args.warm_start else None
    decay = check_decay(DEFAULT_DECAY if args.decay is None else args.decay)
    if args.decay is not None and parent is None:
        raise ConfigError("--decay sets how a warm start grows vocabularies: add --warm-start")
    if parent is not None:
        model_config = parent.config
    if args.store:
        if parent is not None:
            raise ConfigError(
                "--warm-start grows the parent's feature map with raw rows: give --data, "
                "not --store (a store's map is fixed when it is prepared)"
            )
        dataset, format_name = _store_dataset(args)
    else:
        if not args.data:
            raise ConfigError("give the training data: --data PATH... or --store STORE")
        if parent is not None:
            data_format = _format_of_parent(args, parent)
        else:
            data_format = data_format_from(args)
        format_name = data_format.name
        if args.test and args.split not in (None, "none"):
            raise ConfigError("give either --test or --split, not both")
        split = SplitSpec.parse("none" if args.test else (args.split or "random:0.9"))
        dataset = load_dataset(
            data_format,
            args.data,
            split=split,
            valid_fraction=args.valid_fraction,
            seed=args.seed,
            bad_rows=BadRows(args.bad_rows),
            min_count=args.min_count,
            hash_buckets=args.hash_buckets,
            test_paths=args.test,
            base=parent.feature_map if parent is not None else None,
            decay=decay,
        )
    if args.auto is not None:
        from deepfm.experiments.tune import auto_train

        if context.enabled:
            raise ConfigError("--auto runs in one process: start it without torchrun")
        trained, train_config, search = auto_train(
            dataset, model_config, train_config, args.auto, say=_say
        )
        trained.metrics["auto"] = search
    else:
        trained = fit_and_evaluate(
            dataset, model_config, train_config, parent=parent.parent if parent else None
        )
    metrics = trained.metrics
    if not context.is_main:
        return 0  # rank 0 writes the bundle and the metrics
    seen = {
        "paths": [str(Path(p).resolve()) for p in (args.data or [args.store])],
        "bytes": [_size(p) for p in (args.data or [args.store])],
        "rows": dataset.rows(),
        "format": format_name,
        "split": args.split or ("none" if args.test else "random:0.9"),
    }
    if dataset.time_range is not None:
        seen["time_range"] = list(dataset.time_range)
    extra = {}
    if parent is not None:
        extra = {
            "optimizer_state": trained.fit.setup.get("optimizer_state", "fresh"),
            "added": dataset.growth.added if dataset.growth else {},
            "decay": decay,
        }
    out = save_bundle(
        args.out,
        trained.model,
        trained.config,
        dataset.feature_map,
        data_format=format_name,
        metrics=metrics,
        train_config=train_config.to_dict(),
        overwrite=args.overwrite,
        inputs=input_paths(args),
        lineage=lineage_of(seen, parent.bundle if parent else None, **extra),
        optimizer_state=None if args.no_optimizer_state else trained.fit.optimizer_state,
        onnx=args.onnx,
    )
    summary = {k: metrics[k] for k in ("valid", "test", "rows", "growth") if k in metrics}
    if "fallback" in metrics["setup"]:  # DeepFM kept its LR on too few validation rows
        summary["fallback_kept"] = metrics["setup"]["fallback"]["kept"]
    speed = metrics["train_samples_per_s"]
    summary["train_samples_per_s"] = round(speed) if math.isfinite(speed) else None
    print_json(summary)
    print(f"bundle written to {out}", file=sys.stderr)
    return 0


def _size(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


@dataclass
class _WarmStart:
    bundle: Any  # the loaded parent bundle (serve.bundle.Bundle)
    parent: Any  # what the trainer continues (train.run.Parent)

    @property
    def config(self):
        return self.parent.config

    @property
    def feature_map(self):
        return self.parent.feature_map


def _warm_start_parent(args: argparse.Namespace, model_config) -> _WarmStart:
    """The bundle of ``--warm-start``: the model, its settings and feature map are the parent's
    (model flags and --min-count/--hash-buckets/--schema would change them: refused)."""
    from deepfm.serve.bundle import load_bundle, load_optimizer_state
    from deepfm.train.run import Parent

    given = [
        flag
        for flag, value in (
            ("--model", args.model),
            ("--preset", getattr(args, "preset", None)),
            ("--embed-dim", args.embed_dim),
            ("--hidden", args.hidden),
            ("--activation", args.activation),
            ("--dropout", args.dropout),
            ("--l2", args.l2),
            ("--crosses", args.crosses),
            ("--cross-buckets", args.cross_buckets),
            ("--min-count", args.min_count),
            ("--hash-buckets", args.hash_buckets),
            ("--schema", args.schema),
            ("--resume", args.resume),
            ("--auto", args.auto),
        )
        if value is not None
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot be combined with --warm-start: the model, its settings "
            "and its fields are the parent bundle's"
        )
    bundle = load_bundle(args.warm_start)
    state = load_optimizer_state(bundle)
    return _WarmStart(bundle, Parent(bundle.model, bundle.config, bundle.feature_map, state))


def _format_of_parent(args: argparse.Namespace, parent: _WarmStart):
    """The parent's input format, reading its schema (``--format`` may name another reader of
    the same fields)."""
    from deepfm.data.formats import get_format

    return get_format(args.format or parent.bundle.data_format, parent.feature_map.schema)


def _store_dataset(args: argparse.Namespace):
    """(memory-mapped splits of ``--store``, its format name); data options must be absent."""
    from deepfm.data.store import Store

    given = [
        flag
        for flag, value in (
            ("--data", args.data),
            ("--test", args.test),
            ("--split", args.split),
            ("--min-count", args.min_count),
            ("--hash-buckets", args.hash_buckets),
            ("--schema", args.schema),
            ("--format", args.format),
            ("--ratings", args.ratings),
            ("--featindex", args.featindex),
        )
        if value
    ]
    if given:
        raise ConfigError(
            f"{', '.join(given)} cannot be combined with --store: the store fixed its data, "
            "split and feature map when it was prepared"
        )
    store = Store.open(args.store)
    if not store.labeled:
        raise ConfigError(f"store {args.store} has no labels: training needs labeled rows")
    return store.dataset(), store.manifest["data_format"]


def _bundle_and_rows(args: argparse.Namespace):
    from deepfm.data.formats import get_format
    from deepfm.data.pipeline import encode_files
    from deepfm.data.reader import BadRows
    from deepfm.serve.bundle import load_bundle

    bundle = load_bundle(args.bundle)
    if args.format and args.format != bundle.data_format:
        print(
            f"note: reading {args.format} data with a model trained on {bundle.data_format}",
            file=sys.stderr,
        )
    data_format = get_format(
        args.format or bundle.data_format, bundle.feature_map.schema, **format_options(args)
    )
    bad_rows = BadRows(args.bad_rows)
    encoded = encode_files(bundle.feature_map, data_format, args.data, bad_rows)
    return bundle, encoded, bad_rows


def cmd_evaluate(args: argparse.Namespace) -> int:
    from deepfm.train.trainer import Batches, evaluate

    bundle, encoded, bad_rows = _bundle_and_rows(args)
    if encoded.labels is None:
        raise ConfigError("the data has no label column: use `deepfm predict` for unlabeled rows")
    result = {**evaluate(bundle.model, Batches(encoded)), "rows": len(encoded)}
    result["bad_rows"] = bad_rows.total
    if args.json:
        print_json(result, indent=None)
    else:
        print(
            f"AUC {result['auc']:.5f}  Logloss {result['logloss']:.5f}  "
            f"rows {result['rows']:,}  bad rows {result['bad_rows']:,}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np

    from deepfm.outputs import atomic_path, claim_file
    from deepfm.train.trainer import Batches, predict_proba

    if len(args.data) != 1:
        raise ConfigError("predict reads one file, so that output lines match input rows")
    target = claim_file(args.out, overwrite=args.overwrite, inputs=input_paths(args))
    bundle, encoded, bad_rows = _bundle_and_rows(args)
    probabilities = predict_proba(bundle.model, Batches(encoded))
    # one output line per input row, in order; a skipped (bad) row gets "nan"
    lines = np.union1d(encoded.lines, np.asarray(bad_rows.lines, dtype=np.int64))
    out = np.full(len(lines), np.nan)
    out[np.searchsorted(lines, encoded.lines)] = probabilities
    with atomic_path(target) as tmp:
        np.savetxt(tmp, out, fmt="%.7f")
    print(
        f"wrote {len(out):,} probabilities to {args.out} (bad rows: {bad_rows.total})",
        file=sys.stderr,
    )
    return 0


# -- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepfm", description="CTR prediction with DeepFM (Guo et al.) and its baselines"
    )
    parser.add_argument("--version", action="version", version=f"deepfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    demo = sub.add_parser("demo", help="LR, FM and DeepFM-D on the simulated app market")
    add_flag(demo, "--rows", default=200_000, help="generated impressions")
    add_flag(demo, "--seed", default=0)
    add_flag(demo, "--out", default="runs/demo", help="output directory")
    add_flag(demo, "--threads")
    add_flag(demo, "--epochs", default=30, help="at most (early stopping)")
    add_flag(demo, "--batch-size", default=1024)
    add_flag(demo, "--hidden", default=(400, 400, 400), help="DeepFM-D's deep part")
    add_flag(demo, "--quiet")
    demo.set_defaults(handler=cmd_demo)

    train = sub.add_parser("train", help="train a model and write a bundle")
    add_data_options(train, fitting=True)
    add_model_options(train)
    add_train_options(train)
    add_flag(train, "--out", required=True, help="bundle directory to write")
    train.add_argument(
        "--auto",
        type=float,
        metavar="MINUTES",
        help="search the settings around the defaults (Optuna, validation AUC) for at most "
        "MINUTES in all; the chosen ones go into the bundle",
    )
    add_flag(
        train,
        "--overwrite",
        help="replace the bundle in --out (never anything else) and start its checkpoints anew",
    )
    update = train.add_argument_group("daily updates (README: Updating a model daily)")
    update.add_argument(
        "--warm-start",
        metavar="BUNDLE",
        help="continue BUNDLE on the new --data: its vocabularies grow with the new values, old "
        "ids keep their rows, the optimiser continues if BUNDLE saved its state",
    )
    add_flag(update, "--decay")
    update.add_argument(
        "--no-optimizer-state",
        action="store_true",
        help="leave the optimiser's state out of the bundle (smaller; a warm start from it "
        "starts a fresh optimiser)",
    )
    train.add_argument(
        "--onnx",
        action="store_true",
        help="also store the model as ONNX in the bundle (model.onnx): serve and the ONNX "
        "runtime then load it instead of exporting the model at start; costs the export's "
        "seconds and about the weights' size again",
    )
    train.set_defaults(handler=cmd_train, model=None)  # None: deepfm, or the parent's

    for name, handler, text in (
        ("evaluate", cmd_evaluate, "AUC and Logloss of a bundle on labeled data"),
        ("predict", cmd_predict, "one click probability per input row"),
    ):
        command = sub.add_parser(name, help=text)
        add_bundle_option(command)
        add_data_options(command, fitting=False)
        if name == "evaluate":
            add_flag(command, "--json", help="print one JSON object")
        else:
            add_flag(command, "--out", required=True, help="output file")
            add_flag(command, "--overwrite", help="replace an existing --out file")
        command.set_defaults(handler=handler)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register_commands(sub)
    return parser


#: commands whose module registers them without importing torch: ``deepfm <name> ...`` builds
#: only their parser, so the streaming ``prepare`` starts in a fraction of a second and small
#: (the full parser imports torch and scikit-learn: ~3 s and ~300 MB of RSS)
LIGHT_COMMANDS: dict[str, str] = {"prepare": "deepfm.data.commands"}


def _light_parser(argv: Sequence[str]) -> argparse.ArgumentParser | None:
    if not argv or argv[0] not in LIGHT_COMMANDS:
        return None
    parser = argparse.ArgumentParser(prog="deepfm")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    importlib.import_module(LIGHT_COMMANDS[argv[0]]).register_commands(sub)
    return parser


#: exit statuses: 2 a refused input or option (a one-line message says which), 1 the system
#: failed the command (disk full, no permission, out of memory), 70 a bug in deepfm (the
#: traceback goes to a file; DEEPFM_DEBUG=1 prints it), 130 interrupted
EXIT_REFUSED, EXIT_SYSTEM, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 70, 130
DEBUG_ENV = "DEEPFM_DEBUG"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _light_parser(argv) or build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error argparse has printed
        return exc.code if isinstance(exc.code, int) else EXIT_REFUSED
    name = f"deepfm {args.command}"
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeepFMWarning)  # once per place and message
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, DeepFMWarning):
                print(f"{name}: warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        return _run(name, args)


def _run(name: str, args: argparse.Namespace) -> int:
    """Run the command; every failure becomes one line on stderr and an exit status."""
    try:
        return int(args.handler(args) or 0)
    except DeepFMError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return EXIT_SYSTEM if isinstance(exc, OutputError) else EXIT_REFUSED
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if _out_of_memory(exc):
            print(f"{name}: error: out of memory ({_first_line(exc)})", file=sys.stderr)
            return EXIT_SYSTEM
        if isinstance(exc, OSError):
            where = f": {exc.filename}" if exc.filename else ""
            print(f"{name}: error: {exc.strerror or exc}{where}", file=sys.stderr)
            return EXIT_SYSTEM
        if os.environ.get(DEBUG_ENV):
            raise
        report = _save_traceback(exc)
        print(
            f"{name}: internal error ({type(exc).__name__}: {_first_line(exc)}): this is a bug "
            f"in deepfm; the traceback is in {report} ({DEBUG_ENV}=1 prints it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _save_traceback(exc: BaseException) -> str:
    import tempfile
    import time
    import traceback

    text = "".join(traceback.format_exception(exc))
    try:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        handle, path = tempfile.mkstemp(prefix=f"deepfm-error-{stamp}-", suffix=".txt")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(f"deepfm {__version__}, argv {sys.argv!r}\n{text}")
        return path
    except OSError:
        return "(not saved: the temporary directory is not writable)"
