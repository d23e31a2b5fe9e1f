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
from collections.abc import Sequence
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


def add_model_options(parser: argparse.ArgumentParser, *, model_flag: bool = True) -> None:
    """Model flags. Their defaults are None so that ``model_config_from`` can tell a flag given
    on the command line (it wins) from a preset's value; read them through that function.
    ``model_flag=False`` leaves out ``--model`` (for commands that take several models)."""
    from deepfm.models import ModelConfig

    default = ModelConfig()
    group = parser.add_argument_group("model")
    if model_flag:
        group.add_argument("--model", default="deepfm", help="registry name (see `deepfm models`)")
    group.add_argument(
        "--preset",
        help="model settings of the paper's Table III: criteo-random or criteo-sequential "
        "(or a YAML file); flags given explicitly override it",
    )
    group.add_argument(
        "--embed-dim",
        type=int,
        help="embedding size; default is the paper's: k=10 for FM/DeepFM, k+1 for DNN-family",
    )
    group.add_argument(
        "--hidden",
        type=parse_hidden,
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
        group.add_argument(
            "--crosses",
            metavar="AxB,...",
            help="lr only: field crosses, each with its own weight table, e.g. "
            "'C1×C2,I1×C3' (× or * or x between two field names)",
        )
    group.add_argument(
        "--cross-buckets",
        type=int,
        help="weights of a hashed cross table: poly2's, or an lr cross with more pairs of "
        f"values than that (default {default.cross_buckets:,})",
    )


def add_train_options(parser: argparse.ArgumentParser) -> None:
    from deepfm.train.trainer import MONITORS, TrainConfig

    default = TrainConfig()
    group = parser.add_argument_group("training")
    group.add_argument("--epochs", type=int, default=default.epochs)
    group.add_argument("--batch-size", type=int, default=default.batch_size)
    group.add_argument(
        "--lr", type=float, help="learning rate (default: Adam 3e-3; FTRL alpha 0.05)"
    )
    group.add_argument(
        "--patience",
        type=int,
        default=default.patience,
        help="stop after this many epochs without a better validation score",
    )
    group.add_argument(
        "--monitor",
        choices=MONITORS,
        default=default.monitor,
        help="validation score of early stopping and lr decay (default AUC - Logloss)",
    )
    group.add_argument("--seed", type=int, default=default.seed)
    group.add_argument("--threads", type=int, help="torch CPU threads (fix for reproducibility)")
    group.add_argument("--quiet", action="store_true", help="no progress bars")
    speed = parser.add_argument_group("speed, scale and checkpoints")
    speed.add_argument("--device", default=default.device, help="auto, cpu, cuda or cuda:N")
    speed.add_argument(
        "--precision", choices=("fp32", "bf16"), default=default.precision, help="bf16: CUDA only"
    )
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument(
        "--embedding-updates",
        choices=("auto", "dense", "sparse"),
        default=default.embedding_updates,
        help="Adam on whole tables, or on the rows a batch uses (auto: per device)",
    )
    speed.add_argument(
        "--sync-loading", action="store_true", help="prepare each batch when it is needed"
    )
    speed.add_argument(
        "--lr-scaling",
        choices=("none", "sqrt", "linear"),
        default=default.lr_scaling,
        help="with N processes (torchrun), multiply the learning rate by sqrt(N) or N",
    )
    speed.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="STEPS",
        help="write a checkpoint every STEPS steps to <--out>.checkpoints (0: none)",
    )
    speed.add_argument("--resume", metavar="DIR", help="continue from the checkpoints in DIR")


def add_data_options(parser: argparse.ArgumentParser, *, fitting: bool) -> None:
    from deepfm.data.formats import format_names

    group = parser.add_argument_group("data")
    group.add_argument(
        "--data", nargs="+", required=not fitting, metavar="PATH", help="input file(s)"
    )
    group.add_argument("--format", default=None, choices=format_names(), help="input format")
    group.add_argument("--schema", help="YAML schema (needed by --format csv)")
    group.add_argument(
        "--bad-rows",
        choices=("error", "skip"),
        default="error",
        help="stop on the first malformed row (default) or skip and count malformed rows",
    )
    if fitting:
        group.add_argument(
            "--store", help="a store written by `deepfm prepare` (instead of --data)"
        )
        group.add_argument("--test", nargs="+", metavar="PATH", help="test file(s)")
        group.add_argument(
            "--split",
            default=None,
            help="random:0.9 (default), sequential:6/7, or none; ignored with --test",
        )
        group.add_argument("--valid-fraction", type=float, default=0.1)
        group.add_argument("--min-count", type=int, help="rare values → OOV (criteo default 10)")
        group.add_argument(
            "--hash-buckets",
            type=int,
            metavar="N",
            help="hash every categorical field with more than N distinct training values into "
            "N buckets (no vocabulary)",
        )


def model_config_from(args: argparse.Namespace):
    """The model config: ModelConfig defaults < ``--preset`` values < flags given explicitly."""
    from deepfm.models.presets import Preset, load_preset

    preset = load_preset(args.preset) if getattr(args, "preset", None) else Preset("none")
    if preset.assumed:
        print(f"note: preset {preset.name}: {preset.description}", file=sys.stderr)
    return preset.model_config(
        args.model,
        embed_dim=args.embed_dim,
        hidden=args.hidden,
        activation=args.activation,
        dropout=args.dropout,
        l2=args.l2,
        crosses=args.crosses,
        cross_buckets=args.cross_buckets,
    )


def train_config_from(args: argparse.Namespace):
    from deepfm.train.trainer import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        patience=args.patience,
        monitor=args.monitor,
        seed=args.seed,
        threads=args.threads,
        progress=not args.quiet,
        **speed_options_from(args),
    )


def speed_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields of add_train_options' speed group; checkpoints go beside the
    bundle, to ``<--out>.checkpoints`` (the bundle directory is replaced as a whole when it is
    written), or back into the ``--resume`` directory."""
    names = ("device", "precision", "compile", "embedding_updates", "sync_loading", "lr_scaling")
    names += ("checkpoint_every", "resume")
    options: dict[str, Any] = {name: getattr(args, name) for name in names if hasattr(args, name)}
    out = getattr(args, "out", None)
    if options.get("checkpoint_every") and not options.get("resume") and out:
        options["checkpoint_dir"] = f"{Path(out)}.checkpoints"
    return options


def data_format_from(args: argparse.Namespace, default: str = "criteo"):
    from deepfm.data.formats import get_format
    from deepfm.data.schema import load_schema

    schema = load_schema(args.schema) if args.schema else None
    return get_format(args.format or default, schema)


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
    if args.command in ("predict", "evaluate", "export", "serve", "rank"):
        names.append("model")  # a bundle there; elsewhere a model's name
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
    from deepfm.data.pipeline import load_dataset
    from deepfm.data.reader import BadRows
    from deepfm.data.splits import SplitSpec
    from deepfm.serve.bundle import save_bundle
    from deepfm.train.run import fit_and_evaluate

    if args.store:
        dataset, format_name = _store_dataset(args)
    else:
        if not args.data:
            raise ConfigError("give the training data: --data PATH... or --store STORE")
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
        )
    trained = fit_and_evaluate(dataset, model_config, train_config)
    metrics = trained.metrics
    if not context.is_main:
        return 0  # rank 0 writes the bundle and the metrics
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
    )
    summary = {k: metrics[k] for k in ("valid", "test", "rows") if k in metrics}
    speed = metrics["train_samples_per_s"]
    summary["train_samples_per_s"] = round(speed) if math.isfinite(speed) else None
    print_json(summary)
    print(f"bundle written to {out}", file=sys.stderr)
    return 0


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

    bundle = load_bundle(args.model)
    if args.format and args.format != bundle.data_format:
        print(
            f"note: reading {args.format} data with a model trained on {bundle.data_format}",
            file=sys.stderr,
        )
    data_format = get_format(args.format or bundle.data_format, bundle.feature_map.schema)
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
    demo.add_argument("--rows", type=int, default=200_000, help="generated impressions")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--out", default="runs/demo", help="output directory")
    demo.add_argument("--threads", type=int)
    demo.add_argument("--epochs", type=int, default=30, help="at most (early stopping)")
    demo.add_argument("--batch-size", type=int, default=1024)
    demo.add_argument(
        "--hidden", type=parse_hidden, default=(400, 400, 400), help="DeepFM-D's deep part"
    )
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(handler=cmd_demo)

    train = sub.add_parser("train", help="train a model and write a bundle")
    add_data_options(train, fitting=True)
    add_model_options(train)
    add_train_options(train)
    train.add_argument("--out", required=True, help="bundle directory to write")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the bundle in --out (never anything else) and start its checkpoints anew",
    )
    train.set_defaults(handler=cmd_train)

    for name, handler, text in (
        ("evaluate", cmd_evaluate, "AUC and Logloss of a bundle on labeled data"),
        ("predict", cmd_predict, "one click probability per input row"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("--model", required=True, help="bundle directory")
        add_data_options(command, fitting=False)
        if name == "evaluate":
            command.add_argument("--json", action="store_true", help="print one JSON object")
        else:
            command.add_argument("--out", required=True, help="output file")
            command.add_argument(
                "--overwrite", action="store_true", help="replace an existing --out file"
            )
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
