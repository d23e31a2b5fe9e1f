"""``deepfm prepare``: stream raw files into an encoded store (see :mod:`deepfm.data.prepare`)."""

from __future__ import annotations

import argparse
import json
import sys

from deepfm.cli import add_flag


def register_commands(subparsers) -> None:
    from deepfm.cli import add_fitting_options, add_format_options
    from deepfm.data.formats import format_descriptions

    formats = format_descriptions()
    parser = subparsers.add_parser(
        "prepare",
        help="stream raw files into an encoded store (bounded memory)",
        description="Read raw files once, fit the feature map on the training rows, and write "
        "the encoded splits as memory-mapped arrays plus a JSON manifest. Formats: "
        + "; ".join(f"{k}: {v}" for k, v in formats.items()),
    )
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="input files or glob patterns ('logs/day_*.gz'); .gz and .zst are read as streams",
    )
    add_flag(parser, "--out", required=True, metavar="STORE", help="store directory to write")
    add_format_options(parser)
    add_fitting_options(parser)
    add_flag(parser, "--seed", default=0, help="seed of the random split")
    add_flag(parser, "--overwrite", help="replace an existing store")
    parser.add_argument("--block-mb", type=int, default=16, help="bytes parsed per block (MiB)")
    add_flag(
        parser,
        "--workers",
        help="worker processes parsing and encoding (default: the cores; 1: this process)",
    )
    parser.add_argument(
        "--memory-mb",
        type=int,
        default=256,
        help="memory for counting values, all workers together (past it, sorted runs go to disk)",
    )
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="files per split array; a DDP rank of a world dividing it reads whole shards",
    )
    add_flag(parser, "--json", help="print the summary as JSON")
    add_flag(parser, "--quiet", help="no progress messages")
    parser.set_defaults(handler=cmd_prepare)


def cmd_prepare(args: argparse.Namespace) -> int:
    from deepfm.cli import format_options
    from deepfm.data.formats import get_format
    from deepfm.data.prepare import prepare_store, print_summary
    from deepfm.data.reader import BadRows
    from deepfm.data.schema import load_schema
    from deepfm.data.splits import SplitSpec
    from deepfm.errors import ConfigError

    if not 1 <= args.block_mb <= 4096:
        raise ConfigError("--block-mb must be in 1..4096 (MiB read and parsed at once)")
    schema = load_schema(args.schema) if args.schema else None
    data_format = get_format(args.format or "criteo", schema, **format_options(args))
    split = SplitSpec.parse(args.split or "random:0.9")
    say = None if args.quiet else (lambda text: print(text, file=sys.stderr))
    result = prepare_store(
        data_format,
        args.input,
        args.out,
        split=split,
        valid_fraction=args.valid_fraction,
        seed=args.seed,
        min_count=args.min_count,
        hash_buckets=args.hash_buckets,
        bad_rows=BadRows(args.bad_rows),
        overwrite=args.overwrite,
        block_bytes=args.block_mb << 20,
        workers=args.workers,
        memory_mb=args.memory_mb,
        shards=args.shards,
        progress=say,
    )
    manifest = result.manifest
    if not manifest["labeled"]:
        print(
            f"note: the input has no label column ({data_format.schema.label!r}): the store is "
            "unlabeled, for scoring only",
            file=sys.stderr,
        )
    if args.json:
        keys = ("rows", "bad_rows", "rows_per_s", "seconds", "num_features", "distinct_values")
        print(json.dumps({k: manifest[k] for k in keys} | {"store": str(result.path)}))
    else:
        print_summary(manifest)
        print(f"store written to {result.path}", file=sys.stderr)
    return 0
